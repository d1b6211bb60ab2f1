"""Line-oriented devices on a serial port (USB-serial, UART): one sample per line, CSV or key=value.

Built on pyserial with the reads in a worker thread (`asyncio.to_thread`, one call per ~20 ms
chunk): parsing a 1.6 kHz line stream happens off the event loop and the loop wakes 50 times a
second instead of once per line; pyserial is pure Python and pymodbus' RTU transport needs it
anyway, so the `serial` extra adds nothing else. Timestamps are taken when a chunk's bytes arrive.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeagent.core.errors import SensorError
from edgeagent.sensors.status import SourceStatus, channels_from

if TYPE_CHECKING:
    from edgeagent.core.config_schema import SensorsConfig
    from edgeagent.sensors.sources import Samples

CHUNK_S = 0.02
MAX_LINE = 4096  # bytes without a newline: a garbage stream, not a line
_KV_SPLIT = re.compile(r"[\s,;]+")


def parse_line(line: str, fmt: str, columns: Sequence[str], sep: str) -> list[float] | str:
    """One line -> values in `columns` order, or the reason it is malformed."""
    if fmt == "csv":
        fields = line.split(sep)
        if len(fields) != len(columns):
            return f"expected {len(columns)} columns, got {len(fields)}: {line[:60]!r}"
        try:
            return [float(f) for f in fields]
        except ValueError:
            return f"not a number in {line[:60]!r}"
    pairs: dict[str, str] = {}
    for item in _KV_SPLIT.split(line.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            return f"expected key=value pairs: {line[:60]!r}"
        pairs[key.strip()] = value
    try:
        return [float(pairs[c]) for c in columns]
    except KeyError as exc:
        return f"missing key {exc.args[0]!r} in {line[:60]!r}"
    except ValueError:
        return f"not a number in {line[:60]!r}"


class LineReader:
    """Reads what the port holds every ~chunk_s (in a worker thread) and parses complete lines."""

    def __init__(self, port: Any, fmt: str, columns: Sequence[str], sep: str,
                 chunk_s: float = CHUNK_S) -> None:
        self.port = port
        self.fmt = fmt
        self.columns = tuple(columns)
        self.sep = sep
        self.chunk_s = chunk_s
        self._buf = b""

    def read_chunk(self) -> tuple[float, list[list[float]], list[str]]:
        """Blocks up to ~chunk_s; (arrival ts, rows, reasons of malformed lines). Raises on a lost port."""
        t0 = time.monotonic()
        data = self.port.read(1)  # waits up to the port timeout for the first byte
        if data:
            rest = self.chunk_s - (time.monotonic() - t0)
            if rest > 0:
                time.sleep(rest)  # let a chunk's worth of lines arrive: one loop wake-up per chunk
            waiting = self.port.in_waiting
            if waiting:
                data += self.port.read(waiting)
        ts = time.time()
        rows: list[list[float]] = []
        bad: list[str] = []
        if not data:
            return ts, rows, bad
        buf = self._buf + data
        *lines, tail = buf.split(b"\n")
        if len(tail) > MAX_LINE:
            bad.append(f"{len(tail)} bytes without a newline")
            tail = b""
        self._buf = tail
        for raw in lines:
            try:
                line = raw.decode("ascii").strip()
            except UnicodeDecodeError:
                bad.append(f"not ASCII: {raw[:30]!r}")
                continue
            if not line or line.startswith("#"):
                continue
            parsed = parse_line(line, self.fmt, self.columns, self.sep)
            if isinstance(parsed, str):
                bad.append(parsed)
            else:
                rows.append(parsed)
        return ts, rows, bad


def _import_serial() -> Any:
    try:
        import serial
    except ImportError as exc:
        raise SensorError("serial", "pyserial is not installed: install the extra "
                                    "(pip install 'edgeagent[serial]')") from exc
    return serial


class SerialSource:
    """A `SensorSource` over a serial line device; survives unplugging (reported, retried with backoff)."""

    def __init__(self, cfg: SensorsConfig, *, chunk_s: float = CHUNK_S) -> None:
        self._serial = _import_serial()
        s = cfg.serial
        self.cfg = s
        self.rate_hz = float(cfg.rate_hz)
        self.chunk_s = chunk_s
        self.status = SourceStatus("serial", s.device, channels_from(cfg, s.columns, {}), cfg.select,
                                   retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s)
        self.channels = len(self.status.select)

    def _open(self) -> Any:
        s = self.cfg
        stopbits = s.stopbits if s.stopbits == 1.5 else int(s.stopbits)
        return self._serial.Serial(s.device, s.baud, bytesize=s.bytesize, parity=s.parity, stopbits=stopbits,
                                   timeout=self.chunk_s, exclusive=True)

    async def stream(self) -> AsyncIterator[tuple[float, Samples]]:
        error_types = (OSError, self._serial.SerialException)
        while True:
            try:
                port = await asyncio.to_thread(self._open)
            except error_types as exc:
                await asyncio.sleep(self.status.down(f"cannot open: {exc}"))
                continue
            self.status.up()
            reader = LineReader(port, self.cfg.format, self.cfg.columns, self.cfg.separator, self.chunk_s)
            reason = ""
            try:
                last_line = time.monotonic()
                while True:
                    ts, rows, bad = await asyncio.to_thread(reader.read_chunk)
                    for why in bad:
                        self.status.bad_frame(why)
                    if not rows:
                        if time.monotonic() - last_line > self.cfg.timeout_s:
                            reason = f"no complete line for {self.cfg.timeout_s:g} s"
                            break
                        continue
                    last_line = time.monotonic()
                    out = self.status.accept(ts, np.array(rows, np.float64))
                    if out is not None:
                        yield ts, out
            except error_types as exc:
                reason = f"read failed: {exc}"
            finally:
                port.cancel_read()  # a worker still blocked in read() returns at once
                await asyncio.to_thread(port.close)
            await asyncio.sleep(self.status.down(reason))
