"""Event-loop lag: how late a periodic 50 ms timer fires, the p99 over the last minute.

Anything slow on the loop (a blocking call, a long computation, a full garbage collection) delays
every task, inference results included; this figure shows it. It is the `loop` section of
health.json and `metrics.loop_lag_p99_ms` in telemetry, and a WARNING event is emitted when the
lag stays above `WARN_MS` for `WARN_FOR_S` (once, until it recovers).

Once the agent has settled (`SETTLE_AFTER_S`), the objects made at start are moved out of the
garbage collector's reach (`gc.freeze`: full collections then scan far fewer objects, a tail-latency
source) and freed heap pages go back to the kernel (`core.heap.trim`, glibc only).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections import deque
from types import TracebackType
from typing import Any

from edgeagent.core import heap
from edgeagent.core.live import Outbox

log = logging.getLogger(__name__)

PERIOD_S = 0.05
WINDOW_S = 60.0
WARN_MS = 100.0
WARN_FOR_S = 10.0
SETTLE_AFTER_S = 15.0


class LagTracker:
    """The pure part: lag observations in, p99 and warn/recover decisions out (no loop, no clock)."""

    def __init__(self, window_s: float = WINDOW_S, warn_ms: float = WARN_MS,
                 warn_for_s: float = WARN_FOR_S) -> None:
        self.window_s = window_s
        self.warn_ms = warn_ms
        self.warn_for_s = warn_for_s
        self._samples: deque[tuple[float, float]] = deque()  # (monotonic time, lag ms)
        self._above_since: float | None = None
        self.warned = False
        self.max_ms = 0.0

    def observe(self, now: float, lag_ms: float) -> str | None:
        """Record one lag; "warn" when it has been above warn_ms for warn_for_s, "recovered" when
        it drops back after a warning, else None."""
        self._samples.append((now, lag_ms))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        self.max_ms = max(self.max_ms, lag_ms)
        if lag_ms > self.warn_ms:
            if self._above_since is None:
                self._above_since = now
            if not self.warned and now - self._above_since >= self.warn_for_s:
                self.warned = True
                return "warn"
            return None
        self._above_since = None
        if self.warned:
            self.warned = False
            return "recovered"
        return None

    def p99_ms(self) -> float | None:
        if not self._samples:
            return None
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]

    def section(self) -> dict[str, Any]:
        p99 = self.p99_ms()
        last = self._samples[-1][1] if self._samples else None
        return {"lag_p99_ms": None if p99 is None else round(p99, 2),
                "lag_last_ms": None if last is None else round(last, 2),
                "lag_max_ms": round(self.max_ms, 2), "samples": len(self._samples),
                "lagging": self._above_since is not None}


def settle() -> None:
    """After start: freeze what exists (gc) and give freed heap pages back (glibc malloc_trim)."""
    gc.collect()
    gc.freeze()
    heap.trim()


class LoopLagComponent:
    name = "loop"

    def __init__(self, outbox: Outbox, period_s: float = PERIOD_S,
                 settle_after_s: float = SETTLE_AFTER_S, tracker: LagTracker | None = None) -> None:
        self.outbox = outbox
        self.period_s = period_s
        self.settle_after_s = settle_after_s
        self.tracker = tracker or LagTracker()
        self.settled = False

    async def __aenter__(self) -> LoopLagComponent:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def section(self) -> dict[str, Any]:
        return self.tracker.section()

    async def run(self) -> None:
        started = time.monotonic()
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            lag_ms = max(0.0, (now - t0 - self.period_s) * 1000.0)
            verdict = self.tracker.observe(now, lag_ms)
            if verdict == "warn":
                t = self.tracker
                self.outbox.emit_event(
                    "error", "warning",
                    f"event loop lagging: timer late by more than {t.warn_ms:g} ms for {t.warn_for_s:g} s",
                    {"lag_p99_ms": t.p99_ms(), "lag_last_ms": round(lag_ms, 2)})
            elif verdict == "recovered":
                log.info("event loop lag back to normal", extra={"kv": {"lag_ms": round(lag_ms, 2)}})
            if not self.settled and now - started >= self.settle_after_s:
                self.settled = True
                settle()
