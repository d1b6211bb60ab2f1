"""Units in config values: durations written as 30, "30s", "5m", "250ms" (config, rules, ops tools)."""

from __future__ import annotations

import re

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration_s(value: object) -> float:
    """30 -> 30.0, "30s" -> 30.0, "5m" -> 300.0, "250ms" -> 0.25; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("expected a duration like 30, \"30s\", \"5m\", \"1h\"")
