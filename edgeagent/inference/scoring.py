"""From a served window to what listeners see: its score, label and the anomaly state with hysteresis."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from edgeagent.core.config import Config
from edgeagent.inference.heads import Calibrated
from edgeagent.inference.preprocess import ModelMeta
from edgeagent.inference.runner import Result

RATE_BUCKETS_S = 60  # anomaly_rate_1m: per-second buckets over the last minute


@dataclass(frozen=True, slots=True)
class Scored:
    """One served window as listeners (rules, tests) see it."""

    seq: int
    ts: float
    model: str
    score: float | None  # None when the model failed on this window
    label: str | None
    anomaly: bool  # the hysteresis state after this window
    result: Result
    pipeline: str = "default"
    unit: str = ""  # a regression head's unit (then `score` is the value)


class AnomalyState:
    """Threshold with hysteresis: raise at score >= threshold, clear after `clear_windows` windows in a
    row with score < clear_threshold."""

    def __init__(self) -> None:
        self.active = False
        self._quiet = 0
        self._buckets: deque[list[int]] = deque()  # [second, windows, above threshold]

    def update(self, score: float, threshold: float, clear: float, now: float,
               clear_windows: int = 1) -> str | None:
        """"raise", "clear" or None (no edge)."""
        sec = int(now)
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append([sec, 0, 0])
            while self._buckets and self._buckets[0][0] <= sec - RATE_BUCKETS_S:
                self._buckets.popleft()
        self._buckets[-1][1] += 1
        self._buckets[-1][2] += score >= threshold
        if not self.active:
            if score >= threshold:
                self.active, self._quiet = True, 0
                return "raise"
            return None
        self._quiet = self._quiet + 1 if score < clear else 0
        if self._quiet >= clear_windows:
            self.active = False
            return "clear"
        return None

    def rate_1m(self, now: float) -> float | None:
        recent = [b for b in self._buckets if b[0] > int(now) - RATE_BUCKETS_S]
        n = sum(b[1] for b in recent)
        return round(sum(b[2] for b in recent) / n, 4) if n else None


def thresholds(cfg: Config, meta: ModelMeta) -> tuple[float, float]:
    """(threshold, clear_threshold): config overrides the model's; clear never above threshold."""
    i = cfg.inference
    return pick_thresholds(i.threshold, i.clear_threshold, meta, None)


def pick_thresholds(threshold: float | None, clear_threshold: float | None, meta: ModelMeta,
                    calibrated: Calibrated | None) -> tuple[float, float]:
    """Config first, then what the device calibrated, then the model's model.toml; clear <= threshold."""
    base: Calibrated | ModelMeta = calibrated if calibrated is not None and threshold is None else meta
    thr = threshold if threshold is not None else base.threshold
    clear = clear_threshold if clear_threshold is not None else base.clear_threshold
    return thr, min(clear, thr)
