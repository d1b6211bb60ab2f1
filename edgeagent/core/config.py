"""TOML -> frozen, typed config, parsed once at start; every error names its key path.

The schema is in config_schema.py (re-exported here, so `from edgeagent.core.config import Config`
keeps working), the generic walker in config_builder.py; this module reads the file, substitutes
${ENV}, merges layers, builds and runs the checks that span fields. Remote config layers
(config_layers.py) reuse `merge_layers` + `build` so that a pushed config is validated by exactly
the same code as `edgeagent check-config`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeagent.core import actions, pipelines
from edgeagent.core.actions import Action
from edgeagent.core.config_builder import ENV_RE, Builder, EnvStr, substitute_env
from edgeagent.core.config_schema import (
    ACTION_CHECK,
    DEVICE_ID_RE,
    GATE_NAMES,
    AgentConfig,
    BusyConfig,
    Config,
    CsvSensorConfig,
    DeviceConfig,
    FirmwareConfig,
    GateConfig,
    GatesConfig,
    InferenceConfig,
    LoggingConfig,
    MonitorConfig,
    MqttConfig,
    MqttSensorConfig,
    PipelineConfig,
    PowerSaveConfig,
    RemoteConfigConfig,
    RuleConfig,
    SensorsConfig,
    SimulatedSensorConfig,
    SpoolConfig,
    SupportConfig,
    TelemetryConfig,
    TlsConfig,
    UpdatesConfig,
    WindowConfig,
)
from edgeagent.core.errors import ConfigError
from edgeagent.core.sensor_checks import check_sensors
from edgeagent.core.units import DURATION_RE, parse_duration_s

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 boards (JetPack 6)
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DEVICE_ID_RE", "DURATION_RE", "ENV_RE", "GATE_NAMES", "AgentConfig", "BusyConfig", "Config",
    "CsvSensorConfig", "DeviceConfig", "EnvStr", "FirmwareConfig", "GateConfig", "GatesConfig",
    "InferenceConfig", "LoggingConfig", "MonitorConfig", "MqttConfig", "MqttSensorConfig",
    "PipelineConfig", "PowerSaveConfig", "RemoteConfigConfig", "RuleConfig", "SensorsConfig",
    "SimulatedSensorConfig",
    "SpoolConfig", "SupportConfig", "TelemetryConfig", "TlsConfig", "UpdatesConfig", "WindowConfig", "build",
    "check_action", "default_device_id", "load", "merge_layers", "parse_action", "parse_duration_s",
    "read_toml", "substitute_env", "summary", "to_dict",
]


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge tables, later layers win; arrays and scalars are replaced whole."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge_layers(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = merge_layers(value)
            else:
                out[key] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """The raw table of a TOML file; ConfigError naming the file and line on a syntax error."""
    try:
        with open(path, "rb") as f:
            return dict(tomllib.load(f))
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], str(path)) from exc


def build(raw: Mapping[str, Any], source: str = "", env: Mapping[str, str] | None = None) -> Config:
    """Validate a raw (merged) table into a Config; ConfigError lists every problem found."""
    errors: list[str] = []
    expanded = substitute_env(dict(raw), os.environ if env is None else env, "", errors)
    b = Builder(checks={ACTION_CHECK: check_action})
    cfg: Config = b.build(Config, expanded, "")
    errors += b.errors
    errors += _cross_checks(cfg)
    if errors:
        raise ConfigError(errors, source)
    if not cfg.device.id:
        cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, id=default_device_id()))
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that span fields; only meaningful once every field has a valid type."""
    errors: list[str] = []
    if cfg.sensors.window.stride > cfg.sensors.window.size:
        errors.append(f"sensors.window.stride: expected at most sensors.window.size "
                      f"({cfg.sensors.window.size}), got {cfg.sensors.window.stride}")
    errors += check_sensors(cfg.sensors)
    if cfg.mqtt.reconnect_initial_s > cfg.mqtt.reconnect_max_s:
        errors.append("mqtt.reconnect_initial_s: expected at most mqtt.reconnect_max_s")
    if bool(cfg.mqtt.tls.cert_file) != bool(cfg.mqtt.tls.key_file):
        errors.append("mqtt.tls: cert_file and key_file go together (mutual TLS needs both)")
    names = [r.name for r in cfg.rules]
    for i, r in enumerate(cfg.rules):
        if r.name and names.count(r.name) > 1 and names.index(r.name) != i:
            errors.append(f"rules[{i}].name: duplicate rule name {r.name!r}")
    errors += pipelines.problems(cfg)
    for kind in ("model", "firmware"):
        gate: GateConfig = getattr(cfg.updates.gates, kind)
        for i, g in enumerate(gate.skippable):
            if g not in GATE_NAMES:
                errors.append(f"updates.gates.{kind}.skippable[{i}]: unknown gate {g!r}; "
                              f"known: {', '.join(GATE_NAMES)}")
    return errors


