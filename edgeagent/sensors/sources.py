"""Sensor sources (simulated vibration, CSV replay, local MQTT topic), the windowing ring buffer and
the factory that builds any source kind from its config (the bus kinds live in their own modules)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from edgeagent.core.errors import SensorError, SensorPayloadError
from edgeagent.transport.local import LocalSubscription

if TYPE_CHECKING:
    from edgeagent.core.config import SensorsConfig
    from edgeagent.sensors.status import SourceStatus

log = logging.getLogger(__name__)

Samples = npt.NDArray[np.float32]

FAULTS = ("imbalance", "bearing", "spikes")
CHUNK_S = 0.02  # 20 ms chunks: 32 samples at 1600 Hz, cheap to make and fine-grained enough to pace
MQTT_MAX_SAMPLES = 10_000  # one message may not carry more rows than this (bounds memory per message)


@dataclass(frozen=True, slots=True)
class Window:
    """`size` consecutive samples; `seq` counts windows from 0 so consumers can count losses."""

    seq: int
    ts: float
    data: Samples


class Windower:
    """Cuts a sample stream into overlapping windows (`size` samples, every `stride` samples).

    Chunk boundaries do not matter: the same samples give the same windows however they are pushed.
    With `rate_hz` each window's `ts` is interpolated to its own last sample; without it a window
    gets the `ts` of the chunk that completed it.
    """

    def __init__(self, size: int, stride: int, channels: int, *, rate_hz: float | None = None) -> None:
        if size < 1 or stride < 1 or channels < 1:
            raise ValueError(f"size, stride and channels must be >= 1, got {size}, {stride}, {channels}")
        self.size = size
        self.stride = stride
        self.channels = channels
        self.rate_hz = rate_hz
        self._tail: Samples = np.empty((0, channels), np.float32)  # last size-1 samples seen
        self._total = 0  # samples pushed so far
        self._next_end = size  # sample count at which the next window is complete
        self._seq = 0

    @property
    def samples_seen(self) -> int:
        return self._total

    def push(self, ts: float, samples: npt.ArrayLike) -> list[Window]:
        arr = np.asarray(samples, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.channels:
            raise ValueError(f"samples must have shape (n, {self.channels}), got {arr.shape}")
        n = arr.shape[0]
        if n == 0:
            return []
        buf = np.concatenate((self._tail, arr)) if len(self._tail) else arr
        buf_start = self._total - len(self._tail)  # global index of buf[0]
        self._total += n
        windows: list[Window] = []
        while self._next_end <= self._total:
            end = self._next_end - buf_start
            data = np.array(buf[end - self.size:end], dtype=np.float32, copy=True)
            lag = self._total - self._next_end  # samples after this window's last one in the chunk
            wts = ts - lag / self.rate_hz if self.rate_hz else ts
            windows.append(Window(self._seq, wts, data))
            self._seq += 1
            self._next_end += self.stride
        keep = min(self.size - 1, len(buf))
        self._tail = np.array(buf[len(buf) - keep:], dtype=np.float32, copy=True)
        return windows


class SensorSource(Protocol):
    """Anything that yields `(ts of last sample, samples (n, channels) float32)` paced in real time."""

    channels: int
    rate_hz: float

    def stream(self) -> AsyncIterator[tuple[float, Samples]]: ...


class _Pacer:
    """Sleeps until a sample's due time so replay runs at real speed; never sleeps when not realtime."""

    def __init__(self, realtime: bool) -> None:
        self.realtime = realtime
        self._t0: float | None = None

    async def wait(self, offset_s: float) -> None:
        loop = asyncio.get_running_loop()
        if self._t0 is None:
            self._t0 = loop.time()
        delay = self._t0 + offset_s - loop.time() if self.realtime else 0.0
        # sleep(0) still yields so a fast source cannot starve the loop
        await asyncio.sleep(max(0.0, delay))


# --------------------------------------------------------------------------- simulated vibration


class VibrationSimulator:
    """A 3-axis accelerometer (g) on a rotating machine, from a seeded RNG; faults can be injected.

    Healthy: gravity on z, shaft harmonics (1x, 2x, 3x) and sensor noise, with per-seed variation.
    `imbalance` raises the 1x harmonic on the radial axes; `bearing` adds impacts at the outer-race
    defect frequency ringing a structural resonance; `spikes` adds random large impulses.
    Severity is 0 (off) .. 1 (severe). Everything is vectorised per chunk and stays phase-continuous.
    """

    channels = 3
    SPIKE_RATE_HZ = 30.0  # frequent enough that almost every 160 ms window holds one

    def __init__(self, rate_hz: float = 1600.0, seed: int = 0, rotation_hz: float | None = None,
                 base_temp_c: float = 40.0) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        self.rate_hz = float(rate_hz)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        rng = self._rng
        self.rotation_hz = float(rotation_hz if rotation_hz is not None else rng.uniform(24.0, 36.0))
        self._harm_amp = np.array([0.05, 0.025, 0.012]) * rng.uniform(0.6, 1.4, size=3)
        self._harm_phase = rng.uniform(0, 2 * np.pi, size=(3, 3))  # harmonic x axis
        self._axis_gain = np.array([1.0, 0.8, 0.5]) * rng.uniform(0.8, 1.2, size=3)
        self._noise_g = float(rng.uniform(0.01, 0.03))
        self._bpfo_hz = self.rotation_hz * float(rng.uniform(3.4, 3.8))
        self._resonance_hz = float(rng.uniform(380.0, 520.0))
        self._base_temp_c = base_temp_c
        self._temp_c = base_temp_c
        self._n = 0
        self._severity = dict.fromkeys(FAULTS, 0.0)

    @property
    def faults(self) -> dict[str, float]:
        return {k: v for k, v in self._severity.items() if v > 0}

    @property
    def temperature_c(self) -> float:
        """Machine temperature: drifts slowly and runs hotter the worse the fault."""
        return self._temp_c

    def set_fault(self, name: str, severity: float) -> None:
        if name not in self._severity:
            raise ValueError(f"unknown fault {name!r}; expected one of {', '.join(FAULTS)}")
        if not 0.0 <= severity <= 1.0 or math.isnan(severity):
            raise ValueError(f"fault severity must be within 0..1, got {severity}")
        self._severity[name] = float(severity)

    def clear_faults(self) -> None:
        self._severity = dict.fromkeys(FAULTS, 0.0)

    def generate(self, n: int) -> Samples:
        """The next `n` samples, shape (n, 3) float32."""
        rng = self._rng
        t = (self._n + np.arange(n)) / self.rate_hz
        self._n += n
        w = 2 * np.pi * self.rotation_hz * t
        out = rng.normal(0.0, self._noise_g, size=(n, 3))
        out[:, 2] += 1.0  # gravity
        amp = self._harm_amp.copy()
        for k in range(3):
            out += (amp[k] * np.sin((k + 1) * w[:, None] + self._harm_phase[k])) * self._axis_gain
        imb = self._severity["imbalance"]
        if imb:
            # unbalanced mass: a rotating force, so x and y see it 90 degrees apart, z barely
            out[:, 0] += 0.5 * imb * np.sin(w + self._harm_phase[0, 0])
            out[:, 1] += 0.5 * imb * np.cos(w + self._harm_phase[0, 0])
            out[:, 2] += 0.05 * imb * np.sin(w)
        brg = self._severity["bearing"]
        if brg:
            cycle = (t * self._bpfo_hz) % 1.0 / self._bpfo_hz  # seconds since the last impact
            ring = np.exp(-cycle / 0.002) * np.sin(2 * np.pi * self._resonance_hz * t)
            out += (brg * ring)[:, None] * self._axis_gain[::-1]
        spk = self._severity["spikes"]
        if spk:
            hits = np.flatnonzero(rng.random(n) < self.SPIKE_RATE_HZ / self.rate_hz)
            if len(hits):
                sign = rng.choice((-1.0, 1.0), size=(len(hits), 3))
                out[hits] += sign * rng.uniform(2.0, 5.0, size=(len(hits), 1)) * spk
        self._update_temperature(n / self.rate_hz, t[-1] if n else 0.0)
        return out.astype(np.float32)

    def _update_temperature(self, dt_s: float, t_s: float) -> None:
        worst = max(self._severity.values())
        target = self._base_temp_c + 2.0 * math.sin(2 * math.pi * t_s / 600.0) + 20.0 * worst
        self._temp_c += (target - self._temp_c) * (1.0 - math.exp(-dt_s / 60.0))


class SimulatedSource:
    """`VibrationSimulator` as a `SensorSource`: 20 ms chunks paced to the wall clock."""

    def __init__(self, rate_hz: float = 1600.0, seed: int = 0, *, rotation_hz: float | None = None,
                 faults: dict[str, float] | None = None, base_temp_c: float = 40.0,
                 realtime: bool = True, chunk_s: float = CHUNK_S) -> None:
        self.sim = VibrationSimulator(rate_hz, seed, rotation_hz, base_temp_c)
        self.channels = self.sim.channels
        self.rate_hz = self.sim.rate_hz
        self.realtime = realtime
        self._chunk = max(1, round(rate_hz * chunk_s))
        for name, severity in (faults or {}).items():
            self.sim.set_fault(name, severity)
        self._schedule: tuple[str, float, float, float] | None = None

    def schedule_fault(self, name: str, severity: float, start_s: float, duration_s: float = 0.0) -> None:
        """Switch `name` on `start_s` seconds of signal after the start, off again after
        `duration_s` (0: never): demos and soak runs show an anomaly raised and cleared."""
        self._schedule = (name, severity, start_s, duration_s)

    def set_fault(self, name: str, severity: float) -> None:
        self.sim.set_fault(name, severity)

    @property
    def temperature_c(self) -> float:
        return self.sim.temperature_c

    async def stream(self) -> AsyncIterator[tuple[float, Samples]]:
        pacer = _Pacer(self.realtime)
        t0 = time.time()
        sent = 0
        while True:
            if self._schedule is not None:
                name, severity, start_s, duration_s = self._schedule
                t = sent / self.rate_hz
                active = t >= start_s and (duration_s <= 0 or t < start_s + duration_s)
                self.sim.set_fault(name, severity if active else 0.0)
            samples = self.sim.generate(self._chunk)
            sent += self._chunk
            await pacer.wait(sent / self.rate_hz)
            yield t0 + (sent - 1) / self.rate_hz, samples


# --------------------------------------------------------------------------- CSV replay


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    reason: str


def _parse_float(field: str) -> float | None:
    try:
        value = float(field)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_csv(text: str, *, timestamps: bool = True) -> tuple[bool, npt.NDArray[np.float64],
                                                             npt.NDArray[np.float64], list[BadRow]]:
    """Rows -> (has_ts, ts, values (n, channels), bad rows). A non-numeric first line is a header.

    A header whose first column is `ts`/`time`/`timestamp` means timestamped rows; any other header
    means value-only rows. Bad rows (wrong column count, non-numbers, time going backwards) are
    returned with their line numbers instead of stopping the replay.
    """
    ts: list[float] = []
    rows: list[list[float]] = []
    bad: list[BadRow] = []
    width: int | None = None
    first = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        values = [_parse_float(f) for f in fields]
        if first:
            first = False
            if any(v is None for v in values):
                timestamps = fields[0].lower() in ("ts", "t", "time", "timestamp")
                width = len(fields)
                continue
        if width is None:
            width = len(fields)
        if len(fields) != width:
            bad.append(BadRow(lineno, f"expected {width} columns, got {len(fields)}"))
            continue
        if any(v is None for v in values):
            col = next(i for i, v in enumerate(values) if v is None)
            bad.append(BadRow(lineno, f"column {col + 1}: {fields[col]!r} is not a finite number"))
            continue
        nums = [v for v in values if v is not None]
        if timestamps:
            if ts and nums[0] <= ts[-1]:
                bad.append(BadRow(lineno, f"timestamp {nums[0]} does not increase (previous {ts[-1]})"))
                continue
            ts.append(nums[0])
            rows.append(nums[1:])
        else:
            rows.append(nums)
    channels = (width or 1) - (1 if timestamps else 0)
    values_arr = np.array(rows, dtype=np.float64).reshape(len(rows), channels)
    return timestamps, np.array(ts, dtype=np.float64), values_arr, bad


