"""The clock shim moves only the wall clock of the process it is preloaded into."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fieldtrial.clock import ClockControl, build_shim


def test_clock_shim_jumps_wall_clock_but_not_monotonic(tmp_path: Path) -> None:
    shim = build_shim(tmp_path)
    if shim is None:
        pytest.skip("no C compiler")
    clock = ClockControl(tmp_path / "offset")
    clock.jump(-7200)
    code = ("import time, datetime; t=time.time(); m=time.monotonic(); time.sleep(0.05); "
            "print(t, datetime.datetime.now().timestamp(), time.monotonic() - m)")
    out = subprocess.run([sys.executable, "-c", code], env=clock.env(shim), capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    import time

    wall, dt_now, mono = float(out[0]), float(out[1]), float(out[2])
    assert abs(wall - (time.time() - 7200)) < 30
    assert abs(dt_now - wall) < 5
    assert 0.04 < mono < 5  # sleep and monotonic unaffected
