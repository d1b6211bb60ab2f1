"""Routes incoming MQTT messages to the handlers that capabilities registered, one queue each.

Each subscription has its own queue and worker task, bounded in messages and bytes. The session
`put`s each message and waits while a matching queue is full: it then stops reading, does not
acknowledge, and the broker holds the rest (transport.intake). `dispatch` is the non-waiting form:
it drops the oldest waiting message and counts it (the protocol recovers: chunks are re-requested,
desired config is retained). `take` is the express lane: the intake offers each message to the
subscriptions' express takers as paho reads it, before any queue (update chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from edgeagent.core.live import Express, Handler
from edgeagent.core.logs import Once

log = logging.getLogger(__name__)
_once = Once(log)

HANDLER_QUEUE_MAX = 1024
# bytes waiting per handler: update chunks for a whole group (other devices' requests too) must
# not pile up in RAM while the handler is busy writing; past this the oldest are dropped (and the
# updates component asks again for what it misses)
HANDLER_QUEUE_MAX_BYTES = 4 << 20  # twice the default update request window (2 MiB)


@dataclass
class Subscription:
    topic_filter: str
    handler: Handler
    queue: asyncio.Queue[tuple[str, bytes]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=HANDLER_QUEUE_MAX))
    dropped: int = 0
    errors: int = 0
    queued_bytes: int = 0
    task: asyncio.Task[None] | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set when the worker took one

    def __post_init__(self) -> None:
        self._prefix, self._parent = _literal_prefix(self.topic_filter)

    def matches(self, topic: str) -> bool:
        """Filters "a/b/#" and "a/b/+/#" are a prefix test (the express lane asks for every message)."""
        if self._prefix is not None:
            return topic.startswith(self._prefix) or topic == self._parent
        try:
            return topic_matches_sub(self.topic_filter, topic)
        except (ValueError, TypeError):  # paho refuses some hostile topics outright
            return False

    def fits(self, size: int) -> bool:
        """One message always fits an empty queue (a chunk may be up to the packet limit)."""
        return not self.queue.full() and (
            self.queue.empty() or self.queued_bytes + size <= HANDLER_QUEUE_MAX_BYTES)

    def put(self, topic: str, payload: bytes) -> None:
        self.queue.put_nowait((topic, payload))
        self.queued_bytes += len(payload)


def _literal_prefix(topic_filter: str) -> tuple[str | None, str | None]:
    """For "a/b/#": ("a/b/", "a/b"), the parent level matching too; for "a/b/+/#": ("a/b/", None);
    (None, None) for any other filter (paho's matcher decides)."""
    for tail in ("/+/#", "/#"):
        head = topic_filter[: -len(tail)]
        if topic_filter.endswith(tail) and head and "+" not in head and "#" not in head:
            return head + "/", (head if tail == "/#" else None)
    return None, None


class SessionRouter:
    """The agent's `Router` while a broker is configured; the session subscribes what it holds."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []
        self._express: list[tuple[Subscription, Express]] = []
        self._connected = asyncio.Event()
        self._new_filter = asyncio.Event()  # the session subscribes new filters while connected
        self._running = False
        self.active: set[str] = set()  # filters the broker acknowledged on this connection

    # -- Router protocol
    def subscribe(self, topic_filter: str, handler: Handler, express: Express | None = None) -> None:
        sub = Subscription(topic_filter, handler)
        self.subscriptions.append(sub)
        if express is not None:
            self._express.append((sub, express))
        if self._running:
            self._start_worker(sub)
        self._new_filter.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # -- session side
    def set_connected(self, value: bool) -> None:
        if value:
            self._connected.set()
        else:
            self._connected.clear()
            self.active.clear()

    @property
    def filters(self) -> list[str]:
        return list(dict.fromkeys(s.topic_filter for s in self.subscriptions))

    async def wait_new_filter(self) -> None:
        await self._new_filter.wait()
        self._new_filter.clear()

    def _matching(self, topic: str) -> list[Subscription]:
        return [s for s in self.subscriptions if s.matches(topic)]

    def take(self, topic: str, payload: bytes) -> bool:
        """The express lane, called as the message is read: True if an express taker of a matching
        subscription took it (then it is not queued). A taker that raises is counted and logged,
        and the message goes the queued way."""
        for sub, express in self._express:
            if sub.matches(topic):
                try:
                    if express(topic, payload):
                        return True
                except Exception:
                    sub.errors += 1
                    log.exception("express handler failed", extra={"kv": {"filter": sub.topic_filter,
                                                                           "topic": topic}})
        return False

    async def put(self, topic: str, payload: bytes) -> int:
        """Queue the message for every matching handler, waiting while a queue is full (the
        caller's reading stops meanwhile); returns how many matched."""
        subs = self._matching(topic)
        for sub in subs:
            while not sub.fits(len(payload)):
                sub.room.clear()
                await sub.room.wait()
            sub.put(topic, payload)
        return len(subs)

    def dispatch(self, topic: str, payload: bytes) -> int:
        """Queue the message for every matching handler, dropping the oldest waiting message of
        a full queue; returns how many matched."""
        matched = 0
        for sub in self._matching(topic):
            matched += 1
            while not sub.fits(len(payload)):
                try:
                    _t, old = sub.queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                sub.queued_bytes -= len(old)
                sub.dropped += 1
                _once.warning(f"full:{sub.topic_filter}", "handler queue full; dropped the oldest message",
                              extra={"kv": {"filter": sub.topic_filter, "dropped": sub.dropped}})
            sub.put(topic, payload)
        return matched

    def start(self) -> None:
        self._running = True
        for sub in self.subscriptions:
            if sub.task is None:
                self._start_worker(sub)

    def _start_worker(self, sub: Subscription) -> None:
        sub.task = asyncio.create_task(self._worker(sub), name=f"mqtt-handler:{sub.topic_filter}")

    async def stop(self) -> None:
        self._running = False
        tasks = [s.task for s in self.subscriptions if s.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for s in self.subscriptions:
            s.task = None

    async def _worker(self, sub: Subscription) -> None:
        while True:
            topic, payload = await sub.queue.get()
            sub.queued_bytes -= len(payload)
            sub.room.set()
            try:
                await sub.handler(topic, payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                sub.errors += 1
                log.exception("message handler failed", extra={"kv": {"filter": sub.topic_filter,
                                                                       "topic": topic}})
