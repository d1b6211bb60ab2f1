"""Preprocessing (FFT bands, time features, log scaling) and model.toml parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeagent
from edgeagent.core.errors import ModelMetaError
from edgeagent.inference.preprocess import (
    ModelMeta,
    Preprocessor,
    PreprocessSpec,
    load_model_meta,
    parse_model_meta,
)

MODEL_DIR = Path(edgeagent.__file__).resolve().parent / "models" / "vibration-anomaly"  # as installed
RATE = 1600.0


def sine(freq_hz: float, amp: float, n: int = 256, channels: int = 3, axis: int = 0) -> np.ndarray:
    t = np.arange(n) / RATE
    x = np.zeros((n, channels))
    x[:, axis] = amp * np.sin(2 * np.pi * freq_hz * t)
    return x


def test_default_features_have_the_model_shape_and_dtype() -> None:
    spec = PreprocessSpec()
    feats = Preprocessor(spec)(np.zeros((256, 3), np.float32))
    assert feats.shape == (spec.feature_count(256, 3),) == (102,)
    assert feats.dtype == np.float32
    # silence is the floor: log10(eps) everywhere, nothing infinite
    np.testing.assert_allclose(feats, np.log10(spec.eps), rtol=1e-6)


def test_a_sine_lands_in_its_band_with_its_amplitude() -> None:
    pre = Preprocessor(PreprocessSpec(bins=32))
    feats = pre(sine(250.0, 2.0)).reshape(3, 34)  # 250 Hz = bin 40 of 256 at 1600 Hz
    bands = feats[0, :32]
    assert int(np.argmax(bands)) == 39 // 4  # DC dropped: bins 1..128 -> 32 bands of 4
    # one bin of amplitude 2 g in a band of 4: RMS = 2 / sqrt(4) = 1 g
    assert bands[9] == pytest.approx(np.log10(1.0 + 1e-4), abs=1e-3)
    assert feats[0, 32] == pytest.approx(np.log10(2 / np.sqrt(2) + 1e-4), abs=1e-3)  # RMS
    assert feats[0, 33] == pytest.approx(np.log10(2.0 + 1e-4), abs=1e-2)  # peak
    np.testing.assert_allclose(feats[1:], np.log10(1e-4), rtol=1e-6)  # other axes stay silent


def test_dc_offset_is_ignored_and_scaling_applies() -> None:
    x = sine(100.0, 0.3) + np.random.default_rng(0).normal(0, 0.01, (256, 3))
    pre = Preprocessor(PreprocessSpec())
    np.testing.assert_allclose(pre(x), pre(x + np.array([0.0, 0.0, 1.0])), atol=1e-5)  # gravity on z
    scaled = Preprocessor(PreprocessSpec(offset=-2.0, scale=0.5))(x)
    np.testing.assert_allclose(scaled, (pre(x) + 2.0) * 0.5, atol=1e-5)


def test_raw_features_and_spec_checks() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    raw = Preprocessor(PreprocessSpec(fft=False, log=False))(x)
    np.testing.assert_allclose(raw, (x - x.mean(axis=0)).reshape(-1))
    assert PreprocessSpec(fft=False, log=False).feature_count(4, 3) == 12
    with pytest.raises(ValueError, match="log scaling needs fft"):
        Preprocessor(PreprocessSpec(fft=False, log=True))(x)
    with pytest.raises(ValueError, match="bins"):
        Preprocessor(PreprocessSpec(bins=64))(np.zeros((64, 3)))
    with pytest.raises(ValueError, match="shape"):
        Preprocessor(PreprocessSpec())(np.zeros(256))


def test_shipped_model_toml_is_consistent() -> None:
    meta = load_model_meta(MODEL_DIR)
    assert (meta.name, meta.version, meta.output) == ("vibration-anomaly", "1.0.0", "softmax")
    assert meta.labels[0] == "healthy" and len(meta.labels) == meta.output_shape[-1]
    w = meta.window
    assert (w.size, w.stride, w.channels, w.rate_hz) == (256, 16, 3, 1600)
    assert meta.input_shape == (1, meta.preprocess.feature_count(256, 3))
    assert 0 < meta.clear_threshold < meta.threshold < 1
    assert {g.label for g in meta.golden} == set(meta.labels)
    for g in meta.golden:
        assert meta.label_of(g.output) == g.label


def test_score_and_label_for_both_output_kinds() -> None:
    meta = load_model_meta(MODEL_DIR / "model.toml")
    assert meta.score([0.9, 0.05, 0.03, 0.02]) == pytest.approx(0.1)
    assert meta.label_of([[0.1, 0.1, 0.7, 0.1]]) == "bearing"
    assert np.isnan(meta.score([np.nan] * 4))
    single = parse_model_meta(VALID.replace('output = "softmax"', 'output = "score"')
                              .replace("output_shape = [1, 2]", "output_shape = [1, 1]")
                              .replace("output = [0.9, 0.1]", "output = [0.1]"))
    assert single.score([0.8]) == pytest.approx(0.8) and single.label_of([0.8]) == "anomaly"


VALID = """
name = "m"
version = "2.0.0"
output = "softmax"
labels = ["healthy", "anomaly"]
threshold = 0.6
clear_threshold = 0.4
input_shape = [1, 8]
output_shape = [1, 2]

