"""The shipped autoencoder, run through the agent's own runtime seam and head on held-out simulated
machines, under every installed TFLite runtime: quiet on healthy ones, flags strong faults, and its
golden vector reproduces (what a model update's validation checks)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeagent.inference.heads import reconstruction_error
from edgeagent.inference.preprocess import WindowSpec, load_model_meta
from edgeagent.inference.runtime import load_interpreter
from edgeagent.inference.store import SHIPPED_DIR
from edgeagent.inference.swap import LoadSettings, validate
from edgeagent.sensors.sources import VibrationSimulator, Windower
from tests.inference_helpers import RUNTIMES

AE_DIR = SHIPPED_DIR / "vibration-autoencoder"
SEEDS = (300_001, 300_002, 300_003)  # machines the training never saw
WINDOWS = 120
MAX_FALSE_POSITIVE, MIN_DETECTION = 0.01, 0.9

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime installed")


def scores(runtime: str, fault: str | None, severity: float) -> np.ndarray:
    meta = load_model_meta(AE_DIR / "model.toml")
    model = load_interpreter(AE_DIR / "model.tflite", runtime)
    prep = meta.preprocessor()
    out = []
    for seed in SEEDS:
        sim = VibrationSimulator(meta.window.rate_hz, seed)
        if fault:
            sim.set_fault(fault, severity)
        sim.generate(int(meta.window.rate_hz))
        w = Windower(meta.window.size, meta.window.stride, meta.window.channels)
        for win in w.push(0.0, sim.generate(meta.window.size + meta.window.stride * (WINDOWS - 1))):
            x = prep(win.data)
            out.append(float(reconstruction_error(x, model.infer(x)[0])[0]))
    return np.array(out)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_quiet_on_healthy_machines_and_flags_strong_faults(runtime: str) -> None:
    meta = load_model_meta(AE_DIR / "model.toml")
    assert (meta.output, meta.head, meta.window.size) == ("reconstruction", "autoencoder", 256)
    assert float((scores(runtime, None, 0.0) >= meta.threshold).mean()) <= MAX_FALSE_POSITIVE
    for fault, severity in (("imbalance", 1.0), ("bearing", 0.5), ("spikes", 1.0)):
        rate = float((scores(runtime, fault, severity) >= meta.threshold).mean())
        assert rate >= MIN_DETECTION, (fault, severity, rate)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_its_golden_vector_reproduces_as_an_update_would_check_it(runtime: str) -> None:
    meta = load_model_meta(AE_DIR / "model.toml")
    ok = validate(
        AE_DIR,
        meta.name,
        meta.version,
        settings=LoadSettings(runtime),
        current=None,
        recent=[],
        window=WindowSpec(256, 16, 3, 1600.0),
        latency_budget_ms=50.0,
    )
    assert ok.declared and ok.report["golden"] == 1
