"""The runtime seam on the real interpreters: typed details, (de)quantisation, load errors naming the op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeagent.core.errors import ModelLoadError, RuntimeUnavailable
from edgeagent.inference.runtime import explain_load_error, import_runtime, load_interpreter
from tests.inference_helpers import FIXTURES, MODELS, RUNTIMES, SHIPPED

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime installed")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_model_quantises_inputs_and_dequantises_outputs_with_its_own_parameters(runtime: str) -> None:
    m = load_interpreter(SHIPPED / "model.tflite", runtime)
    assert m.runtime == runtime
    (inp,), (out,) = m.inputs, m.outputs
    assert inp.dtype == np.int8 and inp.quantized and inp.shape == (1, 102) and inp.signature == (-1, 102)
    assert out.dtype == np.int8 and out.scale == pytest.approx(1 / 256)
    x = np.random.default_rng(1).normal(-2.0, 0.8, size=102).astype(np.float32)
    y = m.infer(x)[0]
    raw_in = m.interpreter.get_tensor(inp.index).reshape(-1)
    expected_in = np.clip(np.rint(x / inp.scale + inp.zero_point), -128, 127)
    assert np.abs(raw_in.astype(np.int32) - expected_in).max() <= 1  # x * (1/s) may round the other way
    raw_out = m.interpreter.get_tensor(out.index).reshape(-1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.reshape(-1), (raw_out.astype(np.float32) - out.zero_point) * out.scale)
    assert y.sum() == pytest.approx(1.0, abs=0.02)  # a softmax survives the round trip


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_float_and_int8_shipped_models_agree(runtime: str) -> None:
    f = load_interpreter(SHIPPED / "model_float.tflite", runtime)
    q = load_interpreter(SHIPPED / "model.tflite", runtime)
    rng = np.random.default_rng(2)
    for _ in range(5):
        x = rng.normal(-2.0, 0.6, size=102).astype(np.float32)
        np.testing.assert_allclose(f.infer(x)[0], q.infer(x)[0], atol=0.15)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_uint8_model_and_any_declared_input_shape(runtime: str) -> None:
    u = load_interpreter(FIXTURES / "uint8_io.tflite", runtime)
    assert u.inputs[0].dtype == np.uint8 and u.outputs[0].dtype == np.uint8
    y = u.infer(np.full(102, -2.0, np.float32))[0]
    assert y.dtype == np.float32 and y.sum() == pytest.approx(1.0, abs=0.05)
    raw = load_interpreter(FIXTURES / "raw_window.tflite", runtime)
    assert raw.inputs[0].shape == (1, 256, 3)
    y = raw.infer(np.zeros((256, 3), np.float32))[0]  # a window, reshaped to the declared [1, 256, 3]
    assert y.shape == (1, 4)
    with pytest.raises(ValueError):
        raw.infer(np.zeros(100, np.float32))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("model", "op", "says"), [
    (MODELS / "select_tf_op.tflite", "FlexCumprod", "Flex delegate"),
    (FIXTURES / "custom_op.tflite", "Cumprod", "custom op Cumprod"),
    (FIXTURES / "too_new_op.tflite", "FULLY_CONNECTED", "version 99 is newer than this runtime"),
])
def test_a_model_with_ops_the_runtime_lacks_fails_at_load_naming_the_op(runtime: str, model: Path, op: str,
                                                                        says: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_interpreter(model, runtime)
    exc = info.value
    assert exc.op == op and says in exc.reason
    other = "litert" if runtime == "tflite-runtime" else "tflite-runtime"
    assert f"try inference.runtime = '{other}'" in exc.reason


@pytest.mark.skipif(len(RUNTIMES) < 2, reason="needs both runtimes")
def test_auto_tries_the_other_runtime_and_reports_both() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_interpreter(FIXTURES / "too_new_op.tflite", "auto")
    assert info.value.reason.startswith("neither runtime can run it: tflite-runtime: op FULLY_CONNECTED")
    assert "; litert: op FULLY_CONNECTED" in info.value.reason and "try" not in info.value.reason


def test_missing_file_unknown_runtime_and_absent_delegate_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_interpreter(tmp_path / "nope.tflite")
    with pytest.raises(RuntimeUnavailable, match="unknown runtime"):
        import_runtime("onnx")
    with pytest.raises(RuntimeUnavailable) as info:
        load_interpreter(SHIPPED / "model.tflite", RUNTIMES[0], delegate="libedgetpu-absent.so.1")
    assert "inference.delegate" in info.value.reason and info.value.runtime.startswith("delegate")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(ModelLoadError) as load_info:
        load_interpreter(garbage, RUNTIMES[0])
    assert load_info.value.op is None


def test_explain_load_error_knows_the_runtimes_wording() -> None:
    assert explain_load_error("Op builtin_code out of range: 150. Are you using old TFLite binary with "
                              "newer model?")[0] == "150"
    assert explain_load_error("Encountered unresolved custom op: TFLite_Detection_PostProcess.\nSee")[0] == \
        "TFLite_Detection_PostProcess"
    op, reason = explain_load_error("something else\nentirely")
    assert op is None and reason == "something else"
