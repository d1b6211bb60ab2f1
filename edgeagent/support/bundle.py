"""Stand-in for the device-side support bundle builder (issue 20, parts 1-2): a tar.gz of a few files.

Replaced by the real builder at merge; callers use only `build_bundle` and `BundleResult`.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeagent import __version__
from edgeagent.core.config import Config


@dataclass(frozen=True, slots=True)
class BundleResult:
    path: Path
    size: int
    sha256: str
    files: tuple[str, ...]
    omitted: tuple[str, ...]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def build_bundle(cfg: Config, out: Path, *, max_bytes: int, log_lines: Sequence[str],
                 config_path: Path | None = None) -> BundleResult:
    """Write a bundle to `out` (blocking: run it off the event loop)."""
    facts = {"device": cfg.device.id, "agent": __version__, "python": platform.python_version(),
             "machine": platform.machine(), "ts": time.time()}
    parts: list[tuple[str, bytes]] = [("facts.json", json.dumps(facts, indent=1).encode()),
                                      ("log.txt", "\n".join(log_lines).encode())]
    health = cfg.state_dir / "health.json"
    if health.is_file():
        parts.append(("health.json", health.read_bytes()))
    for job_log in sorted(cfg.state_dir.glob("updates/*/log.txt")):
        parts.append((f"updates/{job_log.parent.name}/log.txt", job_log.read_bytes()))
    files: list[str] = []
    omitted: list[str] = []
    used = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for name, data in parts:
            if used + len(data) > max_bytes:
                omitted.append(name)
                continue
            used += len(data)
            _add(tar, name, data)
            files.append(name)
        _add(tar, "manifest.json", json.dumps({"files": files, "omitted": omitted}).encode())
    data = out.read_bytes()
    return BundleResult(out, len(data), hashlib.sha256(data).hexdigest(), tuple(files), tuple(omitted))
