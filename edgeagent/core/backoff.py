"""The one retry delay every loop uses: exponential, capped, with jitter."""

from __future__ import annotations

import random


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None,
              *, jitter: float = 0.5) -> float:
    """Seconds to wait before retry number `attempt` (1-based): `initial_s` doubling per attempt up
    to `max_s`, then scaled by a random factor in [1 - jitter, 1] so that a fleet that lost its
    broker at the same moment does not come back at the same moment."""
    base = min(max_s, initial_s * 2.0 ** max(0, min(attempt - 1, 60)))
    return float(base * (rng or random).uniform(1.0 - jitter, 1.0))