[window]
size = 16
stride = 4
channels = 2
rate_hz = 100.0

[preprocess]
bins = 2

[[golden]]
label = "healthy"
input = [0, 0, 0, 0, 0, 0, 0, 0]
output = [0.9, 0.1]
"""


def test_parse_valid_meta() -> None:
    meta = parse_model_meta(VALID)
    assert isinstance(meta, ModelMeta)
    assert meta.preprocess == PreprocessSpec(bins=2) and meta.window.channels == 2
    assert meta.golden[0].input == (0.0,) * 8 and meta.golden_tolerance == 0.1


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace('name = "m"\n', ""), "name: missing"),
    (lambda t: t.replace("threshold = 0.6", "threshold = 0.3"), "clear_threshold"),
    (lambda t: t + "colour = 1\n", "colour: unknown key"),
    (lambda t: t.replace("bins = 2", "bins = 2\nwindowing = 1"), "preprocess.windowing: unknown key"),
    (lambda t: t.replace("input_shape = [1, 8]", "input_shape = [1, 9]"), "input_shape"),
    (lambda t: t.replace("bins = 2", "bins = 20"), "bins must be within"),
    (lambda t: t.replace('labels = ["healthy", "anomaly"]', 'labels = ["healthy"]'), "labels: 1 labels"),
    (lambda t: t.replace("output = [0.9, 0.1]", "output = [0.9]"), "golden[0].output"),
    (lambda t: t.replace("input = [0, 0, 0, 0, 0, 0, 0, 0]", 'input = ["a"]'), "golden[0].input"),
    (lambda t: t.replace("size = 16", 'size = "16"'), "window.size: expected int"),
    (lambda t: t.replace('output = "softmax"', 'output = "sigmoid"'), "output:"),
    (lambda t: t + "[[", "not valid TOML"),
])
def test_bad_meta_names_the_key(edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelMetaError) as err:
        parse_model_meta(edit(VALID), "bundle/model.toml")
    assert expected in str(err.value) and "bundle/model.toml" in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace('name = "m"\n', "").replace("threshold = 0.6", "threshold = 2")
    (tmp_path / "model.toml").write_text(text)
    with pytest.raises(ModelMetaError) as err:
        load_model_meta(tmp_path)
    assert "name: missing" in err.value.reason and "clear_threshold" in err.value.reason
    with pytest.raises(ModelMetaError, match="cannot read"):
        load_model_meta(tmp_path / "absent.toml")
