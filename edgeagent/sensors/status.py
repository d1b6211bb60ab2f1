"""What every bus source reports: up/down state, the latest scaled value and unit per channel, and
counters of bad frames and out-of-range values; one `sensor` event per state change.

The sources (serial, modbus, iio) call it from the event loop; the pipeline hands it an event sink
(the outbox) and reads `section()` for telemetry, health.json and the rules.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent.core.backoff import backoff_s
from edgeagent.core.config_schema import SensorsConfig
from edgeagent.core.logs import Once

log = logging.getLogger(__name__)

EventSink = Callable[[str, str, str, dict[str, Any]], None]  # Outbox.emit_event(kind, severity, msg, data)
Rows = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Channel:
    """One named value a source reads; `lo`/`hi` bound the plausible scaled values (None: open)."""

    name: str
    unit: str = ""
    lo: float | None = None
    hi: float | None = None


def channels_from(cfg: SensorsConfig, names: Sequence[str], units: dict[str, str],
                  bounds: dict[str, tuple[float | None, float | None]] | None = None) -> list[Channel]:
    """Channels with the config's `units` and `limits` laid over what the source knows itself."""
    out = []
    for n in names:
        lo, hi = (bounds or {}).get(n, (None, None))
        lim = cfg.limits.get(n)
        if lim is not None and len(lim) == 2:
            lo, hi = lim[0], lim[1]
        out.append(Channel(n, cfg.units.get(n, units.get(n, "")), lo, hi))
    return out


class SourceStatus:
    """State, latest values and counters of one bus source (`kind` at `target`)."""

    def __init__(self, kind: str, target: str, channels: Sequence[Channel], select: Sequence[str] = (),
                 *, retry_initial_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.kind = kind
        self.target = target
        self.channels = list(channels)
        names = [c.name for c in self.channels]
        self.select = [names.index(n) for n in select] if select else list(range(len(names)))
        self.events: EventSink | None = None
        self.state = "connecting"  # connecting | ok | down
        self.reason = ""
        self.samples = 0
        self.malformed = 0
        self.out_of_range = 0
        self.disconnects = 0
        self.since = time.time()
        self._latest: list[float | None] = [None] * len(names)
        self._latest_ts: float | None = None
        lo = [-math.inf if c.lo is None else c.lo for c in self.channels]
        hi = [math.inf if c.hi is None else c.hi for c in self.channels]
        self._lo = np.array(lo, np.float64)
        self._hi = np.array(hi, np.float64)
        self._retry = (retry_initial_s, retry_max_s)
        self._attempt = 0
        self._once = Once(log)

    # ------------------------------------------------------------------ state
    def up(self) -> None:
        """The device answers (again)."""
        self._attempt = 0
        if self.state == "ok":
            return
        was_down = self.state == "down"
        self.state, self.reason, self.since = "ok", "", time.time()
        log.info("sensor %s %s connected", self.kind, self.target)
        if was_down:
            self._emit("info", f"sensor {self.kind} {self.target} is back", {})

    def down(self, reason: str) -> float:
        """The device is gone or does not answer: report it once; returns the backoff before a retry."""
        self._attempt += 1
        if self.state != "down":
            self.state, self.reason, self.since = "down", reason, time.time()
            self.disconnects += 1
            self._latest = [None] * len(self._latest)  # a lost device's last values are not current
            log.warning("sensor %s %s lost: %s (retrying with backoff)", self.kind, self.target, reason)
            self._emit("warning", f"sensor {self.kind} {self.target} lost: {reason}", {"reason": reason})
        else:
            self.reason = reason
            log.debug("sensor %s %s still down: %s", self.kind, self.target, reason)
        return backoff_s(self._attempt, *self._retry, jitter=0.2)

    def _emit(self, severity: str, message: str, data: dict[str, Any]) -> None:
        if self.events is not None:
            self.events("sensor", severity, message, {"source": self.kind, "target": self.target,
                                                      "state": self.state, **data})

    # ------------------------------------------------------------------ data
    def bad_frame(self, reason: str) -> None:
        self.malformed += 1
        self._once.warning(f"malformed:{self.kind}", "sensor %s %s: dropped a malformed frame "
                           "(%d so far): %s", self.kind, self.target, self.malformed, reason)

    def accept(self, ts: float, rows: Rows) -> npt.NDArray[np.float32] | None:
        """Scaled rows (n, all channels) -> the selected columns as float32 for the windows; rows with
        a value out of its channel's bounds (or not finite) are counted and dropped."""
        if rows.size == 0:
            return None
        ok = np.all(np.isfinite(rows) & (rows >= self._lo) & (rows <= self._hi), axis=1)
        if not ok.all():
            bad = rows[~ok][0]
            self.out_of_range += int((~ok).sum())
            col = int(np.argmax(~(np.isfinite(bad) & (bad >= self._lo) & (bad <= self._hi))))
            c = self.channels[col]
            self._once.warning(f"range:{self.kind}:{c.name}", "sensor %s %s: %s = %g %s is out of range "
                               "%s..%s; sample dropped (%d so far)", self.kind, self.target, c.name,
                               bad[col], c.unit, c.lo, c.hi, self.out_of_range)
            rows = rows[ok]
            if rows.size == 0:
                return None
        self.samples += len(rows)
        self._latest = [float(v) for v in rows[-1]]
        self._latest_ts = ts
        return np.ascontiguousarray(rows[:, self.select], dtype=np.float32)

    def accept_row(self, ts: float, row: Sequence[float]) -> npt.NDArray[np.float32] | None:
        """`accept` for one sample (a Modbus poll) without numpy's per-call cost."""
        for v, lo, hi in zip(row, self._lo, self._hi, strict=True):
            if not lo <= v <= hi:  # also false for NaN
                return self.accept(ts, np.array([row], np.float64))  # counts and logs it
        self.samples += 1
        self._latest = list(row)
        self._latest_ts = ts
        return np.array([[row[i] for i in self.select]], np.float32)

    def section(self) -> dict[str, Any]:
        """The `sensors` block of telemetry and health.json; rules read each channel by its name."""
        chans = {c.name: {"value": None if v is None else round(v, 6), "unit": c.unit}
                 for c, v in zip(self.channels, self._latest, strict=True)}
        out: dict[str, Any] = {"source": self.kind, "target": self.target, "state": self.state,
                               "since": round(self.since, 3), "ts": self._latest_ts, "channels": chans,
                               "samples": self.samples, "malformed": self.malformed,
                               "out_of_range": self.out_of_range, "disconnects": self.disconnects}
        if self.reason:
            out["reason"] = self.reason
        return out
