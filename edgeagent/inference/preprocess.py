"""Window -> model features (FFT bands, log scaling) and model.toml metadata, shared by agent and trainer.

The training script imports this module, so the features a model was trained on are computed by the
same code on the device: there is exactly one definition of the preprocessing.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeagent.core.errors import ModelMetaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 boards
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

Features = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How a (size, channels) window becomes the model's input vector.

    fft: per channel, mean removed, amplitude spectrum (g) without DC pooled by RMS into `bins` equal
    bands; with time_features also the channel's RMS and peak (spikes that a spectrum smears out).
    Without fft the mean-removed window itself, flattened. Then log10(x + eps) if `log`, and finally
    (x - offset) * scale. Output is flat, channel-major: [ch0 bands.., ch0 rms, ch0 peak, ch1 ...].
    """

    fft: bool = True
    bins: int = 32
    time_features: bool = True
    log: bool = True
    eps: float = 1e-4
    offset: float = 0.0
    scale: float = 1.0

    def feature_count(self, size: int, channels: int) -> int:
        if not self.fft:
            return size * channels
        return channels * (self.bins + (2 if self.time_features else 0))

    def check(self, size: int) -> str | None:
        """Why this spec cannot work on windows of `size` samples, or None."""
        if self.fft and not 1 <= self.bins <= size // 2:
            return f"bins must be within 1..{size // 2} for windows of {size} samples, got {self.bins}"
        if self.log and not self.fft:
            return "log scaling needs fft = true (a raw window has negative values)"
        if self.eps <= 0 or not math.isfinite(self.eps):
            return f"eps must be > 0, got {self.eps}"
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            return "scale must be finite and non-zero, offset finite"
        return None


class Preprocessor:
    """Callable turning one window into float32 features of exactly the model input (no batch dim)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self._edges: dict[int, tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]] = {}

    def _bands(self, size: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
        """Band start indices into the DC-less spectrum and each band's bin count, cached per size."""
        cached = self._edges.get(size)
        if cached is None:
            half = size // 2
            bounds = np.linspace(0, half, self.spec.bins + 1).round().astype(np.intp)
            cached = (bounds[:-1], np.diff(bounds).astype(np.float64))
            self._edges[size] = cached
        return cached

    def __call__(self, window: npt.ArrayLike) -> Features:
        x = np.asarray(window, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"window must have shape (size, channels), got {x.shape}")
        spec = self.spec
        x = x - x.mean(axis=0)
        err = spec.check(x.shape[0])
        if err:
            raise ValueError(err)
        if spec.fft:
            size = x.shape[0]
            amp = np.abs(np.fft.rfft(x, axis=0))[1:size // 2 + 1] * (2.0 / size)
            starts, counts = self._bands(size)
            bands = np.sqrt(np.add.reduceat(amp * amp, starts, axis=0) / counts[:, None])
            parts = [bands]
            if spec.time_features:
                parts += [np.sqrt(np.mean(x * x, axis=0))[None, :], np.max(np.abs(x), axis=0)[None, :]]
            feats = np.concatenate(parts, axis=0).T.reshape(-1)  # channel-major
        else:
            feats = x.reshape(-1)
        if spec.log:
            feats = np.log10(feats + spec.eps)
        out: Features = ((feats - spec.offset) * spec.scale).astype(np.float32)
        return out


# --------------------------------------------------------------------------- model.toml


@dataclass(frozen=True, slots=True)
class WindowSpec:
    size: int = 256
    stride: int = 16
    channels: int = 3
    rate_hz: float = 1600.0


@dataclass(frozen=True, slots=True)
class Golden:
    """A known input and the output a good model gives for it (within `ModelMeta.golden_tolerance`)."""

    label: str
    input: tuple[float, ...]
    output: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """What model.toml says about a model: how to feed it, how to read its output, how to test it."""

    name: str
    version: str
    description: str
    # softmax: score = 1 - p[0] (class 0 healthy); score: out[0]; reconstruction (an autoencoder): the
    # model gives back its input features and the score is the mean squared error between the two
    # (the runner's worker reduces the output to it); regression: out[0] is a value in `unit`
    output: Literal["softmax", "score", "reconstruction", "regression"]
    labels: tuple[str, ...]
    threshold: float
    clear_threshold: float
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    window: WindowSpec
    preprocess: PreprocessSpec
    runtimes: tuple[str, ...] = ("tflite-runtime", "litert")
    num_threads: int = 1
    golden: tuple[Golden, ...] = ()
    golden_tolerance: float = 0.1
    unit: str = ""  # regression: the unit of the value (e.g. "mm/s")

    @property
    def head(self) -> str:
        """The pipeline head this output is read by: classes | autoencoder | regression."""
        return {"reconstruction": "autoencoder", "regression": "regression"}.get(self.output, "classes")

    def score(self, output: npt.ArrayLike) -> float:
        """Anomaly score from the (dequantised, finished) model output: in [0, 1] for classes, the
        reconstruction error for an autoencoder, the value for a regression; NaN stays NaN."""
        out = np.asarray(output, dtype=np.float64).reshape(-1)
        return float(1.0 - out[0]) if self.output == "softmax" else float(out[0])

    def label_of(self, output: npt.ArrayLike) -> str:
        out = np.asarray(output, dtype=np.float64).reshape(-1)
        if self.output == "softmax":
            return self.labels[int(np.argmax(out))]
        return self.labels[1 if out[0] >= self.threshold else 0]

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocess)


