"""The bus sources against real peers on this machine: a pty serial device, pymodbus' own TCP and
RTU servers, sysfs-shaped IIO trees. Each: scaled values with units, a device that goes away is
reported once (state + event) and comes back without a restart, garbage is counted."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.core import config as cfgmod
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.sensors.sources import make_source, source_status
from edgeagent.sensors.status import SourceStatus
from tests.sensor_peers import LineFeeder, ModbusRtuPeer, ModbusTcpPeer, PtyDevice, iio_tree
from tests.util import async_wait_until

FAST_RETRY = {"retry_initial_s": 0.05, "retry_max_s": 0.2}
MODBUS_MAP = [
    {"name": "temperature_c", "address": 0, "type": "int16", "scale": 0.1, "unit": "°C"},
    {"name": "humidity_pct", "address": 1, "type": "uint16", "scale": 0.1, "unit": "%",
     "min": 0.0, "max": 100.0},
]


class Reader:
    """Runs a source's stream in a task, keeping what it yields and the events it reports."""

    def __init__(self, sensors: dict[str, Any]) -> None:
        self.cfg = cfgmod.build({"sensors": {**FAST_RETRY, **sensors}}, env={})
        self.source = make_source(self.cfg.sensors)
        status = source_status(self.source)
        assert status is not None
        self.status: SourceStatus = status
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.status.events = lambda *e: self.events.append(e)
        self.chunks: list[tuple[float, np.ndarray]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for ts, samples in self.source.stream():
            self.chunks.append((ts, samples))

    async def __aenter__(self) -> Reader:
        self._task = asyncio.create_task(self._run(), name="reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a crashed stream fails the test with its own traceback
        await cancel_and_wait(self._task, 10)

    @property
    def rows(self) -> int:
        return sum(len(s) for _, s in self.chunks)

    async def until(self, predicate: Callable[[], object], what: str, timeout_s: float = 20) -> None:
        await async_wait_until(predicate, timeout_s, message=what)
        assert self._task is not None and not self._task.done(), "the stream ended"

    def kinds(self, severity: str) -> list[str]:
        return [e[2] for e in self.events if e[0] == "sensor" and e[1] == severity]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- serial


def test_serial_csv_values_unplug_replug_garbage(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "ttyUSB-accel")

    def line(i: int) -> bytes:
        return b"0.01,-0.02,%.3f\n" % (0.98 + (i % 10) / 1000)

    async def main() -> None:
        sensors = {"source": "serial", "rate_hz": 1600.0, "units": {"ax": "g", "ay": "g", "az": "g"},
                   "limits": {"az": [-16.0, 16.0]}, "serial": {"device": str(dev.path), "timeout_s": 1.0}}
        with LineFeeder(dev, line) as feeder:
            async with Reader(sensors) as r:
                await r.until(lambda: r.rows >= 500, "serial rows")
                sec = r.status.section()
                assert sec["state"] == "ok" and sec["source"] == "serial"
                assert sec["channels"]["ax"] == {"value": 0.01, "unit": "g"}
                assert 0.98 <= sec["channels"]["az"]["value"] <= 0.99
                assert r.chunks[-1][1].shape[1] == 3 and r.chunks[-1][1].dtype == np.float32
                # garbage: wrong column count, words, binary noise, an out-of-range value
                feeder.extra += [b"1,2\n", b"hello,world,!\n", b"\xff\xfe\x00\n", b"0,0,99\n"]
                await r.until(lambda: r.status.malformed >= 3 and r.status.out_of_range >= 1, "garbage")
                rows = r.rows
                await r.until(lambda: r.rows > rows + 100, "rows after garbage")
                # unplug: the pty hangs up and its path goes away
                dev.unplug()
                await r.until(lambda: r.status.state == "down", "down after unplug")
                assert len(r.kinds("warning")) == 1 and r.status.disconnects == 1
                assert r.status.section()["channels"]["ax"]["value"] is None  # no stale values
                await asyncio.sleep(0.5)  # several retries: still one event
                assert len(r.kinds("warning")) == 1
                dev.replug()
                rows = r.rows
                await r.until(lambda: r.status.state == "ok" and r.rows > rows + 100, "resumed after replug")
                assert len(r.kinds("info")) == 1
    try:
        run(main())
    finally:
        dev.close()


def test_serial_kv_lines_and_select(tmp_path: Path) -> None:
    """key=value lines; `select` picks which channels (in which order) the model gets."""
    dev = PtyDevice(tmp_path / "ttyACM0")

    def line(i: int) -> bytes:
        return b"t=21.5 rh=40.0 ax=0.5 ay=0.25\n"

    async def main() -> None:
        sensors = {"source": "serial", "rate_hz": 100.0, "select": ["ay", "ax"],
                   "serial": {"device": str(dev.path), "format": "kv", "columns": ["t", "rh", "ax", "ay"]}}
        with LineFeeder(dev, line, rate_hz=200):
            async with Reader(sensors) as r:
                await r.until(lambda: r.rows >= 20, "kv rows")
                assert r.source.channels == 2
                assert r.chunks[-1][1][0].tolist() == [0.25, 0.5]
                assert r.status.section()["channels"]["t"]["value"] == 21.5
    try:
        run(main())
    finally:
        dev.close()


# --------------------------------------------------------------------------- modbus


async def _modbus_story(peer: ModbusTcpPeer | ModbusRtuPeer, modbus: dict[str, Any]) -> None:
    await peer.set_holding(0, [(-123) & 0xFFFF, 456])
    await peer.start()
    sensors = {"source": "modbus", "rate_hz": 20.0, "modbus": {**modbus, "registers": MODBUS_MAP}}
    try:
        async with Reader(sensors) as r:
            await r.until(lambda: r.rows >= 3, "modbus polls")
            sec = r.status.section()
            assert sec["state"] == "ok"
            assert sec["channels"]["temperature_c"] == {"value": pytest.approx(-12.3), "unit": "°C"}
            assert sec["channels"]["humidity_pct"] == {"value": pytest.approx(45.6), "unit": "%"}
            assert r.chunks[-1][1].tolist() == [[pytest.approx(-12.3), pytest.approx(45.6)]]
            # out of range (humidity 150 %): counted, sample dropped, polling goes on
            await peer.set_holding(1, [1500])
            await r.until(lambda: r.status.out_of_range >= 1, "out of range counted")
            await peer.set_holding(0, [612, 500])
            def temperature() -> object:
                return r.status.section()["channels"]["temperature_c"]["value"]
            await r.until(lambda: temperature() == pytest.approx(61.2), "new value")
            # the server goes away: one event, state down, retried
            await peer.stop()
            await r.until(lambda: r.status.state == "down", "down after the server stopped")
            await asyncio.sleep(0.5)
            assert len(r.kinds("warning")) == 1
            rows = r.rows
            await peer.start()
            await r.until(lambda: r.status.state == "ok" and r.rows > rows + 2, "back after restart")
            assert len(r.kinds("info")) == 1
    finally:
        await peer.stop()


def test_modbus_tcp_against_pymodbus_server() -> None:
    peer = ModbusTcpPeer()
    run(_modbus_story(peer, {"transport": "tcp", "port": peer.port, "timeout_s": 0.5}))


def test_modbus_rtu_against_pymodbus_server_over_a_pty_pair(tmp_path: Path) -> None:
    peer = ModbusRtuPeer(tmp_path, baud=9600)
    run(_modbus_story(peer, {"transport": "rtu", "device": str(peer.agent_path), "baud": 9600,
                             "timeout_s": 0.5}))


def test_modbus_exception_response_is_counted_not_fatal() -> None:
    """A map that reads past the device's registers gets exception responses: counted, no crash."""
    peer = ModbusTcpPeer()

    async def main() -> None:
        await peer.start()
        sensors = {"source": "modbus", "rate_hz": 20.0, "modbus": {
            "port": peer.port, "timeout_s": 0.5, "registers": [{"name": "x_v", "address": 500}]}}
        try:
            async with Reader(sensors) as r:
                await r.until(lambda: r.status.malformed >= 3, "exception responses counted")
                assert r.rows == 0
        finally:
            await peer.stop()
    run(main())


# --------------------------------------------------------------------------- iio


def test_iio_sysfs_scaled_gone_and_back(tmp_path: Path) -> None:
    root = tmp_path / "iio"
    dev = iio_tree(root, raw=(10, -20, 256))

    async def main() -> None:
        sensors = {"source": "iio", "rate_hz": 200.0, "iio": {"root": str(root), "device": "adxl345"}}
        async with Reader(sensors) as r:
            await r.until(lambda: r.rows >= 20, "iio rows")
            ch = r.status.section()["channels"]
            assert ch["accel_x"] == {"value": pytest.approx(0.383), "unit": "m/s^2"}
            assert ch["accel_z"]["value"] == pytest.approx(256 * 0.0383)
            (dev / "in_accel_x_raw").write_text("garbage\n")
            await r.until(lambda: r.status.malformed >= 1, "unreadable raw counted")
            (dev / "in_accel_x_raw").write_text("11\n")
            shutil.rmtree(dev)
            await r.until(lambda: r.status.state == "down", "down after the device went away")
            assert len(r.kinds("warning")) == 1
            iio_tree(root, raw=(1, 2, 3))
            rows = r.rows
            await r.until(lambda: r.status.state == "ok" and r.rows > rows + 10, "back")
            assert r.status.section()["channels"]["accel_y"]["value"] == pytest.approx(2 * 0.0383)
    run(main())


def test_iio_accel_in_g() -> None:
    from edgeagent.sensors.iio import IioSource
    cfg = cfgmod.build({"sensors": {"source": "iio", "iio": {"accel_unit": "g"}}}, env={})
    src = IioSource(cfg.sensors)
    assert [c.unit for c in src.status.channels] == ["g", "g", "g"]


def _records(values: list[tuple[int, int, int]], ts0: int = 0) -> bytes:
    """ADXL345-like scans: three le:s13/16 then an s64 timestamp at offset 8 (record of 16 bytes)."""
    out = b""
    for i, (x, y, z) in enumerate(values):
        out += struct.pack("<hhh2xq", x, y, z, ts0 + i)
    return out


def test_iio_buffered_char_device(tmp_path: Path) -> None:
    root, devdir = tmp_path / "iio", tmp_path / "dev"
    dev = iio_tree(root, buffered=True)
    devdir.mkdir()
    fifo = devdir / "iio:device0"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # the "kernel" side: keeps the FIFO open and writes scans

    async def main() -> None:
        sensors = {"source": "iio", "rate_hz": 400.0, "iio": {"root": str(root), "dev_dir": str(devdir),
                                                            "mode": "auto", "accel_unit": "g"}}
        async with Reader(sensors) as r:
            await r.until(lambda: r.status.state == "ok", "opened")
            assert r.source.mode == "buffered"  # type: ignore[attr-defined]
            assert (dev / "scan_elements" / "in_accel_x_en").read_text().strip() == "1"
            assert (dev / "buffer" / "enable").read_text().strip() == "1"
            # a record split across two writes is reassembled; negative 13-bit values sign-extend
            data = _records([(26, -26, 256)] * 50)
            os.write(fd, data[:100])
            os.write(fd, data[100:])
            await r.until(lambda: r.rows >= 50, "buffered rows")
            first = r.chunks[0][1][0]
            g = 0.0383 / 9.80665
            assert first.tolist() == pytest.approx([26 * g, -26 * g, 256 * g], rel=1e-5)
        assert (dev / "buffer" / "enable").read_text().strip() == "0"  # closed: buffer off again
    try:
        run(main())
    finally:
        os.close(fd)
