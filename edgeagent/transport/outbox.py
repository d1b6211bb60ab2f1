"""The agent's `Outbox` once the transport is up: everything goes into the spool first.

Calls are synchronous and cheap: the caller gets its `seq` at once (reserved in memory) and the
row is handed to the outbox's writer thread, which encodes it and writes whatever has queued up in
one SQLite transaction, then wakes the publisher once per batch. So no caller, the event loop
least of all, waits for SQLite or spends time in JSON. The hand-off is bounded (HANDOFF_MAX
entries; when full the oldest is given up and counted in `lost`). A batch that fails because the
file is corrupt moves the spool aside and is written again on a fresh one; one that fails for
another reason (disk full) stays queued, in order, and is retried (`retry_deferred`, and before
the next batch). Drops of a full spool are reported as an `error` event at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from edgeagent.core.errors import SpoolError
from edgeagent.core.logs import Once
from edgeagent.core.protocol import Topics
from edgeagent.transport.spool import Recovered, Spool, encode, is_corruption

log = logging.getLogger(__name__)
_once = Once(log)
T = TypeVar("T")

DROP_REPORT_INTERVAL_S = 60.0
HANDOFF_MAX = 10_000  # entries waiting for the writer (a stalled or full disk); then the oldest go
BATCH_MAX = 500  # rows per transaction
DEFERRED_MAX = HANDOFF_MAX  # the name earlier releases used


@runtime_checkable
class SampleSink(Protocol):
    """Where the telemetry component puts samples (the spool-backed outbox implements it)."""

    def add_sample(self, sample: dict[str, Any]) -> int:
        """Number the sample (`seq`), hand it to be stored durably, return the seq."""


class SpoolOutbox:
    def __init__(self, spool: Spool, topics: Topics) -> None:
        self.spool = spool
        self.topics = topics
        self.wakeup = asyncio.Event()  # rows were added: the publisher looks again
        self.state_wakeup = asyncio.Event()  # a retained state changed
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.lost = 0  # entries given up: the hand-off was full (the disk stalled or kept failing)
        self.batches = 0  # transactions written (figures for the bench)
        self._pending: deque[tuple[Callable[[], object], bool]] = deque()  # (write, is_state)
        self._cond = threading.Condition()
        self._writing = 0  # entries taken by the writer and not finished yet
        self._failing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._recovered: list[Recovered] = []
        self._drops_lock = threading.Lock()
        self._reported_drops = spool.dropped_total
        self._last_drop_report = 0.0

    # -- Outbox protocol
    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        log.log(logging.WARNING if severity != "info" else logging.INFO, "event %s: %s", kind, message,
                extra={"kv": {"kind": kind, "severity": severity}})
        ts = time.time()
        topic = self.topics.events
        self._submit_numbered("event", lambda seq: lambda: self.spool.add_event(
            topic, kind, severity, message, data, ts, seq))

    def put_state(self, topic: str, payload: dict[str, Any]) -> None:
        self._submit(lambda: self.spool.put_state(topic, encode(payload)), state=True)

    def put_message(self, topic: str, payload: dict[str, Any]) -> None:
        self._submit(lambda: self.spool.add_message(topic, encode(payload)))

    # -- SampleSink
    def add_sample(self, sample: dict[str, Any]) -> int:
        return self._submit_numbered("telemetry", lambda seq: lambda: self.spool.add_sample(sample, seq))

    # -- the hand-off
    def _submit_numbered(self, name: str, make: Callable[[int], Callable[[], object]]) -> int:
        """Reserve the next seq of `name` and queue its write in one step: rows are stored in seq
        order whichever threads emit them."""
        with self._cond:
            seq = self.spool.reserve_seq(name)
            self._submit(make(seq))
            return seq

    def _submit(self, op: Callable[[], object], state: bool = False) -> None:
        with self._cond:
            if len(self._pending) >= HANDOFF_MAX:
                self.lost += 1
                if self._writing >= len(self._pending):
                    return  # every waiting entry is in the transaction being written: drop the new one
                del self._pending[self._writing]  # the oldest that the writer has not taken
            self._pending.append((op, state))
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _writer(self) -> None:
        """The writer thread: batches from the hand-off, one transaction each, in order."""
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending and self._closed:
                    return
                if self._failing and not self._closed:
                    # the last batch failed (disk full): retry_deferred() or a new entry wakes us
                    self._cond.wait(1.0)
            if not self._write_pending() and self._closed:
                return  # closing on a disk that refuses writes: what is left stays in memory

    def _write_pending(self) -> bool:
        """Write what is pending, a batch at a time; False when a batch failed (it stays queued)."""
        while True:
            with self._cond:
                n = min(len(self._pending), BATCH_MAX)
                if n == 0:
                    return True
                batch = [self._pending[i] for i in range(n)]
                self._writing = n
            ok = self._attempt(batch)
            if ok:  # before the batch leaves the hand-off: what it reports is pending when flush() looks
                self._after_batch(any(st for _, st in batch), any(not st for _, st in batch))
            with self._cond:
                self._writing = 0
                if ok:
                    for _ in range(n):
                        if self._pending:
                            self._pending.popleft()
                    self.batches += 1
                self._cond.notify_all()
            if not ok:
                return False

    def _after_batch(self, states: bool, rows: bool) -> None:
        if self._failing:
            self._failing = False
            _once.reset("write")
            log.info("spool writes work again", extra={"kv": {"lost": self.lost}})
        if rows:
            self._wake(self.wakeup)
        if states:
            self._wake(self.state_wakeup)
        while self._recovered:
            self.report_recovered(self._recovered.pop(0))
        self.report_drops()

    def _attempt(self, batch: list[tuple[Callable[[], object], bool]]) -> bool:
        try:
            self._transaction(batch)
            return True
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):  # busy, disk full, I/O error: the file itself is fine
                self._warn_failed(exc)
                return False
            try:
                recovered = self.spool.recover(f"{type(exc).__name__}: {exc}")
                self._transaction(batch)
            except (sqlite3.Error, SpoolError) as exc2:
                self._warn_failed(exc2)
                return False
            self._recovered.append(recovered)  # reported once this batch is done, not inside it
            return True
        except SpoolError as exc:
            self._warn_failed(exc)
            return False

    def _transaction(self, batch: list[tuple[Callable[[], object], bool]]) -> None:
        with self.spool.transaction():
            for op, _ in batch:
                op()

    def _warn_failed(self, exc: BaseException) -> None:
        self._failing = True
        _once.warning("write", "spool write failed; keeping entries in memory and retrying",
                      extra={"kv": {"error": str(exc), "deferred": len(self._pending)}})

    def _wake(self, event: asyncio.Event) -> None:
        """Events are not thread-safe: a caller in a worker thread wakes the loop through it."""
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            try:
                self._loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    @property
    def deferred(self) -> int:
        """Entries not in the spool yet: waiting for the writer, or for a failed write's retry."""
        return len(self._pending)

    @property
    def failing(self) -> bool:
        return self._failing

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until the writer has tried everything handed to it so far (True: all written)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending and not self._failing:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    break
                self._cond.wait(left)
            return not self._pending

    def retry_deferred(self) -> None:
        """Wake the writer to retry entries held since a failed write (no-op when there are none)."""
        with self._cond:
            if not self._pending:
                return
            alive = self._thread is not None and self._thread.is_alive()
            if alive:
                self._cond.notify_all()
        if not alive:
            self._write_pending()  # no writer thread (closed): write here

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the writer once what is pending is written (or, while failing, after timeout_s)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def report_recovered(self, recovered: Recovered) -> None:
        self.emit_event("error", "critical", "spool file was corrupt; moved aside, continuing with a new one",
                        {"moved_to": str(recovered.moved_to), "error": recovered.reason})

    def report_drops(self) -> None:
        """An `error` event for rows a full spool dropped, at most once a minute (the writer thread
        calls this after each batch, the transport's housekeeping once a minute)."""
        with self._drops_lock:
            total = self.spool.dropped_total
            now = time.monotonic()
            if total <= self._reported_drops or now - self._last_drop_report < DROP_REPORT_INTERVAL_S:
                return
            new = total - self._reported_drops
            self._reported_drops = total
            self._last_drop_report = now
        self.emit_event("error", "warning", f"spool full: dropped {new} oldest entries",
                            {"dropped": new, "dropped_total": total, "by_kind": self.spool.dropped,
                             "max_bytes": self.spool.max_bytes})
