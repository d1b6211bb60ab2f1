"""RulesComponent on a real Hub: events, power_save and its restore, busy gating updates, `set:`
through the config layers, the busy file. Driven step by step with a fake clock."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeagent.core import config as cfgmod
from edgeagent.core.hub import Hub, MemoryOutbox
from edgeagent.monitor.context import build_context, failing_gates
from edgeagent.rules import RulesComponent
from tests.util import async_wait_until

NOON = datetime(2026, 11, 25, 12, 0)  # a Wednesday


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, rules: list[dict[str, Any]], **extra: Any) -> tuple[Hub, RulesComponent, Clock]:
    cfg = cfgmod.build({"device": {"id": "dev1", "state_dir": str(tmp_path)}, "rules": rules, **extra})
    hub = Hub(cfg)
    clock = Clock()
    return hub, RulesComponent(hub, clock=clock, wall=lambda: NOON), clock


def events(hub: Hub) -> list[tuple[str, str, str, dict[str, Any]]]:
    assert isinstance(hub.outbox, MemoryOutbox)
    return [(k, s, m, d) for k, s, m, d, _ in hub.outbox.events]


def feed(hub: Hub, comp: RulesComponent, clock: Clock, t: float, **metrics: Any) -> None:
    clock.t = t
    hub.publish_metrics(metrics, ts=t)
    comp.step()


def test_alert_event_carries_the_values_and_clear_is_an_event(tmp_path: Path) -> None:
    hub, comp, clock = make(tmp_path, [{"name": "hot", "when": "temp_c > 75", "for": "30s",
                                        "then": ["alert:critical"]}])

    async def main() -> None:
        async with comp:
            for t in (0, 10, 29):
                feed(hub, comp, clock, t, temp_c=80.0, cpu_percent=5.0)
            assert events(hub) == []
            feed(hub, comp, clock, 30, temp_c=81.5, cpu_percent=5.0)
            feed(hub, comp, clock, 31, temp_c=70.0, cpu_percent=5.0)

    asyncio.run(main())
    (k1, s1, _m1, d1), (k2, s2, m2, d2) = events(hub)
    assert (k1, s1, d1["state"], d1["values"]) == ("rule", "critical", "fired", {"temp_c": 81.5})
    assert (k2, s2, d2["state"], m2) == ("rule", "info", "cleared", "rule hot cleared")


def test_power_save_slows_components_and_is_restored_when_the_rule_clears(tmp_path: Path) -> None:
    hub, comp, clock = make(tmp_path, [
        {"name": "hot", "when": "temp_c > 75", "clear_when": "temp_c < 70", "then": ["power_save"]},
        {"name": "lb", "when": "battery_percent < 10 and not on_external_power", "then": ["power_save"]},
    ], power_save={"monitor_factor": 5, "telemetry_factor": 6, "inference_factor": 3})

    async def main() -> None:
        async with comp:
            woke = asyncio.ensure_future(hub.changed.wait())
            await asyncio.sleep(0)  # let it start waiting, as a component in sleep_or_change does
            feed(hub, comp, clock, 0, temp_c=80.0, battery_percent=50.0, on_external_power=False)
            await asyncio.wait_for(woke, 1)  # components sleeping in sleep_or_change wake at once
            assert (hub.factor("monitor"), hub.factor("telemetry"), hub.factor("inference")) == (5, 6, 3)
            feed(hub, comp, clock, 1, temp_c=80.0, battery_percent=5.0, on_external_power=False)
            feed(hub, comp, clock, 2, temp_c=69.0, battery_percent=5.0, on_external_power=False)
            assert hub.factor("telemetry") == 6, "still saving: the battery rule is active"
            feed(hub, comp, clock, 3, temp_c=69.0, battery_percent=50.0, on_external_power=False)
            assert hub.slowdown == {}
            feed(hub, comp, clock, 4, temp_c=90.0, battery_percent=50.0, on_external_power=False)
            assert hub.factor("monitor") == 5
        assert hub.slowdown == {}, "stopping the component restores the rates"

    asyncio.run(main())


def test_busy_action_gates_an_update_until_the_rule_clears(tmp_path: Path) -> None:
    hub, comp, clock = make(tmp_path, [{"name": "low-battery",
                                        "when": "battery_percent < 10 and not on_external_power",
                                        "then": ["power_save", "busy"]}])
    gate = cfgmod.build({"updates": {"gates": {"model": {"respect_busy": True}}}}).updates.gates.model

    def gates() -> list[str]:
        ctx = build_context(hub.metrics, None, hub.busy, rtt_ms=10.0, disk_free_mb=10_000.0, cores=4,
                            now=NOON)
        return [f.gate for f in failing_gates(ctx, gate, artifact_bytes=1000)]

    async def main() -> None:
        async with comp:
            feed(hub, comp, clock, 0, battery_percent=50.0, on_external_power=False)
            assert gates() == []
            feed(hub, comp, clock, 1, battery_percent=8.0, on_external_power=False)
            assert hub.busy == {"rule:low-battery": "rule low-battery: battery_percent < 10 and not "
                                                    "on_external_power"}
            assert gates() == ["busy"]
            feed(hub, comp, clock, 2, battery_percent=8.0, on_external_power=True)
            assert hub.busy == {}
            assert gates() == []

    asyncio.run(main())


def test_set_action_is_a_runtime_layer_undone_on_clear(tmp_path: Path) -> None:
    hub, comp, clock = make(tmp_path, [{"name": "burst", "when": "anomaly_rate_1m > 0.2",
                                        "then": ["set:telemetry.interval_s=0.5", "set:logging.level=DEBUG"]}],
                            telemetry={"interval_s": 5})
    hub.providers["inference"] = lambda: {"anomaly_rate_1m": rate, "p95_ms": 3.0}
    rate = 0.5

    async def main() -> None:
        nonlocal rate
        async with comp:
            feed(hub, comp, clock, 0)
            assert hub.config.telemetry.interval_s == 0.5
            assert hub.config.logging.level == "DEBUG"
            # a remote layer arriving meanwhile keeps the rule's override on top
            hub.layers.set_remote({"telemetry": {"batch_max": 7, "interval_s": 9}})
            assert (hub.config.telemetry.interval_s, hub.config.telemetry.batch_max) == (0.5, 7)
            rate = 0.0
            feed(hub, comp, clock, 1)
            assert (hub.config.telemetry.interval_s, hub.config.telemetry.batch_max) == (9.0, 7)
            assert hub.config.logging.level == "INFO"

    asyncio.run(main())


def test_absent_sensor_does_not_crash_and_device_state_is_available(tmp_path: Path) -> None:
    hub, comp, clock = make(tmp_path, [
        {"name": "lb", "when": "battery_percent < 10", "then": ["busy"]},
        {"name": "night", "when": "hour >= 12 and weekday == 2 and not connected and not busy",
         "then": ["alert:info"]},
    ])

    async def main() -> None:
        async with comp:
            feed(hub, comp, clock, 0, temp_c=40.0)  # no battery on this board
            feed(hub, comp, clock, 1, temp_c=40.0)

    asyncio.run(main())
    assert [(d["rule"], d["state"]) for _k, _s, _m, d in events(hub)] == [("night", "fired")]
    assert comp.engine.section() == {"lb": {"state": "idle", "fired": 0},
                                     "night": {"state": "active", "fired": 1}}


def test_busy_file_and_run_loop_follow_new_metrics(tmp_path: Path) -> None:
    flag = tmp_path / "busy.flag"
    hub, comp, _clock = make(tmp_path, [{"name": "hot", "when": "temp_c > 75", "then": ["alert:warning"]}],
                             busy={"file": str(flag)}, monitor={"interval_s": 30})
    comp.clock = __import__("time").monotonic

    async def main() -> None:
        async with comp:
            task = asyncio.create_task(comp.run(), name="rules-test")
            try:
                flag.touch()
                hub.publish_metrics({"temp_c": 20.0})  # wakes the loop long before the 30 s interval
                await async_wait_until(lambda: "file" in hub.busy, 5, message="busy file seen")
                hub.publish_metrics({"temp_c": 90.0})
                await async_wait_until(lambda: events(hub), 5, message="rule fired from the run loop")
                flag.unlink()
                hub.publish_metrics({"temp_c": 90.0})
                await async_wait_until(lambda: "file" not in hub.busy, 5, message="busy file gone")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_live_config_change_reloads_rules_and_clears_removed_active_ones(tmp_path: Path) -> None:
    hub, comp, clock = make(tmp_path, [{"name": "lb", "when": "battery_percent < 10", "then": ["busy"]}])

    async def main() -> None:
        async with comp:
            feed(hub, comp, clock, 0, battery_percent=5.0)
            assert "rule:lb" in hub.busy
            hub.layers.set_remote({"rules": [{"name": "hot", "when": "temp_c > 75", "then": ["busy"]}]})
            feed(hub, comp, clock, 1, battery_percent=5.0)
            assert hub.busy == {}
            assert list(comp.engine.section()) == ["hot"]

    asyncio.run(main())


def test_rules_run_inside_the_agent_on_real_monitor_samples(tmp_path: Path) -> None:
    from edgeagent.agent import Agent, Component
    from edgeagent.monitor.sampler import MonitorComponent

    cfg = cfgmod.build({"device": {"id": "dev1", "state_dir": str(tmp_path)}, "monitor": {"interval_s": 0.05},
                        "rules": [{"name": "alive", "when": "cpu_percent >= 0 and mem_used_percent > 0",
                                   "for": "0.2s", "then": ["power_save", "alert:info"]}]})
    seen: dict[str, float] = {}

    def components(hub: Hub) -> list[Component]:
        return [MonitorComponent(hub), RulesComponent(hub)]

    async def main() -> None:
        agent = Agent(cfg, components)
        task = asyncio.create_task(agent.run(), name="agent-under-test")
        try:
            await async_wait_until(lambda: agent.hub.slowdown, 10, message="power_save from a real sample")
            seen.update(agent.hub.slowdown)
            assert agent.hub.sections()["rules"] == {"alive": {"state": "active", "fired": 1}}
            assert [d["values"].keys() for _k, _s, _m, d in events(agent.hub)] == [
                {"cpu_percent", "mem_used_percent"}]
        finally:
            agent.request_stop("test done")
            await asyncio.wait_for(task, 20)
        assert agent.hub.slowdown == {}

    asyncio.run(main())
    assert seen == {"monitor": 4.0, "telemetry": 4.0, "inference": 2.0}


def test_busy_topic_on_the_local_broker_raises_and_clears_busy(tmp_path: Path, broker: Any) -> None:
    from tests.transport_util import Observer

    hub, comp, _clock = make(tmp_path, [], busy={"topic": "plant/line3/busy"},
                             sensors={"mqtt": {"host": "127.0.0.1", "port": broker.port}})
    plc = Observer(broker.port, topics=(), client_id="plc")
    plc.publish("plant/line3/busy", b'{"busy": true, "reason": "tool change"}', retain=True)

    async def main() -> None:
        async with comp:
            task = asyncio.create_task(comp.run(), name="rules-test")
            try:
                await async_wait_until(lambda: hub.busy.get("topic"), 10, message="retained busy state")
                assert hub.busy == {"topic": "plant/line3/busy: tool change"}
                await asyncio.to_thread(plc.publish, "plant/line3/busy", b"garbage", 1, True)
                await asyncio.to_thread(plc.publish, "plant/line3/busy", b"0", 1, True)
                await async_wait_until(lambda: not hub.busy, 10, message="busy cleared")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        plc.close()
