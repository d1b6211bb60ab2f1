"""Wires the components, supervises them and stops them in reverse order within a deadline.

Lifecycle of a component (an async context manager with a `run()`):
  enter (open files, load model) -> run() supervised: a crash is logged with its traceback and
  run() is restarted with exponential backoff; more than `crash_loop_restarts` crashes within
  `crash_loop_window_s` is a crash loop, reported as a critical event and in health.json (and
  still retried, at the maximum backoff) -> on stop: cancel run() in reverse order, then exit
  (flush) in reverse order, all within `agent.shutdown_timeout_s`.
Signals only set an Event; tests inject the trigger instead.

This is the one place where components are wired: each gets the shared objects it uses
(`edgeagent.core.live`) and its collaborators as constructor arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from edgeagent import __version__
from edgeagent.core import config as cfgmod
from edgeagent.core.backoff import backoff_s
from edgeagent.core.config import Config
from edgeagent.core.config_layers import ConfigLayers, EffectiveConfig
from edgeagent.core.live import LiveConfig, Metrics, OutboxRelay, RouterRelay, Sections
from edgeagent.core.logring import installed_ring
from edgeagent.core.sdnotify import Notifier
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.health import HealthWriter

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on purpose, start me again" (Restart=on-failure)


class Component(Protocol):
    name: str

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None: ...

    async def run(self) -> None:
        """The component's long-lived work; returning normally means it has nothing more to do."""


@dataclass
class ComponentState:
    name: str
    state: str = "starting"  # starting | running | restarting | failed | stopped | done
    restarts: int = 0
    last_error: str | None = None
    crash_times: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    crash_loop: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "last_error": self.last_error,
                "crash_loop": self.crash_loop}


CrashListener = Callable[[str, str], None]  # (component name, error text)


@dataclass
class Wiring:
    """What the agent hands to the component factory: the shared objects and the agent's hooks."""

    live: LiveConfig
    metrics: Metrics
    outbox: OutboxRelay
    router: RouterRelay
    sections: Sections
    layers: ConfigLayers
    request_restart: Callable[[str], None]
    crash_listeners: list[CrashListener] = field(default_factory=list)


ComponentFactory = Callable[[Wiring], Sequence[Component]]


def default_components(w: Wiring) -> list[Component]:
    """The production set, in start order (stopped in reverse)."""
    from edgeagent.looplag import LoopLagComponent
    from edgeagent.monitor.component import MonitorComponent
    from edgeagent.remote_config import RemoteConfigComponent
    from edgeagent.rules import RulesComponent
    from edgeagent.support.component import SupportComponent
    from edgeagent.telemetry import TelemetryComponent
    from edgeagent.transport import TransportComponent
    from edgeagent.updates import UpdatesComponent

    monitor = MonitorComponent(w.live, w.metrics)
    transport = TransportComponent(w.live, w.outbox, w.router, w.sections)
    telemetry = TelemetryComponent(w.live, w.metrics, lambda: transport.sample_sink, w.sections)
    loop = LoopLagComponent(w.outbox)
    components: list[Component] = [loop, monitor, transport, telemetry]
    sections = {"loop": loop.section, "monitor": monitor.section, "spool": transport.spool_section,
                "mqtt": transport.mqtt_section,
                "telemetry": telemetry.section}
    inference = None
    if w.live.config.inference.enabled:  # a restart-only key; numpy + TFLite cost ~30 MiB, so only then
        from edgeagent.inference.component import InferenceComponent

        inference = InferenceComponent(w.live, w.outbox)
        components.append(inference)
        sections["inference"] = inference.section
        sections["sensors"] = inference.sensors_section
    elif w.live.config.sensors.source in ("serial", "modbus", "iio"):  # values for telemetry/rules only
        from edgeagent.sensors.component import SensorsComponent

        sensors = SensorsComponent(w.live, w.outbox)
        components.append(sensors)
        sections["sensors"] = sensors.section
    rules = RulesComponent(w.live, w.metrics, w.outbox, w.router, w.sections, w.layers)
    updates = UpdatesComponent(w.live, w.metrics, w.outbox, w.router, model_installer=inference,
                               inference_section=inference.section if inference is not None else None,
                               rtt_ms=lambda: transport.mqtt_section().get("rtt_ms"),
                               session=lambda: transport.session if transport.session is not None
                               and transport.session.connected else None)
    remote = RemoteConfigComponent(w.live, w.outbox, w.router, w.layers, w.request_restart)
    w.crash_listeners.append(remote.on_crash)
    support = SupportComponent(w.live, w.outbox, w.router, lambda: transport.session, _recent_log_lines)
    components += [rules, updates, remote, support]
    sections.update(rules=rules.section, updates=updates.section, firmware=updates.firmware_section,
                    config=remote.section, support=support.section)
    w.sections.bind(sections)
    return components


