"""Is a candidate model fit to serve? Validation before a hot swap, and probation after it.

Validation runs in a background thread on the candidate's own interpreter (the serving one is never
touched): it loads and allocates, its input/output agree with the pipeline's preprocessing (or with
the model.toml it brings), its golden vectors (if any) reproduce, its outputs on the last real windows
are finite, and its latency is within budget. It also warms the interpreter up, so the first window
after the swap does not pay for lazy initialisation. Probation then watches real windows (decided in
`swap_fsm`): one error or non-finite output and the previous model is swapped back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent.core.errors import ModelLoadError, ModelMetaError, ModelRejected, RuntimeUnavailable
from edgeagent.inference.preprocess import ModelMeta, PreprocessSpec, WindowSpec, load_model_meta
from edgeagent.inference.runtime import LoadedModel, load_interpreter
from edgeagent.inference.store import META_FILE, MODEL_FILE
from edgeagent.inference.swap_fsm import FailureWatch as FailureWatch  # re-exported: tests, callers
from edgeagent.inference.swap_fsm import Probation as Probation

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
LATENCY_SAMPLES = 20  # invokes timed for the latency check (median, robust to one preemption)
_DTYPES = ("float32", "int8", "uint8")


@dataclass(frozen=True, slots=True)
class LoadSettings:
    runtime: str = "auto"
    num_threads: int = 1
    delegate: str = ""


@dataclass(frozen=True, slots=True)
class Validated:
    """A candidate that passed: allocated, warmed up, with the meta it will be served with."""

    model: LoadedModel
    meta: ModelMeta
    declared: bool  # meta came from the candidate's own model.toml (not inherited)
    report: dict[str, Any] = field(default_factory=dict)


def default_meta(name: str, version: str, model: LoadedModel, window: WindowSpec) -> ModelMeta:
    """Meta for a bare .tflite with nothing to inherit: the mean-removed raw window in, class 0 (or the
    single output) is the anomaly score's complement (or the score itself)."""
    n_out = model.outputs[0].size if model.outputs else 1
    single = n_out == 1
    labels = ("normal", "anomaly") if single else ("healthy", *(f"class{i}" for i in range(1, n_out)))
    return ModelMeta(name=name, version=version, description="", output="score" if single else "softmax",
                     labels=labels, threshold=0.5, clear_threshold=0.5,
                     input_shape=model.inputs[0].signature, output_shape=model.outputs[0].signature,
                     window=window, preprocess=PreprocessSpec(fft=False, time_features=False, log=False))


def feature_count(meta: ModelMeta) -> int:
    return meta.preprocess.feature_count(meta.window.size, meta.window.channels)


def check_io(model: LoadedModel, meta: ModelMeta, declared: bool,
             reference: ModelMeta | None = None) -> list[str]:
    """Why `model` cannot be fed by `meta`'s preprocessing / read by its output rule (empty: fine)."""
    problems: list[str] = []
    if len(model.inputs) != 1 or not model.outputs:
        return [f"the pipeline feeds one input and reads the first output; the model has "
                f"{len(model.inputs)} input(s), {len(model.outputs)} output(s)"]
    inp, out = model.inputs[0], model.outputs[0]
    want = feature_count(meta)
    if inp.size != want:
        source = "its model.toml" if declared else "the running pipeline"
        problems.append(f"input {list(inp.signature)} takes {inp.size} values but the preprocessing of "
                        f"{source} makes {want} per window")
    for t, what in ((inp, "input"), (out, "output")):
        if t.dtype.name not in _DTYPES:
            problems.append(f"{what} type {t.dtype.name} is not one of {', '.join(_DTYPES)}")
        elif t.dtype.kind in "iu" and not t.quantized:
            problems.append(f"{what} is {t.dtype.name} without quantisation parameters")
    if declared and meta.input_shape and _prod(meta.input_shape) != inp.size:
        problems.append(f"model.toml input_shape {list(meta.input_shape)} does not match the model's "
                        f"{list(inp.signature)}")
    n_out = out.size
    if declared and meta.output_shape and _prod(meta.output_shape) != n_out:
        problems.append(f"model.toml output_shape {list(meta.output_shape)} does not match the model's "
                        f"{list(out.signature)}")
    if meta.output == "softmax" and n_out != len(meta.labels):
        problems.append(f"output has {n_out} values for {len(meta.labels)} labels")
    if meta.output == "reconstruction" and n_out != inp.size:
        problems.append(f"an autoencoder gives back its {inp.size} input values; the output has {n_out}")
    if not declared and reference is not None and reference.output_shape \
            and _prod(reference.output_shape) != n_out:
        problems.append(f"output {list(out.signature)} differs from the running model's "
                        f"{list(reference.output_shape)} and no model.toml says how to read it")
    return problems


def _prod(shape: Sequence[int]) -> int:
    return math.prod(abs(s) for s in shape[1:]) if len(shape) > 1 else math.prod(abs(s) for s in shape)


