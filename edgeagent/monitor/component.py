"""MonitorComponent: samples the board at the configured pace and publishes to the metrics feed."""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType
from typing import Any

from edgeagent.core.live import LiveConfig
from edgeagent.core.live import Metrics as MetricsFeed
from edgeagent.monitor.sampler import Metrics, Sampler

RECHECK_S = 5.0  # the component re-reads its interval at least this often


class MonitorComponent:
    """Samples at `monitor.interval_s x live.factor("monitor")` and publishes to the metrics feed.

    The sample runs in a worker thread (`asyncio.to_thread`, about 50 us of CPU per round trip):
    the sample itself is cheap (about 0.2-0.7 ms of CPU on x86, see `scripts/bench monitor`), but
    /proc and /sys reads can stall under I/O pressure and vcgencmd forks a child, and the event
    loop must never wait on either.
    """

    name = "monitor"

    def __init__(self, live: LiveConfig, feed: MetricsFeed, sampler: Sampler | None = None) -> None:
        self.live = live
        self.feed = feed
        self._sampler = sampler
        self.samples = 0
        self.last_cpu_ms = 0.0
        self._cpu_ms_total = 0.0

    async def __aenter__(self) -> MonitorComponent:
        if self._sampler is None:
            self._sampler = Sampler(self.live.config.monitor)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def section(self) -> dict[str, Any]:
        """For health.json: what the monitor costs."""
        mean = self._cpu_ms_total / self.samples if self.samples else 0.0
        return {"samples": self.samples, "interval_s": self._interval_s(),
                "last_sample_cpu_ms": round(self.last_cpu_ms, 3), "mean_sample_cpu_ms": round(mean, 3)}

    def _interval_s(self) -> float:
        return self.live.config.monitor.interval_s * self.live.factor(self.name)

    def _sample(self, sampler: Sampler) -> Metrics:
        t0 = time.thread_time()
        metrics = sampler.sample(time.time())
        self.last_cpu_ms = (time.thread_time() - t0) * 1000.0
        return metrics

    async def run(self) -> None:
        sampler = self._sampler
        if sampler is None:
            raise RuntimeError("enter the monitor component before run()")
        last = -math.inf
        while True:
            # re-read on every turn: a live config change or power_save applies at once, while a
            # knob that does not touch the monitor (busy, ...) does not cause an extra sample
            due = last + self._interval_s()
            now = time.monotonic()
            if now < due:
                # capped: a change notified before the wait is registered is otherwise missed
                # (LiveConfig.sleep_or_change pulses an Event), and would wait out the old interval
                await self.live.sleep_or_change(min(due - now, RECHECK_S))
                continue
            last = now
            sampler.configure(self.live.config.monitor)
            metrics = await asyncio.to_thread(self._sample, sampler)
            self.samples += 1
            self._cpu_ms_total += self.last_cpu_ms
            self.feed.publish(metrics.as_dict(), metrics.ts)
