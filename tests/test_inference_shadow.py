"""Shadow evaluation: the pure tally and verdict, the manifest's bounds, and the lane on a real runner
(real interpreters): same windows, serving results untouched, shadow shed first under load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeagent.core.errors import ManifestRejected
from edgeagent.core.shadow_spec import MAX_WINDOWS, ShadowSpec, ShadowSpecError, parse_shadow
from edgeagent.inference.preprocess import load_model_meta
from edgeagent.inference.runner import ModelSlot, Result, Runner
from edgeagent.inference.runtime import load_interpreter
from edgeagent.inference.shadow import (
    Answer,
    Promote,
    RejectCandidate,
    ShadowTally,
    comparator_for,
    ks_statistic,
)
from edgeagent.inference.shadow_lane import ShadowLane
from edgeagent.sensors.sources import VibrationSimulator, Windower
from edgeagent.updates import manifest
from tests.inference_helpers import MODELS, RUNTIMES, SHIPPED, UNSEEN_SEED

FLIPPED = MODELS / "shadow" / "flipped"


# ------------------------------------------------------------------------------------ pure decisions
def cls(label: int, score: float = 0.1, infer_s: float = 1e-4) -> Answer:
    return Answer(label, score, infer_s)


def test_classifier_heads_agree_on_the_class_score_heads_within_the_tolerance() -> None:
    same_class = comparator_for("softmax", 0.1)
    assert same_class(cls(2, 0.9), cls(2, 0.6))
    assert not same_class(cls(0, 0.1), cls(1, 0.1))
    assert not same_class(cls(0), Answer(None, float("nan"), 0.0, ok=False))
    for head in ("score", "regression", "reconstruction"):
        close = comparator_for(head, 0.1)
        assert close(Answer(None, 0.50, 0.0), Answer(None, 0.58, 0.0))
        assert not close(Answer(None, 0.50, 0.0), Answer(None, 0.65, 0.0))
        assert not close(Answer(None, 0.50, 0.0), Answer(None, float("nan"), 0.0, ok=False))
    with pytest.raises(ValueError, match="no shadow comparison"):
        comparator_for("mystery", 0.1)


def test_a_candidate_that_agrees_is_promoted_after_n_windows_with_its_figures() -> None:
    t = ShadowTally(ShadowSpec(windows=10), "softmax")
    for i in range(9):
        assert not t.observe(cls(i % 4), cls(i % 4))
        assert t.verdict() is None
    assert t.observe(cls(1), cls(1))
    v = t.verdict()
    assert isinstance(v, Promote)
    assert v.figures["compared"] == 10 and v.figures["agreement"] == 1.0 and v.figures["progress"] == 1.0
    assert v.figures["p99_ratio"] == 1.0 and v.figures["score_shift"] == 0.0 and v.figures["score_ks"] == 0.0
    assert not t.observe(cls(1), cls(2))  # complete: later pairs are not counted
    assert t.compared == 10


def test_low_agreement_rejects_with_the_agreement_in_the_reason() -> None:
    t = ShadowTally(ShadowSpec(windows=20, min_agreement=0.95), "softmax")
    for i in range(20):
        t.observe(cls(0, 0.1), cls(0 if i < 18 else 3, 0.1 if i < 18 else 0.9))
    v = t.verdict()
    assert isinstance(v, RejectCandidate)
    assert "agreement 0.900 (min 0.95)" in v.reason and "(agreement)" in v.reason
    assert v.figures["score_shift"] == pytest.approx(0.08)


def test_latency_ratio_score_shift_and_candidate_errors_each_reject() -> None:
    slow = ShadowTally(ShadowSpec(windows=5, max_p99_ratio=1.5), "softmax")
    for _ in range(5):
        slow.observe(cls(0, infer_s=1e-3), cls(0, infer_s=2e-3))
    v = slow.verdict()
    assert isinstance(v, RejectCandidate) and "(latency)" in v.reason and "p99 ratio 2.00" in v.reason

    shifted = ShadowTally(ShadowSpec(windows=5, min_agreement=0.0, max_score_shift=0.1), "regression")
    for _ in range(5):
        shifted.observe(Answer(None, 1.0, 1e-4), Answer(None, 1.5, 1e-4))
    v = shifted.verdict()
    assert isinstance(v, RejectCandidate) and "score shift" in v.reason and "+0.500" in v.reason

    failing = ShadowTally(ShadowSpec(windows=3, min_agreement=0.0), "softmax")
    for _ in range(3):
        failing.observe(cls(0), Answer(None, float("nan"), 0.0, ok=False))
    v = failing.verdict()
    assert isinstance(v, RejectCandidate) and "3 candidate errors" in v.reason


def test_shed_windows_do_not_count_and_a_timeout_rejects_with_the_counts() -> None:
    t = ShadowTally(ShadowSpec(windows=100), "softmax")
    for _ in range(7):
        t.shed_one()
    t.observe(cls(0), cls(0))
    v = t.timed_out(61.0)
    assert v.figures["shed"] == 7 and v.figures["compared"] == 1
    assert "timed out after 61 s: 1 of 100 windows compared, 7 shed" in v.reason


def test_ks_statistic() -> None:
    assert ks_statistic([0.1, 0.2], [0.1, 0.2]) == 0.0
    assert ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert ks_statistic([], [1.0]) is None


# ------------------------------------------------------------------------------------ manifest bounds
def test_shadow_spec_bounds() -> None:
    assert parse_shadow({"windows": 500}) == ShadowSpec(500, 0.95, 1.5, 0.1, None)
    assert parse_shadow({"windows": 5, "min_agreement": 1, "max_p99_ratio": 2, "tolerance": 0.5,
                         "max_score_shift": 0.2, "future": "ignored"}) == ShadowSpec(5, 1.0, 2.0, 0.5, 0.2)
    bad = [([], "an object"), ({}, "shadow.windows"), ({"windows": 0}, "shadow.windows"),
           ({"windows": True}, "shadow.windows"), ({"windows": MAX_WINDOWS + 1}, "shadow.windows"),
           ({"windows": 1.5}, "shadow.windows"), ({"windows": 5, "min_agreement": 1.01}, "min_agreement"),
           ({"windows": 5, "min_agreement": float("nan")}, "min_agreement"),
           ({"windows": 5, "min_agreement": "0.9"}, "min_agreement"),
           ({"windows": 5, "max_p99_ratio": 0}, "max_p99_ratio"),
           ({"windows": 5, "max_p99_ratio": 1e9}, "max_p99_ratio"),
           ({"windows": 5, "tolerance": -1}, "tolerance"),
           ({"windows": 5, "max_score_shift": float("inf")}, "max_score_shift")]
    for raw, field in bad:
        with pytest.raises(ShadowSpecError, match=field):
            parse_shadow(raw)


def _manifest(**extra: object) -> dict[str, object]:
    m: dict[str, object] = {"v": 1, "type": "manifest", "job": "j1", "kind": "model",
                            "name": "vibration-anomaly", "version": "2.0.0", "size": 10, "sha256": "0" * 64,
                            "chunk_size": 65536, "chunks": 1, "chunk_sha256": ["0" * 64],
                            "issued_at": 1000.0, "expires": 2000.0}
    m.update(extra)
    return m


def test_a_manifest_carries_a_validated_shadow_for_models_only() -> None:
    assert manifest.parse(_manifest()).shadow is None
    spec = manifest.parse(_manifest(shadow={"windows": 200, "min_agreement": 0.9})).shadow
    assert spec == ShadowSpec(200, 0.9)
    with pytest.raises(ManifestRejected, match=r"shadow\.windows must be an integer"):
        manifest.parse(_manifest(shadow={"windows": -1}))
    with pytest.raises(ManifestRejected, match="model updates only"):
        manifest.parse(_manifest(kind="firmware", shadow={"windows": 5}))


# ------------------------------------------------------------------------------------ lane on a runner
def windows(n: int, seed: int = UNSEEN_SEED) -> list[np.ndarray]:
    sim = VibrationSimulator(1600.0, seed)
    sim.generate(1600)
    w = Windower(256, 16, 3)
    return [x.data for x in w.push(0.0, sim.generate(256 + 16 * (n - 1)))]


def served(path: str, tag: str, meta_dir: object = SHIPPED) -> tuple[ModelSlot, object]:
    meta = load_model_meta(meta_dir / "model.toml")  # type: ignore[operator]
    model = load_interpreter(path, RUNTIMES[0])
    return ModelSlot(model, tag, meta.preprocessor()), meta


class Sink:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.lock = threading.Lock()

    def __call__(self, r: Result) -> None:
        with self.lock:
            self.results.append(r)


def run_serving(wins: list[np.ndarray], lane: ShadowLane | None,
                backlog: bool = False) -> tuple[Runner, Sink]:
    """One window at a time (the worker idles between them) until the lane is done, or all queued
    before the worker starts (a backlog: the serving queue stays non-empty until the last window)."""
    slot, _ = served(str(SHIPPED / "model.tflite"), "m@1.0.0")
    sink = Sink()
    runner = Runner(slot, sink, queue_max=len(wins))
    runner.attach_lane(lane)
    if backlog:
        for i, w in enumerate(wins):
            runner.submit(i, 0.0, w)
    runner.start()
    if not backlog:
        for i, w in enumerate(wins):
            if lane is not None and lane.done.is_set():
                break
            runner.submit(i, 0.0, w)
            assert runner.wait_idle(30.0)
    assert runner.wait_idle(30.0)
    assert runner.stop()
    return runner, sink


def make_lane(path: str, meta_dir: object, spec: ShadowSpec, queue_max: int = 8) -> ShadowLane:
    slot, cand_meta = served(path, "m@2.0.0", meta_dir)
    serving_meta = load_model_meta(SHIPPED / "model.toml")
    return ShadowLane(slot, serving_meta, cand_meta, spec, queue_max=queue_max)  # type: ignore[arg-type]


@pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")
def test_the_lane_sees_the_served_windows_and_serving_results_are_unchanged() -> None:
    wins = windows(600)  # enough for 100 comparisons even if a loaded machine makes some shed
    lane = make_lane(str(SHIPPED / "model_float.tflite"), SHIPPED, ShadowSpec(windows=100))
    _, shadowed = run_serving(wins, lane)
    n = len(shadowed.results)
    _, alone = run_serving(wins[:n], None)
    assert [r.seq for r in shadowed.results] == list(range(n))
    for a, b in zip(alone.results, shadowed.results, strict=True):  # the serving answers are untouched
        assert a.tag == b.tag == "m@1.0.0" and np.array_equal(a.output, b.output)  # type: ignore[arg-type]
    assert lane.done.is_set()
    f = lane.figures()
    assert f["compared"] == 100 and f["compared"] + f["shed"] == n and f["candidate"] == "m@2.0.0"
    assert f["agreement"] >= 0.95, f  # int8 and float32 of the same network
    assert isinstance(lane.verdict(), Promote)


@pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")
def test_a_candidate_trained_on_shifted_labels_disagrees() -> None:
    lane = make_lane(str(FLIPPED / "model.tflite"), FLIPPED, ShadowSpec(windows=50))
    run_serving(windows(600), lane)
    v = lane.verdict()
    assert isinstance(v, RejectCandidate), lane.figures()
    assert v.figures["agreement"] < 0.5 and f"agreement {v.figures['agreement']:.3f}" in v.reason


@pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")
def test_under_load_shadow_windows_are_shed_and_counted_serving_windows_are_not() -> None:
    """A backlog of serving windows (the worker cannot keep up): the lane runs only once the serving
    queue is empty, so all but its last `queue_max` offers are shed; every serving window is served."""
    lane = make_lane(str(SHIPPED / "model_float.tflite"), SHIPPED, ShadowSpec(windows=10_000), queue_max=4)
    wins = windows(200)
    runner, sink = run_serving(wins, lane, backlog=True)
    st = runner.stats()
    assert st.dropped == 0 and st.count == len(wins) == len(sink.results)
    assert [r.seq for r in sink.results] == list(range(len(wins)))
    f = lane.figures()
    assert f["compared"] <= 4 and f["shed"] == len(wins) - f["compared"], f  # late windows shed too


@pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")
def test_a_late_serving_window_sheds_its_offer_and_the_next_ones() -> None:
    """CPU pressure shows as a serving window far slower than typical: the candidate backs off."""
    from edgeagent.inference.shadow_lane import COOLDOWN_OFFERS

    lane = make_lane(str(SHIPPED / "model_float.tflite"), SHIPPED, ShadowSpec(windows=10_000), queue_max=1000)
    out = np.zeros(4, dtype=np.float32)
    out[0] = 1.0

    def result(seq: int, total_s: float) -> Result:
        return Result(seq, 0.0, "m@1.0.0", out, None, 1e-4, total_s)

    data = windows(1)[0]
    for i in range(20):
        lane.offer(data, result(i, 0.0003))
    assert lane.figures()["shed"] == 0
    lane.offer(data, result(20, 0.010))  # 10 ms: late
    for i in range(COOLDOWN_OFFERS):
        lane.offer(data, result(21 + i, 0.0003))
    assert lane.figures()["shed"] == 1 + COOLDOWN_OFFERS
    lane.offer(data, result(99, 0.0003))
    assert lane.figures()["shed"] == 1 + COOLDOWN_OFFERS  # pressure over: offered again
    lane.offer(data, result(100, 0.0015))  # 5x typical but under LATE_MIN_S: noise, not pressure
    assert lane.figures()["shed"] == 1 + COOLDOWN_OFFERS


@pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")
def test_while_the_device_saves_power_every_shadow_window_is_shed() -> None:
    lane = make_lane(str(SHIPPED / "model_float.tflite"), SHIPPED, ShadowSpec(windows=10_000))
    lane.paused = True
    wins = windows(30)
    runner, sink = run_serving(wins, lane)
    assert runner.stats().dropped == 0 and len(sink.results) == len(wins)
    assert lane.figures()["shed"] == len(wins) and lane.figures()["compared"] == 0
