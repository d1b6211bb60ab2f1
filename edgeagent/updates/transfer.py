"""Chunk assembly on disk: a partial file plus a persisted bitmap, so a transfer survives kill -9.

The bitmap on disk only ever claims chunks that were fsynced into the partial file before it was
written (atomically), so after a crash a chunk is at worst received twice, never assumed present.
Memory stays bounded: one chunk at a time. The whole-file sha256 is updated as chunks are written
(on the updates writer thread), in index order: a chunk that arrives before its predecessors is
hashed from disk once they are there, so `finish` needs no second pass over the file unless the
transfer resumed after a restart (then it streams the file from disk as before).
All methods block (file I/O): call them off the event loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

from edgeagent.core.errors import ChunkRejected
from edgeagent.core.fsutil import atomic_write_bytes, fsync_dir, sha256_file
from edgeagent.updates.manifest import Manifest

PART = "artifact.part"
BITMAP = "bitmap"
ARTIFACT = "artifact"
MAX_RANGES = 64  # per request message: keep requests small; the rest is asked for next time


class Transfer:
    def __init__(self, directory: Path, manifest: Manifest, persist_every_s: float = 0.5) -> None:
        self.dir = Path(directory)
        self.m = manifest
        self.persist_every_s = persist_every_s
        self._lock = threading.Lock()
        self._have = bytearray(manifest.chunks)  # 1 per chunk received (in memory)
        self._durable = bytearray(manifest.chunks)  # what the bitmap file says
        self._count = 0
        self._dirty = False
        self._last_persist = 0.0
        self._fd: int | None = None
        self.duplicates = 0
        self._hash = hashlib.sha256()  # over chunks [0, _hashed) of the file, in order
        self._hashed = 0

    # -- lifecycle
    @property
    def part_path(self) -> Path:
        return self.dir / PART

    @property
    def artifact_path(self) -> Path:
        return self.dir / ARTIFACT

    def open(self) -> None:
        """Create or reopen the partial file and load the bitmap of a previous run."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.artifact_path.exists() and not self.part_path.exists():
            self._have[:] = b"\x01" * self.m.chunks  # finished before a restart: finish() checks it again
            self._count = self.m.chunks
            return
        self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size != self.m.size:
            os.ftruncate(self._fd, self.m.size)  # sparse; disk space was checked before start
        try:
            data = (self.dir / BITMAP).read_bytes()
        except FileNotFoundError:
            data = b""
        if len(data) == self.m.chunks:
            self._have[:] = data
            self._durable[:] = data
            self._count = sum(1 for b in data if b)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self.persist(force=True)
                os.close(self._fd)
                self._fd = None

    # -- chunks
    def validate(self, index: int, data: bytes) -> None:
        """ChunkRejected for anything that must never reach the disk."""
        m = self.m
        if index < 0 or index >= m.chunks:
            raise ChunkRejected(m.job, index, f"index out of range (manifest declares {m.chunks} chunks)")
        expected = m.chunk_len(index)
        if len(data) > m.chunk_size:
            raise ChunkRejected(m.job, index, f"oversized: {len(data)} bytes > chunk_size {m.chunk_size}")
        if len(data) != expected:
            raise ChunkRejected(m.job, index, f"size mismatch: {len(data)} bytes, expected {expected}")
        if hashlib.sha256(data).hexdigest() != m.chunk_sha256[index]:  # required by the manifest
            raise ChunkRejected(m.job, index, "chunk_sha256 mismatch")

    def write(self, index: int, data: bytes) -> bool:
        """Validate and store one chunk; False for a duplicate (ignored)."""
        self.validate(index, data)
        with self._lock:
            if self._fd is None:
                raise ChunkRejected(self.m.job, index, "transfer is closed")
            if self._have[index]:
                self.duplicates += 1
                return False
            os.pwrite(self._fd, data, index * self.m.chunk_size)
            self._have[index] = 1
            self._count += 1
            self._dirty = True
            self._advance_hash(index, data)
            if self.complete or time.monotonic() - self._last_persist >= self.persist_every_s:
                self.persist(force=True)
            return True

    @property
    def dirty(self) -> bool:
        """Chunks on disk that the bitmap file does not claim yet."""
        return self._dirty

    def flush(self) -> None:
        """Persist what was written since the last persist (the tail of a burst would otherwise
        wait for the next chunk)."""
        with self._lock:
            if self._fd is not None and self._dirty:
                self.persist(force=True)

    def _advance_hash(self, index: int, data: bytes) -> None:
        """Extend the running sha256 over every chunk now contiguous from the start (under _lock)."""
        assert self._fd is not None
        while self._hashed < self.m.chunks and self._have[self._hashed]:
            i = self._hashed
            self._hash.update(data if i == index else
                              os.pread(self._fd, self.m.chunk_len(i), i * self.m.chunk_size))
            self._hashed += 1

    def persist(self, force: bool = False) -> None:
        """fsync the data, then atomically record which chunks it holds."""
        if self._fd is None or not (self._dirty or force):
            return
        os.fsync(self._fd)
        snapshot = bytes(self._have)
        if snapshot != bytes(self._durable) or not (self.dir / BITMAP).exists():
            atomic_write_bytes(self.dir / BITMAP, snapshot, mode=0o600)
            self._durable[:] = snapshot
        self._dirty = False
        self._last_persist = time.monotonic()

    # -- progress
    @property
    def received(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.m.chunks

    @property
    def progress(self) -> float:
        return self._count / self.m.chunks

    def missing_ranges(self, limit: int = MAX_RANGES) -> list[tuple[int, int]]:
        """Inclusive [first, last] ranges of chunks not received yet (at most `limit` ranges)."""
        out: list[tuple[int, int]] = []
        start: int | None = None
        for i, have in enumerate(self._have):
            if not have and start is None:
                start = i
            elif have and start is not None:
                out.append((start, i - 1))
                start = None
                if len(out) >= limit:
                    return out
        if start is not None:
            out.append((start, self.m.chunks - 1))
        return out

    def has(self, index: int) -> bool:
        return bool(self._have[index])

    def missing_after(self, after: int, max_chunks: int) -> list[tuple[int, int]]:
        """Ranges of missing chunks with index > `after`, at most `max_chunks` chunks in total."""
        out: list[tuple[int, int]] = []
        count = 0
        i = max(0, after + 1)
        n = self.m.chunks
        while i < n and count < max_chunks and len(out) < MAX_RANGES:
            if self._have[i]:
                i += 1
                continue
            start = i
            while i < n and not self._have[i] and count < max_chunks:
                i += 1
                count += 1
            out.append((start, i - 1))
        return out

    # -- the end
    def finish(self) -> str:
        """Stream the sha256 from disk; on a match rename the part to `artifact`. Returns the digest."""
        with self._lock:
            running = self._hash.hexdigest() if self._hashed == self.m.chunks else None
            if self._fd is not None:
                self.persist(force=True)
                os.close(self._fd)
                self._fd = None
        if not self.part_path.exists() and self.artifact_path.exists():
            return sha256_file(self.artifact_path)  # renamed before a crash: check again
        digest = running if running is not None else sha256_file(self.part_path)
        if digest == self.m.sha256:
            os.replace(self.part_path, self.artifact_path)
            fsync_dir(self.artifact_path.parent)  # durable before the job says "verified"
        return digest


def disk_free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


class Puller:
    """Flow control of one transfer (pull, as in AWS OTA): keep at most `window` requested chunks
    outstanding and top up as soon as a quarter of them arrived (a sliding window: the sender never
    waits for a round trip while the window is open); start over from the first gap when the
    sender goes quiet. Memory in the MQTT receive path stays bounded by the window.

    With `rate_bytes_s` > 0 the chunks asked for are paced (token bucket, no burst beyond one
    request) so that the download averages at most that rate."""

    def __init__(self, transfer: Transfer, window: int, rate_bytes_s: float = 0.0, now: float = 0.0) -> None:
        self.t = transfer
        self.window = window
        self.asked_upto = -1
        self.pending: set[int] = set()
        self.rate_bytes_s = rate_bytes_s
        self._next_s = now  # pacing: when the next chunk may be asked for
        if rate_bytes_s > 0:
            # one request every ~0.1 s at the cap: small steps keep the average close to it
            self.window = max(1, min(window, int(rate_bytes_s * 0.1) // transfer.m.chunk_size or 1))

    def outstanding(self) -> int:
        self.pending = {i for i in self.pending if not self.t.has(i)}
        return len(self.pending)

    def due(self, now: float = 0.0) -> bool:
        return (self.outstanding() <= self.window * 3 // 4 and self.asked_upto < self.t.m.chunks - 1
                and self.wait_s(now) == 0.0)

    def wait_s(self, now: float) -> float:
        """How long the rate cap holds the next request back (0: it may go now)."""
        return max(0.0, self._next_s - now) if self.rate_bytes_s > 0 else 0.0

    def ask(self, restart: bool = False, now: float = 0.0) -> list[tuple[int, int]]:
        if restart:
            self.asked_upto, self.pending = -1, set()
        if self.wait_s(now) > 0:
            return []
        room = self.window - self.outstanding()
        ranges = self.t.missing_after(self.asked_upto, room) if room > 0 else []
        if ranges:
            self.asked_upto = ranges[-1][1]
            count = 0
            for a, b in ranges:
                self.pending.update(range(a, b + 1))
                count += b - a + 1
            if self.rate_bytes_s > 0:
                # a token bucket holding one window: a late wake-up is made up for, not lost
                per_chunk_s = self.t.m.chunk_size / self.rate_bytes_s
                self._next_s = max(now - self.window * per_chunk_s, self._next_s) + count * per_chunk_s
        return ranges
