"""The root side of privileged steps: validate the agent's request, run root's own command, report.

Started by edgeagent-installer.service (via edgeagent-installer.path) as
`python -m edgeagent.updates.privileged --state-dir /var/lib/edgeagent
--config /etc/edgeagent/installer.toml`.
The agent (unprivileged) owns the state dir, so everything below it is untrusted input here: paths
are walked with O_NOFOLLOW from the state dir, the request only picks an op and an artifact, and the
command always comes from the root-owned installer.toml (see docs/install.md, "Trust boundary").
An install also needs the job's signed manifest, verified here with root's own keys, and the
command gets a root-only copy of the artifact whose sha256 matched it (privileged_checks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgeagent.core.errors import InstallerCommandError, InstallerConfigError, RequestRejected
from edgeagent.updates.installer_presets import (
    OPS,
    PRESETS,
    SAFE_PATH,
    command_for,
    validate_override,
)
from edgeagent.updates.manifest import Manifest
from edgeagent.updates.privileged_checks import check_manifest, load_trusted_keys, verified_copy

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

log = logging.getLogger("edgeagent.updates.privileged")

INSTALLER_DIR = "installer"
UPDATES_DIR = "updates"
REQUEST = "request.json"
RESULT = "result.json"
REQUEST_MAX_BYTES = 64 * 1024
# A manifest lists a sha256 per chunk: 8 MiB is ~120k chunks, far beyond any firmware image.
MANIFEST_MAX_BYTES = 8 * 1024 * 1024
OUTPUT_MAX_BYTES = 4096
DEFAULT_TIMEOUT_S = 1800.0
# Root-only (the installer unit's StateDirectory=): where the verified copy of an artifact lives while
# the command runs, out of the agent's reach.
DEFAULT_STAGING_DIR = Path("/var/lib/edgeagent-installer")
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True, slots=True)
class InstallerConfig:
    preset: str
    overrides: dict[str, list[str]]
    timeout_s: float = DEFAULT_TIMEOUT_S
    # key id -> key, from root-owned PEM files; empty: every install is refused
    trusted_keys: dict[str, Ed25519PublicKey] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    id: str
    job: str
    op: str
    artifact: str | None
    ts: float
    manifest: str | None = None  # install: path of the job's signed manifest below updates/


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    returncode: int | None
    output: str


def load_config(path: Path) -> InstallerConfig:
    """Read installer.toml, refusing a file that anyone but root (or us) could have written."""
    try:
        st = os.stat(path)
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InstallerConfigError(str(path), f"cannot read: {exc.strerror}") from exc
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InstallerConfigError(str(path), "must be owned by root and not group/world-writable")
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InstallerConfigError(str(path), f"invalid TOML: {exc}") from exc
    unknown = set(doc) - {"preset", "timeout_s", "script", "commands", "trusted_keys"}
    if unknown:
        raise InstallerConfigError(str(path), f"unknown keys: {', '.join(sorted(unknown))}")
    preset = doc.get("preset")
    if preset not in PRESETS:
        raise InstallerConfigError(str(path), f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    timeout_s = doc.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise InstallerConfigError(str(path), "timeout_s must be a positive number")
    overrides: dict[str, list[str]] = {}
    script = doc.get("script")
    if script is not None:
        if preset != "script" or not isinstance(script, str) or not script.startswith("/"):
            raise InstallerConfigError(str(path), "script must be an absolute path, with preset = 'script'")
        overrides = {op: [script, *argv[1:]] for op, argv in PRESETS["script"].items()}
    commands = doc.get("commands", {})
    if not isinstance(commands, dict):
        raise InstallerConfigError(str(path), "commands must be a table of op = [argv...]")
    try:
        for op, argv in commands.items():
            overrides[op] = validate_override(op, argv)
    except InstallerCommandError as exc:
        raise InstallerConfigError(str(path), f"commands: {exc}") from exc
    # Last: a key file that others could write stops the helper from serving at all (docs/install.md).
    keys = load_trusted_keys(doc.get("trusted_keys", {}), str(path))
    return InstallerConfig(preset=preset, overrides=overrides, timeout_s=float(timeout_s), trusted_keys=keys)


def parse_request(data: bytes) -> Request:
    """Decode request.json; only `op`, `artifact` and `manifest` influence what runs, none names a command."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # also: nested too deep, 4300+ digit integers
        raise RequestRejected(f"request is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RequestRejected("request must be a JSON object")
    rid = doc.get("id")
    rid = rid if isinstance(rid, str) and _ID_RE.match(rid) else None
    if rid is None:
        raise RequestRejected("request needs an id (1-128 of A-Z a-z 0-9 . _ : -)")
    if doc.get("v") != 1:
        raise RequestRejected(f"unsupported request version {doc.get('v')!r}", rid)
    op, job, artifact, ts = doc.get("op"), doc.get("job", ""), doc.get("artifact"), doc.get("ts", 0.0)
    if op not in OPS:
        raise RequestRejected(f"unknown op {op!r} (known: {', '.join(OPS)})", rid)
    if not isinstance(job, str):
        raise RequestRejected("job must be a string", rid)
    if artifact is not None and not isinstance(artifact, str):
        raise RequestRejected("artifact must be a string or null", rid)
    if op == "install" and not artifact:
        raise RequestRejected("op 'install' needs an artifact", rid)
    manifest = doc.get("manifest")
    if op == "install" and (not isinstance(manifest, str) or not manifest):
        raise RequestRejected("op 'install' needs the job's signed manifest (manifest: a path below "
                              "updates/)", rid)
    try:
        ts_s = math.nan if isinstance(ts, bool) or not isinstance(ts, int | float) else float(ts)
    except OverflowError:
        ts_s = math.nan
    if not math.isfinite(ts_s):
        raise RequestRejected("ts must be a finite number", rid)
    install = op == "install"
    return Request(id=rid, job=job, op=op, artifact=artifact if install else None, ts=ts_s,
                   manifest=manifest if install and isinstance(manifest, str) else None)


@contextlib.contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_state_subdir(state_dir: Path, name: str) -> int:
    """An fd for state_dir/name that refuses a symlinked `name` (the agent owns state_dir)."""
    with _opened(os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as state_fd:
        return os.open(name, _DIR_FLAGS, dir_fd=state_fd)


def open_artifact(state_dir: Path, artifact: str, owner_uid: int, request_id: str | None = None,
                  what: str = "artifact") -> int:
    """An fd of the artifact (or manifest: `what`) if it is a regular, singly-linked file of the
    agent's strictly below updates/."""
    path = PurePosixPath(artifact)
    updates = PurePosixPath(state_dir) / UPDATES_DIR
    if not path.is_absolute() or os.path.normpath(artifact) != artifact or "\x00" in artifact:
        raise RequestRejected(f"{what} must be a normalised absolute path: {artifact!r}", request_id)
    try:
        parts = path.relative_to(updates).parts
    except ValueError:
        raise RequestRejected(f"{what} is not below {updates}: {artifact}", request_id) from None
    if not parts:
        raise RequestRejected(f"{what} must be a file strictly below {updates}", request_id)
    try:
        fd = open_state_subdir(state_dir, UPDATES_DIR)
        for part in parts[:-1]:
            with _opened(fd):
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        with _opened(fd):
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        st = os.fstat(ffd)
    except OSError as exc:
        # ELOOP/ENOTDIR: a symlink somewhere on the way; ENOENT: not there.
        reason = f"{what} {artifact}: {exc.strerror} (symlinks are refused)"
        raise RequestRejected(reason, request_id) from exc
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links (must be 1)"
    elif st.st_uid != owner_uid:
        problem = f"is not owned by the agent (uid {owner_uid})"
    if problem:
        os.close(ffd)
        raise RequestRejected(f"{what} {artifact} {problem}", request_id)
    return ffd


def read_manifest(state_dir: Path, path: str, owner_uid: int, keys: dict[str, Ed25519PublicKey],
                  request_id: str | None = None) -> Manifest:
    """The signed manifest the agent left for an install, read like an artifact and verified with
    root's keys (privileged_checks.check_manifest)."""
    with _opened(open_artifact(state_dir, path, owner_uid, request_id, what="manifest")) as fd:
        data = os.read(fd, MANIFEST_MAX_BYTES + 1)
        while len(data) <= MANIFEST_MAX_BYTES and (more := os.read(fd, MANIFEST_MAX_BYTES + 1 - len(data))):
            data += more
    if len(data) > MANIFEST_MAX_BYTES:
        raise RequestRejected(f"manifest {path} is larger than {MANIFEST_MAX_BYTES} bytes", request_id)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RequestRejected(f"manifest {path} is not JSON: {exc}", request_id) from exc
    return check_manifest(doc, keys, time.time(), request_id)


def tail(data: bytes, limit: int = OUTPUT_MAX_BYTES) -> str:
    """The last `limit` bytes as text, never more than `limit` bytes once encoded again."""
    text = data[-limit:].decode("utf-8", errors="ignore")
    while len(text.encode()) > limit:
        text = text[1:]
    return text


def run_command(argv: list[str], timeout_s: float) -> Outcome:
    """Run argv without a shell, in its own process group, killed whole on timeout."""
    program = argv[0] if argv[0].startswith("/") else shutil.which(argv[0], path=SAFE_PATH)
    if program is None or not os.access(program, os.X_OK):
        return Outcome(False, None, f"command not found: {argv[0]}")
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    log.info("running %s", argv)
    try:
        proc = subprocess.Popen(
            [program, *argv[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd="/", env=env, start_new_session=True, close_fds=True,
        )
    except OSError as exc:  # e.g. ENOEXEC: a script without a usable shebang
        return Outcome(False, 126, f"cannot run {argv[0]}: {exc}")
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a descendant left the group and holds the pipe open
            if proc.stdout is not None:
                proc.stdout.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            out = b""
        msg = f"\n[edgeagent-installer] timed out after {timeout_s:g} s; process group killed\n"
        return Outcome(False, None, tail(out + msg.encode()))
    return Outcome(proc.returncode == 0, proc.returncode, tail(out))


def _write_result(installer_fd: int, result: dict[str, Any]) -> None:
    """Atomic write via the directory fd: a temp name created O_EXCL|O_NOFOLLOW, fsync, rename."""
    data = (json.dumps(result, sort_keys=True) + "\n").encode()
    tmp = f".{RESULT}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=installer_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=installer_fd)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, RESULT, src_dir_fd=installer_fd, dst_dir_fd=installer_fd)
    os.fsync(installer_fd)


def _result(request_id: str | None, op: str | None, outcome: Outcome) -> dict[str, Any]:
    return {"v": 1, "id": request_id, "op": op, "ok": outcome.ok,
            "returncode": outcome.returncode, "output": outcome.output, "ts": time.time()}


def _peek_op(data: bytes) -> str | None:
    """The op of a request about to be rejected, if readable, so its result still names it."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    op = doc.get("op") if isinstance(doc, dict) else None
    return op if isinstance(op, str) else None


def _read_request(installer_fd: int) -> tuple[bytes, os.stat_result] | None:
    try:
        fd = os.open(REQUEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=installer_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RequestRejected(f"cannot open request: {exc.strerror} (symlinks are refused)") from exc
    with _opened(fd):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestRejected("request is not a regular file")
        data = os.read(fd, REQUEST_MAX_BYTES + 1)
    if len(data) > REQUEST_MAX_BYTES:
        raise RequestRejected(f"request larger than {REQUEST_MAX_BYTES} bytes")
    return data, st


def _remove_request(installer_fd: int, seen: os.stat_result | None) -> None:
    """Remove the request we handled, not a newer one the agent wrote meanwhile."""
    try:
        now = os.stat(REQUEST, dir_fd=installer_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if seen is None or (now.st_ino, now.st_dev) == (seen.st_ino, seen.st_dev):
        os.unlink(REQUEST, dir_fd=installer_fd)


def handle_request(state_dir: Path, config: InstallerConfig | InstallerConfigError,
                   staging_dir: Path = DEFAULT_STAGING_DIR) -> dict[str, Any] | None:
    """Handle the pending request, if any; returns the result written (None: nothing was pending)."""
    state_dir = Path(state_dir)
    owner_uid = os.stat(state_dir).st_uid
    with _opened(open_state_subdir(state_dir, INSTALLER_DIR)) as installer_fd, contextlib.ExitStack() as held:
        seen: os.stat_result | None = None
        request: Request | None = None
        op: str | None = None
        staged: str | None = None
        try:
            got = _read_request(installer_fd)
            if got is None:
                return None
            data, seen = got
            op = _peek_op(data)
            request = parse_request(data)
            if isinstance(config, InstallerConfigError):
                raise RequestRejected(f"installer config: {config}", request.id)
            if request.artifact:
                artifact_fd = held.enter_context(_opened(open_artifact(state_dir, request.artifact, owner_uid,
                                                                       request.id)))
                m = read_manifest(state_dir, request.manifest or "", owner_uid, config.trusted_keys,
                                  request.id)
                # Checked now (with a placeholder) so a bad override is a rejection, before the copy.
                command_for(config.preset, request.op, "/dev/null", config.overrides)
                try:
                    name = PurePosixPath(request.artifact).name
                    staged = held.enter_context(verified_copy(artifact_fd, name, m, staging_dir, request.id))
                except OSError as exc:  # staging failed (disk full): still answer the agent
                    return _finish(installer_fd, seen, request,
                                   Outcome(False, None, f"cannot stage the artifact: {exc}"))
                log.info("job %s: manifest %s %s %s (key %s) verified, artifact sha256 matches",
                         request.job, m.kind, m.name, m.version, m.key_id)
            argv = command_for(config.preset, request.op, staged, config.overrides)
        except (RequestRejected, InstallerCommandError) as exc:
            rid = exc.request_id if isinstance(exc, RequestRejected) else (request.id if request else None)
            log.warning("request rejected: %s", exc)
            result = _result(rid, op, Outcome(False, None, f"rejected: {exc}"))
            _write_result(installer_fd, result)
            _remove_request(installer_fd, seen)
            return result
        if request.op == "reboot":
            # The reboot may kill us before we could write anything afterwards: report first.
            result = _result(request.id, request.op, Outcome(True, None, "rebooting"))
            _write_result(installer_fd, result)
            _remove_request(installer_fd, seen)
            outcome = run_command(argv, config.timeout_s)
            if not outcome.ok:
                result = _result(request.id, request.op, outcome)
                _write_result(installer_fd, result)
            return result
        return _finish(installer_fd, seen, request, run_command(argv, config.timeout_s))


def _finish(installer_fd: int, seen: os.stat_result | None, request: Request,
            outcome: Outcome) -> dict[str, Any]:
    result = _result(request.id, request.op, outcome)
    _write_result(installer_fd, result)
    _remove_request(installer_fd, seen)
    log.info("op %s for job %s: ok=%s rc=%s", request.op, request.job, outcome.ok, outcome.returncode)
    return result


def main(argv: list[str] | None = None) -> int:
    """Handle the pending privileged-step request in the state dir, if any, then exit."""
    parser = argparse.ArgumentParser(prog="python -m edgeagent.updates.privileged", description=main.__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/edgeagent"))
    parser.add_argument("--config", type=Path, default=Path("/etc/edgeagent/installer.toml"))
    parser.add_argument("--staging-dir", type=Path, default=DEFAULT_STAGING_DIR,
                        help="root-only directory for the verified copy of an artifact (room for one image)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config: InstallerConfig | InstallerConfigError
    try:
        config = load_config(args.config)
    except InstallerConfigError as exc:
        # Still answer the agent (with ok=false) so it does not wait for a result forever.
        log.error("%s", exc)
        config = exc
    try:
        result = handle_request(args.state_dir, config, args.staging_dir)
    except OSError as exc:
        log.error("cannot handle request in %s: %s", args.state_dir / INSTALLER_DIR, exc)
        return 1
    if result is None:
        log.info("no pending request")
    return 2 if isinstance(config, InstallerConfigError) else 0


if __name__ == "__main__":
    raise SystemExit(main())
