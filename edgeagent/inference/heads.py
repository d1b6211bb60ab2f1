"""Output heads: how a pipeline reads its model (classes, autoencoder, regression), and the on-device
threshold calibration of an autoencoder, persisted in the state dir.

An autoencoder gives back its input features; its anomaly score is the mean squared error between
the two. That needs the input, which only the runner's worker has, so the head hands the worker a
`finish` function that reduces (input, reconstruction) to [error]: the event loop then reads it as a
plain score. Calibration is a plain object (scores in, a threshold out); the pipeline persists it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent.core.fsutil import atomic_write_json, read_json
from edgeagent.inference.preprocess import ModelMeta
from edgeagent.inference.runner import ModelSlot
from edgeagent.inference.runtime import LoadedModel

Array = npt.NDArray[Any]
CALIBRATION_DIR = "calibration"  # <state_dir>/calibration/<pipeline>.json


def reconstruction_error(x: Any, y: Array) -> Array:
    """[mean squared error] of a reconstruction `y` of the features `x` (worker thread)."""
    d = y.reshape(-1).astype(np.float32) - np.asarray(x, dtype=np.float32).reshape(-1)
    return np.array([float(np.dot(d, d)) / d.size], dtype=np.float32)


def finisher(meta: ModelMeta) -> Callable[[Any, Array], Array] | None:
    return reconstruction_error if meta.output == "reconstruction" else None


def make_slot(model: LoadedModel, tag: str, meta: ModelMeta) -> ModelSlot:
    """The runner slot that serves `model` the way its meta says (preprocessing and head)."""
    return ModelSlot(model, tag, meta.preprocessor(), finisher(meta))


def head_problem(head: str, meta: ModelMeta) -> str | None:
    """Why a pipeline configured with `head` cannot read a model whose model.toml says `meta.output`."""
    if head in ("auto", meta.head):
        return None
    return (f"the pipeline's head is {head!r} but the model's model.toml says output = {meta.output!r} "
            f"(a {meta.head} head)")


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True, slots=True)
class Calibrated:
    """A threshold learnt on this device from a baseline period of model `model` ("name@version")."""

    model: str
    windows: int
    mean: float
    std: float
    threshold: float
    clear_threshold: float
    ts: float

    def as_json(self) -> dict[str, Any]:
        return {"v": 1, "model": self.model, "windows": self.windows, "mean": self.mean, "std": self.std,
                "threshold": self.threshold, "clear_threshold": self.clear_threshold, "ts": self.ts}


class Calibration:
    """Collects the first `windows` scores of one model; then threshold = mean + sigma * std (clear at
    mean + sigma/2 * std). The baseline is assumed healthy: calibrate on a machine known to be fine."""

    def __init__(self, model: str, windows: int, sigma: float) -> None:
        self.model = model
        self.windows = windows
        self.sigma = sigma
        self._scores: list[float] = []

    @property
    def progress(self) -> float:
        return round(len(self._scores) / self.windows, 4)

    def add(self, score: float, now: float | None = None) -> Calibrated | None:
        """Take one score; the result once the baseline is complete (then stop feeding it)."""
        if math.isfinite(score):
            self._scores.append(score)
        if len(self._scores) < self.windows:
            return None
        xs = np.asarray(self._scores, dtype=np.float64)
        mean, std = float(xs.mean()), float(xs.std())
        std = max(std, 1e-6 * max(abs(mean), 1e-12))  # a constant baseline still gets a margin
        thr = mean + self.sigma * std
        return Calibrated(self.model, len(xs), round(mean, 8), round(std, 8), round(thr, 8),
                          round(mean + self.sigma / 2 * std, 8), time.time() if now is None else now)


def calibration_path(state_dir: Path, pipeline: str) -> Path:
    return Path(state_dir) / CALIBRATION_DIR / f"{pipeline}.json"


def load_calibration(path: Path, model: str) -> Calibrated | None:
    """The persisted calibration if it is for `model` (another version calibrates anew); blocking."""
    try:
        raw = read_json(path)
        rec = Calibrated(str(raw["model"]), int(raw["windows"]), float(raw["mean"]), float(raw["std"]),
                         float(raw["threshold"]), float(raw["clear_threshold"]), float(raw["ts"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if rec.model != model or not (math.isfinite(rec.threshold) and math.isfinite(rec.clear_threshold)):
        return None
    return rec


def save_calibration(path: Path, rec: Calibrated) -> None:
    """Atomically (a crash leaves the old file or the new one); blocking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rec.as_json())
