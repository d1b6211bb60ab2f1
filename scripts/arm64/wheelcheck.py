"""The wheel scripts/test-arm64 installs: built on the host from the project files, checked before use.

The board gets what `pip wheel` makes of the project, never the source tree, so a file that the
package data misses shows up. The content check runs on the host in a second; without it
(`--skip-wheel-check`) the same wheel fails later, inside the root, when the agent needs the file.
"""

from __future__ import annotations

import email.parser
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from arm64.roots import StepFailed, run

PROJECT_FILES = ("pyproject.toml", "README.md", "edgeagent")  # what setuptools reads to build it


def build(src: Path, out_dir: Path, log: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the project files (setuptools litters the tree it builds in)."""
    with tempfile.TemporaryDirectory(prefix="edgeagent-wheel-src-") as tmp:
        for name in PROJECT_FILES:
            if (src / name).is_dir():
                shutil.copytree(src / name, Path(tmp) / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src / name, Path(tmp) / name)
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out_dir), tmp],
            "pip wheel", log, timeout_s=600)
    wheels = sorted(out_dir.glob("edgeagent-*.whl"))
    if len(wheels) != 1:
        raise StepFailed(f"pip wheel: expected one edgeagent wheel in {out_dir}, found {len(wheels)}")
    return wheels[0]


def expected_files(src: Path) -> list[str]:
    """Every file of the package as the repository has it (git's list; the directory without git)."""
    got = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "edgeagent"], capture_output=True,
                         check=False)
    if got.returncode == 0 and got.stdout:
        names = [n for n in got.stdout.decode().split("\0") if n]
        return sorted(n for n in names if (src / n).is_file())
    return sorted(str(p.relative_to(src)) for p in (src / "edgeagent").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def check_contents(wheel: Path, src: Path) -> str:
    """Raise StepFailed naming every package file the wheel lacks; return a one-line summary."""
    try:
        with zipfile.ZipFile(wheel) as z:
            inside = set(z.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise StepFailed(f"{wheel.name} is not a readable wheel: {exc}") from exc
    want = expected_files(src)
    missing = [n for n in want if n not in inside]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise StepFailed(f"{wheel.name} lacks {len(missing)} package file(s): {shown}")
    return f"{len(want)} package files present"


def requires(wheel: Path, extra: str) -> list[str]:
    """The wheel's dependency lines that apply with `extra` (its Requires-Dist, markers kept)."""
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise StepFailed(f"{wheel.name} has no METADATA")
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    lines = meta.get_all("Requires-Dist") or []
    keep = []
    for line in lines:
        marker = line.split(";", 1)[1] if ";" in line else ""
        if "extra ==" not in marker or f'extra == "{extra}"' in marker or f"extra == '{extra}'" in marker:
            keep.append(line.strip())
    return sorted(keep)


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
