"""Publishes the spool while connected: live rows and the backlog side by side, deleted on PUBACK.

At connect the spool is split at its newest row: rows up to it are the *backlog*, rows added after
are *live*. Every turn sends what is live first, then up to a few messages of the backlog (oldest
first), so a long backlog never holds back fresh data; on the wire the two streams interleave and
consumers order samples by `seq`. Consecutive telemetry rows are packed into one message (up to
`telemetry.batch_max` samples); live samples wait at most `telemetry.batch_wait_s` for company.
Up to `max_inflight` QoS 1 publishes are awaited concurrently; each row is deleted only after its
message's PUBACK (a crash in between re-sends it: at least once). Any publish failure ends the
connection so that the session reconnects and starts over from the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeagent.core.config import Config
from edgeagent.core.errors import EdgeAgentError, SpoolError
from edgeagent.core.logs import Once
from edgeagent.core.protocol import Topics
from edgeagent.transport.outbox import SpoolOutbox
from edgeagent.transport.spool import KIND_SAMPLE, Row, Spool

if TYPE_CHECKING:  # aiomqtt (and paho, ssl) load only when a broker is configured
    import aiomqtt

log = logging.getLogger(__name__)
_once = Once(log)

MAX_INFLIGHT = 20
BACKLOG_MESSAGES_PER_TURN = 4
DELETE_RETRY_S = 1.0  # acked rows whose delete failed (disk full) are deleted again this often


class PublishFailed(EdgeAgentError):
    """A QoS 1 publish got no PUBACK (timeout or lost connection)."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"publish to {topic} failed: {reason}")


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    ids: tuple[int, ...]
    samples: int = 0


def group(rows: Sequence[Row], topics: Topics, batch_max: int) -> list[Outgoing]:
    """Pack rows (in id order) into messages: runs of telemetry samples share a message."""
    out: list[Outgoing] = []
    head = _head(topics.device)
    run: list[Row] = []

    def flush() -> None:
        if run:
            payload = head + b",".join(r.payload for r in run) + b"]}"
            out.append(Outgoing(topics.telemetry, payload, tuple(r.id for r in run), len(run)))
            run.clear()

    for row in rows:
        if row.kind == KIND_SAMPLE:
            run.append(row)
            if len(run) >= batch_max:
                flush()
            continue
        flush()
        out.append(Outgoing(row.topic or topics.events, row.payload, (row.id,)))
    flush()
    return out


def live_ready(rows: Sequence[Row], batch_max: int, batch_wait_s: float, waited_s: float,
               flushing: bool) -> float | None:
    """None if the live rows go now, else how long to wait for a fuller telemetry batch.

    `waited_s` is how long the oldest of them has been waiting (monotonic: a wall-clock jump
    must not hold samples back)."""
    if flushing or not rows or len(rows) >= batch_max or batch_wait_s <= 0:
        return None
    if any(r.kind != KIND_SAMPLE for r in rows):
        return None
    wait_s = batch_wait_s - waited_s
    return wait_s if wait_s > 0 else None


@functools.lru_cache(maxsize=8)
def _head(device: str) -> bytes:
    """The encoded start of a telemetry message, made once per device id (not per batch)."""
    return b'{"v":1,"device":' + json.dumps(device, ensure_ascii=False).encode() + b',"samples":['


@dataclass
class PublishStats:
    messages: int = 0
    samples: int = 0
    delete_failures: int = 0  # acknowledged rows the spool could not delete yet (a full disk)


