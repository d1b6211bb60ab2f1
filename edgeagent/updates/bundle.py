"""Stage a verified model artifact: a raw .tflite is copied, a .tar.gz bundle is extracted safely.

Safe means: only regular files and directories, relative names without `..`, a member count cap,
and a cap on the unpacked total (declared header sizes *and* bytes actually written) relative to
the artifact size, so a decompression bomb stops early. Blocking: run off the event loop.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from edgeagent.core.errors import BundleRejected

GZIP_MAGIC = b"\x1f\x8b"
TFLITE_IDENT = b"TFL3"
MODEL_FILE = "model.tflite"
MAX_MEMBERS = 256
COPY_BLOCK = 1 << 16
HEADER_BUDGET = 1 << 20  # tar headers and padding on top of the members' declared bytes


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute():
        raise BundleRejected(f"bundle member {name!r} has an absolute path")
    if any(part == ".." for part in p.parts):
        raise BundleRejected(f"bundle member {name!r} contains '..'")
    if "\x00" in name or not p.parts:
        raise BundleRejected(f"bundle member {name!r} has an invalid name")
    return p


def stage(artifact: Path, dest: Path, max_unpacked: int) -> Path:
    """Fill `dest` (created, must not exist) with model.tflite (+ model.toml ...); returns `dest`."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        with open(artifact, "rb") as f:
            head = f.read(8)
        if head[:2] == GZIP_MAGIC:
            _extract(artifact, dest, max_unpacked)
        else:
            shutil.copyfile(artifact, dest / MODEL_FILE)
        model = dest / MODEL_FILE
        if not model.is_file():
            raise BundleRejected(f"bundle has no {MODEL_FILE} at its top level")
        with open(model, "rb") as f:
            ident = f.read(8)[4:8]
        if ident != TFLITE_IDENT:
            raise BundleRejected(f"{MODEL_FILE} is not a TFLite flatbuffer (identifier {ident!r})")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


class _Limited(io.RawIOBase):
    """The decompressed stream, cut off past a byte budget: tarfile reads GNU long-name and pax
    headers whole into memory before it yields a member, so member sizes alone bound nothing."""

    def __init__(self, raw: Any, budget: int) -> None:
        self._raw = raw
        self._left = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        self._left -= n
        if self._left < 0:
            raise BundleRejected("bundle unpacks to far more than its members declare (decompression bomb?)")
        return int(n)


def _extract(artifact: Path, dest: Path, max_unpacked: int) -> None:
    declared = written = members = 0
    try:
        with gzip.open(artifact, "rb") as gz:
            stream: Any = io.BufferedReader(_Limited(gz, max_unpacked + HEADER_BUDGET))
            with tarfile.open(mode="r|", fileobj=stream) as tar:
                for member in tar:
                    members += 1
                    if members > MAX_MEMBERS:
                        raise BundleRejected(f"bundle has more than {MAX_MEMBERS} members")
                    name = _safe_name(member.name)
                    if member.issym() or member.islnk():
                        raise BundleRejected(f"bundle member {member.name!r} is a link")
                    if member.isdir():
                        (dest / name).mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isfile():
                        raise BundleRejected(f"bundle member {member.name!r} is not a regular file")
                    declared += member.size
                    if declared > max_unpacked:
                        raise BundleRejected(f"bundle unpacks to more than {max_unpacked} bytes "
                                             f"(decompression bomb?)")
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    if src is None:
                        raise BundleRejected(f"bundle member {member.name!r} cannot be read")
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                    with os.fdopen(fd, "wb") as out:
                        while block := src.read(COPY_BLOCK):
                            written += len(block)
                            if written > max_unpacked:
                                raise BundleRejected(f"bundle unpacks to more than {max_unpacked} bytes")
                            out.write(block)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleRejected(f"bundle is not a valid .tar.gz: {exc}") from exc
