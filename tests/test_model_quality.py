"""The shipped model, run like the agent runs it (simulator -> Windower -> Preprocessor -> bare
interpreter), detects injected faults and stays quiet on healthy machines, under every installed
TFLite runtime, int8 and float alike. Also checks that the test fixture models are what they claim.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.inference.preprocess import ModelMeta, Preprocessor, load_model_meta
from edgeagent.sensors.sources import VibrationSimulator, Windower

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "edgeagent" / "models" / "vibration-anomaly"
FIXTURES = ROOT / "tests" / "models"
RUNTIMES = [m for m in ("tflite_runtime.interpreter", "ai_edge_litert.interpreter")
            if importlib.util.find_spec(m.split(".")[0]) is not None]
MODELS = ["model.tflite", "model_float.tflite"]
TEST_SEVERITY = 0.5
MIN_DETECTION, MAX_FALSE_POSITIVE = 0.9, 0.02

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime installed")


class Bare:
    """A bare interpreter plus the (de)quantisation the runtime seam does: float features in, float out."""

    def __init__(self, runtime: str, path: Path) -> None:
        self.it: Any = importlib.import_module(runtime).Interpreter(model_path=str(path))
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, np.float32).reshape(self.inp["shape"])
        if self.inp["dtype"] == np.int8:
            scale, zero = self.inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        self.it.set_tensor(self.inp["index"], x)
        self.it.invoke()
        y = self.it.get_tensor(self.out["index"]).astype(np.float32)
        if self.out["dtype"] == np.int8:
            scale, zero = self.out["quantization"]
            y = (y - zero) * scale
        return y.reshape(-1)


def pipeline_features(meta: ModelMeta, seed: int, fault: str | None, n_windows: int) -> np.ndarray:
    """Features exactly as the agent makes them: 20 ms chunks through a Windower, then preprocessing."""
    sim = VibrationSimulator(meta.window.rate_hz, seed)
    if fault:
        sim.set_fault(fault, TEST_SEVERITY)
    sim.generate(int(meta.window.rate_hz))  # the agent does not look at the first second either
    w = meta.window
    windower = Windower(w.size, w.stride, w.channels, rate_hz=w.rate_hz)
    pre = Preprocessor(meta.preprocess)
    feats: list[np.ndarray] = []
    while len(feats) < n_windows:
        feats += [pre(win.data) for win in windower.push(0.0, sim.generate(32))]
    return np.stack(feats[:n_windows])


@pytest.fixture(scope="module")
def meta() -> ModelMeta:
    return load_model_meta(MODEL_DIR)


@pytest.fixture(scope="module")
def held_out(meta: ModelMeta) -> dict[str, np.ndarray]:
    """Seeds the training script never uses (it trains on < 1200 and evaluates on 100000+)."""
    healthy = [pipeline_features(meta, s, None, 150) for s in range(900_001, 900_005)]
    sets = {"healthy": np.concatenate(healthy)}
    for fault in meta.labels[1:]:
        runs = [pipeline_features(meta, s, fault, 100) for s in range(900_011, 900_014)]
        sets[fault] = np.concatenate(runs)
    return sets


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_detects_faults_without_false_alarms(runtime: str, model: str, meta: ModelMeta,
                                             held_out: dict[str, np.ndarray]) -> None:
    run = Bare(runtime, MODEL_DIR / model)
    assert tuple(run.inp["shape"]) == meta.input_shape and tuple(run.out["shape"]) == meta.output_shape
    rates = {}
    for name, feats in held_out.items():
        flagged = [meta.score(run(x)) >= meta.threshold for x in feats]
        rates[name] = float(np.mean(flagged))
    assert rates["healthy"] <= MAX_FALSE_POSITIVE, rates
    for fault in meta.labels[1:]:
        assert rates[fault] >= MIN_DETECTION, (fault, rates)
    # and it names the fault, not only "something is wrong"
    for cls, fault in enumerate(meta.labels[1:], start=1):
        named = np.mean([np.argmax(run(x)) == cls for x in held_out[fault]])
        assert named >= 0.85, (fault, named)


@pytest.mark.parametrize("path", [MODEL_DIR / m for m in MODELS] + [FIXTURES / "big_float.tflite"],
                         ids=lambda p: p.name)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_goldens_pass(runtime: str, path: Path, meta: ModelMeta) -> None:
    """What a hot-swap validator checks: every model that should be accepted agrees with the goldens."""
    run = Bare(runtime, path)
    assert meta.golden
    for g in meta.golden:
        out = run(np.array(g.input, np.float32))
        assert np.max(np.abs(out - np.array(g.output))) <= meta.golden_tolerance, (g.label, out, g.output)


def test_runtimes_agree_and_int8_matches_float(meta: ModelMeta, held_out: dict[str, np.ndarray]) -> None:
    feats = np.concatenate([v[::10] for v in held_out.values()])
    outputs = {}
    for rt in RUNTIMES:
        for m in MODELS:
            run = Bare(rt, MODEL_DIR / m)
            outputs[(rt, m)] = np.stack([run(x) for x in feats])
    for m in MODELS:
        for rt in RUNTIMES[1:]:
            np.testing.assert_allclose(outputs[(rt, m)], outputs[(RUNTIMES[0], m)], atol=1e-5)
    rt = RUNTIMES[0]
    dec_int8 = (1 - outputs[(rt, "model.tflite")][:, 0]) >= meta.threshold
    dec_float = (1 - outputs[(rt, "model_float.tflite")][:, 0]) >= meta.threshold
    assert np.mean(dec_int8 == dec_float) >= 0.98


def test_shipped_models_are_small_and_int8_is_int8() -> None:
    assert (MODEL_DIR / "model.tflite").stat().st_size < 64 * 1024
    assert (MODEL_DIR / "model_float.tflite").stat().st_size < 64 * 1024
    run = Bare(RUNTIMES[0], MODEL_DIR / "model.tflite")
    assert run.inp["dtype"] == np.int8 and run.out["dtype"] == np.int8


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fixture_models_are_what_they_claim(runtime: str, meta: ModelMeta) -> None:
    x = np.zeros(meta.input_shape[1:], np.float32)
    assert np.all(np.isnan(Bare(runtime, FIXTURES / "nan.tflite")(x)))
    bad = Bare(runtime, FIXTURES / "bad_shape.tflite")
    assert tuple(bad.inp["shape"]) != meta.input_shape
    big = Bare(runtime, FIXTURES / "big_float.tflite")
    assert tuple(big.inp["shape"]) == meta.input_shape and tuple(big.out["shape"]) == meta.output_shape
    assert (FIXTURES / "big_float.tflite").stat().st_size > 1_500_000
    with pytest.raises(RuntimeError, match="FlexCumprod"):
        Bare(runtime, FIXTURES / "select_tf_op.tflite")
