"""Shadow evaluation, decided without I/O: does a candidate behave like the serving model on live windows?

The shadow lane (shadow_lane.py) runs the candidate on the windows the serving model just served and
tells a `ShadowTally` each pair of answers. The tally keeps the figures an operator sees (agreement,
score distribution shift, latency ratio, windows shed) and, once `spec.windows` pairs are compared,
gives the verdict: promote only if every criterion of the manifest's `shadow` holds.

Agreement is per head kind (`comparator_for`): the same class for a classifier head; for a score head
(regression value, reconstruction error, a bare score) the two scores within `spec.tolerance`. The
tally itself is kind-agnostic, so each pipeline's serving model can be shadowed whatever its head.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeagent.core.shadow_spec import ShadowSpec

CLASSIFIER_HEADS = frozenset({"softmax"})
SCORE_HEADS = frozenset({"score", "regression", "reconstruction"})
LATENCY_SAMPLES = 1024  # invokes kept per side for the p99s (a sliding window)
SCORE_SAMPLES = 2048  # scores kept per side for the distribution shift (KS statistic)
MIN_P99_MS = 0.001  # a serving p99 below this (cache hits) is clamped: the ratio stays finite


@dataclass(frozen=True, slots=True)
class Answer:
    """One model's answer on one window: its class (classifier heads), its score, its invoke time."""

    label: int | None
    score: float
    infer_s: float
    ok: bool = True  # served without error and finite


Comparator = Callable[[Answer, Answer], bool]


def comparator_for(head: str, tolerance: float) -> Comparator:
    """Serving vs candidate agreement for a head kind; ValueError for a kind nobody compares."""
    if head in CLASSIFIER_HEADS:
        return lambda s, c: s.ok and c.ok and s.label is not None and s.label == c.label
    if head in SCORE_HEADS:
        return lambda s, c: s.ok and c.ok and abs(s.score - c.score) <= tolerance
    raise ValueError(f"no shadow comparison for head kind {head!r}")


@dataclass(frozen=True, slots=True)
class Promote:
    figures: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RejectCandidate:
    reason: str
    figures: dict[str, Any]


Verdict = Promote | RejectCandidate


def _p99_ms(values: deque[float]) -> float | None:
    return round(float(np.percentile(list(values), 99)) * 1000.0, 4) if values else None