class Publisher:
    """One connection's worth of publishing; `run` returns only by raising PublishFailed."""

    def __init__(self, spool: Spool, outbox: SpoolOutbox, topics: Topics, config: Callable[[], Config],
                 stats: PublishStats, max_inflight: int = MAX_INFLIGHT) -> None:
        self.spool = spool
        self.outbox = outbox
        self.topics = topics
        self.config = config
        self.stats = stats
        self.max_inflight = max_inflight
        self.flushing = False
        self.progress = asyncio.Event()  # set after each batch of deletions
        self._window = asyncio.Semaphore(max_inflight)
        self._failure: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the publishing workers (no task per message)
        self._work: asyncio.Queue[Outgoing | tuple[str, bytes, int]] = asyncio.Queue()
        self._acked: list[int] = []
        self._ack_event = asyncio.Event()
        self._states_inflight: dict[str, int] = {}

    async def run(self, client: aiomqtt.Client, publish_timeout_s: float) -> None:
        self._failure = asyncio.get_running_loop().create_future()
        deleter = asyncio.create_task(self._delete_loop(), name="mqtt-spool-delete")
        # max_inflight long-lived workers: the window semaphore bounds what is queued for them
        self._tasks = {asyncio.create_task(self._worker(client, publish_timeout_s), name=f"mqtt-publish-{i}")
                       for i in range(self.max_inflight)}
        try:
            await self._publish_loop(client, publish_timeout_s)
        finally:
            for t in list(self._tasks):
                t.cancel()
            for t in list(self._tasks):
                with contextlib.suppress(BaseException):
                    await t
            deleter.cancel()
            with contextlib.suppress(BaseException):
                await deleter
            if self._acked:  # PUBACKed but not deleted yet: delete now so a reconnect does not resend
                ids, self._acked = self._acked, []
                with contextlib.suppress(Exception):
                    self.spool.delete(ids)
            if not self._failure.done():
                self._failure.cancel()

    async def _publish_loop(self, client: aiomqtt.Client, timeout_s: float) -> None:
        assert self._failure is not None
        live_from = await asyncio.to_thread(self.spool.max_id) + 1
        backlog_cursor, live_cursor = 0, live_from - 1
        head_seen = (0, 0.0)  # (id, monotonic time) of the oldest live row when first fetched
        self.outbox.state_wakeup.set()  # retained states are (re)published on every connect
        while True:
            if self._failure.done():
                self._failure.result()
            self.outbox.wakeup.clear()
            cfg = self.config().telemetry
            batch_max = cfg.batch_max
            msgs: list[Outgoing] = []
            if self.outbox.state_wakeup.is_set():
                self.outbox.state_wakeup.clear()
                for st in await asyncio.to_thread(self.spool.pending_states):
                    if self._states_inflight.get(st.topic) != st.version:
                        self._states_inflight[st.topic] = st.version
                        await self._start((st.topic, st.payload, st.version))
            wait_s: float | None = None
            live = await asyncio.to_thread(self.spool.fetch, live_cursor, None, max(64, batch_max * 4))
            if live:
                if head_seen[0] != live[0].id:
                    head_seen = (live[0].id, time.monotonic())
                waited_s = time.monotonic() - head_seen[1]
                wait_s = live_ready(live, batch_max, cfg.batch_wait_s, waited_s, self.flushing)
                if wait_s is None:
                    msgs += group(live, self.topics, batch_max)
                    live_cursor = live[-1].id
            if backlog_cursor < live_from - 1:
                limit = max(64, batch_max * BACKLOG_MESSAGES_PER_TURN)
                back = await asyncio.to_thread(self.spool.fetch, backlog_cursor, live_from, limit)
                if back:
                    msgs += group(back, self.topics, batch_max)
                    backlog_cursor = back[-1].id
                else:
                    backlog_cursor = live_from - 1
            if not msgs:
                await self._wait_for_work(wait_s)
                continue
            for m in msgs:
                await self._start(m)

    async def _start(self, item: Outgoing | tuple[str, bytes, int]) -> None:
        """Take a window slot (or fail fast if the connection is already broken), then hand the
        message to a worker."""
        assert self._failure is not None
        if self._window.locked() or self._failure.done():
            acquire: asyncio.Future[Any] = asyncio.ensure_future(self._window.acquire())
            failure: asyncio.Future[Any] = self._failure
            done, _ = await asyncio.wait({acquire, failure}, return_when=asyncio.FIRST_COMPLETED)
            if acquire not in done:
                acquire.cancel()
                self._failure.result()
        else:
            await self._window.acquire()  # a free slot: no waiting, no futures
        self._work.put_nowait(item)

    async def _worker(self, client: aiomqtt.Client, timeout_s: float) -> None:
        while True:
            item = await self._work.get()
            try:
                if isinstance(item, Outgoing):
                    await self._publish(client, item, timeout_s)
                else:
                    await self._publish_state(client, *item, timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bookkeeping error after the publish: start over from the spool
                log.exception("publishing failed")
                self._fail(item.topic if isinstance(item, Outgoing) else item[0], exc)

    async def _wait_for_work(self, timeout_s: float | None) -> None:
        assert self._failure is not None
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.outbox.wakeup.wait()),
                                            asyncio.ensure_future(self.outbox.state_wakeup.wait()),
                                            self._failure]
        try:
            await asyncio.wait(waits, timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits[:2]:
                w.cancel()

    def _fail(self, topic: str, exc: BaseException) -> None:
        assert self._failure is not None
        if not self._failure.done():
            self._failure.set_exception(PublishFailed(topic, f"{type(exc).__name__}: {exc}"))

    async def _publish(self, client: aiomqtt.Client, m: Outgoing, timeout_s: float) -> None:
        try:
            await client.publish(m.topic, m.payload, qos=1, timeout=timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(m.topic, exc)
            return
        finally:
            self._window.release()
        self.stats.messages += 1
        self.stats.samples += m.samples
        self._acked.extend(m.ids)
        self._ack_event.set()

    async def _publish_state(self, client: aiomqtt.Client, topic: str, payload: bytes, version: int,
                             timeout_s: float) -> None:
        try:
            await client.publish(topic, payload, qos=1, retain=True, timeout=timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(topic, exc)
            return
        finally:
            self._window.release()
            if self._states_inflight.get(topic) == version:
                del self._states_inflight[topic]
        self.stats.messages += 1
        await asyncio.to_thread(self.spool.ack_state, topic, version)
        self.progress.set()

    async def _delete_loop(self) -> None:
        failing = False
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            ids, self._acked = self._acked, []
            if not ids:
                continue
            try:
                await asyncio.to_thread(self.spool.delete, ids)
            except (sqlite3.Error, SpoolError) as exc:
                # a full disk fails deletes too: keep the ids (the rows are still counted in the
                # backlog) and try again; ending this task would leave them until the next connect
                failing = True
                self.stats.delete_failures += 1
                self._acked = ids + self._acked
                _once.warning("delete", "cannot delete published rows from the spool; retrying",
                              extra={"kv": {"error": str(exc), "rows": len(self._acked)}})
                await asyncio.sleep(DELETE_RETRY_S)
                self._ack_event.set()
                continue
            if failing:
                failing = False
                _once.reset("delete")
                log.info("published rows are deleted from the spool again")
            self.progress.set()
