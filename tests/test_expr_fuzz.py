"""Fuzzing: no input crashes the rule language or the remote config merge, or escapes them."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.core import config as cfgmod
from edgeagent.core.config_layers import AppliedState, check_remote_layer, dumps_toml
from edgeagent.core.errors import ConfigError, ExprError, ExprEvalError
from edgeagent.core.expr import MAX_DEPTH, Expr, parse

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FUZZ = settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["temp_c", "battery_percent", "on_external_power", "busy", "model", "inference.p95_ms", "absent"]
VALUES: dict[str, Any] = {"temp_c": 71.5, "battery_percent": 0.0, "on_external_power": False, "busy": True,
                          "model": "vib@1", "inference.p95_ms": float("nan")}


class Env:
    def lookup(self, name: str) -> Any:
        if name not in VALUES:
            raise ExprEvalError(f"{name} is absent", name)
        return VALUES[name]

    def history(self, func: str, name: str, window_s: float) -> float:
        if name == "temp_c":
            return 70.0
        raise ExprEvalError("no history", name)


def parse_or_none(text: str) -> Expr | None:
    try:
        return parse(text)
    except ExprError as exc:
        assert 1 <= exc.column <= len(text) + 1, (text, exc.column)
        return None


def check_evaluation(expr: Expr) -> None:
    try:
        assert isinstance(expr.test(Env()), bool)
    except ExprEvalError:
        pass


@FUZZ
@given(st.text(max_size=200))
def test_random_text_only_ever_raises_expr_error(text: str) -> None:
    expr = parse_or_none(text)
    if expr is not None:
        check_evaluation(expr)


TOKENS = st.sampled_from([
    *NAMES, "and", "or", "not", "true", "false", "(", ")", ",", "<", "<=", ">", ">=", "==", "!=", "+", "-",
    "*", "/", "%", "0", "1", "2.5", "1e308", "-1", '"5m"', '"x"', "'y'", "abs", "min", "max", "round", "avg",
    "min_over", "max_over", "__import__", "lambda", "[", "]", "**", ".", ";", "\\", "\x00",
])


@FUZZ
@given(st.lists(TOKENS, max_size=60))
def test_random_token_sequences_only_ever_raise_expr_error(tokens: list[str]) -> None:
    expr = parse_or_none(" ".join(tokens))
    if expr is not None:
        check_evaluation(expr)


@st.composite
def well_formed(draw: st.DrawFn, depth: int = 0) -> str:
    """Valid-looking expressions, so the evaluator (not only the parser) gets fuzzed."""
    numbers = st.floats(allow_nan=False, allow_infinity=False).map(repr)
    leaf = st.one_of(st.sampled_from(NAMES), numbers,
                     st.sampled_from(['"x"', "true", "false", 'avg(temp_c, "1m")', "max_over(absent, '5s')"]))
    if depth > 4 or draw(st.booleans()):
        return draw(leaf)
    op = draw(st.sampled_from(["and", "or", "<", ">=", "==", "!=", "+", "-", "*", "/", "%"]))
    left, right = draw(well_formed(depth + 1)), draw(well_formed(depth + 1))
    text = f"({left} {op} {right})"
    if draw(st.booleans()):
        text = draw(st.sampled_from(["not ", "-", "abs", "round"])) + text
    return text


@FUZZ
@given(well_formed())
def test_well_formed_expressions_evaluate_to_a_bool_or_an_eval_error(text: str) -> None:
    try:
        expr = parse(text, condition=False)
    except ExprError:
        return
    try:
        value = expr.evaluate(Env())
    except ExprEvalError:
        return
    assert isinstance(value, (bool, float, str))


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "open('/etc/passwd')", "temp_c.__class__ > 0", "[x for x in y]",
    "lambda: 1", "temp_c ** 1000000", "a if b else c", "temp_c > 75; import os", "exec('1')",
    "eval('1') > 0", "getattr(temp_c, 'x') > 1",
])
def test_python_does_not_leak_into_the_language(text: str) -> None:
    with pytest.raises(ExprError):
        parse(text)


def test_deep_nesting_and_long_chains_are_bounded_with_clear_errors() -> None:
    for text in ["(" * 5000 + "a" + ")" * 5000, "not " * 5000 + "a", "-" * 5000 + "a > 1",
                 "abs(" * 100 + "a" + ")" * 100 + " > 1"]:
        with pytest.raises(ExprError, match=r"nested too deeply|longer than|more than"):
            parse(text)
    with pytest.raises(ExprError, match="more than 256 tokens"):
        parse("+".join(["a"] * 300) + ">1")
    parse("(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH)  # the limit itself is fine
    e = parse("+".join(["temp_c"] * 120) + ">1")  # a long flat chain evaluates without recursion trouble
    assert e.test(Env()) is True


# --------------------------------------------------------------------------- config merge / validate


KEYS = st.sampled_from(["telemetry", "interval_s", "batch_max", "rules", "name", "when", "then", "logging",
                        "level", "monitor", "inference", "threshold", "device", "id", "state_dir", "mqtt",
                        "port", "updates", "gates", "model", "for", "cooldown", "x", "", "a.b", "ü"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["temp_c > 75", "alert:critical", "DEBUG", "30s", "${HOME}", "\ud800"]))
TABLES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=5)),
                      max_leaves=25)
FILE = {"device": {"id": "dev1", "state_dir": "/tmp/edgeagent-fuzz"}, "telemetry": {"interval_s": 5}}


@FUZZ
@given(st.dictionaries(KEYS, TABLES, max_size=6))
def test_merge_and_validate_give_a_config_or_a_config_error(partial: dict[str, Any]) -> None:
    problems = check_remote_layer(partial)
    try:
        cfg = cfgmod.build(cfgmod.merge_layers(FILE, partial), "fuzz", env={})
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        return
    assert isinstance(cfg, cfgmod.Config)
    if not problems:
        # what the device would persist reads back identical (the applied layer survives restarts)
        state = AppliedState(version=3, sha256="ab", config=partial, confirmed=False, seen_version=3)
        back = AppliedState.from_raw(tomllib.loads(state.to_toml()))
        assert _same(back.config, partial)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@FUZZ
@given(st.dictionaries(st.text(max_size=8), TABLES, max_size=5))
def test_toml_writer_round_trips_or_refuses(table: dict[str, Any]) -> None:
    try:
        text = dumps_toml(table)
    except ValueError:
        assert check_remote_layer(table), "the checker must refuse what the writer cannot write"
        return
    if check_remote_layer(table):
        return  # writable but refused for other reasons (null-free, but e.g. NaN or ${VAR})
    assert _same(tomllib.loads(text), table)


# --------------------------------------------------------------------------- desired config messages


@FUZZ
@given(st.binary(max_size=300))
def test_random_desired_payloads_are_rejected_cleanly(payload: bytes) -> None:
    from edgeagent.core.errors import RemoteConfigRejected
    from edgeagent.remote_config import parse_desired

    try:
        parse_desired("t", payload, {"ops": PUBLIC}, "dev1", ())
    except RemoteConfigRejected as exc:
        assert exc.reason


PUBLIC = Ed25519PrivateKey.generate().public_key()


@FUZZ
@given(st.dictionaries(KEYS, TABLES, max_size=4), st.sampled_from(["AAAA", "", "!!", 5]))
def test_structured_desired_messages_with_bogus_signatures_are_rejected(partial: dict[str, Any],
                                                                         sig: Any) -> None:
    import json

    from edgeagent.core.errors import RemoteConfigRejected
    from edgeagent.remote_config import parse_desired

    msg = {"v": 1, "version": 1, "config": partial, "sig": {"alg": "ed25519", "key_id": "ops", "value": sig}}
    payload = json.dumps(msg).encode()  # ASCII JSON: lone surrogates travel as \ud800 escapes
    try:
        parse_desired("t", payload, {"ops": PUBLIC}, "dev1", ())
    except RemoteConfigRejected as exc:
        assert exc.reason.startswith(("signature:", "malformed JSON")), exc.reason
    else:
        raise AssertionError("a bogus signature was accepted")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, TABLES, max_size=5))
def test_signed_random_layers_never_crash_the_component(partial: dict[str, Any]) -> None:
    import asyncio
    import tempfile
    from pathlib import Path

    from tests.test_remote_config import Device

    with tempfile.TemporaryDirectory() as tmp:
        dev = Device(Path(tmp))
        before = dev.live.config

        async def main() -> None:
            async with dev.comp:
                try:
                    payload = dev.desired(1, partial)
                except (ValueError, UnicodeEncodeError):
                    return  # not even sendable as JSON (lone surrogates): nothing to test
                await dev.push(payload)
                rep = dev.reported()
                assert rep is not None and rep["state"] in ("applied", "rejected"), rep
                if rep["state"] == "rejected":
                    assert dev.live.config is before, "a rejected config changes nothing"
                # whatever happened is reportable and persisted in a readable form
                from edgeagent.core import protocol

                protocol.dumps(rep)
                from edgeagent.core.config_layers import read_applied

                assert read_applied(dev.dir / "state") is not None

        asyncio.run(main())
