"""Modbus TCP and RTU (RS-485) through pymodbus' asyncio client: a register map, polled at `rate_hz`.

Each channel names its table (holding/input), address, type (int16, uint16, int32, uint32,
float32; 32-bit types with a word order), scale, offset and unit. Neighbouring registers of one
table are read in one request (at most 125 registers, gaps up to 8), so a typical map costs one
round trip per poll. A timeout or a lost connection closes the client, reports the source down and
reconnects with backoff; an exception response (illegal address...) is counted as a bad frame.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeagent.core.errors import SensorError
from edgeagent.sensors.status import SourceStatus, channels_from

if TYPE_CHECKING:
    from edgeagent.core.config_schema import ModbusRegisterConfig, SensorsConfig
    from edgeagent.sensors.sources import Samples

WORDS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_FORMAT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
MAX_READ = 125  # registers per request (the protocol's limit)
MAX_GAP = 8  # unused registers worth reading to save a round trip


def decode(words: Sequence[int], type_: str, word_order: str = "big") -> float:
    """Registers (16-bit words, big-endian bytes as Modbus sends them) -> the typed value."""
    ws = list(words) if word_order == "big" else list(reversed(words))
    raw = b"".join(w.to_bytes(2, "big") for w in ws)
    return float(struct.unpack(_FORMAT[type_], raw)[0])


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: `count` registers of `table` from `start`; `members` are (channel, offset)."""

    table: str
    start: int
    count: int
    members: tuple[tuple[int, int], ...]


def plan_reads(registers: Sequence[ModbusRegisterConfig]) -> list[Block]:
    """Group the map into as few requests as the protocol allows (pure: tested without a server)."""
    blocks: list[Block] = []
    for table in ("holding", "input"):
        regs = sorted((r.address, i) for i, r in enumerate(registers) if r.table == table)
        cur: list[tuple[int, int]] = []
        start = end = 0
        for addr, i in regs:
            width = WORDS[registers[i].type]
            if cur and addr - end <= MAX_GAP and addr + width - start <= MAX_READ:
                cur.append((i, addr - start))
                end = max(end, addr + width)
                continue
            if cur:
                blocks.append(Block(table, start, end - start, tuple(cur)))
            cur, start, end = [(i, 0)], addr, addr + width
        if cur:
            blocks.append(Block(table, start, end - start, tuple(cur)))
    return blocks


class ModbusSource:
    """A `SensorSource` polling one Modbus unit; survives the server going away."""

    def __init__(self, cfg: SensorsConfig) -> None:
        try:
            from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
            from pymodbus.exceptions import ModbusException
        except ImportError as exc:
            raise SensorError("modbus", "pymodbus is not installed: install the extra "
                                        "(pip install 'edgeagent[modbus]')") from exc
        m = cfg.modbus
        if not m.registers:
            raise SensorError("modbus", "sensors.modbus.registers is empty")
        self.cfg = m
        self.rate_hz = float(cfg.rate_hz)
        self._tcp, self._rtu, self._errors = AsyncModbusTcpClient, AsyncModbusSerialClient, ModbusException
        target = f"{m.host}:{m.port}" if m.transport == "tcp" else m.device
        units = {r.name: r.unit for r in m.registers}
        bounds = {r.name: (r.min, r.max) for r in m.registers}
        self.status = SourceStatus("modbus", f"{target} unit {m.unit_id}",
                                   channels_from(cfg, [r.name for r in m.registers], units, bounds),
                                   cfg.select, retry_initial_s=cfg.retry_initial_s,
                                   retry_max_s=cfg.retry_max_s)
        self.channels = len(self.status.select)
        self.blocks = plan_reads(m.registers)
        # pymodbus logs every failed connect and timeout at ERROR; the status reports those once
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    def _client(self) -> Any:
        m = self.cfg
        if m.transport == "tcp":
            return self._tcp(m.host, port=m.port, timeout=m.timeout_s, retries=0, reconnect_delay=0)
        stopbits = int(m.stopbits) if m.stopbits != 1.5 else 1
        return self._rtu(m.device, baudrate=m.baud, bytesize=m.bytesize, parity=m.parity,
                         stopbits=stopbits, timeout=m.timeout_s, retries=0, reconnect_delay=0)

    async def poll(self, client: Any) -> list[float] | None:
        """One value per channel (scaled), or None after an exception response (counted)."""
        m = self.cfg
        values = [0.0] * len(m.registers)
        for b in self.blocks:
            read = client.read_holding_registers if b.table == "holding" else client.read_input_registers
            rr = await read(b.start, count=b.count, device_id=m.unit_id)  # pymodbus' own timeout_s
            if rr.isError():
                self.status.bad_frame(f"{b.table} registers {b.start}..{b.start + b.count - 1}: {rr}")
                return None
            words = rr.registers
            if len(words) < b.count:
                self.status.bad_frame(f"asked for {b.count} registers, got {len(words)}")
                return None
            for i, off in b.members:
                r = m.registers[i]
                values[i] = decode(words[off:off + WORDS[r.type]], r.type, r.word_order) * r.scale + r.offset
        return values

    async def stream(self) -> AsyncIterator[tuple[float, Samples]]:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate_hz
        errors = (OSError, asyncio.TimeoutError, self._errors)
        while True:
            client = self._client()
            reason = ""
            try:
                if not await asyncio.wait_for(client.connect(), self.cfg.timeout_s * 2 + 1):
                    raise ConnectionError("cannot connect")
                due = loop.time()
                while True:
                    values = await self.poll(client)
                    ts = time.time()
                    if values is not None:
                        self.status.up()
                        out = self.status.accept_row(ts, values)
                        if out is not None:
                            yield ts, out
                    due += period
                    now = loop.time()
                    if due > now:
                        await asyncio.sleep(due - now)
                    else:  # fell behind (slow device): poll again now, no burst to catch up
                        due = now
            except errors as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            finally:
                client.close()
            await asyncio.sleep(self.status.down(reason))
