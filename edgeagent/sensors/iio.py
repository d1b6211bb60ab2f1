"""Linux Industrial I/O devices (ADXL345 and other accelerometers, ADCs, IMUs) without a library.

Two modes. `sysfs`: every sample reads `in_<channel>_raw` (files kept open, `pread`), paced in a
worker thread; simple, works with every driver, fine up to a few hundred Hz. `buffered`: the
driver's FIFO through `/dev/iio:deviceN`, laid out by `scan_elements` (`*_en`, `*_index`,
`*_type` such as `le:s13/16>>0`); the kernel timestamps and buffers, one read per ~20 ms chunk.
Values are `(raw + offset) x scale` with `in_<channel>_scale` or the shared `in_<type>_scale`
(`in_accel_scale`), in the IIO ABI's units (m/s^2 for acceleration).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edgeagent.core.errors import SensorError
from edgeagent.sensors.status import SourceStatus, channels_from

if TYPE_CHECKING:
    from edgeagent.core.config_schema import SensorsConfig
    from edgeagent.sensors.sources import Samples

CHUNK_S = 0.02
STANDARD_GRAVITY = 9.80665  # m/s^2 per g
# the IIO sysfs ABI's units after (raw + offset) x scale
UNITS = {"accel": "m/s^2", "anglvel": "rad/s", "magn": "gauss", "voltage": "mV", "current": "mA",
         "temp": "m°C", "pressure": "kPa", "humidityrelative": "m%RH", "illuminance": "lux",
         "incli": "deg", "rot": "deg"}
TYPE_RE = re.compile(r"^(be|le):([su])(\d+)/(\d+)(?:X(\d+))?>>(\d+)$")


def channel_type(channel: str) -> str:
    """`accel_x` -> `accel`, `voltage0` -> `voltage`: the prefix shared attributes use."""
    m = re.match(r"[a-z]+", channel)
    return m.group(0) if m else channel


@dataclass(frozen=True, slots=True)
class ScanType:
    """One element of a buffered scan, from `in_accel_x_type` = `le:s13/16>>0`."""

    big_endian: bool
    signed: bool
    realbits: int
    storagebits: int
    shift: int

    @classmethod
    def parse(cls, text: str) -> ScanType:
        m = TYPE_RE.match(text.strip())
        if not m or (m.group(5) and m.group(5) != "1"):
            raise ValueError(f"unsupported scan element type {text.strip()!r}")
        real, storage = int(m.group(3)), int(m.group(4))
        if storage not in (8, 16, 32, 64) or not 0 < real <= storage:
            raise ValueError(f"unsupported scan element type {text.strip()!r}")
        return cls(m.group(1) == "be", m.group(2) == "s", real, storage, int(m.group(6)))


def scan_layout(elements: Sequence[tuple[int, str, ScanType]]) -> tuple[int, dict[str, int]]:
    """(record size, byte offset per element) for the enabled elements as (index, name, type):
    each element is aligned to its own size, the record to its largest element (the kernel's rule)."""
    offsets: dict[str, int] = {}
    pos = largest = 0
    for _, name, st in sorted(elements):
        size = st.storagebits // 8
        pos = (pos + size - 1) // size * size
        offsets[name] = pos
        pos += size
        largest = max(largest, size)
    return (pos + largest - 1) // largest * largest if largest else 0, offsets


def decode_scan(data: bytes, record: int, offset: int, st: ScanType) -> npt.NDArray[np.int64]:
    """Raw integer values of one element from `n` whole records."""
    size = st.storagebits // 8
    dt = np.dtype(f"{'>' if st.big_endian else '<'}u{size}")
    n = len(data) // record
    rows = np.frombuffer(data, np.uint8, n * record).reshape(n, record)[:, offset:offset + size]
    raw = np.ascontiguousarray(rows).view(dt).reshape(n).astype(np.uint64)
    raw = (raw >> np.uint64(st.shift)) & np.uint64((1 << st.realbits) - 1)
    vals = raw.astype(np.int64)
    if st.signed:
        sign = 1 << (st.realbits - 1)
        vals = np.where(vals & sign, vals - (1 << st.realbits), vals)
    return vals


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii").strip()


def find_device(root: Path, wanted: str) -> Path:
    """The device directory whose `name` (or directory name) is `wanted`; the only one if empty."""
    try:
        devs = sorted(p for p in root.iterdir() if p.name.startswith("iio:device"))
    except OSError as exc:
        raise SensorError("iio", f"cannot list {root}: {exc}") from exc
    names = {}
    for d in devs:
        try:
            names[d] = _read_text(d / "name")
        except OSError:
            names[d] = ""
    if not wanted:
        if len(devs) == 1:
            return devs[0]
        raise SensorError("iio", f"{len(devs)} devices under {root} ({', '.join(names.values()) or 'none'}): "
                                 "set sensors.iio.device")
    for d in devs:
        if wanted in (d.name, names[d]):
            return d
    found = ", ".join(names.values()) or "none"
    raise SensorError("iio", f"no device {wanted!r} under {root} (found: {found})")


class IioSource:
    """A `SensorSource` over one IIO device; a device that disappears is reported and looked for again."""

    def __init__(self, cfg: SensorsConfig, *, chunk_s: float = CHUNK_S) -> None:
        i = cfg.iio
        self.cfg = i
        self.root = Path(i.root)
        self.rate_hz = float(cfg.rate_hz)
        self.chunk_s = chunk_s
        units = {c: UNITS.get(channel_type(c), "") for c in i.channels}
        # m/s^2 -> g on acceleration channels when asked (the shipped model was trained in g)
        self.gain = np.array([1.0 / STANDARD_GRAVITY if channel_type(c) == "accel" and i.accel_unit == "g"
                              else 1.0 for c in i.channels], np.float64)
        units.update({c: "g" for c in i.channels if channel_type(c) == "accel" and i.accel_unit == "g"})
        target = f"{i.device or 'device'} under {i.root}"
        self.status = SourceStatus("iio", target, channels_from(cfg, i.channels, units), cfg.select,
                                   retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s)
        self.channels = len(self.status.select)
        self.mode = ""  # what the last open chose

    def _attr(self, dev: Path, channel: str, attr: str, default: float) -> float:
        for name in (f"in_{channel}_{attr}", f"in_{channel_type(channel)}_{attr}"):
            p = dev / name
            if p.exists():
                return float(_read_text(p))
        return default

    def _calibration(self, dev: Path) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        scale = [self._attr(dev, c, "scale", 1.0) for c in self.cfg.channels]
        offset = [self._attr(dev, c, "offset", 0.0) for c in self.cfg.channels]
        return np.array(scale, np.float64) * self.gain, np.array(offset, np.float64)

    def _buffered(self, dev: Path) -> bool:
        if self.cfg.mode == "sysfs":
            return False
        has = (dev / "scan_elements").is_dir() and (Path(self.cfg.dev_dir) / dev.name).exists()
        if self.cfg.mode == "buffered" and not has:
            raise SensorError("iio", f"{dev} has no scan_elements or {self.cfg.dev_dir}/{dev.name}: "
                                     "the driver has no buffer (use mode = \"sysfs\")")
        return has

    async def stream(self) -> AsyncIterator[tuple[float, Samples]]:
        while True:
            try:
                dev = await asyncio.to_thread(find_device, self.root, self.cfg.device)
                buffered = self._buffered(dev)
                reader: _SysfsReader | _BufferReader = await asyncio.to_thread(
                    _BufferReader if buffered else _SysfsReader, self, dev)
            except (SensorError, OSError, ValueError) as exc:
                await asyncio.sleep(self.status.down(str(exc)))
                continue
            self.mode = "buffered" if buffered else "sysfs"
            self.status.up()
            reason = ""
            try:
                while True:
                    ts, rows, bad = await asyncio.to_thread(reader.read_chunk)
                    if bad:
                        self.status.bad_frame(bad)
                    out = self.status.accept(ts, rows)
                    if out is not None:
                        yield ts, out
            except (OSError, ValueError, EOFError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                await asyncio.to_thread(reader.close)
            await asyncio.sleep(self.status.down(reason))


class _SysfsReader:
    """`pread` of each `in_<channel>_raw`, paced to rate_hz in the worker thread."""

    def __init__(self, src: IioSource, dev: Path) -> None:
        self.dev = dev
        self.scale, self.offset = src._calibration(dev)
        self.period = 1.0 / src.rate_hz
        self.per_chunk = max(1, round(src.rate_hz * src.chunk_s))
        self.fds = [os.open(dev / f"in_{c}_raw", os.O_RDONLY) for c in src.cfg.channels]
        self._next = time.monotonic()

    def read_chunk(self) -> tuple[float, npt.NDArray[np.float64], str]:
        if not self.dev.is_dir():  # an open fd on a removed file would read on forever
            raise FileNotFoundError(f"{self.dev} is gone")
        rows: list[list[float]] = []
        bad = ""
        fds, period, nxt = self.fds, self.period, self._next
        mono, pread, append = time.monotonic, os.pread, rows.append  # the hot loop: locals only
        for _ in range(self.per_chunk):
            now = mono()
            if nxt > now:
                time.sleep(nxt - now)
            elif now - nxt > period:
                nxt = now  # fell behind (a busy board): carry on from now, no burst to catch up
            nxt += period
            try:
                append([float(pread(fd, 32, 0)) for fd in fds])
            except ValueError as exc:
                bad = f"unreadable raw value: {exc}"
        self._next = nxt
        raw = np.array(rows, np.float64).reshape(len(rows), len(fds))
        return time.time(), (raw + self.offset) * self.scale, bad

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class _BufferReader:
    """The kernel FIFO of a buffered IIO device: enable the channels and the buffer, read records."""

    def __init__(self, src: IioSource, dev: Path) -> None:
        self.dev = dev
        self.scale, self.offset = src._calibration(dev)
        scan = dev / "scan_elements"
        for c in src.cfg.channels:
            _ensure(scan / f"in_{c}_en", "1")
        elements = []
        for en in sorted(scan.glob("*_en")):
            if _read_text(en) != "1":
                continue
            name = en.name[:-3]
            elements.append((int(_read_text(scan / f"{name}_index")), name,
                             ScanType.parse(_read_text(scan / f"{name}_type"))))
        self.record, offsets = scan_layout(elements)
        types = {name: st for _, name, st in elements}
        self.cols = [(offsets[f"in_{c}"], types[f"in_{c}"]) for c in src.cfg.channels]
        _ensure(dev / "buffer" / "enable", "1")
        self.fd = os.open(Path(src.cfg.dev_dir) / dev.name, os.O_RDONLY | os.O_NONBLOCK)
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)
        self.timeout_ms = max(1, round(src.chunk_s * 1000))
        self.max_bytes = self.record * max(64, round(src.rate_hz * src.chunk_s * 4))
        self._buf = b""

    def read_chunk(self) -> tuple[float, npt.NDArray[np.float64], str]:
        empty = np.empty((0, len(self.cols)), np.float64)
        if not self.poll.poll(self.timeout_ms):
            if not self.dev.is_dir():
                raise FileNotFoundError(f"{self.dev} is gone")
            return time.time(), empty, ""
        data = os.read(self.fd, self.max_bytes)
        ts = time.time()
        if not data:
            raise EOFError(f"{self.dev.name}: the buffer was closed")
        data = self._buf + data
        usable = len(data) // self.record * self.record
        self._buf = data[usable:]
        if not usable:
            return ts, empty, ""
        raw = np.stack([decode_scan(data[:usable], self.record, off, st) for off, st in self.cols], axis=1)
        return ts, (raw + self.offset) * self.scale, ""

    def close(self) -> None:
        os.close(self.fd)
        try:
            (self.dev / "buffer" / "enable").write_text("0", encoding="ascii")
        except OSError:
            pass  # the device is gone, or the buffer is managed outside (read-only /sys)


def _ensure(path: Path, value: str) -> None:
    """Write a sysfs attribute unless it already holds `value` (a sandbox may mount /sys read-only
    and leave the setup to a udev rule or a boot unit)."""
    if _read_text(path) == value:
        return
    try:
        path.write_text(value, encoding="ascii")
    except OSError as exc:
        raise SensorError("iio", f"cannot write {value} to {path}: {exc} (set it up at boot, see "
                                 "docs/sensors.md)") from exc
