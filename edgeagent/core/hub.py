"""What components share at run time, behind small Protocols: no component talks to another directly.

- `config`: the effective Config (replaced as a whole when a remote config is applied live;
  components read their intervals from it on every loop turn, and wait on `changed`).
- `metrics`: the latest monitor sample (the DESIGN.md metric names), for telemetry, rules and gates.
- `outbox`: where events, retained state messages and one-off messages go (the spool, once the
  transport is up; until then a bounded in-memory buffer, so nothing emitted at start is lost).
- `router`: MQTT subscriptions of the later capabilities (updates, config), one small API.
- `providers`: named sections ("inference", "spool", "updates", ...) for telemetry and health.json.
- `slowdown`: per-component rate factors (power_save), `busy`: reasons the device is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgeagent.core.config import Config, to_dict
from edgeagent.core.config_layers import ConfigLayers
from edgeagent.core.protocol import Topics

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[None]]
Provider = Callable[[], dict[str, Any]]


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


class Router(Protocol):
    """Subscriptions for the capabilities that receive commands (updates, remote config)."""

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Register `handler(topic, payload)` for a filter; kept across reconnects. The handler
        runs on the event loop; it must not block and should not raise (errors are logged)."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...


class ModelInstaller(Protocol):
    """The inference component's side of a model update (the updates component calls it)."""

    async def install(self, staged_dir: Path, name: str, version: str, job: str) -> None:
        """Copy `staged_dir` (model.tflite + optional model.toml, already verified and extracted
        safely) into the model store, validate it in the background, hot-swap it and keep it on
        probation until it has served real windows. Returns when it is the active model and has
        served them; raises ModelRejected (never activated) or ModelRolledBack (failed in
        probation, previous model active again), both carrying `.reason`."""

    def installed_version(self, name: str) -> str | None:
        """The active version of model `name`, or None."""


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


@dataclass
class OfflineRouter:
    """The router when no broker is configured: subscriptions are recorded, nothing arrives."""

    subscriptions: list[tuple[str, Handler]] = field(default_factory=list)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self.subscriptions.append((topic_filter, handler))

    @property
    def connected(self) -> bool:
        return False

    async def wait_connected(self) -> None:
        await asyncio.Event().wait()  # never: offline is a normal state


class Hub:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.device.id)
        self.metrics: dict[str, Any] = {}
        self.metrics_ts: float = 0.0
        self.outbox: Outbox = MemoryOutbox()
        self.router: Router = OfflineRouter()
        self.providers: dict[str, Provider] = {}
        self.slowdown: dict[str, float] = {}
        self.busy: dict[str, str] = {}  # source -> reason
        self.changed = asyncio.Event()  # set (and cleared) whenever config/slowdown/busy change
        self.model_installer: ModelInstaller | None = None  # set by the inference component
        # called as listener(component_name, error_text) when a supervised component crashes
        self.crash_listeners: list[Callable[[str, str], None]] = []
        # asks for a new process (e.g. to finish a config rollback of restart-only keys); the agent
        # stops cleanly and exits with RESTART_EXIT_CODE, which systemd's Restart=on-failure restarts
        self.request_restart: Callable[[str], None] | None = None
        self._metric_listeners: list[Callable[[dict[str, Any]], None]] = []
        # file < remote < runtime overrides: the agent starts them from what load_effective read;
        # a hub built directly (tests) takes its start config as the file layer
        self.layers = ConfigLayers(self, to_dict(config))

    # -- metrics
    def publish_metrics(self, metrics: dict[str, Any], ts: float | None = None) -> None:
        self.metrics = metrics
        self.metrics_ts = ts if ts is not None else time.time()
        for listener in list(self._metric_listeners):
            try:
                listener(metrics)
            except Exception:
                log.exception("metrics listener failed")

    def on_metrics(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._metric_listeners.append(listener)

    # -- wiring
    def set_outbox(self, outbox: Outbox) -> None:
        previous = self.outbox
        self.outbox = outbox
        if isinstance(previous, MemoryOutbox):
            previous.drain_into(outbox)

    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        self.outbox.emit_event(kind, severity, message, data)

    def sections(self) -> dict[str, dict[str, Any]]:
        """Every provider's current section; a failing provider is reported, not fatal."""
        out: dict[str, dict[str, Any]] = {}
        for name, provider in list(self.providers.items()):
            try:
                out[name] = provider()
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    # -- live knobs
    def notify_changed(self) -> None:
        # a fresh Event per change: set-then-clear on one Event loses the wakeup of a sleeper whose
        # wait() task has not started yet (asyncio.wait_for wraps it in a task)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def replace_config(self, config: Config) -> None:
        self.config = config
        self.notify_changed()

    def replace(self, config: Config) -> None:
        """LiveConfig's name for replace_config, so that ConfigLayers can drive either."""
        self.replace_config(config)

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
        try:
            await asyncio.wait_for(changed.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass
