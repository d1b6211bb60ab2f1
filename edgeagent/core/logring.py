"""A bounded in-memory ring of the agent's recent formatted log lines (for support bundles).

Bounded twice, by lines and by bytes (UTF-8): when either bound is passed the oldest lines go. A
line longer than the byte bound is cut to it (marked), so one huge traceback cannot empty the ring.
Thread-safe: the logging handler appends from any thread, a bundle reads from another.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

CUT_MARK = " ...[cut]"


class LogRing:
    """The last `max_lines` lines, together at most `max_bytes` bytes."""

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        if max_lines < 1 or max_bytes < 1:
            raise ValueError("a log ring needs room for at least one line and one byte")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[tuple[str, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.dropped = 0  # lines pushed out by the bounds since start

    def append(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        if len(data) > self.max_bytes:
            mark = CUT_MARK if self.max_bytes > len(CUT_MARK) else ""
            line = data[:self.max_bytes - len(mark)].decode("utf-8", "ignore") + mark
            data = line.encode("utf-8", "replace")
        size = len(data)
        with self._lock:
            self._lines.append((line, size))
            self._bytes += size
            while len(self._lines) > self.max_lines or self._bytes > self.max_bytes:
                _, gone = self._lines.popleft()
                self._bytes -= gone
                self.dropped += 1

    def recent(self, n: int | None = None) -> list[str]:
        """The last `n` lines (all when None), oldest first."""
        with self._lock:
            lines = [line for line, _ in self._lines]
        if n is None:
            return lines
        return lines[-n:] if n > 0 else []

    def __len__(self) -> int:
        with self._lock:
            return len(self._lines)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes


class RingHandler(logging.Handler):
    """Formats each record (the same formatter as stderr) into a LogRing."""

    def __init__(self, ring: LogRing) -> None:
        super().__init__()
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ring.append(self.format(record))
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def installed_ring(logger: logging.Logger | None = None) -> LogRing | None:
    """The ring `logs.setup` installed on the root logger, if any (no module state: ask logging)."""
    for h in (logger or logging.getLogger()).handlers:
        if isinstance(h, RingHandler):
            return h.ring
    return None