def validate(model_dir: Path, name: str, version: str, *, settings: LoadSettings, window: WindowSpec,
             current: ModelMeta | None, recent: Sequence[Array], latency_budget_ms: float) -> Validated:
    """All checks, in order of cost; ModelRejected with the first failing check's reason."""

    def reject(reason: str) -> ModelRejected:
        return ModelRejected(f"{name}@{version}: {reason}")

    declared = (model_dir / META_FILE).is_file()
    meta: ModelMeta | None = None
    if declared:
        try:
            meta = load_model_meta(model_dir / META_FILE)
        except ModelMetaError as exc:
            raise reject(f"model.toml: {exc.reason}") from exc
        if meta.name != name:
            raise reject(f"model.toml names model {meta.name!r}, the update is for {name!r}")
        if (meta.window.size, meta.window.channels) != (window.size, window.channels):
            raise reject(f"model.toml wants windows of {meta.window.size}x{meta.window.channels}; the "
                         f"pipeline makes {window.size}x{window.channels} (change sensors.window first)")
    try:
        model = load_interpreter(model_dir / MODEL_FILE, settings.runtime, settings.num_threads,
                                 settings.delegate)
    except (ModelLoadError, RuntimeUnavailable) as exc:
        raise reject(f"does not load: {exc.reason}") from exc
    if meta is None:
        meta = _inherit(current, name, version, model, window)
    problems = check_io(model, meta, declared, current)
    if problems:
        raise reject("; ".join(problems))
    report: dict[str, Any] = {"runtime": model.runtime, "declared_meta": declared}
    timings: list[float] = []

    def run(x: Array) -> Array:
        t0 = time.perf_counter()
        try:
            out = model.infer(x)[0].reshape(-1)
        finally:
            timings.append(time.perf_counter() - t0)
        return out

    if declared:
        for i, g in enumerate(meta.golden):
            try:
                got = run(np.asarray(g.input, dtype=np.float32))
            except Exception as exc:
                raise reject(f"golden[{i}] ({g.label}): invoke failed: {exc}") from exc
            want = np.asarray(g.output, dtype=np.float32)
            if want.size != got.size:  # no broadcasting: a short golden must not pass everything
                raise reject(f"golden[{i}] ({g.label}): {want.size} expected values for {got.size} outputs")
            diff = float(np.max(np.abs(got.reshape(-1) - want.reshape(-1))))
            if not diff <= meta.golden_tolerance:
                raise reject(f"golden[{i}] ({g.label}): output {np.round(got, 4).tolist()} differs from "
                             f"{list(g.output)} by {diff:.3g} > {meta.golden_tolerance}")
        report["golden"] = len(meta.golden)
    prep = meta.preprocessor()
    for k, w in enumerate(recent):
        try:
            out = run(prep(w))
        except Exception as exc:
            raise reject(f"invoke failed on recent real window {k + 1} of {len(recent)}: {exc}") from exc
        if not np.isfinite(out).all():
            raise reject(f"non-finite output on recent real window {k + 1} of {len(recent)}: "
                         f"{np.round(out, 4).tolist()}")
    report["windows"] = len(recent)
    # time enough invokes for a median (this also warms the interpreter up before the swap)
    x = prep(recent[-1]) if recent else np.zeros(model.inputs[0].shape, np.float32)
    while len(timings) < LATENCY_SAMPLES + (len(meta.golden) if declared else 0) + len(recent):
        try:
            run(x)
        except Exception as exc:
            raise reject(f"invoke failed: {exc}") from exc
    p50_ms = float(np.median(timings[-LATENCY_SAMPLES:])) * 1000.0
    report["latency_p50_ms"] = round(p50_ms, 3)
    if p50_ms > latency_budget_ms:
        raise reject(f"latency p50 {p50_ms:.2f} ms exceeds inference.latency_budget_ms "
                     f"({latency_budget_ms:g} ms)")
    return Validated(model, meta, declared, report)


def _inherit(current: ModelMeta | None, name: str, version: str, model: LoadedModel,
             window: WindowSpec) -> ModelMeta:
    """A bare .tflite is read like the model it replaces (same preprocessing, labels, thresholds)."""
    if current is None:
        return default_meta(name, version, model, window)
    from dataclasses import replace

    return replace(current, name=name, version=version, golden=())


def load_served(model_dir: Path, name: str, version: str, settings: LoadSettings,
                window: WindowSpec) -> tuple[LoadedModel, ModelMeta]:
    """Load a stored version to serve it (start, rollback): no validation, it passed once."""
    model = load_interpreter(model_dir / MODEL_FILE, settings.runtime, settings.num_threads,
                             settings.delegate)
    if (model_dir / META_FILE).is_file():
        meta = load_model_meta(model_dir / META_FILE)
        from dataclasses import replace

        meta = replace(meta, name=name, version=version)  # the store's directory is the record
    else:
        meta = default_meta(name, version, model, window)
    return model, meta
