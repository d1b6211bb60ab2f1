"""What a rule may do (`then = [...]`): parsed here in core so that config validation can check it.

The values of `set:<key>=<value>` are validated against the config schema by the caller's
`check_set` (core/config.py passes its own `build`), which keeps this module free of the schema.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edgeagent.core.layer_checks import LOCAL_ONLY

SEVERITIES = ("info", "warning", "critical")
# runtime knobs a rule may set (`set:telemetry.interval_s=60`); anything else needs a remote config,
# and no rule (not even one arriving in a remote config) may set a local-only key (tests hold it)
SET_KEYS = ("telemetry.interval_s", "telemetry.batch_max", "monitor.interval_s", "inference.threshold",
            "inference.clear_threshold", "logging.level")
_SET_RE = re.compile(r"^set:([a-z_.]+)=(.*)$", re.DOTALL)

# the problems of a partial config table ([] when it validates)
SetCheck = Callable[[dict[str, Any]], list[str]]


@dataclass(frozen=True, slots=True)
class Action:
    kind: Literal["alert", "power_save", "busy", "set"]
    text: str
    severity: str = ""  # alert
    key: str = ""  # set: "section.field"
    value: Any = None  # set: the parsed value

    def partial(self) -> dict[str, Any]:
        """A `set:` action as a partial config table: {"telemetry": {"interval_s": 60.0}}."""
        section, _, name = self.key.partition(".")
        return {section: {name: self.value}}


def is_local_only(key: str) -> bool:
    """`key` is, or lies under, a key only the local file may set (core.layer_checks.LOCAL_ONLY)."""
    return any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in LOCAL_ONLY)


def _scalar(text: str) -> Any:
    t = text.strip()
    if t in ("true", "false"):
        return t == "true"
    for conv in (int, float):
        try:
            value = conv(t)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            break
        return value
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        return t[1:-1]
    return t


def parse_action(text: str, check_set: SetCheck) -> Action:
    """`alert:<severity>`, `power_save`, `busy` or `set:<key>=<value>`; ValueError says what is wrong."""
    if text == "power_save":
        return Action("power_save", text)
    if text == "busy":
        return Action("busy", text)
    if text.startswith("alert:"):
        severity = text[len("alert:"):]
        if severity not in SEVERITIES:
            raise ValueError(f"alert severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        return Action("alert", text, severity=severity)
    m = _SET_RE.match(text)
    if m:
        key, value = m.group(1), _scalar(m.group(2))
        if is_local_only(key):
            raise ValueError(f"set: {key} is local-only")
        if key not in SET_KEYS:
            raise ValueError(f"set: {key!r} is not a runtime knob; allowed: {', '.join(SET_KEYS)}")
        action = Action("set", text, key=key, value=value)
        problems = check_set(action.partial())
        if problems:
            raise ValueError(f"set: {'; '.join(problems)}")
        return action
    raise ValueError(f"unknown action {text!r}; expected alert:<info|warning|critical>, power_save, busy "
                     f"or set:<key>=<value>")
