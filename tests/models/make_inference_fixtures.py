#!/usr/bin/env python3
"""Make the small .tflite fixtures of the inference tests (tests/models/inference/); needs TensorFlow.

    /path/to/tf-venv/bin/python tests/models/make_inference_fixtures.py

The outputs are committed: tests never import TensorFlow. Each model is checked to load in every
TFLite runtime importable here (tflite-runtime 2.14 is older than the converter).

- uint8_io.tflite        102 features -> 4 softmax, fully quantised with uint8 input and output
- raw_window.tflite      input [1, 256, 3] (a raw window, "any input shape"), Conv1D -> 4 softmax
- nan_when_large.tflite  softmax(xW) + 1e-6 * sqrt(T - max(x)): finite for healthy features (all < T),
                         NaN once any feature exceeds T (a model that fails only on some real inputs)
- raise_when_large.tflite  GATHER with an index from max(x): out of bounds (invoke fails) once max(x)>T
- custom_op.tflite       an unresolved custom op ("Cumprod", allow_custom_ops)
- too_new_op.tflite      the float model with FULLY_CONNECTED claiming op version 99
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent / "inference"
FEATURES, LABELS = 102, 4
THRESHOLD = 1.0  # log10 features of the simulator stay below 0.5; a test source goes above 1.0


def convert(fn: tf.types.experimental.GenericFunction, *, quant: str | None = None,
            shape: tuple[int, ...] = (1, FEATURES), custom: bool = False) -> bytes:
    conc = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32))
    conv = tf.lite.TFLiteConverter.from_concrete_functions([conc], fn)
    if custom:
        conv.allow_custom_ops = True
    if quant:
        rng = np.random.default_rng(0)

        def rep():  # type: ignore[no-untyped-def]
            for _ in range(64):
                yield [rng.normal(-2.0, 0.6, size=shape).astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8 if quant == "uint8" else tf.int8
        conv.inference_output_type = tf.uint8 if quant == "uint8" else tf.int8
    return bytes(conv.convert())


def weights(shape: tuple[int, ...], seed: int) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(0, 0.3, size=shape).astype(np.float32))


def make() -> dict[str, bytes]:
    w = weights((FEATURES, LABELS), 1)
    b = tf.constant(np.array([3.0, 0.0, 0.0, 0.0], np.float32))  # healthy-ish by default

    @tf.function
    def dense(x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(tf.matmul(x, w) + b)

    @tf.function
    def nan_when_large(x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(tf.matmul(x, w) + b) + 1e-6 * tf.sqrt(THRESHOLD - tf.reduce_max(x))

    table = tf.constant(np.zeros((4, LABELS), np.float32))

    @tf.function
    def raise_when_large(x: tf.Tensor) -> tf.Tensor:
        # index 0 while max(x) < T, >= 4 (out of bounds: GATHER fails at invoke) once max(x) >= T
        idx = tf.cast(tf.reduce_max(x) >= THRESHOLD, tf.int32) * 7
        return tf.nn.softmax(tf.matmul(x, w) + b) + tf.gather(table, tf.reshape(idx, [1]))

    k = weights((5, 3, 8), 2)
    w2 = weights((8, LABELS), 3)

    @tf.function
    def raw_window(x: tf.Tensor) -> tf.Tensor:
        h = tf.nn.relu(tf.nn.conv1d(x, k, stride=4, padding="VALID"))
        return tf.nn.softmax(tf.matmul(tf.reduce_mean(h, axis=1), w2))

    @tf.function
    def custom(x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(tf.math.cumprod(tf.matmul(x, w), axis=1))

    float_blob = convert(dense)
    return {
        "uint8_io.tflite": convert(dense, quant="uint8"),
        "raw_window.tflite": convert(raw_window, shape=(1, 256, 3)),
        "nan_when_large.tflite": convert(nan_when_large),
        "raise_when_large.tflite": convert(raise_when_large),
        "custom_op.tflite": convert(custom, custom=True),
        "too_new_op.tflite": bump_op_version(float_blob, "FULLY_CONNECTED", 99),
    }


def bump_op_version(blob: bytes, op: str, version: int) -> bytes:
    """The same model with `op` claiming a version no runtime knows (as a newer converter would)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    code = getattr(schema.BuiltinOperator, op)
    for oc in model.operatorCodes:
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            oc.version = version
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def check(path: Path) -> None:
    """Print how each importable runtime takes the model (a fixture meant to load must load)."""
    for modname in ("tflite_runtime.interpreter", "ai_edge_litert.interpreter"):
        try:
            mod = __import__(modname, fromlist=["Interpreter"])
        except ImportError:
            continue
        try:
            it = mod.Interpreter(model_path=str(path))
            it.allocate_tensors()
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
            it.invoke()
            print(f"  {modname}: ok {list(d['shape'])} {d['dtype'].__name__}")
        except Exception as exc:
            print(f"  {modname}: {type(exc).__name__}: {str(exc)[:120]}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, blob in make().items():
        path = OUT / name
        path.write_bytes(blob)
        print(f"{path} ({len(blob)} bytes)")
        check(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
