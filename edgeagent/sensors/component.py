"""Runs the configured bus source when no model consumes it (`inference.enabled = false`), so its
values still reach telemetry and the rules (a Modbus temperature transmitter needs no model).

With inference on, the inference pipeline runs the source itself and reports the same section.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from edgeagent.core.live import LiveConfig, Outbox
from edgeagent.core.sensor_checks import BUS_SOURCES
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.sensors.sources import SensorSource, make_source, source_status

log = logging.getLogger(__name__)


def sensors_section(source: object) -> dict[str, Any]:
    """The `sensors` block for a source (empty for sources without a status)."""
    status = source_status(source)
    return status.section() if status is not None else {}


class SensorsComponent:
    name = "sensors"

    def __init__(self, live: LiveConfig, outbox: Outbox) -> None:
        self.live = live
        self.outbox = outbox
        self.source: object | None = None

    async def __aenter__(self) -> SensorsComponent:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.source = None

    def section(self) -> dict[str, Any]:
        return sensors_section(self.source)

    async def run(self) -> None:
        """Read until the sensors config changes, then start over with the new one."""
        while True:
            cfg = self.live.config.sensors
            if cfg.source not in BUS_SOURCES:
                await self._until_changed(cfg)
                continue
            source = make_source(cfg)
            status = source_status(source)
            if status is not None:
                status.events = self.outbox.emit_event
            self.source = source
            read = asyncio.create_task(self._drain(source), name="sensors:read")
            watch = asyncio.create_task(self._until_changed(cfg), name="sensors:config")
            try:
                done, _ = await asyncio.wait((read, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait((read, watch))
            if read in done:
                read.result()  # a crash goes to the supervisor
                return  # the source ended (never for bus sources, which retry on their own)
            log.info("sensors settings changed: reopening the source")

    @staticmethod
    async def _drain(source: SensorSource) -> None:
        async for _ in source.stream():
            pass  # the values reach telemetry and rules through the source's status

    async def _until_changed(self, cfg: object) -> None:
        while self.live.config.sensors == cfg:
            await self.live.changed.wait()
