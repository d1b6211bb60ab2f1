"""Line-oriented devices on a serial port (USB-serial, UART): one sample per line, CSV or key=value.

Built on pyserial with the reads in a worker thread (`asyncio.to_thread`, one call per 50 ms
chunk): parsing a 1.6 kHz line stream happens off the event loop and the loop wakes 20 times a
second instead of once per line (each hand-over costs a few hundred microseconds of CPU, so the
chunk is what keeps the source within 1.5x of a bare pyserial loop: scripts/bench sensors);
pyserial is pure Python and pymodbus' RTU transport needs it anyway, so the `serial` extra adds
nothing else. Timestamps are taken when a chunk's bytes arrive.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import select
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeagent.core.errors import SensorError
from edgeagent.sensors.status import SourceStatus, channels_from

if TYPE_CHECKING:
    from edgeagent.core.config_schema import SensorsConfig
    from edgeagent.sensors.sources import Samples

CHUNK_S = 0.05  # 80 lines at 1.6 kHz per hand-over; adds at most 50 ms before a window is cut
MAX_LINE = 4096  # bytes without a newline: a garbage stream, not a line
READ_MAX = 65536
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
        self._lock = threading.Lock()  # close() waits for a read in flight (its fd must stay ours)

    def close(self) -> None:
        with self._lock:
            self.port.close()

    def read_chunk(self) -> tuple[float, list[list[float]], list[str]]:
        """Blocks up to ~chunk_s; (arrival ts, rows, reasons of malformed lines). Raises on a lost port.

        pyserial opened and configured the port; the reads go straight to its fd (pyserial's read()
        costs ~60 us of CPU per call in timeouts and selects, which a 1.6 kHz stream feels)."""
        with self._lock:
            fd, parts = self.port.fd, []
            deadline = time.monotonic() + self.chunk_s
            # gather what arrives for one chunk here, so the event loop wakes once per chunk
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([fd], [], [], left)[0]:
                    break
                part = os.read(fd, READ_MAX)
                if not part:  # readable but empty: the other end hung up (USB unplugged)
                    raise OSError(errno.EIO, "device disconnected")
                parts.append(part)
            data = b"".join(parts)
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
        csv, sep, width, append = self.fmt == "csv", self.sep.encode(), len(self.columns), rows.append
        for raw in lines:
            if csv:  # the fast path: float() takes bytes and ignores the spaces and '\r' around them
                fields = raw.split(sep)
                if len(fields) == width:
                    try:
                        append([float(f) for f in fields])
                        continue
                    except ValueError:
                        pass
            self._slow_line(raw, rows, bad)
        return ts, rows, bad

    def _slow_line(self, raw: bytes, rows: list[list[float]], bad: list[str]) -> None:
        """A key=value line, or a CSV line the fast path refused: a comment, a blank or garbage."""
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            bad.append(f"not ASCII: {raw[:30]!r}")
            return
        if not line or line.startswith("#"):
            return
        parsed = parse_line(line, self.fmt, self.columns, self.sep)
        if isinstance(parsed, str):
            bad.append(parsed)
        else:
            rows.append(parsed)


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
                await asyncio.to_thread(reader.close)  # after a read in flight (<= chunk_s)
            await asyncio.sleep(self.status.down(reason))
