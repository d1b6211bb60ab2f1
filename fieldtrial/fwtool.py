"""The trial's firmware installer commands: the fake A/B installer
(fieldtrial/fixtures/fake_ab_installer.py) behind a thin wrapper that makes some images bad on
purpose, decided by the image's first bytes:
    FAIL-INSTALL...  the install op fails (bad image header)
    FAIL-HEALTH...   installs and boots, but the post-boot health command fails

    python -m fieldtrial.fwtool --ab AB_PY --root DIR OP [ARTIFACT]
    python -m fieldtrial.fwtool --root DIR health
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

FAIL_INSTALL = b"FAIL-INSTALL"
FAIL_HEALTH = b"FAIL-HEALTH"


def booted_image(root: Path) -> Path | None:
    try:
        slot = (root / "booted").read_text().strip()
    except OSError:
        return None
    img = root / f"slot-{slot}" / "rootfs.img"
    return img if img.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fieldtrial.fwtool")
    p.add_argument("--ab", type=Path, help="the fake A/B installer script")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("op")
    p.add_argument("artifact", nargs="?")
    a = p.parse_args(argv)
    if a.op == "health":
        img = booted_image(a.root)
        if img is not None and img.read_bytes()[:len(FAIL_HEALTH)] == FAIL_HEALTH:
            print("app self-test failed (trial image marked FAIL-HEALTH)")
            return 3
        print("healthy")
        return 0
    if a.ab is None:
        print("--ab is required for installer ops", file=sys.stderr)
        return 2
    if a.op == "install" and a.artifact:
        with open(a.artifact, "rb") as f:
            head = f.read(len(FAIL_INSTALL))
        if head == FAIL_INSTALL:
            print("install: error: bad image header (trial image marked FAIL-INSTALL)")
            return 1
    argv2 = [sys.executable, str(a.ab), "--root", str(a.root), a.op] + ([a.artifact] if a.artifact else [])
    return subprocess.run(argv2).returncode


if __name__ == "__main__":
    sys.exit(main())
