"""Installing a verified artifact: models go to the inference hot swap, firmware to the A/B installer.

Firmware commands come from `installer_presets` (argv lists, never a shell). In `direct` mode the
agent runs them itself (own process group, killed whole at the timeout); in `privileged` mode it
writes `installer/request.json` for edgeagent-installer.service and waits for `result.json`; an
install request names the job's signed manifest (MANIFEST_FILE beside the artifact), which the root
helper verifies again with its own keys.
Every command's output goes to the job's `log.txt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeagent.core.config import FirmwareConfig
from edgeagent.core.fsutil import atomic_write_json, read_json
from edgeagent.updates.installer_presets import SAFE_PATH, InstallerCommandError, command_for

OUTPUT_MAX_BYTES = 16 * 1024
MANIFEST_FILE = "manifest.json"  # the job's signed manifest, next to its artifact (firmware.py writes it)


@dataclass(frozen=True, slots=True)
class OpResult:
    ok: bool
    returncode: int | None
    output: str

    def describe(self, op: str) -> str:
        if self.ok:
            return f"{op} ok"
        tail = self.output.strip().splitlines()[-1:] or [""]
        code = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return f"{op} failed ({code}): {tail[0][:200]}"


class FirmwareRunner(Protocol):
    async def run(self, op: str, artifact: Path | None, job: str, log_path: Path) -> OpResult: ...


def append_log(log_path: Path, text: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8", errors="replace") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def _overrides(cfg: FirmwareConfig) -> dict[str, list[str]]:
    return {op: list(argv) for op, argv in cfg.commands.items()}


class DirectRunner:
    """Runs the installer's commands as the agent's own children."""

    def __init__(self, cfg: FirmwareConfig) -> None:
        self.cfg = cfg

    async def run(self, op: str, artifact: Path | None, job: str, log_path: Path) -> OpResult:
        try:
            argv = command_for(self.cfg.installer, op, str(artifact) if artifact else None,
                               _overrides(self.cfg))
        except InstallerCommandError as exc:
            return OpResult(False, None, str(exc))
        return await run_argv(argv, self.cfg.command_timeout_s, log_path, op)


async def run_argv(argv: list[str], timeout_s: float, log_path: Path, op: str) -> OpResult:
    """Run argv without a shell in its own process group; the whole group is killed at the timeout."""
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=SAFE_PATH)
    await asyncio.to_thread(append_log, log_path, f"[{time.strftime('%H:%M:%S')}] $ {argv!r}")
    if program is None:
        result = OpResult(False, 127, f"command not found: {argv[0]}")
        await asyncio.to_thread(append_log, log_path, result.output)
        return result
    try:
        proc = await asyncio.create_subprocess_exec(
            program, *argv[1:], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        result = OpResult(False, 126, f"cannot run {argv[0]}: {exc}")
        await asyncio.to_thread(append_log, log_path, result.output)
        return result
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        text = out[-OUTPUT_MAX_BYTES:].decode("utf-8", errors="replace")
        result = OpResult(proc.returncode == 0, proc.returncode, text)
    except asyncio.TimeoutError:
        _kill_group(proc.pid)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5.0)
        result = OpResult(False, None, f"timed out after {timeout_s:g} s; process group killed")
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    footer = f"[{op}: ok={result.ok} rc={result.returncode}]"
    await asyncio.to_thread(append_log, log_path, f"{result.output}\n{footer}")
    return result


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class PrivilegedRunner:
    """Hands each op to edgeagent-installer.service through request.json/result.json."""

    def __init__(self, cfg: FirmwareConfig, state_dir: Path, poll_s: float = 0.2) -> None:
        self.cfg = cfg
        self.dir = Path(state_dir) / "installer"
        self.poll_s = poll_s

    async def run(self, op: str, artifact: Path | None, job: str, log_path: Path) -> OpResult:
        rid = str(uuid.uuid4())
        request = {"v": 1, "id": rid, "job": job, "op": op,
                   "artifact": str(artifact) if artifact else None,
                   "manifest": str(artifact.with_name(MANIFEST_FILE)) if artifact else None,
                   "ts": time.time()}
        await asyncio.to_thread(append_log, log_path, f"[{time.strftime('%H:%M:%S')}] request {request}")
        await asyncio.to_thread(atomic_write_json, self.dir / "request.json", request)
        deadline = time.monotonic() + self.cfg.command_timeout_s + 30.0
        while time.monotonic() < deadline:
            result = await asyncio.to_thread(self._read_result, rid)
            if result is not None:
                await asyncio.to_thread(append_log, log_path, result.output + f"\n[{op}: ok={result.ok} "
                                                                              f"rc={result.returncode}]")
                return result
            await asyncio.sleep(self.poll_s)
        result = OpResult(False, None, f"no result from the privileged installer within "
                                       f"{self.cfg.command_timeout_s + 30:g} s")
        await asyncio.to_thread(append_log, log_path, result.output)
        return result

    def _read_result(self, rid: str) -> OpResult | None:
        try:
            doc = read_json(self.dir / "result.json")
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("id") != rid:
            return None
        rc = doc.get("returncode")
        return OpResult(doc.get("ok") is True, rc if isinstance(rc, int) else None,
                        str(doc.get("output", "")))


def make_runner(cfg: FirmwareConfig, state_dir: Path) -> FirmwareRunner:
    return DirectRunner(cfg) if cfg.mode == "direct" else PrivilegedRunner(cfg, state_dir)


def installed_firmware_version(cfg: FirmwareConfig, recorded: str | None) -> str | None:
    """The running firmware's version: the image's version file, else the journal's last commit."""
    try:
        text = Path(cfg.version_file).read_text().strip()
    except OSError:
        text = ""
    return text or recorded
