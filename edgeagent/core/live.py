"""What components share while the agent runs, each a small typed object handed to exactly the
components that use it (wired in `edgeagent.agent`):

- `LiveConfig`: the effective Config (replaced as a whole when a remote config is applied), the
  topics, and the live knobs: per-component slowdown factors (power_save) and busy reasons.
- `Metrics`: the latest monitor sample (the DESIGN.md metric names) and who wants each new one.
- `Outbox` / `OutboxRelay`: where events, retained state and one-off messages go; until the
  transport attaches the spool, a bounded memory buffer, so nothing emitted at start is lost.
- `Router` / `RouterRelay`: MQTT subscriptions of the capabilities that take commands; recorded
  until the transport attaches the real router, and offline (nothing arrives) without a broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeagent.core.config import Config
from edgeagent.core.protocol import Topics
from edgeagent.core.tasks import wait_event

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[None]]
# offered a message as soon as it is read, on the loop: True means it took it (no queue, no task)
Express = Callable[[str, bytes], bool]
Section = Callable[[], dict[str, Any]]


class LiveConfig:
    """The running config and the knobs that change while the agent runs; `changed` wakes sleepers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.device.id)
        self.slowdown: dict[str, float] = {}
        self.busy: dict[str, str] = {}  # source -> reason
        self.changed = asyncio.Event()

    def notify_changed(self) -> None:
        # a fresh Event per change: set-then-clear on one Event loses the wakeup of a sleeper whose
        # wait() task has not started yet (asyncio.wait_for wraps it in a task)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def replace(self, config: Config) -> None:
        self.config = config
        self.notify_changed()

    def factor(self, component: str) -> float:
        return self.slowdown.get(component, 1.0)

    def set_busy(self, source: str, reason: str | None) -> None:
        if reason is None:
            self.busy.pop(source, None)
        else:
            self.busy[source] = reason
        self.notify_changed()

    async def sleep_or_change(self, seconds: float) -> None:
        """Sleep, but wake early when a knob changes (so a new interval applies at once)."""
        changed = self.changed  # taken now: a change from here on wakes us
        await wait_event(changed, seconds)


class Metrics:
    """The latest monitor sample; listeners run on the loop and must not block."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.ts: float = 0.0
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def publish(self, metrics: dict[str, Any], ts: float | None = None) -> None:
        self.latest = metrics
        self.ts = ts if ts is not None else time.time()
        for listener in list(self._listeners):
            try:
                listener(metrics)
            except Exception:
                log.exception("metrics listener failed")

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(listener)


class Outbox(Protocol):
    """Everything the device sends that must not be lost goes through here."""

    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        """An event on P/D/events (seq assigned, spooled, delivered in order)."""

    def put_state(self, topic: str, payload: dict[str, Any]) -> None:
        """A retained QoS 1 state message (job status, config reported): last value per topic wins,
        (re)published on every connect until acknowledged."""

    def put_message(self, topic: str, payload: dict[str, Any]) -> None:
        """A one-off QoS 1 message (e.g. an update `request`), spooled like telemetry."""


@dataclass
class MemoryOutbox:
    """Holds what is emitted before the transport exists (or in tests), bounded, oldest dropped."""

    maxlen: int = 1000
    events: deque[tuple[str, str, str, dict[str, Any], float]] = field(default_factory=deque)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)
    dropped: int = 0

    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        if len(self.events) >= self.maxlen:
            self.events.popleft()
            self.dropped += 1
        self.events.append((kind, severity, message, dict(data or {}), time.time()))
        log.log(logging.WARNING if severity != "info" else logging.INFO, "event %s: %s", kind, message,
                extra={"kv": {"kind": kind, "severity": severity}})

    def put_state(self, topic: str, payload: dict[str, Any]) -> None:
        self.states[topic] = payload

    def put_message(self, topic: str, payload: dict[str, Any]) -> None:
        if len(self.messages) >= self.maxlen:
            self.messages.popleft()
            self.dropped += 1
        self.messages.append((topic, payload))

    def drain_into(self, other: Outbox) -> None:
        """Hand everything over to the real outbox, in order."""
        while self.events:
            kind, severity, message, data, _ts = self.events.popleft()
            other.emit_event(kind, severity, message, data)
        for topic, payload in self.states.items():
            other.put_state(topic, payload)
        self.states.clear()
        while self.messages:
            other.put_message(*self.messages.popleft())


class OutboxRelay:
    """The outbox every component holds: memory until the transport attaches the spool's."""

    def __init__(self) -> None:
        self.target: Outbox = MemoryOutbox()

    def attach(self, outbox: Outbox) -> None:
        previous, self.target = self.target, outbox
        if isinstance(previous, MemoryOutbox):
            previous.drain_into(outbox)

    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        self.target.emit_event(kind, severity, message, data)

    def put_state(self, topic: str, payload: dict[str, Any]) -> None:
        self.target.put_state(topic, payload)

    def put_message(self, topic: str, payload: dict[str, Any]) -> None:
        self.target.put_message(topic, payload)


class Router(Protocol):
    """Subscriptions for the capabilities that receive commands (updates, remote config)."""

    def subscribe(self, topic_filter: str, handler: Handler, express: Express | None = None) -> None:
        """Register `handler(topic, payload)` for a filter; kept across reconnects. The handler
        runs on the event loop; it must not block and should not raise (errors are logged).

        `express(topic, payload)`, when given, is offered each matching message first, as it is
        read and before any queue: True means it took the message and the handler never sees it.
        It must not block or await. Update chunks take it: a thousand a second, each would
        otherwise cost a queue hop and a task wake-up."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...


class RouterRelay:
    """The router every component holds: subscriptions are recorded and handed to the transport's
    router when it attaches; with no broker configured nothing ever arrives (offline is normal)."""

    def __init__(self) -> None:
        self.subscriptions: list[tuple[str, Handler, Express | None]] = []
        self.target: Router | None = None
        self._attached = asyncio.Event()

    def attach(self, router: Router) -> None:
        self.target = router
        for topic_filter, handler, express in self.subscriptions:
            router.subscribe(topic_filter, handler, express)
        self._attached.set()

    def subscribe(self, topic_filter: str, handler: Handler, express: Express | None = None) -> None:
        self.subscriptions.append((topic_filter, handler, express))
        if self.target is not None:
            self.target.subscribe(topic_filter, handler, express)

    @property
    def connected(self) -> bool:
        return self.target is not None and self.target.connected

    async def wait_connected(self) -> None:
        await self._attached.wait()
        assert self.target is not None
        await self.target.wait_connected()


class Sections:
    """The named figures health.json and telemetry report ("monitor", "spool", "inference", ...).

    Bound once, in `edgeagent.agent`, to the `section()` methods of the components that have one;
    components only read it. A failing section is reported in place, never fatal.
    """

    def __init__(self, sources: Mapping[str, Section] | None = None) -> None:
        self._sources: dict[str, Section] = dict(sources or {})

    def bind(self, sources: Mapping[str, Section]) -> None:
        self._sources = dict(sources)

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in list(self._sources) if names is None else names:
            source = self._sources.get(name)
            if source is None:
                continue
            try:
                out[name] = source()
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out
