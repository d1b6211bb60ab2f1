"""TransportComponent: opens the spool, attaches it as the agent's outbox and the session's router
as its router, runs the MQTT session.

Entered right after the monitor, so every later component finds the spool-backed outbox and the
session's router attached. The session lives from enter to exit (not in `run`), because at stop
the agent cancels every `run` first and the telemetry component flushes its last sample only in
its own exit: our exit then publishes what is pending for a moment, says "offline"/"shutdown" and
disconnects cleanly. With `mqtt.host` empty the agent is offline: the spool still records
everything (bounded) and nothing is published.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from edgeagent.core.config_schema import DeviceConfig
from edgeagent.core.live import LiveConfig, OutboxRelay, RouterRelay, Sections
from edgeagent.core.protocol import status_online
from edgeagent.transport.outbox import SpoolOutbox
from edgeagent.transport.router import SessionRouter
from edgeagent.transport.session import Session
from edgeagent.transport.spool import Spool

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.sqlite"
MB = 1024 * 1024
HOUSEKEEPING_S = 5.0
DEFERRED_RETRY_S = 1.0  # while writes wait in memory (disk full), try the spool this often


def status_payload(sections: dict[str, dict[str, Any]], device: DeviceConfig | None = None) -> dict[str, Any]:
    """The retained "online" status: model "name@version" and firmware {"version","slot"} if known,
    the device's groups and hardware from its config, and with several pipelines each one's model."""
    model = None
    spec = sections.get("inference", {}).get("model")
    if isinstance(spec, str) and spec:
        name, _, version = spec.partition("@")
        model = {"name": name, "version": version}
    firmware = None
    fw = sections.get("firmware")
    if isinstance(fw, dict) and fw.get("version"):
        firmware = {"version": str(fw["version"]), "slot": str(fw.get("slot", ""))}
    payload = (status_online(model=model, firmware=firmware) if device is None else
               status_online(model=model, firmware=firmware, groups=device.groups, hardware=device.hardware))
    pipelines = sections.get("inference", {}).get("pipelines")
    if isinstance(pipelines, dict):  # [[pipelines]]: each one's model too (`model` is the first one's)
        payload["pipelines"] = {name: _model_of(p.get("model")) for name, p in pipelines.items()
                                if isinstance(p, dict)}
    return payload


def _model_of(tag: object) -> dict[str, str] | None:
    name, _, version = str(tag or "").partition("@")
    return {"name": name, "version": version} if name else None


class TransportComponent:
    name = "transport"

    def __init__(self, live: LiveConfig, outbox: OutboxRelay, router: RouterRelay,
                 sections: Sections) -> None:
        self.live = live
        self._relay = outbox
        self._router = router
        self._sections = sections
        self.spool: Spool | None = None
        self.outbox: SpoolOutbox | None = None
        self.session: Session | None = None

    @property
    def sample_sink(self) -> SpoolOutbox | None:
        """Where telemetry samples go (None until entered)."""
        return self.outbox

    def spool_section(self) -> dict[str, Any]:
        if self.spool is None or self.outbox is None:
            return {}
        return {**self.spool.stats(), "deferred": self.outbox.deferred, "lost": self.outbox.lost}

    def mqtt_section(self) -> dict[str, Any]:
        if self.session is None:
            return {"connected": False, "since": None, "rtt_ms": None, "reconnects": 0, "offline": True}
        return self.session.provider()

    async def __aenter__(self) -> TransportComponent:
        live = self.live
        cfg = live.config
        spool = Spool(cfg.state_dir / SPOOL_FILE, int(cfg.spool.max_mb * MB), cfg.device.id)
        recovered = await asyncio.to_thread(spool.open)
        self.spool = spool
        self.outbox = outbox = SpoolOutbox(spool, live.topics)
        self._relay.attach(outbox)
        if recovered is not None:
            outbox.report_recovered(recovered)
        if not cfg.mqtt.host:
            log.info("no broker configured (mqtt.host is empty): offline, spooling only")
            return self
        router = SessionRouter()
        self._router.attach(router)  # subscriptions made before us are kept
        self.session = Session(lambda: self.live.config, live.topics, spool, outbox, router,
                               lambda: status_payload(self._sections.snapshot(("inference", "firmware")),
                                                              self.live.config.device))
        self.session.start()
        return self
    async def run(self) -> None:
        """Housekeeping: apply a live spool.max_mb change, retry writes that failed (disk full),
        report drops of a full spool."""
        while True:
            if self.spool is not None:
                self.spool.max_bytes = max(1, int(self.live.config.spool.max_mb * MB))
            if self.outbox is not None:
                self.outbox.retry_deferred()
                self.outbox.report_drops()
            busy = self.outbox is not None and self.outbox.deferred > 0
            await self.live.sleep_or_change(DEFERRED_RETRY_S if busy else HOUSEKEEPING_S)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        budget_s = self.live.config.agent.shutdown_timeout_s
        try:
            if self.session is not None:
                await self.session.shutdown(flush_s=min(3.0, budget_s * 0.3),
                                            close_s=min(5.0, budget_s * 0.4))
        finally:
            if self.outbox is not None:
                await asyncio.to_thread(self.outbox.close)
            if self.spool is not None:
                await asyncio.to_thread(self.spool.close)