class CsvSource:
    """Replays a CSV file (`ts,ax,ay,az` or value columns only), paced by its timestamps or a fixed rate.

    Emitted timestamps are wall-clock: the replay start plus the file's own time offsets, so a looped
    file keeps time increasing. The file is read once at construction so errors surface early.
    """

    def __init__(self, path: str | Path, *, rate_hz: float | None = None, loop: bool = False,
                 timestamps: bool = True, realtime: bool = True, chunk_s: float = CHUNK_S) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SensorError(str(self.path), f"cannot read CSV: {exc}") from exc
        has_ts, self._ts, self._values, self.bad_rows = parse_csv(text, timestamps=timestamps)
        if self.bad_rows:
            shown = "; ".join(f"line {b.line}: {b.reason}" for b in self.bad_rows[:5])
            more = f" (and {len(self.bad_rows) - 5} more)" if len(self.bad_rows) > 5 else ""
            log.warning("%s: skipping %d bad rows: %s%s", self.path, len(self.bad_rows), shown, more)
        if len(self._values) == 0:
            raise SensorError(str(self.path), "no valid data rows")
        if rate_hz is not None and rate_hz <= 0:
            raise SensorError(str(self.path), f"rate_hz must be > 0, got {rate_hz}")
        if rate_hz is None:
            if not has_ts:
                raise SensorError(str(self.path), "rows have no timestamp column: set a rate_hz")
            if len(self._ts) < 2:
                raise SensorError(str(self.path), "need two timestamped rows (or a rate_hz) to know the rate")
            rate_hz = float(1.0 / np.median(np.diff(self._ts)))
            # offsets from the first row; one extra nominal step between the end and a loop's restart
            self._offsets = self._ts - self._ts[0]
        else:
            self._offsets = np.arange(len(self._values)) / rate_hz
        self.rate_hz = float(rate_hz)
        self.channels = int(self._values.shape[1])
        self.loop = loop
        self.realtime = realtime
        self._chunk = max(1, round(self.rate_hz * chunk_s))
        self._period_s = float(self._offsets[-1]) + 1.0 / self.rate_hz

    async def stream(self) -> AsyncIterator[tuple[float, Samples]]:
        pacer = _Pacer(self.realtime)
        t0 = time.time()
        base = 0.0
        while True:
            for start in range(0, len(self._values), self._chunk):
                stop = min(start + self._chunk, len(self._values))
                offset = base + float(self._offsets[stop - 1])
                await pacer.wait(offset)
                yield t0 + offset, self._values[start:stop].astype(np.float32)
            if not self.loop:
                return
            base += self._period_s


# --------------------------------------------------------------------------- local MQTT topic


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_payload(payload: bytes | str, channels: int, now: float) -> tuple[float, Samples]:
    """One MQTT message -> (ts, samples (n, channels)); raises SensorPayloadError if malformed.

    Accepted: `1.5` (one channel), `[x, y, z]` (one sample; for one channel: n samples),
    `[[x, y, z], ...]`, or `{"ts": t, "values": <any of those>}`. Without `ts` the receive time is used.
    """
    def bad(reason: str) -> SensorPayloadError:
        return SensorPayloadError("mqtt", reason)

    try:
        doc = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # also: nested thousands deep, 4300+ digit integers
        raise bad(f"not JSON: {exc}") from exc
    ts = now
    if isinstance(doc, dict):
        if "values" not in doc:
            raise bad('object payload needs "values"')
        if "ts" in doc:
            try:
                ts = float(doc["ts"]) if _is_number(doc["ts"]) else math.nan
            except OverflowError:
                ts = math.nan
            if not math.isfinite(ts):
                raise bad('"ts" must be a finite number')
        doc = doc["values"]
    if _is_number(doc):
        rows: Sequence[Sequence[object]] = [[doc]]
    elif isinstance(doc, list) and doc and all(_is_number(x) for x in doc):
        rows = [doc] if len(doc) == channels else ([[x] for x in doc] if channels == 1 else [])
        if not rows:
            raise bad(f"a flat list must hold {channels} values, got {len(doc)}")
    elif isinstance(doc, list) and doc and all(isinstance(r, list) for r in doc):
        rows = doc
    else:
        raise bad("values must be a number, a list of numbers or a list of rows")
    if len(rows) > MQTT_MAX_SAMPLES:
        raise bad(f"more than {MQTT_MAX_SAMPLES} samples in one message")
    for i, row in enumerate(rows):
        if len(row) != channels or not all(_is_number(x) for x in row):
            raise bad(f"row {i} must hold {channels} numbers")
    try:
        arr = np.array(rows, dtype=np.float64)
    except (OverflowError, ValueError) as exc:  # an integer too large for a float
        raise bad(f"values must be finite numbers ({exc})") from exc
    if not np.all(np.isfinite(arr)):
        raise bad("values must be finite")
    return ts, arr.astype(np.float32)