_TOP = {"name", "version", "description", "output", "labels", "threshold", "clear_threshold",
        "input_shape", "output_shape", "golden_tolerance", "runtime", "window", "preprocess", "golden",
        "unit"}
OUTPUTS = ("softmax", "score", "reconstruction", "regression")


class _Reader:
    """Typed access to a TOML table that remembers every problem with its key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def get(self, table: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str,
            default: Any = None, required: bool = False) -> Any:
        if key not in table:
            if required:
                self.errors.append(f"{path}{key}: missing")
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,)))
        if not ok:
            self.errors.append(f"{path}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
            return default
        return value

    def unknown(self, table: dict[str, Any], known: set[str], path: str) -> None:
        for key in sorted(set(table) - known):
            self.errors.append(f"{path}{key}: unknown key")


def _floats(r: _Reader, value: object, path: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        r.errors.append(f"{path}: expected a list of numbers")
        return ()
    return tuple(float(v) for v in value)


def _ints(r: _Reader, value: object, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        r.errors.append(f"{path}: expected a non-empty list of positive integers")
        return ()
    return tuple(value)


def parse_model_meta(text: str, source: str = "model.toml") -> ModelMeta:
    """model.toml text -> ModelMeta; ModelMetaError naming every bad key (used for bundles too)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelMetaError(source, f"not valid TOML: {exc}") from exc
    r = _Reader(source)
    r.unknown(doc, _TOP, "")
    num = (int, float)
    name = r.get(doc, "name", str, "", "", required=True)
    version = r.get(doc, "version", str, "", "", required=True)
    output = r.get(doc, "output", str, "", "softmax")
    if output not in OUTPUTS:
        r.errors.append(f"output: expected one of {', '.join(OUTPUTS)}, got {output!r}")
        output = "softmax"
    unit = r.get(doc, "unit", str, "", "")
    labels = tuple(r.get(doc, "labels", list, "", ["healthy", "anomaly"]))
    if not labels or not all(isinstance(x, str) for x in labels):
        r.errors.append("labels: expected a non-empty list of strings")
    threshold = float(r.get(doc, "threshold", num, "", 0.5))
    clear = float(r.get(doc, "clear_threshold", num, "", threshold))
    if output in ("reconstruction", "regression"):  # an error or a value: not a probability
        if not (math.isfinite(threshold) and math.isfinite(clear) and clear <= threshold):
            r.errors.append(f"clear_threshold: expected clear_threshold ({clear}) <= threshold ({threshold})")
    elif not 0.0 <= clear <= threshold <= 1.0:
        r.errors.append(f"clear_threshold: expected 0 <= clear_threshold ({clear}) <= threshold "
                        f"({threshold}) <= 1")
    input_shape = _ints(r, doc.get("input_shape"), "input_shape")
    output_shape = _ints(r, doc.get("output_shape"), "output_shape")

    rt = r.get(doc, "runtime", dict, "", {})
    r.unknown(rt, {"runtimes", "num_threads"}, "runtime.")
    runtimes = tuple(r.get(rt, "runtimes", list, "runtime.", ["tflite-runtime", "litert"]))
    num_threads = r.get(rt, "num_threads", int, "runtime.", 1)

    win = r.get(doc, "window", dict, "", {})
    r.unknown(win, {"size", "stride", "channels", "rate_hz"}, "window.")
    window = WindowSpec(
        size=r.get(win, "size", int, "window.", 256, required=True),
        stride=r.get(win, "stride", int, "window.", 16, required=True),
        channels=r.get(win, "channels", int, "window.", 3, required=True),
        rate_hz=float(r.get(win, "rate_hz", num, "window.", 1600.0, required=True)),
    )
    if min(window.size, window.stride, window.channels) < 1 or window.rate_hz <= 0:
        r.errors.append("window: size, stride and channels must be >= 1 and rate_hz > 0")

    pre = r.get(doc, "preprocess", dict, "", {})
    defaults = PreprocessSpec()
    r.unknown(pre, set(PreprocessSpec.__dataclass_fields__), "preprocess.")
    spec = PreprocessSpec(
        fft=r.get(pre, "fft", bool, "preprocess.", defaults.fft),
        bins=r.get(pre, "bins", int, "preprocess.", defaults.bins),
        time_features=r.get(pre, "time_features", bool, "preprocess.", defaults.time_features),
        log=r.get(pre, "log", bool, "preprocess.", defaults.log),
        eps=float(r.get(pre, "eps", num, "preprocess.", defaults.eps)),
        offset=float(r.get(pre, "offset", num, "preprocess.", defaults.offset)),
        scale=float(r.get(pre, "scale", num, "preprocess.", defaults.scale)),
    )
    if window.size >= 1:
        err = spec.check(window.size)
        if err:
            r.errors.append(f"preprocess: {err}")
    features = spec.feature_count(window.size, window.channels)
    if input_shape and math.prod(input_shape[1:]) != features:
        r.errors.append(f"input_shape: {list(input_shape)} does not hold the {features} features that "
                        f"[preprocess] makes from a {window.size}x{window.channels} window")
    n_out = math.prod(output_shape[1:]) if output_shape else 0
    if output == "softmax" and output_shape and n_out != len(labels):
        r.errors.append(f"labels: {len(labels)} labels for {n_out} softmax outputs")
    if output == "reconstruction" and output_shape and n_out != features:
        r.errors.append(f"output_shape: an autoencoder gives back its {features} input features, "
                        f"not {n_out}")

    golden: list[Golden] = []
    tolerance = float(r.get(doc, "golden_tolerance", num, "", 0.1))
    for i, g in enumerate(r.get(doc, "golden", list, "", [])):
        path = f"golden[{i}]."
        if not isinstance(g, dict):
            r.errors.append(f"golden[{i}]: expected a table")
            continue
        r.unknown(g, {"label", "input", "output"}, path)
        gin = _floats(r, g.get("input"), path + "input")
        gout = _floats(r, g.get("output"), path + "output")
        if gin and len(gin) != features:
            r.errors.append(f"{path}input: expected {features} values, got {len(gin)}")
        if gout and n_out and len(gout) != n_out:
            r.errors.append(f"{path}output: expected {n_out} values, got {len(gout)}")
        golden.append(Golden(str(g.get("label", "")), gin, gout))
    if r.errors:
        raise ModelMetaError(source, "; ".join(r.errors))
    return ModelMeta(name=name, version=version, description=str(doc.get("description", "")),
                     output=output, labels=labels, threshold=threshold, clear_threshold=clear,
                     input_shape=input_shape, output_shape=output_shape, window=window,
                     preprocess=spec, runtimes=tuple(str(x) for x in runtimes), num_threads=num_threads,
                     golden=tuple(golden), golden_tolerance=tolerance, unit=unit)


def load_model_meta(path: Path) -> ModelMeta:
    """Read model.toml (or the model.toml inside a model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelMetaError(str(path), f"cannot read: {exc}") from exc
    return parse_model_meta(text, str(path))
