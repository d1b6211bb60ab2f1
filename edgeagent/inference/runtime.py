"""The runtime seam: one small wrapper over tflite-runtime or ai-edge-litert (LiteRT) interpreters.

Everything the agent needs from an interpreter goes through `LoadedModel`: typed tensor details
(shape, dtype, quantisation), float-in/float-out inference with (de)quantisation from the model's
own scale and zero point, and load errors translated into `ModelLoadError` naming the missing op.
A `LoadedModel` is not thread-safe: one thread at a time owns it (the runner's worker).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent.core.errors import ModelLoadError, RuntimeUnavailable
from edgeagent.core.pipelines import delegate_problem

log = logging.getLogger(__name__)

RUNTIMES = ("tflite-runtime", "litert")
_MODULES = {"tflite-runtime": "tflite_runtime.interpreter", "litert": "ai_edge_litert.interpreter"}
_INSTALL = {"tflite-runtime": "pip install 'edgeagent[tflite]' (tflite-runtime, Python <= 3.11)",
            "litert": "pip install 'edgeagent[litert]' (ai-edge-litert)"}

Array = npt.NDArray[Any]
# the clip ufunc itself: np.clip's Python wrapper costs more than the work on 100 values
_clip: Any = (getattr(np, "_core", None) or np.core).umath.clip  # numpy 2 | numpy 1

# What runtimes say when a model needs something they do not have (kept as regexes: the wording
# is the runtimes', and differs a little between versions).
_OP_ERRORS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Encountered unresolved custom op: ([^.\s]+)"), "custom op {op} is not in this runtime"),
    (re.compile(r"Didn't find op for builtin opcode '([^']+)' version '(\d+)'"),
     "op {op} version {ver} is newer than this runtime supports"),
    (re.compile(r"Op builtin_code out of range: (\d+)"),
     "builtin op code {op} is unknown to this runtime (model made by a newer converter)"),
    (re.compile(r"Select TensorFlow op\(s\).*?\((Flex\w+)\)", re.S),
     "Select TensorFlow op {op} needs the Flex delegate, which no TFLite runtime wheel ships"),
    (re.compile(r"Select TensorFlow op\(s\)"),
     "Select TensorFlow ops need the Flex delegate, which no TFLite runtime wheel ships"),
)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One input or output tensor as the model declares it."""

    name: str
    index: int
    shape: tuple[int, ...]  # as allocated (dynamic dims resolved to 1)
    signature: tuple[int, ...]  # as declared, -1 for a dynamic dimension
    dtype: np.dtype[Any]
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.dtype.kind in "iu"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def describe(self) -> str:
        q = f" q(scale={self.scale:.4g}, zero_point={self.zero_point})" if self.quantized else ""
        return f"{list(self.signature)} {self.dtype.name}{q}"


def import_runtime(runtime: str) -> tuple[str, ModuleType]:
    """The interpreter module for "tflite-runtime", "litert" or "auto" (tflite-runtime first)."""
    names = RUNTIMES if runtime == "auto" else (runtime,)
    problems: list[str] = []
    for name in names:
        if name not in _MODULES:
            raise RuntimeUnavailable(name, f"unknown runtime; expected one of auto, {', '.join(RUNTIMES)}")
        try:
            return name, importlib.import_module(_MODULES[name])
        except ImportError as exc:
            problems.append(f"{name}: {exc} (install: {_INSTALL[name]})")
    raise RuntimeUnavailable(runtime, "no TFLite runtime can be imported: " + "; ".join(problems))


def available_runtimes() -> list[str]:
    """The runtimes importable here, in `auto` order."""
    out = []
    for name in RUNTIMES:
        try:
            import_runtime(name)
        except RuntimeUnavailable:
            continue
        out.append(name)
    return out


def explain_load_error(text: str) -> tuple[str | None, str]:
    """(op, human reason) for a runtime's error text; op None when the text names none."""
    for pattern, template in _OP_ERRORS:
        m = pattern.search(text)
        if m:
            groups = m.groups()
            op = groups[0] if groups else None
            ver = groups[1] if len(groups) > 1 else ""
            return op, template.format(op=op, ver=ver)
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return None, first[:300]


def _other(runtime: str) -> str:
    return "litert" if runtime == "tflite-runtime" else "tflite-runtime"


