"""Deep check of the sensor sources: each configured source opens. One function per source kind in
`SOURCE_CHECKS`; a new kind (serial, modbus, iio) plugs in by adding its function there.

A check function gets the config, the source's name and the timeout, and returns its lines. It must
not keep anything open and must not hold a device longer than the timeout.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeagent.check.broker import Endpoint, mqtt_connect, reach
from edgeagent.check.result import Check, fail, ok, warn
from edgeagent.core.config import Config
from edgeagent.core.errors import SensorError

SourceCheck = Callable[[Config, str, float], list[Check]]


def _simulated(cfg: Config, name: str, timeout_s: float) -> list[Check]:
    return _make(cfg, name, "simulated vibration")


def _csv(cfg: Config, name: str, timeout_s: float) -> list[Check]:
    return _make(cfg, name, f"CSV {cfg.sensors.csv.path}")


def _make(cfg: Config, name: str, what: str) -> list[Check]:
    """Build the source as the pipeline does (a CSV file is read and parsed whole)."""
    from edgeagent.sensors.sources import make_source

    try:
        src = make_source(cfg.sensors)
    except SensorError as exc:
        return [fail(name, f"{what}: {exc}", "correct the [sensors] section (see configs/default.toml)")]
    return [ok(name, f"{what} opens: {getattr(src, 'channels', '?')} channels at "
                     f"{getattr(src, 'rate_hz', 0.0):g} Hz")]


def _mqtt(cfg: Config, name: str, timeout_s: float) -> list[Check]:
    """The local sensor broker answers and lets us subscribe to the samples' topic."""
    m = cfg.sensors.mqtt
    ep = Endpoint(m.host, m.port, client_id=f"{cfg.client_id}-check-sensors"[:64])
    checks = reach(ep, timeout_s, name)
    if checks[-1].status == "FAIL":
        return checks
    accepted, said = mqtt_connect(ep, False, timeout_s, subscribe=m.topic)
    if not accepted:
        return [*checks, fail(name, f"local broker {m.host}:{m.port}: {said}",
                              "the sensor broker must allow this device to subscribe to sensors.mqtt.topic")]
    return [*checks, ok(name, f"subscribed to {m.topic} on {m.host}:{m.port}")]


SOURCE_CHECKS: dict[str, SourceCheck] = {"simulated": _simulated, "csv": _csv, "mqtt": _mqtt}


def configured_sources(cfg: Config) -> list[tuple[str, str]]:
    """(name for the check line, kind) of every source the config names."""
    return [("sensors.source", cfg.sensors.source)]


def source_checks(cfg: Config, timeout_s: float,
                  sources: list[tuple[str, str]] | None = None) -> list[Check]:
    """One check per source (`sources` defaults to what the config names)."""
    if not cfg.inference.enabled:
        return []
    checks: list[Check] = []
    for name, kind in configured_sources(cfg) if sources is None else sources:
        check = SOURCE_CHECKS.get(kind)
        if check is None:
            checks.append(warn(name, f"no check for sources of kind {kind!r}",
                               "add one to edgeagent.check.sources.SOURCE_CHECKS"))
            continue
        checks += check(cfg, name, timeout_s)
    return checks
