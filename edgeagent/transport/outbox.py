"""The agent's `Outbox` once the transport is up: everything goes into the spool first.

Calls are synchronous (callers are simple) and cost one short SQLite transaction on the caller's
thread (WAL, no fsync); worker threads may call too. Each add wakes the publisher. A write that
fails because the file is corrupt moves the spool aside and retries once on a fresh one; drops of
a full spool are reported as an `error` event at most once a minute. A write that fails for
another reason (disk full) is kept in memory (bounded, in order) and retried.
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
DEFERRED_MAX = 2000  # entries kept in memory while the spool cannot be written (disk full)


@runtime_checkable
class SampleSink(Protocol):
    """Where the telemetry component puts samples (the spool-backed outbox implements it)."""

    def add_sample(self, sample: dict[str, Any]) -> int:
        """Number the sample (`seq`), store it durably, return the seq (0: it waits in memory
        because the spool cannot be written right now; it gets its seq when it can)."""


class SpoolOutbox:
    def __init__(self, spool: Spool, topics: Topics) -> None:
        self.spool = spool
        self.topics = topics
        self.wakeup = asyncio.Event()  # rows were added: the publisher looks again
        self.state_wakeup = asyncio.Event()  # a retained state changed
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.lost = 0  # entries given up: more than DEFERRED_MAX writes failed in a row
        self._deferred: deque[Callable[[], object]] = deque()
        self._failing = False
        self._lock = threading.RLock()
        self._depth = 0
        self._recovered: list[Recovered] = []
        self._reported_drops = spool.dropped_total
        self._last_drop_report = 0.0

    # -- Outbox protocol
    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        log.log(logging.WARNING if severity != "info" else logging.INFO, "event %s: %s", kind, message,
                extra={"kv": {"kind": kind, "severity": severity}})
        self._write(lambda: self.spool.add_event(self.topics.events, kind, severity, message, data))
        self._wake(self.wakeup)

    def put_state(self, topic: str, payload: dict[str, Any]) -> None:
        self._write(lambda: self.spool.put_state(topic, encode(payload)))
        self._wake(self.state_wakeup)

    def put_message(self, topic: str, payload: dict[str, Any]) -> None:
        self._write(lambda: self.spool.add_message(topic, encode(payload)))
        self._wake(self.wakeup)

    # -- SampleSink
    def add_sample(self, sample: dict[str, Any]) -> int:
        seq = self._write(lambda: self.spool.add_sample(sample))
        self._wake(self.wakeup)
        self.report_drops()
        return seq if seq is not None else 0

    # -- internals
    def _wake(self, event: asyncio.Event) -> None:
        """Events are not thread-safe: a caller in a worker thread wakes the loop through it."""
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            self._loop.call_soon_threadsafe(event.set)

    def _write(self, op: Callable[[], T]) -> T | None:
        """Run one spool write; a write that fails (disk full, I/O error) waits in memory, in order,
        and is retried before the next write and by `retry_deferred` (TransportComponent.run)."""
        with self._lock:
            self._depth += 1
            try:
                if self._deferred:
                    self._retry()
                if self._deferred:  # still failing: keep the order behind the earlier ones
                    self._defer(op)
                    return None
                ok, result = self._attempt(op)
                if not ok:
                    self._defer(op)
                return result
            finally:
                self._depth -= 1
                if self._depth == 0 and self._recovered:
                    self.report_recovered(self._recovered.pop(0))

    def _attempt(self, op: Callable[[], T]) -> tuple[bool, T | None]:
        try:
            return True, op()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):  # busy, disk full, I/O error: the file itself is fine
                self._warn_failed(exc)
                return False, None
            try:
                recovered = self.spool.recover(f"{type(exc).__name__}: {exc}")
                result = op()
            except (sqlite3.Error, SpoolError) as exc2:
                self._warn_failed(exc2)
                return False, None
            self._recovered.append(recovered)  # reported once this write is done, not inside it
            return True, result
        except SpoolError as exc:
            self._warn_failed(exc)
            return False, None

    def _warn_failed(self, exc: BaseException) -> None:
        self._failing = True
        _once.warning("write", "spool write failed; keeping entries in memory and retrying",
                      extra={"kv": {"error": str(exc), "deferred": len(self._deferred) + 1}})

    def _defer(self, op: Callable[[], object]) -> None:
        if len(self._deferred) >= DEFERRED_MAX:
            self._deferred.popleft()
            self.lost += 1
        self._deferred.append(op)

    def _retry(self) -> None:
        while self._deferred:
            ok, _ = self._attempt(self._deferred[0])
            if not ok:
                return
            self._deferred.popleft()
        if self._failing:
            self._failing = False
            _once.reset("write")
            log.info("spool writes work again", extra={"kv": {"lost": self.lost}})

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def retry_deferred(self) -> None:
        """Flush entries held in memory since a failed write (no-op when there are none)."""
        if not self._deferred:
            return
        with self._lock:
            self._depth += 1
            try:
                self._retry()
            finally:
                self._depth -= 1
        self._wake(self.wakeup)
        self._wake(self.state_wakeup)

    def report_recovered(self, recovered: Recovered) -> None:
        self.emit_event("error", "critical", "spool file was corrupt; moved aside, continuing with a new one",
                        {"moved_to": str(recovered.moved_to), "error": recovered.reason})

    def report_drops(self) -> None:
        total = self.spool.dropped_total
        now = time.monotonic()
        if total > self._reported_drops and now - self._last_drop_report >= DROP_REPORT_INTERVAL_S:
            new = total - self._reported_drops
            self._reported_drops = total
            self._last_drop_report = now
            self.emit_event("error", "warning", f"spool full: dropped {new} oldest entries",
                            {"dropped": new, "dropped_total": total, "by_kind": self.spool.dropped,
                             "max_bytes": self.spool.max_bytes})
