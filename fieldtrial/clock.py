"""Wall-clock jumps for agent processes: a tiny LD_PRELOAD shim compiled at run time (no binary
in the repo). Only CLOCK_REALTIME moves; monotonic clocks and sleeps stay real."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from edgeagent.core.fsutil import atomic_write_text

SOURCE = Path(__file__).with_name("clockshim.c")


def build_shim(workdir: Path) -> Path | None:
    """Compile the shim with gcc; None (and the trial skips clock faults) when there is no gcc."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = workdir / "clockshim.so"
    res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SOURCE), "-ldl"],
                         capture_output=True, text=True)
    return out if res.returncode == 0 else None


class ClockControl:
    """The offset file one or more agents read; `jump(+3600)` moves their wall clock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_s = 0.0
        atomic_write_text(path, "0\n")

    def env(self, shim: Path) -> dict[str, str]:
        return {"LD_PRELOAD": str(shim), "EDGEAGENT_CLOCK_OFFSET_FILE": str(self.path)}

    def jump(self, delta_s: float) -> float:
        self.offset_s += delta_s
        atomic_write_text(self.path, f"{self.offset_s}\n")
        return self.offset_s
