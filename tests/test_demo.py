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
