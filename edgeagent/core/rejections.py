"""Refused input, reported without amplification: the first refusal of a kind of reason in a
window is logged and sent as an event at once; repeats within the window are only counted, and
one summary event with the count goes out when the window has passed (on the next refusal or
`flush()`). A flood of 2,000 forged messages is then two events, not 2,000."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

WINDOW_S = 60.0


class EventSink(Protocol):
    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None: ...


@dataclass
class _Window:
    started: float
    kind: str
    message: str
    data: dict[str, Any]
    repeats: int = 0


@dataclass
class Rejections:
    """Counts refusals per `reason` (a short, stable key such as "signature" or "orphan-chunk")."""

    sink: EventSink
    clock: Callable[[], float] = time.monotonic
    window_s: float = WINDOW_S
    totals: dict[str, int] = field(default_factory=dict)
    _open: dict[str, _Window] = field(default_factory=dict)

    def refuse(self, kind: str, reason: str, message: str, data: dict[str, Any] | None = None) -> bool:
        """Record one refusal; `message` says what was refused and why (it goes in the event).
        True when this one was reported (the first of its window), False when only counted."""
        now = self.clock()
        self.totals[reason] = self.totals.get(reason, 0) + 1
        window = self._open.get(reason)
        if window is not None and now - window.started < self.window_s:
            window.repeats += 1
            log.debug("refused again (%s): %s", reason, message)
            return False
        if window is not None:
            self._summarize(reason, window)
        self._open[reason] = _Window(now, kind, message, dict(data or {}))
        log.warning("refused (%s): %s", reason, message, extra={"kv": {"reason": reason}})
        self.sink.emit_event(kind, "warning", message, {**(data or {}), "reason": reason, "count": 1})
        return True

    def flush(self) -> None:
        """Send the summaries of windows that have passed (call it now and then from a loop)."""
        now = self.clock()
        for reason, window in list(self._open.items()):
            if now - window.started >= self.window_s:
                del self._open[reason]
                self._summarize(reason, window)

    def _summarize(self, reason: str, window: _Window) -> None:
        if window.repeats == 0:
            return
        message = f"{window.repeats} more refused in {self.window_s:g} s like: {window.message}"
        log.warning("%s", message, extra={"kv": {"reason": reason, "count": window.repeats}})
        self.sink.emit_event(window.kind, "warning", message,
                             {**window.data, "reason": reason, "count": window.repeats,
                              "window_s": self.window_s})