def _recent_log_lines(n: int) -> list[str]:
    """The last `n` lines of the in-memory log ring `logs.setup` installed (none in a bare test)."""
    ring = installed_ring()
    return ring.recent(n) if ring is not None else []


class Agent:
    def __init__(self, config: Config, components: ComponentFactory = default_components,
                 notifier: Notifier | None = None, *, effective: EffectiveConfig | None = None) -> None:
        """`effective`: what `edgeagent run` loaded (`load_effective`), so that remote config keeps
        the file and remote layers apart; by default the config itself is the file layer."""
        self.config = config
        live = LiveConfig(config)
        layers = (ConfigLayers.starting_from(live, effective) if effective is not None
                  else ConfigLayers(live, cfgmod.to_dict(config), {}))
        self.wiring = Wiring(live=live, metrics=Metrics(), outbox=OutboxRelay(), router=RouterRelay(),
                             sections=Sections(), layers=layers, request_restart=self.request_restart)
        self._factory = components
        self.notifier = notifier or Notifier()
        self.stop_event = asyncio.Event()
        self.states: dict[str, ComponentState] = {}
        self.state = "starting"
        self.started_at = time.time()
        self.health = HealthWriter(config.state_dir, self.health_snapshot,
                                   lambda: self.wiring.live.config.agent.health_interval_s)
        self.restart_reason: str | None = None

    @property
    def live(self) -> LiveConfig:
        return self.wiring.live

    def health_snapshot(self) -> dict[str, Any]:
        """health.json's content; taken on the loop (sections read loop-owned state)."""
        cfg = self.wiring.live.config
        return {
            "v": 1,
            "ts": time.time(),
            "pid": os.getpid(),
            "agent": __version__,
            "device": cfg.device.id,
            "state": self.state,
            "started_at": self.started_at,
            "interval_s": cfg.agent.health_interval_s,
            "components": {name: s.as_dict() for name, s in self.states.items()},
            "busy": dict(self.wiring.live.busy),
            "sections": self.wiring.sections.snapshot(),
        }

    def request_restart(self, reason: str) -> None:
        """Stop cleanly and exit with RESTART_EXIT_CODE so that the service manager starts us again."""
        self.restart_reason = reason
        self.request_stop(f"restart: {reason}")

    def request_stop(self, reason: str = "requested") -> None:
        if not self.stop_event.is_set():
            log.info("stopping", extra={"kv": {"reason": reason}})
            self.stop_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)

    async def run(self) -> int:
        """Run until stop is requested; returns the process exit code."""
        cfg = self.config
        os.makedirs(cfg.state_dir, exist_ok=True)
        components = list(self._factory(self.wiring))
        deadline_s = cfg.agent.shutdown_timeout_s
        stack = contextlib.AsyncExitStack()
        tasks: list[asyncio.Task[None]] = []
        aux: list[asyncio.Task[None]] = []
        exit_code = 0
        try:
            for c in components:
                self.states[c.name] = ComponentState(c.name)
                await stack.enter_async_context(c)
            for c in components:
                tasks.append(asyncio.create_task(self._supervise(c), name=f"supervise:{c.name}"))
            aux.append(asyncio.create_task(self.notifier.watchdog_loop(), name="sd-watchdog"))
            aux.append(asyncio.create_task(self.health.loop(), name="health"))
            self.state = "running"
            self.notifier.ready(f"running: device {cfg.device.id}, {len(components)} components")
            log.info("agent running", extra={"kv": {"device": cfg.device.id, "version": __version__,
                                                    "components": ",".join(c.name for c in components)}})
            await self.stop_event.wait()
        finally:
            self.state = "stopping"
            self.notifier.stopping("stopping")
            t0 = time.monotonic()

            def remaining() -> float:
                return max(0.05, deadline_s - (time.monotonic() - t0))

            # 1. stop inputs first: cancel supervised loops in reverse start order
            for task in reversed(tasks):
                await cancel_and_wait(task, remaining())
            # 2. flush and close in reverse order (AsyncExitStack unwinds in reverse)
            close = asyncio.create_task(stack.aclose(), name="close-components")
            try:
                await asyncio.wait_for(asyncio.shield(close), remaining())
            except asyncio.TimeoutError:
                log.error("components did not stop within shutdown_timeout_s; cancelling",
                          extra={"kv": {"shutdown_timeout_s": deadline_s}})
                await cancel_and_wait(close)
                exit_code = 1
            except Exception:
                log.exception("error while stopping components")
                exit_code = 1
            for state in self.states.values():
                if state.state not in ("failed",):
                    state.state = "stopped"
            await cancel_and_wait(aux, remaining())
            self.state = "stopped"
            self.health.write_now()
            self.notifier.close()
            log.info("agent stopped", extra={"kv": {"stop_s": round(time.monotonic() - t0, 3)}})
        if exit_code == 0 and self.restart_reason is not None:
            exit_code = RESTART_EXIT_CODE
        return exit_code

    async def _supervise(self, c: Component) -> None:
        st = self.states[c.name]
        cfg = self.config.agent
        attempt = 0
        while True:
            st.state = "running"
            started = time.monotonic()
            try:
                await c.run()
                st.state = "done"
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                if now - started > cfg.crash_loop_window_s:
                    attempt = 0  # it ran fine for a while: start the backoff over
                attempt += 1
                st.restarts += 1
                st.last_error = f"{type(exc).__name__}: {exc}"
                st.crash_times.append(now)
                recent = sum(1 for t in st.crash_times if now - t <= cfg.crash_loop_window_s)
                delay = backoff_s(attempt, cfg.restart_initial_s, cfg.restart_max_s, jitter=0.2)
                log.error("component %s crashed; restarting in %.1fs", c.name, delay, exc_info=True,
                          extra={"kv": {"component": c.name, "restarts": st.restarts}})
                for listener in list(self.wiring.crash_listeners):
                    try:
                        listener(c.name, st.last_error)
                    except Exception:
                        log.exception("crash listener failed")
                if recent > cfg.crash_loop_restarts:
                    if not st.crash_loop:
                        st.crash_loop = True
                        self.wiring.outbox.emit_event(
                            "error", "critical", f"component {c.name} is in a crash loop",
                            {"component": c.name, "crashes": recent, "window_s": cfg.crash_loop_window_s,
                             "error": st.last_error})
                    delay = cfg.restart_max_s
                    st.state = "failed"
                else:
                    self.wiring.outbox.emit_event(
                        "error", "warning", f"component {c.name} crashed and restarts",
                        {"component": c.name, "error": st.last_error, "restarts": st.restarts})
                    st.state = "restarting"
                await asyncio.sleep(delay)
                if st.crash_loop and recent <= cfg.crash_loop_restarts:
                    st.crash_loop = False


async def run_agent(config: Config, components: ComponentFactory = default_components,
                    install_signals: bool = True, *, effective: EffectiveConfig | None = None) -> int:
    from edgeagent.core.heap import bound_heap
    bound_heap()
    agent = Agent(config, components, effective=effective)
    if install_signals:
        agent.install_signal_handlers()
    return await agent.run()
