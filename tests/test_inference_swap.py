"""Validation of candidates (real interpreters, real files) and the pure probation/hysteresis rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeagent.core import config
from edgeagent.core.errors import ModelRejected
from edgeagent.inference.pipeline import AnomalyState, thresholds
from edgeagent.inference.preprocess import WindowSpec, load_model_meta
from edgeagent.inference.runner import Result
from edgeagent.inference.swap import FailureWatch, LoadSettings, Probation, Validated, validate
from tests.inference_helpers import FIXTURES, MODELS, RUNTIMES, SHIPPED, UNSEEN_SEED

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime installed")
WINDOW = WindowSpec(256, 16, 3, 1600.0)
NAME = "vibration-anomaly"


def recent(n: int = 8, gain: float = 1.0) -> list[np.ndarray]:
    from edgeagent.sensors.sources import VibrationSimulator

    sim = VibrationSimulator(1600.0, UNSEEN_SEED)
    return [sim.generate(256) * np.float32(gain) for _ in range(n)]


def candidate(tmp: Path, model: Path, meta: Path | None = None) -> Path:
    d = tmp / "cand"
    d.mkdir(parents=True)
    shutil.copyfile(model, d / "model.tflite")
    if meta is not None:
        shutil.copyfile(meta, d / "model.toml")
    return d


def run(d: Path, runtime: str, windows: list[np.ndarray] | None = None, budget_ms: float = 50.0) -> Validated:
    current = load_model_meta(SHIPPED / "model.toml")
    return validate(d, NAME, "2.0.0", settings=LoadSettings(runtime), window=WINDOW, current=current,
                    recent=recent() if windows is None else windows, latency_budget_ms=budget_ms)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("model", ["model.tflite", "model_float.tflite"])
def test_the_shipped_models_pass_with_their_golden_vectors(tmp_path: Path, runtime: str, model: str) -> None:
    v = run(candidate(tmp_path, SHIPPED / model, SHIPPED / "model.toml"), runtime)
    assert v.declared and v.report["golden"] == len(v.meta.golden) > 0
    assert v.report["windows"] == 8 and 0 < v.report["latency_p50_ms"] < 50


def test_a_bare_tflite_is_read_like_the_model_it_replaces(tmp_path: Path) -> None:
    v = run(candidate(tmp_path, SHIPPED / "model_float.tflite"), RUNTIMES[0])
    assert not v.declared and v.meta.version == "2.0.0" and v.meta.golden == ()
    assert v.meta.labels == ("healthy", "imbalance", "bearing", "spikes")


@pytest.mark.parametrize(("model", "why"), [
    (MODELS / "bad_shape.tflite", "input [1, 50] takes 50 values but the preprocessing of the running "
                                  "pipeline makes 102"),
    (MODELS / "nan.tflite", "non-finite output on recent real window 1 of 8"),
    (MODELS / "select_tf_op.tflite", "does not load: Select TensorFlow op FlexCumprod"),
])
def test_candidates_that_cannot_serve_are_rejected_with_the_reason(tmp_path: Path, model: Path,
                                                                   why: str) -> None:
    with pytest.raises(ModelRejected) as info:
        run(candidate(tmp_path, model), RUNTIMES[0])
    assert why in info.value.reason


def test_finite_on_healthy_but_not_on_recent_windows_is_rejected(tmp_path: Path) -> None:
    d = candidate(tmp_path, FIXTURES / "nan_when_large.tflite")
    assert run(d, RUNTIMES[0]).report["windows"] == 8  # healthy recent windows: fine
    with pytest.raises(ModelRejected, match="non-finite output on recent real window"):
        run(d, RUNTIMES[0], recent(gain=1000.0))
    with pytest.raises(ModelRejected, match="invoke failed on recent real window"):
        run(candidate(tmp_path / "r", FIXTURES / "raise_when_large.tflite"), RUNTIMES[0], recent(gain=1000.0))


def test_latency_over_budget_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected, match=r"exceeds inference\.latency_budget_ms"):
        run(candidate(tmp_path, MODELS / "big_float.tflite"), RUNTIMES[0], budget_ms=0.0001)


def test_golden_vectors_must_reproduce(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected, match=r"golden\[0\] \(healthy\): output"):
        run(candidate(tmp_path, FIXTURES / "uint8_io.tflite", SHIPPED / "model.toml"), RUNTIMES[0])


def res(seq: int, tag: str = "new", output: list[float] | None = None, error: str | None = None) -> Result:
    out = None if error else np.asarray(output if output is not None else [1.0, 0.0], np.float32)
    return Result(seq, 0.0, tag, out, error)


def test_probation_counts_only_the_new_models_windows_and_fails_on_the_first_bad_one() -> None:
    p = Probation("new", 3)
    assert not p.observe(res(1, "old"))
    assert not p.observe(res(2)) and not p.observe(res(3))
    assert p.observe(res(4)) and p.done and p.failure is None and p.first_seq == 2
    p = Probation("new", 10)
    assert p.observe(res(1, output=[float("nan"), 0.0])) and p.failure == "non-finite output on window 1"
    p = Probation("new", 10)
    assert p.observe(res(1, error="RuntimeError: boom")) and "boom" in (p.failure or "")


def test_failure_watch_wants_a_streak() -> None:
    w = FailureWatch(3)
    bad = res(0, error="x")
    assert [w.observe(r) for r in (bad, bad, res(1), bad, bad, bad, bad)] == \
        [False, False, False, False, False, True, False]


def test_hysteresis_raises_once_and_clears_after_quiet_windows() -> None:
    s = AnomalyState()
    scores = [0.1, 0.6, 0.9, 0.2, 0.9, 0.2, 0.2, 0.2, 0.4, 0.2]
    edges = [s.update(x, 0.5, 0.3, 1000.0, clear_windows=3) for x in scores]
    assert edges == [None, "raise", None, None, None, None, None, "clear", None, None]
    assert s.rate_1m(1000.0) == pytest.approx(3 / 10)
    assert s.rate_1m(1100.0) is None  # a minute later nothing is left


def test_thresholds_come_from_config_over_the_model() -> None:
    meta = load_model_meta(SHIPPED / "model.toml")
    assert thresholds(config.build({}), meta) == (meta.threshold, meta.clear_threshold)
    assert thresholds(config.build({"inference": {"threshold": 0.8}}), meta) == (0.8, meta.clear_threshold)
    assert thresholds(config.build({"inference": {"threshold": 0.2}}), meta) == (0.2, 0.2)
    assert thresholds(config.build({"inference": {"threshold": 0.9, "clear_threshold": 0.7}}), meta) == \
        (0.9, 0.7)
