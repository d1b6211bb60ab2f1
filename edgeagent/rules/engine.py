"""The rule engine, pure: feed (now, values) -> transitions (fired / cleared) with their actions.

A rule is idle, pending (its condition holds but not yet for `for`, or it is cooling down) or
active. It fires when `when` has held for `for` seconds and at least `cooldown` seconds have passed
since it last fired; it clears when `clear_when` holds (hysteresis) or, without one, when `when`
stops holding. A condition that cannot be evaluated (absent sensor, type error) counts as false and
is reported once per rule and cause, so a board without a battery does not crash its rules.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgeagent.core.actions import SET_KEYS, SEVERITIES, Action
from edgeagent.core.config import RuleConfig, check_action, parse_action
from edgeagent.core.errors import ExprEvalError
from edgeagent.core.expr import Expr, Value, check_expression, parse

# re-exported: the rules' vocabulary lives in core so that config validation can check it
__all__ = [
    "HISTORY_MAX_SAMPLES",
    "SET_KEYS",
    "SEVERITIES",
    "Action",
    "CompiledRule",
    "FeedResult",
    "Problem",
    "RuleEngine",
    "RuleState",
    "Transition",
    "check_action",
    "check_expression",
    "compile_rule",
    "parse_action",
]

HISTORY_MAX_SAMPLES = 4096  # per name; the oldest sample is dropped first


@dataclass(frozen=True, slots=True)
class CompiledRule:
    config: RuleConfig
    when: Expr
    clear_when: Expr | None
    actions: tuple[Action, ...]

    @property
    def name(self) -> str:
        return self.config.name


def compile_rule(rc: RuleConfig) -> CompiledRule:
    """ExprError / ValueError for a bad rule; config validation runs the same checks at load."""
    when = parse(rc.when)
    clear = parse(rc.clear_when) if rc.clear_when else None
    return CompiledRule(rc, when, clear, tuple(parse_action(a) for a in rc.then))


@dataclass
class RuleState:
    phase: Literal["idle", "pending", "active"] = "idle"
    since: float | None = None  # when the condition started to hold (pending)
    fired_at: float | None = None
    fired_count: int = 0
    values: dict[str, Any] = field(default_factory=dict)  # what made it fire


@dataclass(frozen=True, slots=True)
class Transition:
    rule: CompiledRule
    change: Literal["fired", "cleared"]
    at: float
    values: dict[str, Any]  # the values the relevant expression referenced, at that moment
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Problem:
    rule: str
    key: str  # stable, for logging once: "temp_c" (absent) or the message
    message: str


@dataclass(frozen=True, slots=True)
class FeedResult:
    transitions: list[Transition]
    problems: list[Problem]


class _Env:
    def __init__(self, values: Mapping[str, Any], history: Mapping[str, deque[tuple[float, float]]],
                 now: float) -> None:
        self.values = values
        self.hist = history
        self.now = now

    def lookup(self, name: str) -> Value:
        if name not in self.values:
            raise ExprEvalError(f"{name} is absent", name)
        value = self.values[name]
        if isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)):
            return float(value)
        raise ExprEvalError(f"{name} is not a number, string or true/false", name)

    def history(self, func: str, name: str, window_s: float) -> float:
        samples = [v for t, v in self.hist.get(name, ()) if t >= self.now - window_s]
        if not samples:
            raise ExprEvalError(f"no history of {name} in the last {window_s:g}s", name)
        if func == "avg":
            return sum(samples) / len(samples)
        return min(samples) if func == "min_over" else max(samples)


class RuleEngine:
    def __init__(self, rules: Sequence[RuleConfig] = ()) -> None:
        self.rules: list[CompiledRule] = []
        self.states: dict[str, RuleState] = {}
        self._history: dict[str, deque[tuple[float, float]]] = {}
        self._windows: dict[str, float] = {}
        self.reconfigure(rules)

    def reconfigure(self, rules: Sequence[RuleConfig], now: float = 0.0) -> list[Transition]:
        """Load a new rule set (live config); a rule whose definition is unchanged keeps its state,
        an active rule that is gone or changed is cleared (so its actions are undone)."""
        compiled = [compile_rule(rc) for rc in rules]  # raises before anything changes
        old = {r.name: r for r in self.rules}
        keep = {r.name for r in compiled if r.name in old and old[r.name].config == r.config}
        out: list[Transition] = []
        for name, rule in old.items():
            if name not in keep:
                st = self.states.pop(name, RuleState())
                if st.phase == "active":
                    out.append(Transition(rule, "cleared", now, {}, "rule changed or removed"))
        self.rules = compiled
        for r in compiled:
            self.states.setdefault(r.name, RuleState())
        self._windows = {}
        for r in compiled:
            for expr in (r.when, r.clear_when):
                for name, window_s in expr.history if expr else ():
                    self._windows[name] = max(window_s, self._windows.get(name, 0.0))
        self._history = {n: self._history.get(n, deque(maxlen=HISTORY_MAX_SAMPLES)) for n in self._windows}
        return out

    def active(self) -> list[CompiledRule]:
        return [r for r in self.rules if self.states[r.name].phase == "active"]

    def feed(self, now: float, values: Mapping[str, Any]) -> FeedResult:
        self._record(now, values)
        env = _Env(values, self._history, now)
        transitions: list[Transition] = []
        problems: list[Problem] = []
        for rule in self.rules:
            st = self.states[rule.name]
            if st.phase == "active":
                if rule.clear_when is not None:
                    clear = self._test(rule, rule.clear_when, env, problems)
                else:
                    clear = not self._test(rule, rule.when, env, problems)
                if clear:
                    expr = rule.clear_when or rule.when
                    transitions.append(Transition(rule, "cleared", now, _snapshot(expr, values)))
                    st.phase, st.since = "idle", None
                continue
            if not self._test(rule, rule.when, env, problems):
                st.phase, st.since = "idle", None
                continue
            if st.since is None:
                st.phase, st.since = "pending", now
            held = now - st.since >= rule.config.for_s
            cooled = st.fired_at is None or now - st.fired_at >= rule.config.cooldown_s
            if held and cooled:
                st.phase, st.fired_at = "active", now
                st.fired_count += 1
                st.values = _snapshot(rule.when, values)
                transitions.append(Transition(rule, "fired", now, dict(st.values)))
        return FeedResult(transitions, problems)

    def _test(self, rule: CompiledRule, expr: Expr, env: _Env, problems: list[Problem]) -> bool:
        try:
            return expr.test(env)
        except ExprEvalError as exc:
            problems.append(Problem(rule.name, exc.name or exc.reason, exc.reason))
            return False

    def _record(self, now: float, values: Mapping[str, Any]) -> None:
        for name, window_s in self._windows.items():
            hist = self._history[name]
            value = values.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                hist.append((now, float(value)))
            while hist and hist[0][0] < now - window_s:
                hist.popleft()

    def section(self) -> dict[str, Any]:
        """For telemetry/health: each rule's phase and how often it fired."""
        return {r.name: {"state": self.states[r.name].phase, "fired": self.states[r.name].fired_count}
                for r in self.rules}


def _snapshot(expr: Expr, values: Mapping[str, Any]) -> dict[str, Any]:
    return {n: values[n] for n in sorted(expr.names) if n in values}
