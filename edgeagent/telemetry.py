"""Telemetry samples: the monitor's metrics plus inference and spool figures, into the spool.

One sample every `telemetry.interval_s x live.factor("telemetry")` (power_save slows it down). A
sample is `{"seq","ts","metrics","inference","spool"}`; the spool numbers it (`seq`, persisted)
and keeps it until the broker acknowledged it. Batching (`telemetry.batch_max` samples per
message, `telemetry.batch_wait_s`) happens when publishing, so every sample is durable at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from edgeagent.core.live import LiveConfig, Metrics, Sections
from edgeagent.core.logs import Once
from edgeagent.core.tasks import wait_event
from edgeagent.transport.outbox import SampleSink

log = logging.getLogger(__name__)

FIRST_METRICS_WAIT_S = 2.0
SAMPLE_SECTIONS = ("inference", "sensors", "spool")  # `sensors`: a bus source's state and latest values
_once = Once(log)


def build_sample(metrics: dict[str, Any], sections: dict[str, dict[str, Any]], ts: float) -> dict[str, Any]:
    """A sample without its seq (the spool assigns it); absent sections are omitted."""
    sample: dict[str, Any] = {"ts": ts, "metrics": dict(metrics)}
    lag = sections.get("loop", {}).get("lag_p99_ms")
    if lag is not None:
        sample["metrics"]["loop_lag_p99_ms"] = lag
    for name in SAMPLE_SECTIONS:
        if sections.get(name):  # an empty `sensors` (no bus source) is left out
            sample[name] = sections[name]
    return sample


class TelemetryComponent:
    name = "telemetry"

    def __init__(self, live: LiveConfig, metrics: Metrics, sink: Callable[[], SampleSink | None],
                 sections: Sections) -> None:
        self.live = live
        self.metrics = metrics
        self._sink = sink
        self._sections = sections
        self.samples = 0
        self.last_seq = 0
        self._first_metrics = asyncio.Event()

    async def __aenter__(self) -> TelemetryComponent:
        self._first_metrics = asyncio.Event()
        self.metrics.subscribe(lambda _m: self._first_metrics.set())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.sample_now()  # the last word before the transport flushes and says "offline"

    def section(self) -> dict[str, Any]:
        return {"samples": self.samples, "last_seq": self.last_seq, "interval_s": self._interval_s()}

    def _interval_s(self) -> float:
        return self.live.config.telemetry.interval_s * self.live.factor(self.name)

    def sample_now(self) -> int | None:
        """Build one sample and spool it; returns its seq (0 while the spool cannot be written and
        the sample waits in memory, None without a spool)."""
        sink = self._sink()
        if sink is None:
            _once.warning("nosink", "no spool-backed outbox (transport not running); sample dropped")
            return None
        sections = self._sections.snapshot((*SAMPLE_SECTIONS, "loop"))
        seq = sink.add_sample(build_sample(self.metrics.latest, sections, time.time()))
        self.samples += 1
        if seq:  # 0: the spool could not be written now; the sample waits in memory for its seq
            self.last_seq = seq
        return seq

    async def run(self) -> None:
        # the first sample waits (a little) for the monitor's first reading: no empty sample per start
        if not self.metrics.latest:
            await wait_event(self._first_metrics, min(self._interval_s(), FIRST_METRICS_WAIT_S))
        last = -math.inf
        while True:
            interval = self._interval_s()
            due = last + interval
            now = time.monotonic()
            if now < due:
                await self.live.sleep_or_change(due - now)
                continue
            # keep the rate (no drift) unless we fell more than one interval behind
            last = due if now - due < interval else now
            self.sample_now()