def ks_statistic(a: list[float], b: list[float]) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs
    (0 = same distribution of scores, 1 = disjoint)."""
    if not a or not b:
        return None
    xa, xb = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([xa, xb])
    cdf_a = np.searchsorted(xa, grid, side="right") / len(xa)
    cdf_b = np.searchsorted(xb, grid, side="right") / len(xb)
    return round(float(np.max(np.abs(cdf_a - cdf_b))), 4)


class ShadowTally:
    """Counts pairs of answers and windows shed; `verdict()` once `spec.windows` pairs are in."""

    def __init__(self, spec: ShadowSpec, head: str) -> None:
        self.spec = spec
        self.head = head
        self.agrees = comparator_for(head, spec.tolerance)
        self.compared = 0
        self.agreed = 0
        self.candidate_errors = 0
        self.shed = 0  # windows the candidate never saw: the serving model came first
        self._sum = [0.0, 0.0]  # score sums (serving, candidate) over finite pairs
        self._finite = 0
        self._scores: tuple[deque[float], deque[float]] = (deque(maxlen=SCORE_SAMPLES),
                                                           deque(maxlen=SCORE_SAMPLES))
        self._infer: tuple[deque[float], deque[float]] = (deque(maxlen=LATENCY_SAMPLES),
                                                          deque(maxlen=LATENCY_SAMPLES))

    @property
    def complete(self) -> bool:
        return self.compared >= self.spec.windows

    def observe(self, serving: Answer, candidate: Answer) -> bool:
        """Count one pair; True when this pair completed the run."""
        if self.complete:
            return False
        self.compared += 1
        if self.agrees(serving, candidate):
            self.agreed += 1
        if not candidate.ok:
            self.candidate_errors += 1
        elif math.isfinite(serving.score) and math.isfinite(candidate.score):
            self._finite += 1
            self._sum[0] += serving.score
            self._sum[1] += candidate.score
            self._scores[0].append(serving.score)
            self._scores[1].append(candidate.score)
        if serving.infer_s > 0:  # a cache hit has no invoke time
            self._infer[0].append(serving.infer_s)
        if candidate.ok:
            self._infer[1].append(candidate.infer_s)
        return self.complete

    def shed_one(self) -> None:
        self.shed += 1

    # ------------------------------------------------------------------ figures
    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def p99_ratio(self) -> float | None:
        s, c = _p99_ms(self._infer[0]), _p99_ms(self._infer[1])
        if s is None or c is None:
            return None
        return round(c / max(s, MIN_P99_MS), 3)

    def figures(self) -> dict[str, Any]:
        """What the job status, telemetry and `fleet history` carry (JSON-ready, rounded)."""
        n = self._finite
        mean_s = self._sum[0] / n if n else None
        mean_c = self._sum[1] / n if n else None
        agreement = self.agreement
        return {
            "windows": self.spec.windows, "compared": self.compared,
            "progress": round(min(1.0, self.compared / self.spec.windows), 4),
            "agreement": None if agreement is None else round(agreement, 4),
            "min_agreement": self.spec.min_agreement,
            "score_mean_serving": None if mean_s is None else round(mean_s, 4),
            "score_mean_candidate": None if mean_c is None else round(mean_c, 4),
            "score_shift": None if mean_s is None or mean_c is None else round(mean_c - mean_s, 4),
            "score_ks": ks_statistic(list(self._scores[0]), list(self._scores[1])),
            "p99_ms_serving": _p99_ms(self._infer[0]), "p99_ms_candidate": _p99_ms(self._infer[1]),
            "p99_ratio": self.p99_ratio, "max_p99_ratio": self.spec.max_p99_ratio,
            "candidate_errors": self.candidate_errors, "shed": self.shed,
        }

    # ------------------------------------------------------------------ decisions
    def verdict(self) -> Verdict | None:
        """None until `spec.windows` pairs are compared; then promote or reject (with the figures)."""
        if not self.complete:
            return None
        return self._judge(self.figures())

    def timed_out(self, elapsed_s: float) -> RejectCandidate:
        """The run did not complete in time (windows shed under load, or too few windows)."""
        f = self.figures()
        return RejectCandidate(f"shadow timed out after {elapsed_s:.0f} s: {self.compared} of "
                               f"{self.spec.windows} windows compared, {self.shed} shed; "
                               + _describe(f, self.spec), f)

    def _judge(self, f: dict[str, Any]) -> Verdict:
        spec, failed = self.spec, []
        agreement = f["agreement"] or 0.0
        if agreement < spec.min_agreement:
            failed.append("agreement")
        ratio = f["p99_ratio"]
        if ratio is not None and ratio > spec.max_p99_ratio:
            failed.append("latency")
        shift = f["score_shift"]
        if spec.max_score_shift is not None and shift is not None and abs(shift) > spec.max_score_shift:
            failed.append("score shift")
        if self.candidate_errors:
            failed.append("errors")
        if not failed:
            return Promote(f)
        return RejectCandidate(f"shadow failed ({', '.join(failed)}) over {self.compared} windows: "
                               + _describe(f, spec), f)


def _describe(f: dict[str, Any], spec: ShadowSpec) -> str:
    """The figures as one line: what an operator reads in the job's reason."""
    agreement = "n/a" if f["agreement"] is None else f"{f['agreement']:.3f}"
    ratio = "n/a" if f["p99_ratio"] is None else f"{f['p99_ratio']:.2f}"
    shift = "n/a" if f["score_shift"] is None else f"{f['score_shift']:+.3f}"
    parts = [f"agreement {agreement} (min {spec.min_agreement:g})",
             f"p99 ratio {ratio} (max {spec.max_p99_ratio:g})",
             f"score shift {shift} (KS {f['score_ks'] if f['score_ks'] is not None else 'n/a'})"]
    if f["candidate_errors"]:
        parts.append(f"{f['candidate_errors']} candidate errors")
    return "; ".join(parts)
