"""RulesComponent: evaluates the rules at the monitor's pace and performs their actions.

It also owns the other busy sources: `busy.file` (exists -> busy, one stat per turn) and
`busy.topic` on the local broker (rules/busy.py).

Actions are states, not one-shots: `power_save` slows monitor/telemetry/inference while any rule
holding it is active, `busy` raises `rule:<name>` in the busy set (updates wait), `set:<k>=<v>`
is a runtime config layer (through the same build + replace path as a remote config); all are
undone when the rule clears. `alert:<severity>` sends one event with the values that fired it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

from edgeagent.core.config import Config, RuleConfig, merge_layers
from edgeagent.core.config_layers import ConfigLayers
from edgeagent.core.errors import ConfigError, ExprError
from edgeagent.core.live import LiveConfig, Metrics, Outbox, Router, Sections
from edgeagent.core.logs import Once
from edgeagent.core.tasks import cancel_and_wait, wait_event
from edgeagent.rules.busy import BusyTopicWatcher
from edgeagent.rules.engine import CompiledRule, RuleEngine, Transition

log = logging.getLogger(__name__)

STARTUP_GRACE_S = 30.0  # values absent this soon after start (inference still loading) are not warned

SLOWED = ("monitor", "telemetry", "inference")  # LiveConfig.slowdown keys power_save sets
SECTIONS = ("inference", "mqtt", "sensors")  # sections rules may read (cheap ones only)


def collect_values(metrics: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]],
                   busy: bool, connected: bool, now: datetime) -> dict[str, Any]:
    """The names a condition can use: every scalar metric (`temp_c`), every scalar of the inference
    and mqtt sections both as `inference.p95_ms` and, unless a metric has that name, `p95_ms`; each
    pipeline's as `vibration.p95_ms` (with `[[pipelines]]` the flat names are the first one's); and
    device state `busy`, `connected`, `hour`, `minute`, `weekday` (0 = Monday, local time). A bus
    source's channels are read by name (`temperature_c`, `sensors.temperature_c`) while it has a value."""
    out: dict[str, Any] = {k: v for k, v in metrics.items() if _scalar(v)}
    for section, table in sections.items():
        for k, v in table.items():
            if _scalar(v):
                out[f"{section}.{k}"] = v
                out.setdefault(k, v)
        pipelines = table.get("pipelines")  # [[pipelines]]: each one's figures as `vibration.count`
        for name, figures in (pipelines.items() if isinstance(pipelines, Mapping) else ()):
            for k, v in (figures.items() if isinstance(figures, Mapping) else ()):
                if _scalar(v):
                    out[f"{name}.{k}"] = v
    channels = sections.get("sensors", {}).get("channels", {})
    for name, ch in channels.items() if isinstance(channels, Mapping) else ():
        value = ch.get("value") if isinstance(ch, Mapping) else None
        if _scalar(value):
            out[f"sensors.{name}"] = value
            out.setdefault(name, value)
    out.update(busy=busy, connected=connected, hour=now.hour, minute=now.minute, weekday=now.weekday())
    return out


def _scalar(v: object) -> bool:
    return isinstance(v, (bool, int, float, str))


