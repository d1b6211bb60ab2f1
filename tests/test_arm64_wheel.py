"""scripts/test-arm64 refuses a wheel that lacks a package file, naming the step and the file.

The fast test checks the host-side step (no root, no emulation). The second one proves that the
same wheel also fails inside the emulated root when that check is skipped: it needs the arm64
job's cached root and minutes of emulation, so it runs only there (EDGEAGENT_ARM64_JOB=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test-arm64"
MODEL = "edgeagent/models/vibration-anomaly/model.tflite"
sys.path.insert(0, str(ROOT / "scripts"))

from arm64 import wheelcheck  # noqa: E402


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The project's wheel as `pip wheel` builds it, and a copy without the shipped model."""
    tmp = tmp_path_factory.mktemp("arm64-wheel")
    good = wheelcheck.build(ROOT, tmp / "dist", tmp / "build.log")
    broken = tmp / "broken" / good.name
    broken.parent.mkdir()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w", zipfile.ZIP_DEFLATED) as dst:
        assert MODEL in src.namelist()
        for item in src.infolist():
            if item.filename != MODEL:
                dst.writestr(item, src.read(item.filename))
    return good, broken


def script(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run scripts/test-arm64; past the timeout it gets SIGTERM (and unmounts), not SIGKILL."""
    with subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          text=True, cwd=ROOT) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=120)
            pytest.fail(f"scripts/test-arm64 {' '.join(args)} ran over {timeout_s} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_wheel_without_its_model_fails_at_the_wheel_contents_step(wheels: tuple[Path, Path]) -> None:
    good, broken = wheels
    ok = script("--wheel", str(good), "--only", "wheel")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "package files present" in ok.stdout

    bad = script("--wheel", str(broken), "--only", "wheel")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "test-arm64: FAILED at wheel contents" in bad.stderr
    assert f"lacks 1 package file(s): {MODEL}" in bad.stdout
    assert "| wheel contents" in bad.stdout and "FAILED" in bad.stdout  # the summary table names it


def test_the_dependency_set_that_keys_a_roots_venv_is_the_wheels_own_for_the_extra(
        wheels: tuple[Path, Path]) -> None:
    good, _ = wheels
    tflite, litert = wheelcheck.requires(good, "tflite"), wheelcheck.requires(good, "litert")
    assert any(r.startswith("tflite-runtime") for r in tflite) and not any("litert" in r for r in tflite)
    assert any(r.startswith("ai-edge-litert") for r in litert)
    assert not any("tflite-runtime" in r for r in litert)
    core = [r for r in tflite if "extra ==" not in r]
    assert core == [r for r in litert if "extra ==" not in r] and any(r.startswith("psutil") for r in core)


def test_a_file_that_is_not_a_wheel_is_refused_with_its_name(tmp_path: Path) -> None:
    junk = tmp_path / "edgeagent-0.1.0-py3-none-any.whl"
    junk.write_text("not a zip")
    bad = script("--wheel", str(junk), "--only", "wheel")
    assert bad.returncode == 1
    assert "is not a readable wheel" in bad.stdout and "FAILED at wheel contents" in bad.stderr


@pytest.mark.skipif(os.environ.get("EDGEAGENT_ARM64_JOB") != "1", reason="runs in the arm64 job (.ci/run)")
@pytest.mark.timeout(2400)  # a root that is not cached yet is built first
def test_without_the_check_the_broken_wheel_fails_inside_the_root_when_the_agent_starts(
        wheels: tuple[Path, Path]) -> None:
    _, broken = wheels
    bad = script("--wheel", str(broken), "--skip-wheel-check", "--root", "bookworm", "--until", "run",
                 timeout_s=2000)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "test-arm64: FAILED at bookworm: run" in bad.stderr
    run_row = next(line for line in bad.stdout.splitlines() if line.startswith("| bookworm: run"))
    assert "no 10 inference results" in run_row  # the agent stays up without its model: says why
    assert "no model 'vibration-anomaly' in the store and none shipped" in run_row
    for passed in ("bookworm: install", "bookworm: check-config"):  # installs and validates fine
        assert any(line.startswith(f"| {passed}") and "| ok:" in line for line in bad.stdout.splitlines())
