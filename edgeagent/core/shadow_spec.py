"""The `shadow` field of a model manifest: how a candidate is judged on live windows before it serves.

Shared by the manifest parser (updates), the device's shadow lane (inference) and `edgeagent push`
(ops), so its bounds live in one place. Every field is inside the signed manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_WINDOWS = 1_000_000  # at 100 windows/s about 3 h: longer is a field trial, not a shadow run
MAX_P99_RATIO = 100.0
MAX_TOLERANCE = 1e6
DEFAULT_MIN_AGREEMENT = 0.95
DEFAULT_MAX_P99_RATIO = 1.5
DEFAULT_TOLERANCE = 0.1  # score heads (regression, reconstruction): |a - b| <= tolerance agrees
MAX_SCORE_SHIFT = 1e6


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    """`windows` live windows compared; promote only if agreement >= `min_agreement`, candidate
    p99 / serving p99 <= `max_p99_ratio` and (when given) |mean score shift| <= `max_score_shift`."""

    windows: int
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_p99_ratio: float = DEFAULT_MAX_P99_RATIO
    tolerance: float = DEFAULT_TOLERANCE
    max_score_shift: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"windows": self.windows, "min_agreement": self.min_agreement,
                               "max_p99_ratio": self.max_p99_ratio, "tolerance": self.tolerance}
        if self.max_score_shift is not None:
            out["max_score_shift"] = self.max_score_shift
        return out


class ShadowSpecError(ValueError):
    """Names the field and the bound it broke."""


def _number(raw: Mapping[str, Any], key: str, default: float | None, low: float, high: float,
            low_open: bool = False) -> float | None:
    if key not in raw:
        return default
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ShadowSpecError(f"shadow.{key} must be a finite number, got {str(v)[:40]!r}")
    if float(v) < low or float(v) > high or (low_open and float(v) == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ShadowSpecError(f"shadow.{key} must be within {bound}, got {v!r}")
    return float(v)


def parse_shadow(raw: object) -> ShadowSpec:
    """A `shadow` object; ShadowSpecError naming the first bad field. Unknown keys are ignored
    (the protocol's rule), missing ones take the defaults above; `windows` is required."""
    if not isinstance(raw, dict):
        raise ShadowSpecError("shadow must be an object")
    windows = raw.get("windows")
    if isinstance(windows, bool) or not isinstance(windows, int) or not 1 <= windows <= MAX_WINDOWS:
        raise ShadowSpecError(f"shadow.windows must be an integer within 1..{MAX_WINDOWS}, "
                              f"got {str(windows)[:40]!r}")
    agreement = _number(raw, "min_agreement", DEFAULT_MIN_AGREEMENT, 0.0, 1.0)
    ratio = _number(raw, "max_p99_ratio", DEFAULT_MAX_P99_RATIO, 0.0, MAX_P99_RATIO, low_open=True)
    tolerance = _number(raw, "tolerance", DEFAULT_TOLERANCE, 0.0, MAX_TOLERANCE)
    shift = _number(raw, "max_score_shift", None, 0.0, MAX_SCORE_SHIFT)
    assert agreement is not None and ratio is not None and tolerance is not None
    return ShadowSpec(windows, agreement, ratio, tolerance, shift)


@dataclass(frozen=True, slots=True)
class ShadowOutcome:
    """What a shadow run concluded: promote (hot swap as any install) or not, and the figures."""

    promote: bool
    reason: str
    figures: dict[str, Any]
