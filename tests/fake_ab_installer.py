"""A toy A/B firmware installer for the update tests: two slot directories and a boot flag.

    fake_ab_installer.py --root DIR [--fail|--hang] OP [ARTIFACT]

install copies the artifact into the inactive slot and marks it pending; reboot boots the pending
slot on trial (the test then restarts the agent process: that is the "reboot"); mark-good commits
it; mark-bad switches the boot flag back to the other slot; slot prints the booted slot.
Every op is appended to DIR/ops.log so tests can see what ran, in which order.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--fail", action="store_true", help="exit 1 after printing an error")
    p.add_argument("--hang", action="store_true", help="sleep (until killed)")
    p.add_argument("op", choices=("install", "reboot", "mark-good", "mark-bad", "abort", "slot"))
    p.add_argument("artifact", nargs="?")
    a = p.parse_args(argv)
    root: Path = a.root
    for slot in ("A", "B"):
        (root / f"slot-{slot}").mkdir(parents=True, exist_ok=True)
    booted_file = root / "booted"
    if not booted_file.exists():
        booted_file.write_text("A\n")
    booted = booted_file.read_text().strip()
    other = "B" if booted == "A" else "A"
    with open(root / "ops.log", "a") as log:
        log.write(f"{a.op} {a.artifact or ''}".rstrip() + "\n")
    if a.hang:
        print(f"{a.op}: hanging", flush=True)
        time.sleep(3600)
    if a.fail:
        print(f"{a.op}: error: simulated failure (bad image header)", flush=True)
        return 1
    if a.op == "install":
        if not a.artifact or not Path(a.artifact).is_file():
            print(f"install: no such artifact {a.artifact}", file=sys.stderr)
            return 2
        shutil.copyfile(a.artifact, root / f"slot-{other}" / "rootfs.img")
        (root / "pending").write_text(other + "\n")
        print(f"installed {Path(a.artifact).name} into slot {other}")
    elif a.op == "reboot":
        pending = root / "pending"
        if pending.exists():
            booted_file.write_text(pending.read_text())
            pending.unlink()
            (root / "state").write_text("trial\n")
        count = root / "reboots"
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(f"{n}\n")
        print("rebooting")
    elif a.op == "mark-good":
        (root / "state").write_text("good\n")
        print(f"slot {booted} marked good")
    elif a.op == "mark-bad":
        booted_file.write_text(other + "\n")
        (root / "state").write_text("bad\n")
        print(f"slot {booted} marked bad; next boot: {other}")
    elif a.op == "abort":  # still in the old slot: drop the pending install, keep booting this one
        (root / "pending").unlink(missing_ok=True)
        print(f"pending install dropped; next boot: {booted}")
    elif a.op == "slot":
        print(booted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
