"""One line per event to stderr (journald adds time and unit): key=value or JSON.

Under systemd (`JOURNAL_STREAM` set: stderr is the journal) each line starts with its syslog
priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), so `journalctl -p warning` works,
and carries no timestamp of ours (journald stamps it). The in-memory ring keeps the timestamps.

Extra fields go in `extra={"kv": {...}}`. `Once` logs a repeated error at WARNING the first time and
at DEBUG afterwards, so a flapping link does not flood the journal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from edgeagent.core.logring import LogRing, RingHandler, installed_ring

__all__ = ["JsonFormatter", "KvFormatter", "LogRing", "Once", "installed_ring", "journal_priority",
           "set_level", "setup"]
_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "kv"}


def _kv_value(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s, ensure_ascii=False)
    return s


def journal_priority(levelno: int) -> int:
    """The syslog priority journald reads from a `<N>` line prefix."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class KvFormatter(logging.Formatter):
    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal  # priority prefix, no timestamp

    def format(self, record: logging.LogRecord) -> str:
        parts = {
            "ts": f"{record.created:.3f}",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.journal:
            del parts["ts"]
        fields: dict[str, Any] = dict(getattr(record, "kv", {}) or {})
        line = " ".join(f"{k}={_kv_value(v)}" for k, v in {**parts, **fields}.items())
        if record.exc_info:
            tb = self.formatException(record.exc_info)
            line += " exc=" + json.dumps(tb)
        return f"<{journal_priority(record.levelno)}>{line}" if self.journal else line


class JsonFormatter(logging.Formatter):
    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal  # priority prefix, no timestamp

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        if self.journal:
            del out["ts"]
        out.update(getattr(record, "kv", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False, default=str)
        return f"<{journal_priority(record.levelno)}>{line}" if self.journal else line


def setup(level: str = "INFO", fmt: str = "kv", *, ring_lines: int = 2000,
          ring_kb: float = 512.0) -> LogRing:
    """One stderr handler and one in-memory ring (the recent lines for a support bundle), both with
    the same formatter; returns the ring (`installed_ring()` finds it again)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else KvFormatter()
    journal = bool(os.environ.get("JOURNAL_STREAM"))  # systemd connected stderr to the journal
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(journal=journal) if fmt == "json" else KvFormatter(journal=journal))
    root.addHandler(handler)
    ring = LogRing(ring_lines, max(1, int(ring_kb * 1024)))
    ring_handler = RingHandler(ring)
    ring_handler.setFormatter(formatter)
    root.addHandler(ring_handler)
    root.setLevel(level.upper())
    for noisy in ("asyncio",):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return ring


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


class Once:
    """WARNING the first time a key is seen (and again after `reset`), DEBUG for the repeats."""

    def __init__(self, logger: logging.Logger, quiet_s: float = 300.0) -> None:
        self._log = logger
        self._seen: dict[str, float] = {}
        self._quiet_s = quiet_s

    def warning(self, key: str, msg: str, *args: object, **kw: Any) -> None:
        now = time.monotonic()
        last = self._seen.get(key)
        level = logging.WARNING if last is None or now - last > self._quiet_s else logging.DEBUG
        if level == logging.WARNING:
            self._seen[key] = now
        self._log.log(level, msg, *args, **kw)

    def reset(self, key: str) -> None:
        self._seen.pop(key, None)
