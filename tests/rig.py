"""What the agent wires for its components (edgeagent.agent.Wiring), built for one test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgeagent.agent import Wiring
from edgeagent.core import config as cfgmod
from edgeagent.core.config import Config
from edgeagent.core.config_layers import ConfigLayers
from edgeagent.core.live import LiveConfig, MemoryOutbox, Metrics, OutboxRelay, RouterRelay, Sections
from edgeagent.telemetry import TelemetryComponent
from edgeagent.transport import TransportComponent


def wiring(cfg: Config, remote: dict[str, Any] | None = None,
           request_restart: Callable[[str], None] | None = None) -> Wiring:
    """Fresh shared objects for `cfg`, as `Agent` makes them."""
    live = LiveConfig(cfg)
    return Wiring(live=live, metrics=Metrics(), outbox=OutboxRelay(), router=RouterRelay(),
                  sections=Sections(),
                  layers=ConfigLayers(live, cfgmod.to_dict(cfg), dict(remote or {})),
                  request_restart=request_restart or (lambda reason: None))


def memory(w: Wiring) -> MemoryOutbox:
    """The in-memory outbox behind `w.outbox` (no transport attached)."""
    assert isinstance(w.outbox.target, MemoryOutbox)
    return w.outbox.target


def transport(w: Wiring) -> TransportComponent:
    return TransportComponent(w.live, w.outbox, w.router, w.sections)


def telemetry(w: Wiring, t: TransportComponent) -> TelemetryComponent:
    return TelemetryComponent(w.live, w.metrics, lambda: t.sample_sink, w.sections)