class MqttSource:
    """Samples published by other local processes on one MQTT topic; malformed messages are counted."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 1883, topic: str = "sensors/vibration",
                 channels: int = 3, rate_hz: float = 1600.0, username: str | None = None,
                 password: str | None = None) -> None:
        if channels < 1 or rate_hz <= 0:
            raise SensorError("mqtt", f"channels must be >= 1 and rate_hz > 0 (got {channels}, {rate_hz})")
        self.host = host
        self.port = port
        self.topic = topic
        self.channels = channels
        self.rate_hz = float(rate_hz)
        self._username = username
        self._password = password
        self.received = 0
        self.malformed = 0
        self._sub = LocalSubscription(host, port, topic, username=username, password=password,
                                      label="sensor MQTT")

    @property
    def subscribed(self) -> asyncio.Event:
        """Set while subscribed: tests and callers wait on it."""
        return self._sub.subscribed

    @property
    def connects(self) -> int:
        return self._sub.connects

    async def stream(self) -> AsyncIterator[tuple[float, Samples]]:
        async for payload in self._sub.payloads():
            try:
                ts, samples = parse_payload(payload, self.channels, time.time())
            except SensorPayloadError as exc:
                self.malformed += 1
                level = logging.WARNING if self.malformed == 1 else logging.DEBUG
                log.log(level, "dropped malformed message on %s (%d so far): %s",
                        self.topic, self.malformed, exc.reason)
                continue
            self.received += 1
            yield ts, samples


# --------------------------------------------------------------------------- config


def make_source(cfg: SensorsConfig) -> SensorSource:
    """The source one `SensorsConfig` names (simulated, csv, mqtt, serial, modbus, iio); SensorError
    if unusable. Bus sources carry a `status` (see `source_status`); their modules load only here."""
    if cfg.source == "serial":
        from edgeagent.sensors.serial import SerialSource

        return SerialSource(cfg)
    if cfg.source == "modbus":
        from edgeagent.sensors.modbus import ModbusSource

        return ModbusSource(cfg)
    if cfg.source == "iio":
        from edgeagent.sensors.iio import IioSource

        return IioSource(cfg)
    if cfg.source == "simulated":
        if cfg.channels != VibrationSimulator.channels:
            raise SensorError("simulated", f"the simulator has 3 channels, not {cfg.channels}")
        sim = cfg.simulated
        src = SimulatedSource(cfg.rate_hz, sim.seed, rotation_hz=sim.rpm / 60.0,
                              base_temp_c=sim.temperature_c)
        if sim.fault != "none" and (sim.fault_start_s > 0 or sim.fault_duration_s > 0):
            src.schedule_fault(sim.fault, sim.fault_severity, sim.fault_start_s, sim.fault_duration_s)
        elif sim.fault != "none":
            src.set_fault(sim.fault, sim.fault_severity)
        return src
    if cfg.source == "csv":
        if not cfg.csv.path:
            raise SensorError("csv", "sensors.csv.path is empty")
        csv_src = CsvSource(cfg.csv.path, rate_hz=cfg.csv.rate_hz or None, loop=cfg.csv.loop,
                            timestamps=cfg.csv.timestamps)
        if csv_src.channels != cfg.channels:
            raise SensorError(cfg.csv.path, f"file has {csv_src.channels} value columns, "
                                            f"sensors.channels is {cfg.channels}")
        return csv_src
    return MqttSource(host=cfg.mqtt.host, port=cfg.mqtt.port, topic=cfg.mqtt.topic,
                      channels=cfg.channels, rate_hz=cfg.rate_hz)


def source_status(source: object) -> SourceStatus | None:
    """A bus source's state and latest values (None for simulated, csv and mqtt)."""
    from edgeagent.sensors.status import SourceStatus

    status = getattr(source, "status", None)
    return status if isinstance(status, SourceStatus) else None
