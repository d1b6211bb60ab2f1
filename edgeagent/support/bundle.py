"""`build_bundle`: a capped, redacted `.tar.gz` of what it takes to diagnose a board.

Members are gathered first (facts.py, redact.py), then packed in order of importance while the
compressed archive stays under `max_bytes`; a member that does not fit is left out whole and listed
in `manifest.json` with the reason, never cut silently. The archive is written to a temp file,
fsynced and renamed, so a reader sees a whole bundle or none. Blocking: call it from a thread.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from edgeagent.core import config as cfgmod
from edgeagent.core.config import Config
from edgeagent.core.config_layers import dumps_toml, load_effective
from edgeagent.core.errors import ConfigError, EdgeAgentError
from edgeagent.core.fsutil import atomic_file, sha256_file
from edgeagent.support import facts
from edgeagent.support.facts import Unavailable
from edgeagent.support.redact import env_paths, redact_table, scrub, secret_values

MANIFEST = "manifest.json"
MIN_BUNDLE_BYTES = 8 * 1024  # the manifest and the archive's own framing must always fit
_SLACK_BYTES = 1024  # tar end blocks and the gzip trailer, compressed
_OMIT_REASON_BYTES = 200  # room kept in the manifest for each member not packed yet


class BundleError(EdgeAgentError):
    """The bundle could not be written (`path`: where it was going)."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        self.path = path
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class BundleResult:
    """The written archive: its members (name, bytes) in order, and what was left out and why."""

    path: Path
    size: int
    sha256: str
    files: list[tuple[str, int]]
    omitted: list[tuple[str, str]]


# a member: its name and a function producing its bytes (or raising Unavailable)
Member = tuple[str, Callable[[], bytes]]


def build_bundle(cfg: Config, out: Path, *, max_bytes: int, log_lines: Sequence[str],
                 config_path: Path | None = None, journal: bool | None = None,
                 journal_lines: int | None = None) -> BundleResult:
    """Write the bundle for `cfg`'s state dir to `out`. `log_lines`: the agent's recent log (its
    ring); `config_path`: the local file, for the layers and to know what came from ${ENV};
    `journal`: add journalctl's last hour (None: only when running under systemd), at most
    `journal_lines` lines of it."""
    if max_bytes < MIN_BUNDLE_BYTES:
        raise BundleError(f"a bundle needs at least {MIN_BUNDLE_BYTES} bytes, the cap is {max_bytes}", out)
    omitted: list[tuple[str, str]] = []
    layers, from_env, config_note = _layers(cfg, config_path, omitted)
    secrets = secret_values(cfgmod.to_dict(cfg), from_env)
    members = _members(cfg, layers, from_env, config_note, log_lines, omitted,
                       facts.under_systemd() if journal is None else journal, journal_lines)
    out = Path(out)
    with atomic_file(out, 0o600) as raw:  # a bundle is for the technician's eyes: owner only
        files = _pack(raw, members, omitted, secrets, max_bytes)
        raw.flush()
        size = raw.tell()
        if size > max_bytes:  # the estimates are conservative; this would be a bug, not a big board
            raise BundleError(f"bundle came out at {size} bytes, over the cap of {max_bytes}", out)
    digest = sha256_file(out)
    return BundleResult(out, size, digest, files, omitted)


# --------------------------------------------------------------------------- what goes in


def _layers(cfg: Config, config_path: Path | None, omitted: list[tuple[str, str]]
            ) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]], str]:
    """The config layers to show, the paths the file filled from ${ENV}, and check-config's verdict."""
    effective = cfgmod.to_dict(cfg)
    if config_path is None:
        omitted.append(("config/file.toml", "no config file was given (the effective config is included)"))
        return {"effective": effective}, {}, "config file: not given"
    try:
        loaded = load_effective(Path(config_path))
    except ConfigError as exc:
        try:
            raw = cfgmod.read_toml(Path(config_path))
        except ConfigError:
            omitted.append(("config/file.toml", f"cannot read {config_path}"))
            return {"effective": effective}, {}, f"{config_path}: {exc}"
        note = f"{config_path}: {len(exc.errors)} error(s) here\n" + "\n".join(f"  {e}" for e in exc.errors)
        return {"effective": effective, "file": raw}, env_paths(raw), note
    layers = {"effective": effective, **loaded.layers}
    return layers, env_paths(loaded.file), f"{config_path}: OK"


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode()


