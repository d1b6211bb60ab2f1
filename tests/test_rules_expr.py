"""The rule expression language: parse errors carry their column, evaluation is strict and safe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import config as cfgmod
from edgeagent.core.errors import ConfigError, ExprError, ExprEvalError
from edgeagent.core.expr import MAX_DEPTH, parse


class Env:
    def __init__(self, **values: Any) -> None:
        self.values = values

    def lookup(self, name: str) -> Any:
        if name not in self.values:
            raise ExprEvalError(f"{name} is absent", name)
        v = self.values[name]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    def history(self, func: str, name: str, window_s: float) -> float:
        raise ExprEvalError("no history", name)


@pytest.mark.parametrize(("text", "message"), [
    ("(temp_c > 75))", "unexpected token ')' at column 14"),
    ("temp_c >", "unexpected end of expression at column 9"),
    ("temp_c > 75 @", "unexpected character '@' at column 13"),
    ("temp_c > > 75", "unexpected token '>' at column 10"),
    ("a < b < c", "chained comparison '<': combine comparisons with 'and' at column 7"),
    ("temp_c + 1", "expected a condition (a comparison, and/or/not, or a true/false name), got a number "
                   "at column 8"),
    ("not 3", "'not' operand: expected a condition, got a number at column 5"),
    ('"a" < 3', "comparing a string with a number using '<' is always false at column 5"),
    ("foo(1) > 2",
     "unknown function 'foo' (known: abs, min, max, round, avg, min_over, max_over) at column 1"),
    ("abs(1, 2) > 0", "abs() takes 1 arguments, got 2 at column 1"),
    ('avg(temp_c, "5 parsecs") > 1', 'avg(): expected a duration like 30, "30s", "5m", "1h" at column 1'),
    ("avg(1, 2) > 1", 'expected avg(name, "5m"): a metric name and a duration string at column 1'),
    ('x == "abc', "unterminated string at column 6"),
    ("", "empty expression at column 1"),
    ("true and", "unexpected end of expression at column 9"),
    ("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1),
     f"expression nested too deeply (more than {MAX_DEPTH} levels) at column {MAX_DEPTH + 1}"),
])
def test_parse_errors_name_the_column(text: str, message: str) -> None:
    with pytest.raises(ExprError) as err:
        parse(text)
    assert str(err.value) == message


def test_config_load_rejects_a_malformed_rule_with_its_key_path_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[rules]]\nname = "hot"\nwhen = "temp_c > 75)"\nthen = ["alert:critical"]\n'
                    '[[rules]]\nname = "b"\nwhen = "busy"\nclear_when = "not"\n'
                    'then = ["alert:loud", "set:mqtt.host=x", "set:telemetry.interval_s=-1", "reboot"]\n')
    with pytest.raises(ConfigError) as err:
        cfgmod.load(path)
    errors = err.value.errors
    assert "rules[0].when: unexpected token ')' at column 12" in errors
    assert "rules[1].clear_when: unexpected end of expression at column 4" in errors
    assert any(e.startswith("rules[1].then[0]: alert severity must be one of") for e in errors)
    assert any(e.startswith("rules[1].then[1]: set: mqtt.host is local-only") for e in errors)
    assert any(e.startswith("rules[1].then[2]: set: telemetry.interval_s: expected a number") for e in errors)
    assert any(e.startswith("rules[1].then[3]: unknown action 'reboot'") for e in errors)


def test_the_examples_of_the_issue_load() -> None:
    cfg = cfgmod.build({"rules": [
        {"name": "hot", "when": "temp_c > 75", "for": "30s", "then": ["alert:critical", "power_save"]},
        {"name": "low-battery", "when": "battery_percent < 10 and not on_external_power",
         "then": ["power_save", "busy"]},
        {"name": "anomaly-burst", "when": "anomaly_rate_1m > 0.2", "then": ["alert:warning"]},
    ]})
    assert [r.name for r in cfg.rules] == ["hot", "low-battery", "anomaly-burst"]
    assert cfg.rules[0].for_s == 30.0


LOW = "battery_percent < 10 and not on_external_power"


@pytest.mark.parametrize(("text", "values", "expected"), [
    ("temp_c > 75", {"temp_c": 80}, True),
    ("temp_c > 75", {"temp_c": 75}, False),
    (LOW, {"battery_percent": 5, "on_external_power": False}, True),
    (LOW, {"battery_percent": 5, "on_external_power": True}, False),
    ("a + b * 2 == 7", {"a": 1, "b": 3}, True),
    ("(a + b) * 2 == 8", {"a": 1, "b": 3}, True),
    ("-a < 0 or a % 2 == 1", {"a": 3}, True),
    ("abs(a - 10) <= 1 and max(a, b, 2) == 11 and min(a, b) == 3", {"a": 11, "b": 3}, True),
    ("round(a, 1) == 2.5", {"a": 2.46}, True),
    ('model == "vib@1.0" and state != "idle"', {"model": "vib@1.0", "state": "busy"}, True),
    ("flag == 1", {"flag": True}, False),  # a boolean is not a number
    ("flag", {"flag": True}, True),
    ("true or missing > 1", {}, True),  # short-circuit: the right side is not looked at
    ("inference.p95_ms > 50", {"inference.p95_ms": 60}, True),
    ("x >= 1e3", {"x": 1000}, True),
])
def test_evaluate(text: str, values: dict[str, Any], expected: bool) -> None:
    assert parse(text).test(Env(**values)) is expected


@pytest.mark.parametrize(("text", "values", "reason"), [
    ("temp_c > 75", {}, "temp_c is absent"),
    ("a / b > 1", {"a": 1, "b": 0}, "division by zero at column 3"),
    ("a > 1", {"a": "text"}, "expected a number at column 1, got 'text'"),
    ("a and true", {"a": 1.0}, "expected true/false at column 1, got 1.0"),
    ("a", {"a": 2.0}, "condition evaluated to float 2.0, not true/false"),
])
def test_evaluation_problems_are_expr_eval_errors(text: str, values: dict[str, Any], reason: str) -> None:
    with pytest.raises(ExprEvalError) as err:
        parse(text).test(Env(**values))
    assert err.value.reason == reason


def test_names_and_history_are_collected_once_at_parse() -> None:
    e = parse('avg(temp_c, "5m") > 70 and max_over(cpu_percent, "1m") > 90 or load1 > 4')
    assert e.names == {"temp_c", "cpu_percent", "load1"}
    assert set(e.history) == {("temp_c", 300.0), ("cpu_percent", 60.0)}
