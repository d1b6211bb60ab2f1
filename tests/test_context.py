"""Update gates as pure functions: each one failing alone, with its measured value; backoff; windows."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import pytest

from edgeagent.core.config import GateConfig
from edgeagent.monitor.context import DeviceContext, MetricsAverager, build_context, failing_gates, next_try_s

WED_10 = datetime(2026, 11, 25, 10, 0)  # a Wednesday
ALL = GateConfig(battery_min_percent=30, load_max=1.5, cpu_max_percent=80, mem_free_min_mb=64,
                 disk_margin=2.0, temp_max_c=75, network_rtt_max_ms=500,
                 maintenance_windows=("Mon-Sun 00:00-24:00",), respect_busy=True)
OK = DeviceContext(now=WED_10, battery_percent=90, on_external_power=False, load_per_core=0.2, cpu_percent=10,
                   mem_available_mb=900, disk_free_mb=1000, temp_c=50, rtt_ms=20, busy={})


def ctx(**kw: Any) -> DeviceContext:
    return DeviceContext(**{**{f: getattr(OK, f) for f in OK.__slots__}, **kw})


def test_all_open() -> None:
    assert failing_gates(OK, ALL, artifact_bytes=10 << 20) == []


@pytest.mark.parametrize(("change", "gate", "text"), [
    ({"battery_percent": 8}, "battery", "battery 8% < 30%"),
    ({"load_per_core": 2.5}, "load", "load 2.50 per core > 1.5"),
    ({"cpu_percent": 97}, "cpu", "cpu 97% > 80%"),
    ({"mem_available_mb": 20}, "memory", "memory 20 MB free < 64 MB"),
    ({"disk_free_mb": 15}, "disk", "disk 15 MB free < 20 MB (artifact x 2)"),
    ({"temp_c": 81.5}, "temperature", "temperature 81.5 C > 75 C"),
    ({"rtt_ms": 900}, "network", "network rtt 900 ms > 500 ms"),
    ({"rtt_ms": None}, "network", "not connected"),
    ({"busy": {"rules": "press cycle running"}}, "busy", "busy (rules: press cycle running)"),
])
def test_each_gate_alone(change: dict[str, Any], gate: str, text: str) -> None:
    fails = failing_gates(ctx(**change), ALL, artifact_bytes=10 << 20)
    assert [f.gate for f in fails] == [gate]
    assert text in fails[0].reason


def test_battery_gate_open_on_external_power_and_without_battery() -> None:
    assert failing_gates(ctx(battery_percent=8, on_external_power=True), ALL) == []
    assert failing_gates(ctx(battery_percent=None), ALL) == []


def test_windows_local_time_and_overnight() -> None:
    cfg = GateConfig(maintenance_windows=("Mon-Fri 02:00-04:30",))
    fails = failing_gates(ctx(now=WED_10), cfg)
    assert [f.gate for f in fails] == ["window"] and "next opens Thu 02:00" in fails[0].reason
    assert failing_gates(ctx(now=datetime(2026, 11, 26, 3, 0)), cfg) == []
    night = GateConfig(maintenance_windows=("Fri 22:00-02:00",))
    assert failing_gates(ctx(now=datetime(2026, 11, 28, 1, 30)), night) == []  # Saturday 01:30
    assert failing_gates(ctx(now=datetime(2026, 11, 28, 2, 30)), night) != []


def test_critical_skips_only_the_skippable() -> None:
    cfg = GateConfig(battery_min_percent=30, temp_max_c=70, skippable=("battery",))
    c = ctx(battery_percent=5, temp_c=90)
    assert [f.gate for f in failing_gates(c, cfg, critical=False)] == ["battery", "temperature"]
    assert [f.gate for f in failing_gates(c, cfg, critical=True)] == ["temperature"]


def test_busy_ignored_when_not_respected() -> None:
    assert failing_gates(ctx(busy={"file": "x"}), GateConfig(respect_busy=False)) == []


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    cfg = GateConfig(battery_min_percent=30, backoff_initial_s=10, backoff_max_s=100)
    fails = failing_gates(ctx(battery_percent=5), cfg)
    rng = random.Random(1)
    delays = [next_try_s(a, cfg, fails, OK, rng) for a in range(1, 10)]
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20
    assert all(50 <= d <= 100 for d in delays[5:])


def test_window_only_waits_exactly_for_the_window() -> None:
    cfg = GateConfig(maintenance_windows=("Wed 10:30-11:00",))
    fails = failing_gates(OK, cfg)
    assert next_try_s(1, cfg, fails, OK) == pytest.approx(1800)


def test_context_averages_cpu_and_load() -> None:
    import time

    avg = MetricsAverager(horizon_s=60)
    now = time.monotonic()
    avg.add({"cpu_percent": 100, "load1": 9.0}, ts=now - 120)  # too old: ignored
    for cpu in (100, 0, 20):
        avg.add({"cpu_percent": cpu, "load1": 3.0}, ts=now)
    c = build_context({"cpu_percent": 100, "battery_percent": 55, "on_external_power": True}, avg, {}, 12.0,
                      500.0, cores=2, now=WED_10)
    assert c.cpu_percent == pytest.approx(40) and c.load_per_core == pytest.approx(1.5)
    assert c.battery_percent == 55 and c.on_external_power is True and c.rtt_ms == 12.0