def _members(cfg: Config, layers: dict[str, dict[str, Any]], from_env: dict[str, list[str]],
             config_note: str, log_lines: Sequence[str], omitted: list[tuple[str, str]],
             journal: bool, journal_lines: int | None) -> list[Member]:
    """Every member, most important first (the cap drops from the end of what does not fit)."""
    state = cfg.state_dir
    head = "# written by `edgeagent support bundle`: secrets and ${ENV} values are redacted\n"
    check = f"{config_note}\n\n{cfgmod.summary(cfg)}\n".encode()
    members: list[Member] = [("check-config.txt", lambda: check)]
    for name in ("effective", "file", "remote", "defaults"):
        if name == "remote" and not layers.get(name):
            continue
        if name in layers:
            # the file's own ${VAR} text stays (it names no value); elsewhere env values are hidden
            env = {} if name == "file" else from_env
            members.append((f"config/{name}.toml", partial(_toml, head, layers[name], env)))
    members += [
        ("health.json", lambda: facts.read_file(state / facts.HEALTH_FILE)),
        ("board.json", lambda: _json(facts.board_facts(cfg.monitor.disk_paths, state))),
        ("journal.json", lambda: facts.read_file(state / facts.JOURNAL_FILE)),
        ("spool.json", lambda: _json(facts.spool_stats(state / facts.SPOOL_FILE))),
        ("models.json", lambda: _json(facts.model_listing(state / facts.MODELS_DIR))),
    ]
    jobs = facts.job_files(state / facts.UPDATES_DIR)
    members += [(name, partial(facts.read_file, path)) for name, path, tail in jobs if not tail]
    if log_lines:
        members.append(("logs/agent.log", lambda: ("\n".join(log_lines) + "\n").encode()))
    else:
        omitted.append(("logs/agent.log", "no in-process log lines: the ring lives in the running agent"
                        + (" (see logs/journal.txt)" if journal else "")))
    if journal:
        members.append(("logs/journal.txt", partial(facts.journal_text, lines=journal_lines)))
    members += [(name, partial(_tail, path)) for name, path, tail in jobs if tail]
    return members


def _toml(head: str, table: dict[str, Any], from_env: dict[str, list[str]]) -> bytes:
    return (head + dumps_toml(redact_table(table, from_env))).encode()


def _tail(path: Path) -> bytes:
    data, size = facts.tail_file(path)
    if len(data) < size:
        return f"[the last {len(data)} of {size} bytes]\n".encode() + data
    return data


# --------------------------------------------------------------------------- packing under the cap


def _pack(raw: BinaryIO, members: list[Member], omitted: list[tuple[str, str]],
          secrets: set[str], max_bytes: int) -> list[tuple[str, int]]:
    files: list[tuple[str, int]] = []
    now = time.time()
    with (gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=int(now)) as gz,
          tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar):
        for i, (name, produce) in enumerate(members):
            try:
                data = scrub(produce(), secrets)
            except Unavailable as exc:
                omitted.append((name, str(exc)))
                continue
            rest = [m for m, _ in members[i + 1:]]
            reserve = _manifest_reserve([*files, (name, len(data))], omitted, rest)
            need = len(zlib.compress(data, 6)) + 512  # + its compressed tar header and flush
            gz.flush()
            used = raw.tell()
            if used + need + reserve > max_bytes:
                omitted.append((name, f"does not fit under the {max_bytes} byte cap: {len(data)} bytes "
                                      f"(~{need} compressed), {max(0, max_bytes - used - reserve)} left"))
                continue
            _add(tar, name, data, now)
            files.append((name, len(data)))
        manifest = _manifest(files, omitted, max_bytes, now)
        _add(tar, MANIFEST, manifest, now)
        files.append((MANIFEST, len(manifest)))
    return files


def _manifest_reserve(files: list[tuple[str, int]], omitted: list[tuple[str, str]], rest: list[str]) -> int:
    draft = _manifest(files, [*omitted, *((n, "x" * _OMIT_REASON_BYTES) for n in rest)], 0, 0.0)
    return len(zlib.compress(draft, 6)) + 512 + _SLACK_BYTES


def _manifest(files: list[tuple[str, int]], omitted: list[tuple[str, str]], max_bytes: int,
              now: float) -> bytes:
    """The manifest lists itself with its own size: rendered until that size is stable."""
    size = 0
    for _ in range(8):
        body = _json({"format": 1, "created_at": now, "max_bytes": max_bytes,
                      "files": [{"name": n, "size": s} for n, s in [*files, (MANIFEST, size)]],
                      "omitted": [{"name": n, "reason": r} for n, r in omitted]})
        if len(body) == size:
            return body
        size = len(body)
    raise BundleError("manifest size did not settle")  # pragma: no cover - sizes grow by digits only


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))

