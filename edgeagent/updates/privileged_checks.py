"""What the root helper requires before it installs anything: trusted keys only root can change, a
firmware manifest signed by one of them, and artifact bytes that match it.

The agent verified all of this already, but the helper must not take the agent's word for it: the
agent is the process a hostile publisher would have compromised. So root reads its own keys (from
paths in its own installer.toml), verifies the manifest the agent left next to the artifact, and
hashes a private copy of the artifact, which is what the install command then gets.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgeagent.core import signing
from edgeagent.core.errors import InstallerConfigError, ManifestRejected, RequestRejected, SignatureInvalid
from edgeagent.updates import manifest

if TYPE_CHECKING:  # cryptography is imported on first use (see core/signing.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KEY_MAX_BYTES = 16 * 1024
COPY_BLOCK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _trusted_uids() -> frozenset[int]:
    # Root; and the helper's own uid, which is root in production (it lets a developer run the
    # helper unprivileged against files of their own, as load_config does).
    return frozenset({0, os.geteuid()})


def _unsafe(st: os.stat_result, what: str) -> str | None:
    """Why `st` could be changed by someone other than root, or None."""
    if st.st_uid not in _trusted_uids():
        return f"{what} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # A root-owned sticky directory (/tmp) is fine on the way: others may add entries to it but
        # cannot rename or remove root's, and the next component is checked in turn.
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            return None
        return f"{what} is writable by group/others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def read_root_owned(path: str, max_bytes: int = KEY_MAX_BYTES) -> bytes:
    """The contents of a regular file that only root can change: the file and every directory above
    it root-owned and not group/world-writable, no symlink anywhere (each step opened O_NOFOLLOW and
    checked with fstat, so what is checked is what is read). ValueError says what is wrong."""
    if not path.startswith("/") or os.path.normpath(path) != path or "\x00" in path:
        raise ValueError(f"{path!r} must be a normalised absolute path")
    parts = PurePosixPath(path).parts[1:]
    if not parts:
        raise ValueError(f"{path} is not a file")
    shown = "/"
    try:
        fd = os.open("/", _DIR_FLAGS)
        try:
            for part in parts[:-1]:
                problem = _unsafe(os.fstat(fd), f"directory {shown}")
                if problem:
                    raise ValueError(problem)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
                shown = os.path.join(shown, part)
            problem = _unsafe(os.fstat(fd), f"directory {shown}")
            if problem:
                raise ValueError(problem)
            ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(ffd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path} is not a regular file")
            problem = _unsafe(st, path)
            if problem:
                raise ValueError(problem)
            data = f.read(max_bytes + 1)
    except OSError as exc:  # ELOOP/ENOTDIR: a symlink on the way; ENOENT: not there
        raise ValueError(f"cannot read {path}: {exc.strerror} (symlinks are refused)") from exc
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes")
    return data


def _public_key(data: bytes, path: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def load_trusted_keys(raw: object, config_path: str) -> dict[str, Ed25519PublicKey]:
    """installer.toml's `trusted_keys` (key id -> PEM path) as keys; every problem is reported."""
    if not isinstance(raw, dict):
        raise InstallerConfigError(config_path, 'trusted_keys must be a table of key id = "/path/to/key.pem"')
    keys: dict[str, Ed25519PublicKey] = {}
    errors: list[str] = []
    for key_id, path in raw.items():
        if not isinstance(path, str):
            errors.append(f"trusted_keys.{key_id}: expected a path string")
            continue
        try:
            keys[key_id] = _public_key(read_root_owned(path), path)
        except ValueError as exc:
            errors.append(f"trusted_keys.{key_id}: {exc}")
    if errors:
        raise InstallerConfigError(config_path, "; ".join(errors))
    return keys


def _verify_signature(message: dict[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    return signing.verify(message, keys, expected_type="manifest")


def check_manifest(doc: object, keys: Mapping[str, Ed25519PublicKey], now: float,
                   request_id: str | None = None) -> manifest.Manifest:
    """The firmware manifest the helper may install from: signed by a key of root's, of type
    manifest, kind firmware, not expired. RequestRejected says which check failed."""
    def reject(reason: str) -> RequestRejected:
        return RequestRejected(f"manifest: {reason}", request_id)

    if not keys:
        raise reject("installer.toml has no trusted_keys, so no manifest can be verified "
                     "(root installs only firmware whose signature it checked itself)")
    if not isinstance(doc, dict):
        raise reject("not a JSON object")
    try:
        _verify_signature(doc, keys)
    except SignatureInvalid as exc:
        raise reject(f"signature: {exc.reason}") from None
    if doc.get("type") != "manifest":
        raise reject(f"type must be 'manifest', got {doc.get('type')!r}")
    try:
        m = manifest.parse(doc)
    except ManifestRejected as exc:
        raise reject(exc.reason.removeprefix("manifest: ")) from None
    if m.kind != "firmware":
        raise reject(f"kind is {m.kind!r}: only firmware is installed by the root helper")
    if now >= m.expires:
        raise reject(f"expired: expires {m.expires:.0f} <= now {now:.0f}")
    return m


@contextlib.contextmanager
def verified_copy(fd: int, name: str, m: manifest.Manifest, staging_dir: Path,
                  request_id: str | None = None) -> Iterator[str]:
    """A root-only copy of the artifact whose bytes match `m` (size and sha256), removed afterwards.

    A copy, not a hard link: the agent owns the inode and could rewrite it through the path or an
    fd it keeps open after we hashed it. The copy is hashed as it is written, so the command
    installs exactly the bytes that were checked. At most size + 1 bytes are read.
    """
    size = os.fstat(fd).st_size
    if size != m.size:
        raise RequestRejected(f"artifact is {size} bytes, the manifest says {m.size}", request_id)
    staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=staging_dir, prefix="request-"))
    try:
        digest = hashlib.sha256()
        copied = 0
        dfd = os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        with os.fdopen(dfd, "wb") as dst:
            while copied <= m.size:
                block = os.pread(fd, min(COPY_BLOCK, m.size + 1 - copied), copied)
                if not block:
                    break
                digest.update(block)
                dst.write(block)
                copied += len(block)
        if copied != m.size:
            raise RequestRejected(f"artifact changed size while being copied (the manifest says {m.size} "
                                  f"bytes)", request_id)
        if digest.hexdigest() != m.sha256:
            raise RequestRejected(f"artifact sha256 {digest.hexdigest()} does not match the manifest's "
                                  f"{m.sha256} (changed after signing?)", request_id)
        yield str(workdir / name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
