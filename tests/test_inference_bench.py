"""`edgeagent bench-model` as a user runs it: a child process, any .tflite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inference_helpers import FIXTURES, MODELS, ROOT, RUNTIMES, SHIPPED

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime installed")


def bench_model(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent.cli", "bench-model", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("model", "runtime"), [
    (SHIPPED / "model.tflite", RUNTIMES[-1] if RUNTIMES else ""),
    (FIXTURES / "raw_window.tflite", RUNTIMES[0] if RUNTIMES else ""),  # not one of ours: [1, 256, 3]
    (FIXTURES / "uint8_io.tflite", RUNTIMES[0] if RUNTIMES else ""),
])
def test_bench_model_json_has_both_distributions_and_the_ratio(model: Path, runtime: str) -> None:
    p = bench_model(str(model), "--runtime", runtime, "--threads", "2", "--count", "200", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["runtime"] == runtime and res["threads"] == 2
    for side in ("bare", "runner", "e2e"):
        d = res[side]
        assert d["n"] >= 200 - 4 and 0 < d["min_ms"] <= d["p50_ms"] <= d["p95_ms"] <= d["p99_ms"]
    assert res["ratio_runner_p50"] == pytest.approx(res["runner"]["p50_ms"] / res["bare"]["p50_ms"], rel=0.01)


def test_bench_model_prints_a_table() -> None:
    p = bench_model(str(SHIPPED / "model_float.tflite"), "--count", "100")
    assert p.returncode == 0, p.stderr
    assert "bare" in p.stdout and "runner" in p.stdout and "ratio p50: runner/bare" in p.stdout


def test_bench_model_explains_a_model_it_cannot_load() -> None:
    p = bench_model(str(MODELS / "select_tf_op.tflite"), "--count", "10")
    assert p.returncode == 2
    assert "FlexCumprod" in p.stderr and "Traceback" not in p.stderr
