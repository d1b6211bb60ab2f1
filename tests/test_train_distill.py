"""scripts/train-model --distill: the annealing schedule (pure), and a real --quick run of both head
kinds through the training venv (TensorFlow), skipped where that venv has not been made."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_VENV = Path(os.environ.get("EDGEAGENT_TRAIN_VENV", ROOT / ".venv-train"))


def _distill_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_distill", ROOT / "scripts" / "train_distill.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_distill", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_temperature_is_constant_or_annealed_linearly_to_one() -> None:
    td = _distill_module()
    assert [td.temperature_at(e, 5, 4.0, False) for e in range(5)] == [4.0] * 5
    assert [td.temperature_at(e, 5, 4.0, True) for e in range(5)] == [4.0, 3.25, 2.5, 1.75, 1.0]
    assert td.temperature_at(0, 1, 4.0, True) == 4.0


def test_bad_flags_are_refused_before_any_training() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train-model"), "--distill", "--alpha", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--alpha" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (TRAIN_VENV / "bin" / "python").exists(),
                    reason="no training venv (scripts/train-model makes .venv-train on first use)")
@pytest.mark.parametrize("head", ["softmax", "reconstruction"])
def test_distill_quick_prints_teacher_vs_student(tmp_path: Path, head: str) -> None:
    out = subprocess.run([str(ROOT / "scripts" / "train-model"), "--distill", "--quick", "--head", head,
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    rows = {m[0].strip(): m for m in re.findall(r"^\| ([a-z0-9 ,]+) \| ([0-9.]+) \| ([0-9.]+) \| (\d+) \|",
                                                 out.stdout, re.M)}
    assert {"teacher float32", "teacher int8", "student int8"} <= rows.keys(), out.stdout
    for label, (_, acc, f1, size) in rows.items():
        assert 0.0 <= float(acc) <= 1.0 and 0.0 <= float(f1) <= 1.0
        written = tmp_path / f"{label.replace(' ', '-').replace(',', '')}.tflite"
        assert written.stat().st_size == int(size)  # the table reports the files it wrote
    ships = out.returncode == 0
    assert ("student ships" in out.stdout) == ships and ("does NOT ship" in out.stdout) == (not ships)
    assert (tmp_path / "model.tflite").exists() == (ships and head == "softmax")
