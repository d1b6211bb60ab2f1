"""push --shadow: the flag's parser (the manifest's signed `shadow` object) and the figures' line."""

from __future__ import annotations

import argparse
from typing import Any

from edgeagent.core.shadow_spec import ShadowSpecError, parse_shadow


def shadow_arg(text: str) -> dict[str, Any]:
    """argparse type of push's --shadow N[:AGREEMENT] (the manifest's `shadow` object)."""
    windows, sep, agreement = text.partition(":")
    raw: dict[str, Any] = {}
    try:
        raw["windows"] = int(windows)
        if sep:
            raw["min_agreement"] = float(agreement)
        return parse_shadow(raw).as_dict()
    except (ValueError, ShadowSpecError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WINDOWS[:MIN_AGREEMENT], e.g. 500:0.95 "
                                         f"({exc})") from None


def shadow_line(device: str, doc: dict[str, Any]) -> str | None:
    """One line of shadow figures from a job status (None when it carries none)."""
    f = doc.get("shadow")
    if not isinstance(f, dict):
        return None

    def num(key: str, fmt: str) -> str:
        v = f.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    return (f"{device}: shadow {num('compared', 'd')}/{num('windows', 'd')} windows, "
            f"agreement {num('agreement', '.3f')} (min {num('min_agreement', 'g')}), "
            f"p99 ratio {num('p99_ratio', '.2f')}, score shift {num('score_shift', '+.3f')} "
            f"(KS {num('score_ks', '.2f')}), shed {num('shed', 'd')}")
