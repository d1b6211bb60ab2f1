"""One line per event to stderr (journald adds time and unit): key=value or JSON.

Extra fields go in `extra={"kv": {...}}`. `Once` logs a repeated error at WARNING the first time and
at DEBUG afterwards, so a flapping link does not flood the journal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from edgeagent.core.logring import LogRing, RingHandler, installed_ring

__all__ = ["JsonFormatter", "KvFormatter", "LogRing", "Once", "installed_ring", "set_level", "setup"]
_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "kv"}


def _kv_value(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s, ensure_ascii=False)
    return s


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = {
            "ts": f"{record.created:.3f}",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields: dict[str, Any] = dict(getattr(record, "kv", {}) or {})
        line = " ".join(f"{k}={_kv_value(v)}" for k, v in {**parts, **fields}.items())
        if record.exc_info:
            tb = self.formatException(record.exc_info)
            line += " exc=" + json.dumps(tb)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "kv", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "INFO", fmt: str = "kv", *, ring_lines: int = 2000,
          ring_kb: float = 512.0) -> LogRing:
    """One stderr handler and one in-memory ring (the recent lines for a support bundle), both with
    the same formatter; returns the ring (`installed_ring()` finds it again)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = JsonFormatter() if fmt == "json" else KvFormatter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
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
