"""Deep check of the sensor sources: each configured source opens. One function per source kind in
`SOURCE_CHECKS`; every pipeline's source (`[[pipelines]]`) is checked, and a bus source that feeds
telemetry only (inference off) too.

A check function gets the config, the source's settings, the check line's name and the timeout, and
returns its lines. It must not keep anything open and must not hold a device longer than the timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edgeagent.check.broker import Endpoint, mqtt_connect, reach
from edgeagent.check.result import Check, fail, ok, warn
from edgeagent.core.config import Config, SensorsConfig
from edgeagent.core.errors import SensorError

SourceCheck = Callable[[Config, SensorsConfig, str, float], list[Check]]
BUS_KINDS = ("serial", "modbus", "iio")
SERIAL_FIX = ("check the device path (ls -l /dev/serial/by-id/), that the service user is in the "
              "device's group (dialout) and that the unit allows the device (docs/sensors.md)")


def _simulated(cfg: Config, s: SensorsConfig, name: str, timeout_s: float) -> list[Check]:
    return _make(s, name, "simulated vibration")


def _csv(cfg: Config, s: SensorsConfig, name: str, timeout_s: float) -> list[Check]:
    return _make(s, name, f"CSV {s.csv.path}")


def _make(s: SensorsConfig, name: str, what: str) -> list[Check]:
    """Build the source as the pipeline does (a CSV file is read and parsed whole)."""
    from edgeagent.sensors.sources import make_source

    try:
        src = make_source(s)
    except SensorError as exc:
        return [fail(name, f"{what}: {exc}", "correct the source's section (see configs/default.toml)")]
    return [ok(name, f"{what} opens: {getattr(src, 'channels', '?')} channels at "
                     f"{getattr(src, 'rate_hz', 0.0):g} Hz")]


def _mqtt(cfg: Config, s: SensorsConfig, name: str, timeout_s: float) -> list[Check]:
    """The local sensor broker answers and lets us subscribe to the samples' topic."""
    m = s.mqtt
    ep = Endpoint(m.host, m.port, client_id=f"{cfg.client_id}-check-sensors"[:64])
    checks = reach(ep, timeout_s, name)
    if checks[-1].status == "FAIL":
        return checks
    accepted, said = mqtt_connect(ep, False, timeout_s, subscribe=m.topic)
    if not accepted:
        return [*checks, fail(name, f"local broker {m.host}:{m.port}: {said}",
                              "the sensor broker must allow this device to subscribe to sensors.mqtt.topic")]
    return [*checks, ok(name, f"subscribed to {m.topic} on {m.host}:{m.port}")]


def _open_tty(name: str, device: str, what: str) -> list[Check]:
    """The serial device opens read-write (as the source opens it); nothing is read or configured."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return [fail(name, f"{what} {device}: {exc.strerror or exc}", SERIAL_FIX)]
    os.close(fd)
    return [ok(name, f"{what} {device} opens")]


def _serial(cfg: Config, s: SensorsConfig, name: str, timeout_s: float) -> list[Check]:
    return _open_tty(name, s.serial.device, "serial device")


def _modbus(cfg: Config, s: SensorsConfig, name: str, timeout_s: float) -> list[Check]:
    m = s.modbus
    if m.transport == "rtu":
        return _open_tty(name, m.device, "Modbus RTU adapter")
    checks = reach(Endpoint(m.host, m.port, client_id=""), timeout_s, name)
    if checks[-1].status == "FAIL":
        return checks
    return [*checks, ok(name, f"Modbus TCP {m.host}:{m.port} accepts connections (unit {m.unit_id})")]


def _iio(cfg: Config, s: SensorsConfig, name: str, timeout_s: float) -> list[Check]:
    from edgeagent.sensors.iio import find_device

    i = s.iio
    try:
        dev = find_device(Path(i.root), i.device)
    except SensorError as exc:
        return [fail(name, str(exc), "load the device's driver (e.g. dtoverlay=adxl345 on a Pi) or set "
                                     "sensors.iio.device / sensors.iio.root (docs/sensors.md)")]
    raws = sorted(p.name for p in dev.glob("in_*_raw"))
    if not raws:
        return [fail(name, f"IIO device {dev} has no in_*_raw channels", "is it the right device?")]
    try:
        (dev / raws[0]).read_text()
    except OSError as exc:
        return [fail(name, f"IIO {dev / raws[0]}: {exc.strerror or exc}",
                     "the service user must be able to read the device's sysfs files")]
    return [ok(name, f"IIO device {dev.name} reads ({len(raws)} raw channels)")]


SOURCE_CHECKS: dict[str, SourceCheck] = {"simulated": _simulated, "csv": _csv, "mqtt": _mqtt,
                                         "serial": _serial, "modbus": _modbus, "iio": _iio}


def configured_sources(cfg: Config) -> list[tuple[str, SensorsConfig]]:
    """(name for the check line, settings) of every source the agent would open."""
    if not cfg.inference.enabled:  # a bus source still feeds telemetry and rules
        return [("sensors.source", cfg.sensors)] if cfg.sensors.source in BUS_KINDS else []
    from edgeagent.core.pipelines import resolve

    specs = resolve(cfg)
    if len(specs) == 1 and specs[0].legacy:
        return [("sensors.source", specs[0].sensors)]
    return [(f"pipelines.{p.name}.source", p.sensors) for p in specs]


def source_checks(cfg: Config, timeout_s: float,
                  sources: list[tuple[str, SensorsConfig]] | None = None) -> list[Check]:
    """One check per source (`sources` defaults to what the config names)."""
    checks: list[Check] = []
    for name, s in configured_sources(cfg) if sources is None else sources:
        check = SOURCE_CHECKS.get(s.source)
        if check is None:
            checks.append(warn(name, f"no check for sources of kind {s.source!r}",
                               "add one to edgeagent.check.sources.SOURCE_CHECKS"))
            continue
        checks += check(cfg, s, name, timeout_s)
    return checks
