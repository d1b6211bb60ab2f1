"""The pure rule engine, driven by a fake clock and metric streams."""

from __future__ import annotations

from typing import Any

from edgeagent.core import config as cfgmod
from edgeagent.core.config import RuleConfig
from edgeagent.rules.engine import RuleEngine


def rules(*tables: dict[str, Any]) -> tuple[RuleConfig, ...]:
    return cfgmod.build({"rules": list(tables)}).rules


def run(engine: RuleEngine, stream: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, str, str]]:
    out = []
    for now, values in stream:
        for t in engine.feed(now, values).transitions:
            out.append((now, t.rule.name, t.change))
    return out


def test_for_requires_the_condition_to_hold_that_long() -> None:
    e = RuleEngine(rules({"name": "hot", "when": "temp_c > 75", "for": "30s", "then": ["alert:critical"]}))
    stream = [(0, {"temp_c": 80}), (20, {"temp_c": 80}), (25, {"temp_c": 70}),  # broken: starts over
              (26, {"temp_c": 80}), (50, {"temp_c": 80}), (55, {"temp_c": 81}), (56, {"temp_c": 82}),
              (57, {"temp_c": 60})]
    assert run(e, stream) == [(56, "hot", "fired"), (57, "hot", "cleared")]
    assert e.states["hot"].phase == "idle"


def test_fired_transition_carries_the_values_that_triggered_it() -> None:
    e = RuleEngine(rules({"name": "lb", "when": "battery_percent < 10 and not on_external_power",
                          "then": ["busy"]}))
    [t] = e.feed(0, {"battery_percent": 7.5, "on_external_power": False, "cpu_percent": 3}).transitions
    assert t.change == "fired"
    assert t.values == {"battery_percent": 7.5, "on_external_power": False}


def test_clear_when_gives_hysteresis() -> None:
    e = RuleEngine(rules({"name": "hot", "when": "temp_c > 75", "clear_when": "temp_c < 70",
                          "then": ["power_save"]}))
    stream = [(0, {"temp_c": 76}), (1, {"temp_c": 74}), (2, {"temp_c": 71}), (3, {"temp_c": 76}),
              (4, {"temp_c": 69.9}), (5, {"temp_c": 74})]
    assert run(e, stream) == [(0, "hot", "fired"), (4, "hot", "cleared")]


def test_cooldown_spaces_firings_and_fires_late_if_the_condition_still_holds() -> None:
    e = RuleEngine(rules({"name": "burst", "when": "anomaly_rate_1m > 0.2", "cooldown": "60s",
                          "then": ["alert:warning"]}))
    hi, lo = {"anomaly_rate_1m": 0.5}, {"anomaly_rate_1m": 0.0}
    stream = [(0, hi), (1, lo), (10, hi), (30, lo), (40, hi), (59, hi), (60, hi), (61, lo), (62, hi)]
    # fired at 0; 10 and 40 are within the cooldown (pending); at 60 the cooldown is over and it holds
    assert run(e, stream) == [(0, "burst", "fired"), (1, "burst", "cleared"), (60, "burst", "fired"),
                              (61, "burst", "cleared")]
    assert e.states["burst"].fired_count == 2


def test_absent_names_make_the_condition_false_and_are_reported_not_raised() -> None:
    e = RuleEngine(rules({"name": "lb", "when": "battery_percent < 10", "then": ["busy"]},
                         {"name": "hot", "when": "temp_c > 75", "then": ["alert:info"]}))
    result = e.feed(0, {"temp_c": 90})
    assert [t.rule.name for t in result.transitions] == ["hot"]
    assert [(p.rule, p.key) for p in result.problems] == [("lb", "battery_percent")]


def test_a_rule_without_clear_when_clears_when_its_sensor_disappears() -> None:
    e = RuleEngine(rules({"name": "hot", "when": "temp_c > 75", "then": ["power_save"]}))
    assert run(e, [(0, {"temp_c": 90}), (1, {})]) == [(0, "hot", "fired"), (1, "hot", "cleared")]


def test_history_functions_average_over_their_window() -> None:
    e = RuleEngine(rules({"name": "warm", "when": 'avg(temp_c, "10s") > 70', "then": ["alert:info"]}))
    stream = [(float(t), {"temp_c": 60.0}) for t in range(10)]
    stream += [(float(t), {"temp_c": 85.0}) for t in range(10, 16)]
    fired = run(e, stream)
    assert fired and fired[0][1:] == ("warm", "fired")
    # the window includes both ends: at 13 it holds 3..13 -> (7 x 60 + 4 x 85) / 11 = 69.1,
    # at 14 it holds 4..14 -> (6 x 60 + 5 x 85) / 11 = 71.4
    assert fired[0][0] == 14.0


def test_reconfigure_keeps_unchanged_rules_and_clears_removed_active_ones() -> None:
    hot = {"name": "hot", "when": "temp_c > 75", "then": ["power_save"]}
    lb = {"name": "lb", "when": "battery_percent < 10", "then": ["busy"]}
    e = RuleEngine(rules(hot, lb))
    run(e, [(0, {"temp_c": 80, "battery_percent": 5})])
    assert {r.name for r in e.active()} == {"hot", "lb"}
    cleared = e.reconfigure(rules(hot, {**lb, "when": "battery_percent < 20"}), now=1)
    assert [(t.rule.name, t.change) for t in cleared] == [("lb", "cleared")]
    assert [r.name for r in e.active()] == ["hot"]
    assert e.states["hot"].fired_count == 1
