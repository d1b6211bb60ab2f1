"""What `edgeagent push` tells the operator: each device's outcome as it happens (stderr: a redrawn
progress bar on a terminal, plain lines otherwise) and a final table (stdout).

A job's retained status (`P/D/updates/J/status`) says its state; the words are the operator's:
accepted (received), downloading, verified, deferred (with the gate's reason and the next try),
installing, succeeded, rejected, failed, rolled back, cancelled; and offline from the device's own
retained status. A job still deferred at the deadline is shown as deferred, never "timed out": the
device keeps it and installs it when its gates open.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from edgeagent.core.protocol import FINAL_JOB_STATES
from edgeagent.ops.push_shadow import shadow_line

WORDS = {"received": "accepted", "rolled_back": "rolled back", "health_check": "health check"}
BAR_WIDTH = 30
PLAIN_PROGRESS_STEP = 0.25  # without a terminal, one downloading line per quarter


def word(state: str) -> str:
    return WORDS.get(state, state)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _in(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def detail(doc: Mapping[str, Any], now: float | None = None) -> str:
    """The reason of a job status, plus the next try of a deferred one."""
    reason = str(doc.get("reason") or "")
    state = doc.get("state")
    if state == "downloading":
        progress = doc.get("progress")
        if isinstance(progress, int | float):
            return f"{float(progress) * 100:.0f}%"
    if state == "deferred":
        nxt = doc.get("next_try")
        if isinstance(nxt, int | float):
            when = f"next try {_clock(nxt)} (in {_in(nxt - (time.time() if now is None else now))})"
            return f"{reason}; {when}" if reason else when
    return reason


def line(device: str, doc: Mapping[str, Any]) -> str:
    text = detail(doc)
    return f"{device}: {word(str(doc.get('state')))}{': ' + text if text else ''}"


class Reporter:
    """Prints each device's job status as it arrives (thread-safe: paho's thread calls it)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, str]] = {}  # device -> (state, detail) last printed
        self._quarter: dict[str, int] = {}
        self._bar_open = False

    def _emit(self, text: str) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def status(self, device: str, doc: Mapping[str, Any]) -> None:
        state = str(doc.get("state"))
        with self._lock:
            if state == "downloading":
                self._progress(device, doc)
                return
            if state == "shadowing":  # the candidate's figures as they come
                figures = shadow_line(device, dict(doc))
                if figures is not None:
                    self._emit(figures)
                    return
            key = (state, str(doc.get("reason") or ""))
            if self._last.get(device) == key:
                return
            self._last[device] = key
            self._emit(line(device, doc))

    def _progress(self, device: str, doc: Mapping[str, Any]) -> None:
        p = doc.get("progress")
        progress = min(1.0, max(0.0, float(p))) if isinstance(p, int | float) else 0.0
        if self.tty:
            bar = "#" * int(progress * BAR_WIDTH)
            self.stream.write(f"\r{device}: downloading [{bar:<{BAR_WIDTH}}] {progress * 100:5.1f}%")
            self.stream.flush()
            self._bar_open = True
            self._last[device] = ("downloading", "")
            return
        quarter = int(progress / PLAIN_PROGRESS_STEP)
        if self._last.get(device, ("",))[0] != "downloading" or quarter > self._quarter.get(device, -1):
            self._quarter[device] = quarter
            self._last[device] = ("downloading", "")
            self._emit(f"{device}: downloading {progress * 100:.0f}%")

    def presence(self, device: str, doc: Mapping[str, Any], text: str) -> None:
        with self._lock:
            self._emit(f"{device}: {text}")

    def note(self, text: str) -> None:
        with self._lock:
            self._emit(text)

    def close(self) -> None:
        with self._lock:
            if self._bar_open:
                self.stream.write("\n")
                self.stream.flush()
                self._bar_open = False


def outcome(doc: Mapping[str, Any] | None, presence: Mapping[str, Any] | None) -> tuple[str, str]:
    """(state word, detail) of one device for the final table."""
    if doc is None:
        if presence is not None and presence.get("state") != "online":
            return "offline", "no answer; the job waits in its broker session until it reconnects"
        return "no answer", "the device never reported this job"
    state = str(doc.get("state"))
    text = detail(doc)
    if state not in FINAL_JOB_STATES and state != "deferred":
        text = f"{text}; not finished at the deadline" if text else "not finished at the deadline"
    return word(state), text


def table(rows: list[tuple[str, str, str]]) -> str:
    """DEVICE STATE DETAIL, aligned, plain text (it is read as often by scripts as by people)."""
    head = ("DEVICE", "STATE", "DETAIL")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows)) if rows else len(head[0])
    w1 = max(len(head[1]), *(len(r[1]) for r in rows)) if rows else len(head[1])
    out = [f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]}".rstrip()]
    out += [f"{d:<{w0}}  {s:<{w1}}  {t}".rstrip() for d, s, t in rows]
    return "\n".join(out)
