"""Real peers for the bus sources, all on this machine: a pty "USB-serial device" the test writes to,
a null-modem between two ptys (Modbus RTU), pymodbus' own Modbus server, and a sysfs-shaped IIO tree."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
import tty
from pathlib import Path
from typing import Any

from tests.util import free_port


class PtyDevice:
    """A serial device the test drives: the agent opens `path` (a symlink, like /dev/serial/by-id/...),
    the test writes to the master side. `unplug()` hangs it up and removes the path; `replug()` makes
    a new pty behind the same path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.master = -1
        self.replug()

    def replug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        self.master = master
        name = os.ttyname(slave)
        os.close(slave)  # the agent opens it by name
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.symlink_to(name)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def close(self) -> None:
        self.unplug()


class LineFeeder:
    """Writes CSV lines to a PtyDevice from a thread at roughly `rate_hz` (in bursts, like a UART)."""

    def __init__(self, dev: PtyDevice, make_line: Any, rate_hz: float = 1600.0) -> None:
        self.dev = dev
        self.make_line = make_line
        self.rate_hz = rate_hz
        self.sent = 0
        self.extra: list[bytes] = []  # injected raw bytes (garbage), written at the next burst
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LineFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        burst = max(1, int(self.rate_hz / 100))
        while not self._stop.wait(0.01):
            if self.dev.master < 0:
                continue
            chunk = b"".join(self.make_line(self.sent + i) for i in range(burst))
            while self.extra:
                chunk += self.extra.pop(0)
            try:
                self.dev.write(chunk)
                self.sent += burst
            except OSError:
                continue  # unplugged between the check and the write


class NullModem:
    """Two ptys joined back to back (what two USB-RS485 adapters on one bus look like): whatever
    one side writes the other reads. `a` and `b` are symlinks to the two device paths."""

    def __init__(self, a: Path, b: Path) -> None:
        self.a, self.b = a, b
        self._fds: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._fds = []
        for link in (self.a, self.b):
            master, slave = os.openpty()
            tty.setraw(slave)
            tty.setraw(master)
            name = os.ttyname(slave)
            # the slave stays open here too (never read): a pty whose slave was closed hangs up its
            # master (EIO), and bytes pumped in that moment would be lost
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(name)
            self._fds += [master, slave]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(self._fds[0], self._fds[2], self._stop),
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _pump(x: int, y: int, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ready, _, _ = select.select([x, y], [], [], 0.05)
                for fd in ready:
                    data = os.read(fd, 4096)
                    os.write(y if fd == x else x, data)
            except OSError:
                continue  # a side not opened yet (EIO until someone opens the slave)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()


def modbus_device(unit: int = 1) -> Any:
    """A pymodbus simulated device: 100 registers from address 0 (read as holding or input)."""
    from pymodbus.simulator import DataType, SimData, SimDevice

    return SimDevice(unit, simdata=[SimData(0, count=100, values=0, datatype=DataType.REGISTERS)])


class _ModbusPeer:
    """What both peers share: registers the test sets (kept across a stop/start, like a device's own
    values across a reboot) and a server task in the test's event loop."""

    _server: Any = None
    _task: asyncio.Task[None] | None = None
    values: dict[int, int]

    async def set_holding(self, address: int, values: list[int], unit: int = 1) -> None:
        for i, v in enumerate(values):
            self.values[address + i] = v
        if self._server is not None:
            await self._server.async_setValues(unit, 16, address, values)

    async def _serve(self, server: Any) -> None:
        """Returns once the server listens (its port is open)."""
        self._server = server
        await server.serve_forever(background=True)
        for addr, v in sorted(self.values.items()):
            await server.async_setValues(1, 16, addr, [v])

    async def _stop_server(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._server = self._task = None


class ModbusTcpPeer(_ModbusPeer):
    """pymodbus' own TCP server on a free loopback port, run in the test's event loop; the registers
    survive a stop/start (a device that reboots keeps its map)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.values = {}

    async def start(self) -> None:
        """Serve, and return once the port accepts connections."""
        from pymodbus.server import ModbusTcpServer

        await self._serve(ModbusTcpServer(modbus_device(), address=("127.0.0.1", self.port)))
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return

    async def stop(self) -> None:
        await self._stop_server()


class ModbusRtuPeer(_ModbusPeer):
    """pymodbus' serial (RTU) server on one end of a NullModem; the agent opens the other end."""

    def __init__(self, workdir: Path, baud: int = 9600) -> None:
        self.modem = NullModem(workdir / "rtu-server", workdir / "rtu-agent")
        self.agent_path = self.modem.b
        self.baud = baud
        self.values = {}

    async def start(self) -> None:
        from pymodbus.server import ModbusSerialServer

        self.modem.start()
        await self._serve(ModbusSerialServer(modbus_device(), port=str(self.modem.a), baudrate=self.baud))

    async def stop(self) -> None:
        await self._stop_server()
        self.modem.stop()


def iio_tree(root: Path, name: str = "adxl345", scale: str = "0.038300",
             raw: tuple[int, int, int] = (10, -20, 256), buffered: bool = False, index: int = 0) -> Path:
    """A sysfs-shaped IIO device like the ADXL345 driver makes (shared in_accel_scale)."""
    dev = root / f"iio:device{index}"
    dev.mkdir(parents=True)
    (dev / "name").write_text(name + "\n")
    (dev / "in_accel_scale").write_text(scale + "\n")
    for axis, value in zip("xyz", raw, strict=True):
        (dev / f"in_accel_{axis}_raw").write_text(f"{value}\n")
    if buffered:
        scan = dev / "scan_elements"
        scan.mkdir()
        for i, axis in enumerate("xyz"):
            (scan / f"in_accel_{axis}_en").write_text("0\n")
            (scan / f"in_accel_{axis}_index").write_text(f"{i}\n")
            (scan / f"in_accel_{axis}_type").write_text("le:s13/16>>0\n")
        (scan / "in_timestamp_en").write_text("1\n")
        (scan / "in_timestamp_index").write_text("3\n")
        (scan / "in_timestamp_type").write_text("le:s64/64>>0\n")
        (dev / "buffer").mkdir()
        (dev / "buffer" / "enable").write_text("0\n")
    return dev