def _load_delegate(module: ModuleType, runtime: str, library: str) -> Any:
    # probe with ctypes first: load_delegate's own failure leaves a half-built object whose __del__
    # prints a traceback, and its message does not say what to do
    problem = delegate_problem(library)
    if problem is not None:
        raise RuntimeUnavailable(f"delegate {library}", problem)
    try:
        return module.load_delegate(library)
    except (ValueError, OSError, RuntimeError) as exc:
        raise RuntimeUnavailable(f"delegate {library}", f"{runtime} cannot use it: {exc}") from exc


def _tensor_info(d: dict[str, Any]) -> TensorInfo:
    scale, zero = d.get("quantization", (0.0, 0))
    sig = d.get("shape_signature", d["shape"])
    return TensorInfo(name=str(d.get("name", "")), index=int(d["index"]),
                      shape=tuple(int(x) for x in d["shape"]), signature=tuple(int(x) for x in sig),
                      dtype=np.dtype(d["dtype"]), scale=float(scale), zero_point=int(zero))


class LoadedModel:
    """An allocated interpreter with typed details; `infer` takes and returns float arrays."""

    def __init__(self, interpreter: Any, path: Path, runtime: str, num_threads: int, delegate: str) -> None:
        self.interpreter = interpreter
        self.path = path
        self.runtime = runtime
        self.num_threads = num_threads
        self.delegate = delegate
        self.size_bytes = path.stat().st_size if path.exists() else 0
        self.inputs = tuple(_tensor_info(d) for d in interpreter.get_input_details())
        self.outputs = tuple(_tensor_info(d) for d in interpreter.get_output_details())
        # hot path: bound methods and per-tensor constants looked up once
        self._set = interpreter.set_tensor
        self._get = interpreter.get_tensor
        self._invoke = interpreter.invoke
        self._in = [(t.index, t.shape, t.dtype, t.quantized,
                     np.float32(1.0 / t.scale if t.quantized else 1.0), np.float32(t.zero_point),
                     tuple(np.float32(v) for v in _limits(t.dtype))) for t in self.inputs]
        # 8-bit outputs dequantise through a 256-entry table (one `take`, no float arithmetic)
        self._out = [(t.index, t.quantized, _dequant_table(t), np.float32(t.zero_point), np.float32(t.scale))
                     for t in self.outputs]
        t0 = self.inputs[0] if len(self.inputs) == 1 else None
        self._in1 = (t0.index, t0.shape, t0.dtype) if t0 is not None else None
        o0 = self.outputs[0] if len(self.outputs) == 1 else None
        self._out1 = o0.index if o0 is not None and not o0.quantized else None

    def describe(self) -> str:
        ins = ", ".join(t.describe() for t in self.inputs)
        outs = ", ".join(t.describe() for t in self.outputs)
        return f"{self.path.name} on {self.runtime}: in {ins} -> out {outs}"

    def set_inputs(self, x: Array | Sequence[Array]) -> None:
        """Reshape each float input to its tensor (same element count), quantise if the tensor is."""
        xs = (x,) if isinstance(x, np.ndarray) else tuple(x)
        if len(xs) != len(self._in):
            raise ValueError(f"model takes {len(self._in)} inputs, got {len(xs)}")
        for (index, shape, dtype, quantized, inv_scale, zero, limits), arr in zip(self._in, xs, strict=True):
            if arr.dtype != dtype or arr.shape != shape:
                if quantized and arr.dtype.kind == "f":
                    # in place on one temporary, float32 constants: ~4 us for 100 values, not ~7
                    q = arr.astype(np.float32) * inv_scale
                    q += zero
                    np.rint(q, out=q)
                    _clip(q, limits[0], limits[1], out=q)
                    arr = q
                arr = arr.reshape(shape).astype(dtype, copy=False)
            self._set(index, arr)

    def get_outputs(self) -> list[Array]:
        """Every output as float32 (dequantised with the model's scale and zero point)."""
        outs: list[Array] = []
        for index, quantized, table, zero, scale in self._out:
            y = self._get(index)
            if table is not None:
                y = table.take(y.view(np.uint8))
            elif quantized:  # 16-bit activations (16x8 quantisation)
                y = (y.astype(np.float32) - zero) * scale
            outs.append(y)
        return outs

    def infer(self, x: Array | Sequence[Array]) -> list[Array]:
        if self._in1 is not None and isinstance(x, np.ndarray):  # the common case, inlined
            index, shape, dtype = self._in1
            if x.dtype is dtype and x.shape == shape:
                self._set(index, x)
            else:
                self.set_inputs(x)
        else:
            self.set_inputs(x)
        self._invoke()
        if self._out1 is not None:
            return [self._get(self._out1)]
        return self.get_outputs()

    def invoke(self) -> None:
        self._invoke()

    def random_inputs(self, rng: np.random.Generator) -> list[Array]:
        """Inputs of the declared shapes and types (bench-model); quantised ones in their raw dtype."""
        out: list[Array] = []
        for t in self.inputs:
            if t.dtype.kind in "iu":
                info = np.iinfo(t.dtype)
                # narrow range around zero: random int32/int64 indices would be out of bounds
                lo, hi = (int(info.min), int(info.max)) if t.dtype.itemsize == 1 else (0, 1)
                out.append(rng.integers(lo, hi, size=t.shape, endpoint=True).astype(t.dtype))
            elif t.dtype.kind == "b":
                out.append(rng.random(t.shape) < 0.5)
            else:
                out.append(rng.standard_normal(t.shape).astype(t.dtype))
        return out


