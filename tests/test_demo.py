"""The README's first command: the demo starts a loopback Mosquitto and the agent on
configs/dev.toml, prints what it publishes, and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_demo_shows_telemetry_with_inference_and_stops_cleanly(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "edgeagent.ops.demo", "--seconds", "6"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "telemetry    seq=" in out and "inference vibration-anomaly@" in out, out
    assert "status       offline shutdown" in out, out
    assert "demo: agent exited with 0" in out, out


DEMO_VENV_MAX_MB = 120


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_venv_is_small_and_enough_for_the_demo(tmp_path: Path) -> None:
    """`scripts/setup-venv --demo` in a copy of the checkout: at most 120 MB, no dev tools and no
    fleet extra, and the demo runs from it (so nothing it needs is missing)."""
    import shutil

    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("edgeagent", "configs", "scripts"):
        shutil.copytree(ROOT / name, checkout / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, checkout / name)
    setup = subprocess.run(["bash", "scripts/setup-venv", "--demo"], cwd=checkout, capture_output=True,
                           text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "setup: creating .venv-demo" in setup.stderr and "TFLite runtime" in setup.stderr
    venv = checkout / ".venv-demo"
    size_mb = int(subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True,
                                 check=True).stdout.split()[0])
    print(f"demo venv: {size_mb} MB")
    assert size_mb <= DEMO_VENV_MAX_MB
    site = next(venv.glob("lib/python3*/site-packages"))
    present = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert not present & {"pytest", "ruff", "mypy", "hypothesis", "rich", "prometheus_client", "pip"}, present
    r = subprocess.run([str(venv / "bin/python"), "-m", "edgeagent.ops.demo", "--seconds", "6"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "telemetry    seq=" in r.stdout, r.stdout + r.stderr
