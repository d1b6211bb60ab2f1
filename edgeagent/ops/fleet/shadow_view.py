"""Shadow evaluation figures in the fleet tools: what a job status's `shadow` object becomes in the
device state (watch) and in the job history (one line appended to the stored reason)."""

from __future__ import annotations

import math
from typing import Any

# the figures kept per job: numbers only, so a device cannot grow the fleet store with free text
FIELDS = ("windows", "compared", "agreement", "min_agreement", "p99_ratio", "score_shift", "score_ks", "shed")


def figures(raw: object) -> dict[str, float] | None:
    """The numeric figures of a job status's `shadow` object (None when it has none)."""
    if not isinstance(raw, dict):
        return None
    out = {k: float(v) for k, v in raw.items()
           if k in FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return out or None


def note(f: dict[str, float] | None) -> str:
    """'shadow 120/500 windows, agreement 0.992, p99 ratio 1.02, shed 3' (empty without figures)."""
    if not f:
        return ""
    parts = [f"shadow {f.get('compared', 0):.0f}/{f.get('windows', 0):.0f} windows"]
    if "agreement" in f:
        parts.append(f"agreement {f['agreement']:.3f}")
    if "p99_ratio" in f:
        parts.append(f"p99 ratio {f['p99_ratio']:.2f}")
    if "score_shift" in f:
        parts.append(f"score shift {f['score_shift']:+.3f}")
    if f.get("shed"):
        parts.append(f"shed {f['shed']:.0f}")
    return ", ".join(parts)


def cell(job: dict[str, Any] | None) -> str:
    """The watch table's `shadow` column: progress and agreement of a job in shadow."""
    f = (job or {}).get("shadow")
    if not isinstance(f, dict) or (job or {}).get("state") != "shadowing":
        return ""
    agreement = f.get("agreement")
    return f"{f.get('compared', 0):.0f}/{f.get('windows', 0):.0f} " + (
        f"{agreement:.3f}" if isinstance(agreement, float) else "-")