def _dequant_table(t: TensorInfo) -> Array | None:
    """float32 value of every 8-bit code (indexed by the code's bits as uint8), None if not needed."""
    if not t.quantized or t.dtype.itemsize != 1:
        return None
    codes = np.arange(256, dtype=np.uint8).view(t.dtype).astype(np.float32)
    table: Array = ((codes - np.float32(t.zero_point)) * np.float32(t.scale)).astype(np.float32)
    return table


def _limits(dtype: np.dtype[Any]) -> tuple[float, float]:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return float("-inf"), float("inf")


def load_interpreter(model_path: Path | str, runtime: str = "auto", num_threads: int = 1,
                     delegate: str = "") -> LoadedModel:
    """Load and allocate a .tflite model. With "auto", a model whose ops tflite-runtime lacks is
    retried on LiteRT when it is installed. Raises RuntimeUnavailable or ModelLoadError."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(str(path), "no such model file")
    name, module = import_runtime(runtime)
    try:
        return _load(module, name, path, num_threads, delegate)
    except ModelLoadError as exc:
        if runtime != "auto" or exc.op is None:
            raise
        other = _other(name)
        try:
            _, other_module = import_runtime(other)
        except RuntimeUnavailable:
            raise exc from None
        log.info("model needs an op %s lacks; trying %s", name, other,
                 extra={"kv": {"model": str(path), "op": exc.op}})
        try:
            return _load(other_module, other, path, num_threads, delegate)
        except ModelLoadError as exc2:
            first, second = (e.reason.split("; try inference.runtime")[0] for e in (exc, exc2))
            raise ModelLoadError(str(path), f"neither runtime can run it: {name}: {first}; {other}: {second}",
                                 exc2.op or exc.op, other) from exc2


def _load(module: ModuleType, runtime: str, path: Path, num_threads: int, delegate: str) -> LoadedModel:
    delegates = [_load_delegate(module, runtime, delegate)] if delegate else None
    try:
        interpreter = module.Interpreter(model_path=str(path), num_threads=num_threads,
                                         experimental_delegates=delegates)
        interpreter.allocate_tensors()
        _fix_dynamic_batch(interpreter)
    except (ValueError, RuntimeError) as exc:
        op, reason = explain_load_error(str(exc))
        if op is not None:
            reason += f"; try inference.runtime = '{_other(runtime)}'"
        raise ModelLoadError(str(path), reason, op, runtime) from exc
    return LoadedModel(interpreter, path, runtime, num_threads, delegate)


def _fix_dynamic_batch(interpreter: Any) -> None:
    """Dynamic dimensions (-1, usually the batch) become 1: the agent feeds one window at a time."""
    resized = False
    for d in interpreter.get_input_details():
        sig = d.get("shape_signature")
        if sig is not None and any(int(s) < 0 for s in sig):
            shape = [1 if int(s) < 0 else int(s) for s in sig]
            if list(d["shape"]) != shape:
                interpreter.resize_tensor_input(d["index"], shape)
                resized = True
    if resized:
        interpreter.allocate_tensors()
