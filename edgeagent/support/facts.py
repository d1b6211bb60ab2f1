"""The facts a support bundle gathers from the state dir and the board, read-only and best effort.

Each function returns plain JSON-able data or bytes, or raises `Unavailable` saying why the fact is
missing (the bundle lists it as omitted). Nothing here writes, and nothing reads a payload or a key.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgeagent import __version__
from edgeagent.core.fsutil import sha256_file

# the state dir's files, named here rather than imported so that a bundle never loads the transport
# or the updates machinery (tests check they match transport.component / updates.jobs / health)
SPOOL_FILE = "spool.sqlite"
JOURNAL_FILE = "journal.json"
HEALTH_FILE = "health.json"
UPDATES_DIR = "updates"
MODELS_DIR = "models"
JOB_LOG_TAIL_BYTES = 64 * 1024
JOURNALCTL_TIMEOUT_S = 10.0
JOURNALCTL = ("journalctl", "-u", "edgeagent", "--since", "-1h", "--no-pager", "-o", "short-iso")
RUNTIME_PACKAGES = ("tflite-runtime", "ai-edge-litert", "tensorflow", "numpy", "aiomqtt", "psutil")
_KINDS = {"T": "samples", "E": "events", "M": "messages"}


class Unavailable(Exception):
    """A fact that could not be gathered here; the message says why (goes into `omitted`)."""


def under_systemd(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise Unavailable(f"{path} does not exist") from exc
    except OSError as exc:
        raise Unavailable(f"cannot read {path}: {exc.strerror}") from exc


def tail_file(path: Path, max_bytes: int = JOB_LOG_TAIL_BYTES) -> tuple[bytes, int]:
    """The last `max_bytes` of a file (from a line start) and the file's full size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError as exc:
        raise Unavailable(f"cannot read {path}: {exc.strerror}") from exc
    if size > max_bytes and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data, size


# --------------------------------------------------------------------------- spool


def spool_stats(path: Path) -> dict[str, Any]:
    """Counts, bytes and ages per kind, pending retained states and seq counters: never a payload.
    SQLite opens the file read-only; a reader that may not create the WAL index reads it immutable."""
    if not path.exists():
        raise Unavailable(f"no spool at {path}")
    errors: list[str] = []
    for mode in ("ro", "ro&immutable=1"):
        try:
            out = _query_spool(path, mode)
        except sqlite3.Error as exc:
            errors.append(f"{mode}: {exc}")
            continue
        out["opened"] = mode
        if errors:
            out["open_errors"] = errors
        return out
    raise Unavailable(f"cannot read the spool {path}: {'; '.join(errors)}")


def _query_spool(path: Path, mode: str) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{quote(str(path))}?mode={mode}", uri=True, timeout=2.0)
    try:
        kinds: dict[str, Any] = {}
        for kind, rows, nbytes, oldest, newest in db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(ts), MAX(ts) "
                "FROM outbox GROUP BY kind"):
            kinds[_KINDS.get(kind, str(kind))] = {"rows": rows, "payload_bytes": nbytes,
                                                  "oldest_ts": oldest, "newest_ts": newest}
        states = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM state").fetchone()
        meta = {str(k): v for k, v in db.execute("SELECT key, value FROM meta")}
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    files = {p.name: p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}.seq.json"))
             if p.exists()}
    return {"path": str(path), "backlog_by_kind": kinds,
            "backlog_rows": sum(k["rows"] for k in kinds.values()),
            "states_pending": states[0], "states_bytes": states[1], "meta": meta,
            "db_bytes": pages * page_size, "files": files}


# --------------------------------------------------------------------------- models


def model_listing(models_dir: Path) -> dict[str, Any]:
    """Every file of the model store with its size and sha256 (symlinks named, not followed)."""
    if not models_dir.is_dir():
        raise Unavailable(f"no model store at {models_dir}")
    files: list[dict[str, Any]] = []
    for root, dirs, names in os.walk(models_dir):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            rel = str(p.relative_to(models_dir))
            try:
                if p.is_symlink():
                    files.append({"path": rel, "symlink": os.readlink(p)})
                else:
                    files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
            except OSError as exc:
                files.append({"path": rel, "error": exc.strerror or str(exc)})
    return {"root": str(models_dir), "files": files}