class RulesComponent:
    name = "rules"

    def __init__(self, live: LiveConfig, metrics: Metrics, outbox: Outbox, router: Router, sections: Sections,
                 layers: ConfigLayers, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = datetime.now) -> None:
        self.live = live
        self.metrics = metrics
        self.outbox = outbox
        self.router = router
        self.sections = sections
        self.layers = layers
        self.clock = clock
        self.wall = wall
        self.engine = RuleEngine()
        self._rules: tuple[RuleConfig, ...] = ()
        self._wake = asyncio.Event()
        self._once = Once(log)
        self._busy_file = False
        self._power_save = False
        self._started_at: float | None = None

    async def __aenter__(self) -> RulesComponent:
        self._started_at = self.clock()
        self.reload(self.live.config)
        self.metrics.subscribe(lambda _m: self._wake.set())
        return self

    def section(self) -> dict[str, Any]:
        return self.engine.section()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for rule in self.engine.active():
            self._undo(rule)
        self._set_power_save(False)

    async def run(self) -> None:
        if not self.live.config.busy.topic:
            await self._evaluate_loop()
            return
        tasks = [asyncio.create_task(self._evaluate_loop(), name="rules-evaluate"),
                 asyncio.create_task(BusyTopicWatcher(self.live).run(), name="rules-busy-topic")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raise: the supervisor restarts us
        finally:
            await cancel_and_wait(tasks)

    async def _evaluate_loop(self) -> None:
        while True:
            self.step()
            cfg = self.live.config
            interval_s = max(0.05, cfg.monitor.interval_s * self.live.factor("monitor"))
            # a new monitor sample wakes us; the timeout keeps `for`/clear timing going without one
            await wait_event(self._wake, interval_s)
            self._wake.clear()

    # -- one evaluation turn (synchronous: tests drive it with a fake clock)

    def step(self) -> list[Transition]:
        cfg = self.live.config
        if cfg.rules != self._rules:
            self.reload(cfg)
        self._poll_busy_file(cfg)
        sections = {}
        for name, table in self.sections.snapshot(SECTIONS).items():
            if "error" in table and len(table) == 1:
                self._once.warning(f"section:{name}", "section %s failed: %s", name, table["error"])
                continue
            sections[name] = table
        mqtt = sections.get("mqtt", {})
        connected = bool(mqtt.get("connected", self.router.connected))
        values = collect_values(self.metrics.latest, sections, bool(self.live.busy), connected, self.wall())
        result = self.engine.feed(self.clock(), values)
        # right after start the inference section is not there yet: not worth a warning
        starting = self._started_at is not None and self.clock() - self._started_at < STARTUP_GRACE_S
        for p in result.problems:
            if starting:
                log.debug("rule %s: %s; the condition counts as false", p.rule, p.message)
                continue
            self._once.warning(f"{p.rule}:{p.key}", "rule %s: %s; the condition counts as false", p.rule,
                               p.message, extra={"kv": {"rule": p.rule}})
        for t in result.transitions:
            self._perform(t)
        return result.transitions

    def reload(self, cfg: Config) -> None:
        """Take a new rule set from a (live) config; the previous set stays on a bad one."""
        try:
            cleared = self.engine.reconfigure(cfg.rules, self.clock())
        except (ExprError, ValueError) as exc:  # config validation checks these first: belt and braces
            log.error("rules not reloaded: %s", exc)
            self._rules = cfg.rules
            return
        self._rules = cfg.rules
        for t in cleared:
            self._perform(t)
        log.info("rules loaded", extra={"kv": {"rules": ",".join(r.name for r in self.engine.rules) or "-"}})

    # -- actions

    def _perform(self, t: Transition) -> None:
        rule = t.rule
        data = {"rule": rule.name, "state": t.change, "when": rule.config.when, "values": t.values}
        if t.change == "fired":
            alerts = [a for a in rule.actions if a.kind == "alert"]
            for a in alerts:
                self.outbox.emit_event("rule", a.severity, f"rule {rule.name}: {rule.config.when}", data)
            if not alerts:
                self.outbox.emit_event("rule", "info", f"rule {rule.name} fired: {rule.config.when}", data)
            if any(a.kind == "busy" for a in rule.actions):
                self.live.set_busy(f"rule:{rule.name}", f"rule {rule.name}: {rule.config.when}")
            sets = [a for a in rule.actions if a.kind == "set"]
            if sets:
                self._set_override(rule, sets)
        else:
            if t.reason:
                data["reason"] = t.reason
            self.outbox.emit_event("rule", "info", f"rule {rule.name} cleared", data)
            self._undo(rule)
        self._set_power_save(any(a.kind == "power_save" for r in self.engine.active() for a in r.actions))

    def _undo(self, rule: CompiledRule) -> None:
        if any(a.kind == "busy" for a in rule.actions):
            self.live.set_busy(f"rule:{rule.name}", None)
        if any(a.kind == "set" for a in rule.actions):
            self._set_override(rule, [])

    def _set_override(self, rule: CompiledRule, sets: list[Any]) -> None:
        partial = merge_layers(*(a.partial() for a in sets)) if sets else None
        try:
            self.layers.set_override(f"rule:{rule.name}", partial)
        except ConfigError as exc:
            self.outbox.emit_event("rule", "warning", f"rule {rule.name}: cannot apply {exc.errors[0]}",
                                {"rule": rule.name, "errors": exc.errors})

    def _set_power_save(self, on: bool) -> None:
        if on == self._power_save:
            return
        self._power_save = on
        if on:
            ps = self.live.config.power_save
            self.live.slowdown.update(monitor=ps.monitor_factor, telemetry=ps.telemetry_factor,
                                     inference=ps.inference_factor)
        else:
            for key in SLOWED:
                self.live.slowdown.pop(key, None)
        log.info("power save %s", "on" if on else "off")
        self.live.notify_changed()

    def _poll_busy_file(self, cfg: Config) -> None:
        path = cfg.busy.file
        busy = bool(path) and os.path.exists(path)  # one stat per turn: cheap enough for the loop
        if busy != self._busy_file:
            self._busy_file = busy
            self.live.set_busy("file", f"{path} exists" if busy else None)