def default_device_id() -> str:
    """The hostname, reduced to characters that are safe in MQTT topics."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.") or "edgeagent"
    return name


def load(path: Path | str, overlays: tuple[Mapping[str, Any], ...] = (),
         env: Mapping[str, str] | None = None) -> Config:
    """Read a TOML file, merge overlays (e.g. the applied remote layer) on top, validate."""
    raw = read_toml(Path(path))
    return build(merge_layers(raw, *overlays), str(path), env)


def to_dict(cfg: object) -> Any:
    """A config value as plain TOML-able data (tuples -> lists, None dropped), for show/diff."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if v is None:
                continue
            out[f.metadata.get("key", f.name)] = to_dict(v)
        return out
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def summary(cfg: Config) -> str:
    """One screen for `edgeagent check-config`."""
    m, t, i = cfg.mqtt, cfg.telemetry, cfg.inference
    broker = (f"{m.host}:{m.port} (MQTT {m.protocol}, TLS {'on' if m.tls.enabled else 'off'}"
              f"{', client cert' if m.tls.cert_file else ''})") if m.host else "none (offline: spool only)"
    lines = [
        f"device      {cfg.device.id}  groups={','.join(cfg.device.groups) or '-'}  "
        f"hardware={cfg.device.hardware or '-'}",
        f"state dir   {cfg.device.state_dir}",
        f"broker      {broker}  prefix={m.topic_prefix}",
        f"monitor     every {cfg.monitor.interval_s:g}s  disks={','.join(cfg.monitor.disk_paths)}",
        f"sensors     {cfg.sensors.source} @ {cfg.sensors.rate_hz:g} Hz  window={cfg.sensors.window.size}"
        f"/{cfg.sensors.window.stride}",
        f"inference   {'on' if i.enabled else 'off'}  model={i.model} ({i.model_variant})  "
        f"runtime={i.runtime}  threads={i.num_threads}"
        f"{f'  budget={i.threads_budget}' if i.threads_budget else ''}"
        f"{f'  delegate={i.delegate}' if i.delegate else ''}",
        *_pipeline_lines(cfg),
        f"telemetry   every {t.interval_s:g}s  batch<={t.batch_max}  spool<={cfg.spool.max_mb:g} MB",
        f"updates     {'on' if cfg.updates.enabled else 'off'}  "
        f"keys={','.join(cfg.updates.trusted_keys) or '-'}"
        f"  firmware={cfg.updates.firmware.installer}/{cfg.updates.firmware.mode}",
        f"rules       {len(cfg.rules)}: {', '.join(r.name for r in cfg.rules) or '-'}",
        f"logging     {cfg.logging.level} ({cfg.logging.format})",
    ]
    return "\n".join(lines)


def _pipeline_lines(cfg: Config) -> list[str]:
    if not cfg.pipelines or not cfg.inference.enabled:
        return []
    return [f"pipeline    {p.name}: {p.sensors.source} @ {p.sensors.rate_hz:g} Hz  window="
            f"{p.sensors.window.size}/{p.sensors.window.stride}  model={p.model} ({p.model_variant})  "
            f"head={p.head}  threads={p.num_threads}" for p in pipelines.resolve(cfg)]


# --------------------------------------------------------------------------- rule actions


def parse_action(text: str) -> Action:
    """A rule action, its `set:` value checked against the schema; ValueError says what is wrong."""
    return actions.parse_action(text, _set_problems)


def check_action(text: str) -> str | None:
    """For config validation (RuleConfig.then): None, or what is wrong with the action."""
    try:
        parse_action(text)
    except ValueError as exc:
        return str(exc)
    return None


def _set_problems(partial: dict[str, Any]) -> list[str]:
    try:
        build(partial, env={})
    except ConfigError as exc:
        return exc.errors
    return []