# --------------------------------------------------------------------------- update jobs


def job_files(updates_dir: Path) -> list[tuple[str, Path, bool]]:
    """(member name, file, is a log to tail) for each job's status file and log."""
    if not updates_dir.is_dir():
        return []
    out: list[tuple[str, Path, bool]] = []
    for job in sorted(p for p in updates_dir.iterdir() if p.is_dir()):
        if (job / "status").is_file():
            out.append((f"updates/{job.name}/status", job / "status", False))
        if (job / "log.txt").is_file():
            out.append((f"updates/{job.name}/log.tail.txt", job / "log.txt", True))
    return out


# --------------------------------------------------------------------------- board


def _first_line(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096).replace(b"\0", b"").decode(errors="replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return None


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip('"')
    except OSError:
        return None
    return None


def board_facts(disk_paths: tuple[str, ...], state_dir: Path) -> dict[str, Any]:
    """Model, kernel, Python, runtime versions (from package metadata: nothing is imported), free
    disk, temperatures, memory and load; what could not be read is named in `errors`."""
    uname = platform.uname()
    facts: dict[str, Any] = {
        "edgeagent": __version__, "hostname": uname.node, "system": uname.system,
        "kernel": uname.release, "kernel_build": uname.version, "machine": uname.machine,
        "platform": platform.platform(), "os": _os_release(),
        "model": _first_line("/proc/device-tree/model") or _first_line("/sys/firmware/devicetree/base/model"),
        "jetson": _first_line("/etc/nv_tegra_release"),
        "python": sys.version.split()[0], "python_implementation": platform.python_implementation(),
        "executable": sys.executable, "collected_at": time.time(),
    }
    errors: list[str] = []
    versions: dict[str, str | None] = {}
    for pkg in RUNTIME_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    facts["packages"] = versions
    try:
        import psutil
    except ImportError as exc:
        errors.append(f"psutil: {exc}")
    else:
        facts.update(_psutil_facts(psutil, (*disk_paths, str(state_dir)), errors))
    facts["errors"] = errors
    return facts


def _psutil_facts(psutil: Any, paths: tuple[str, ...], errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    disks: dict[str, Any] = {}
    for p in dict.fromkeys(paths):
        try:
            u = psutil.disk_usage(p)
            disks[p] = {"total_mb": round(u.total / 2**20, 1), "free_mb": round(u.free / 2**20, 1),
                        "percent": u.percent}
        except OSError as exc:
            errors.append(f"disk {p}: {exc.strerror or exc}")
    out["disks"] = disks
    try:
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        out["temperatures_c"] = {name: [{"label": t.label, "current": t.current, "high": t.high,
                                         "critical": t.critical} for t in entries]
                                 for name, entries in temps.items()}
    except (OSError, RuntimeError) as exc:
        errors.append(f"temperatures: {exc}")
    try:
        vm = psutil.virtual_memory()
        out["memory_mb"] = {"total": round(vm.total / 2**20, 1), "available": round(vm.available / 2**20, 1)}
        out["load_avg"] = list(os.getloadavg())
        out["boot_time"] = psutil.boot_time()
        out["cpu_count"] = psutil.cpu_count()
    except (OSError, RuntimeError) as exc:
        errors.append(f"memory/load: {exc}")
    return out


# --------------------------------------------------------------------------- journald


def journal_text(timeout_s: float = JOURNALCTL_TIMEOUT_S, lines: int | None = None) -> bytes:
    """The unit's last hour from journald (`Unavailable` when there is no journalctl or it may not
    read the unit's journal)."""
    cmd = [*JOURNALCTL, *(["-n", str(lines)] if lines else [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise Unavailable("journalctl is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"journalctl did not finish within {timeout_s:g} s") from exc
    except OSError as exc:
        raise Unavailable(f"journalctl could not run: {exc.strerror or exc}") from exc
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise Unavailable(f"journalctl exited {proc.returncode}: {err.splitlines()[0] if err else '-'}")
    if not proc.stdout.strip() or proc.stdout.strip() == b"-- No entries --":
        raise Unavailable(f"journalctl returned no lines{': ' + err.splitlines()[0] if err else ''}")
    return proc.stdout
