"""TOML -> frozen, typed config, parsed once at start; every error names its key path.

The schema is the dataclasses below: field names are TOML keys, annotations are the expected
types, `metadata` carries ranges and checks. A generic builder walks them, collects *every*
problem (not only the first) and rejects unknown keys so typos cannot silently become defaults.
Remote config layers (remote_config.py) reuse `merge_layers` + `build` so that a pushed config is
validated by exactly the same code as `edgeagent check-config`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeagent.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 boards (JetPack 6)
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"min": lo, "max": hi, "lo_open": lo_open}


def _check(fn: Callable[[Any], str | None], **extra: Any) -> dict[str, Any]:
    """A field check returning an error message (without the key path) or None."""
    return {"check": fn, **extra}


def parse_duration_s(value: object) -> float:
    """30 -> 30.0, "30s" -> 30.0, "5m" -> 300.0, "250ms" -> 0.25; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("expected a duration like 30, \"30s\", \"5m\", \"1h\"")


def _device_id_check(value: str) -> str | None:
    if not DEVICE_ID_RE.match(value):
        return (f"expected 1-64 characters of letters, digits, '.', '_' or '-' (it is part of MQTT "
                f"topics), got {value!r}")
    return None


def _level_check(value: str) -> str | None:
    ok = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    return None if value.upper() in ok else f"expected one of {', '.join(ok)}, got {value!r}"


def _window_check(value: str) -> str | None:
    from edgeagent.sensors.windows import parse_window  # late import: windows.py is small and pure

    try:
        parse_window(value)
    except ValueError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str = field(default="", metadata=_check(lambda v: _device_id_check(v) if v else None))
    groups: tuple[str, ...] = field(default=(), metadata={"item_check": _device_id_check})
    hardware: str = ""  # e.g. "rpi4", "rpi5", "jetson-orin-nano"; matched against manifest targets
    state_dir: str = "/var/lib/edgeagent"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    shutdown_timeout_s: float = field(default=10.0, metadata=_range(0.5, 300))
    health_interval_s: float = field(default=5.0, metadata=_range(0.1, 3600))
    restart_initial_s: float = field(default=1.0, metadata=_range(0.01, 3600))
    restart_max_s: float = field(default=60.0, metadata=_range(0.01, 86400))
    crash_loop_restarts: int = field(default=5, metadata=_range(1, 1000))
    crash_loop_window_s: float = field(default=300.0, metadata=_range(1, 86400))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = field(default="INFO", metadata=_check(_level_check))
    format: Literal["kv", "json"] = "kv"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    enabled: bool = True
    ca_file: str = ""  # empty: the system's CA store
    cert_file: str = ""  # client certificate for mutual TLS (with key_file)
    key_file: str = ""
    insecure_skip_verify: bool = False  # lab use only: never in production


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str = ""  # empty: offline, everything is kept in the local spool
    port: int = field(default=8883, metadata=_range(1, 65535))
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = ""  # default: the device id
    username: str = ""
    password: str = ""  # use ${ENV} substitution, never a literal secret in a shared file
    keepalive_s: int = field(default=30, metadata=_range(5, 65535))
    topic_prefix: str = field(default="edge", metadata=_check(
        lambda v: None if v and not any(c in v for c in "+#") and not v.endswith("/")
        else f"expected a topic prefix without '+', '#' or a trailing '/', got {v!r}"))
    session_expiry_s: int = field(default=86400, metadata=_range(0, 4294967295))
    reconnect_initial_s: float = field(default=1.0, metadata=_range(0.01, 3600))
    reconnect_max_s: float = field(default=60.0, metadata=_range(0.1, 86400))
    connect_timeout_s: float = field(default=10.0, metadata=_range(0.1, 600))
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    interval_s: float = field(default=1.0, metadata=_range(0.05, 3600))
    disk_paths: tuple[str, ...] = ("/",)
    net_interfaces: tuple[str, ...] = ()  # empty: every interface except loopback
    temp_sensor: str = ""  # psutil sensor name to prefer (e.g. "cpu_thermal"); empty: hottest CPU-ish
    thermal_dir: str = "/sys/class/thermal"
    battery_file: str = ""  # sysfs/UPS file holding a percentage (overrides psutil)
    power_file: str = ""  # sysfs/UPS file holding 1/0 for external power (overrides psutil)
    throttled: bool = True  # Raspberry Pi: vcgencmd get_throttled / sysfs, when present
    # vcgencmd forks a child: run it at most this often (the sysfs file, when present, every sample)
    throttled_interval_s: float = field(default=10.0, metadata=_range(1, 86400))
    jetson_gpu_load_file: str = "/sys/devices/gpu.0/load"


@dataclass(frozen=True, slots=True)
class SimulatedSensorConfig:
    seed: int = 0
    fault: Literal["none", "imbalance", "bearing", "spikes"] = "none"
    fault_severity: float = field(default=1.0, metadata=_range(0, 1))  # 0 off .. 1 severe
    fault_start_s: float = field(default=0.0, metadata=_range(0, 1e9))  # fault on after this much signal
    fault_duration_s: float = field(default=0.0, metadata=_range(0, 1e9))  # then off again; 0: stays on
    rpm: float = field(default=1800.0, metadata=_range(60, 60000))  # the shipped model knows 1440-2160
    temperature_c: float = 45.0  # healthy running temperature; faults heat the machine up to +20 C


@dataclass(frozen=True, slots=True)
class CsvSensorConfig:
    path: str = ""
    loop: bool = True
    rate_hz: float = field(default=0.0, metadata=_range(0, 1e6))  # 0: pace by the timestamps
    timestamps: bool = True  # first column is a unix/relative time; a header row overrides this


@dataclass(frozen=True, slots=True)
class MqttSensorConfig:
    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=_range(1, 65535))
    topic: str = "sensors/vibration"


@dataclass(frozen=True, slots=True)
class WindowConfig:
    size: int = field(default=256, metadata=_range(1, 1_000_000))
    stride: int = field(default=16, metadata=_range(1, 1_000_000))


@dataclass(frozen=True, slots=True)
class SensorsConfig:
    source: Literal["simulated", "csv", "mqtt"] = "simulated"
    rate_hz: float = field(default=1600.0, metadata=_range(0.1, 1e6))
    channels: int = field(default=3, metadata=_range(1, 64))
    simulated: SimulatedSensorConfig = SimulatedSensorConfig()
    csv: CsvSensorConfig = CsvSensorConfig()
    mqtt: MqttSensorConfig = MqttSensorConfig()
    window: WindowConfig = WindowConfig()


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    enabled: bool = True
    runtime: Literal["auto", "tflite-runtime", "litert"] = "auto"
    model: str = "vibration-anomaly"
    model_variant: Literal["int8", "float"] = "int8"  # which shipped file seeds the store
    num_threads: int = field(default=1, metadata=_range(1, 64))
    delegate: str = ""  # e.g. "libedgetpu.so.1" for a Coral USB stick
    queue_max: int = field(default=64, metadata=_range(1, 100_000))
    keep_versions: int = field(default=3, metadata=_range(1, 100))
    threshold: float | None = None  # default: the model's model.toml
    clear_threshold: float | None = None  # hysteresis; default: the model's model.toml
    # an anomaly clears after this many windows in a row below clear_threshold (intermittent faults
    # such as spikes leave single quiet windows that must not clear and re-raise the alarm)
    clear_windows: int = field(default=5, metadata=_range(1, 1_000_000))
    latency_budget_ms: float = field(default=50.0, metadata=_range(0.1, 60_000))
    probation_windows: int = field(default=50, metadata=_range(1, 1_000_000))
    cache_size: int = field(default=0, metadata=_range(0, 1_000_000))  # 0: result cache off


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    interval_s: float = field(default=5.0, metadata=_range(0.01, 86400))
    batch_max: int = field(default=50, metadata=_range(1, 10_000))
    batch_wait_s: float = field(default=1.0, metadata=_range(0, 3600))


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    max_mb: float = field(default=64.0, metadata=_range(0.01, 1_000_000))


@dataclass(frozen=True, slots=True)
class GateConfig:
    """Context gates for one kind of update; None (absent) disables a gate."""

    battery_min_percent: float | None = field(default=None, metadata=_range(0, 100))
    load_max: float | None = field(default=None, metadata=_range(0, 1000))  # load1 per core, averaged
    cpu_max_percent: float | None = field(default=None, metadata=_range(0, 100))
    mem_free_min_mb: float | None = field(default=None, metadata=_range(0, 10_000_000))
    disk_margin: float = field(default=2.0, metadata=_range(1, 100))  # free disk >= size x margin
    temp_max_c: float | None = field(default=None, metadata=_range(-50, 200))
    network_rtt_max_ms: float | None = field(default=None, metadata=_range(0, 600_000))
    maintenance_windows: tuple[str, ...] = field(default=(), metadata={"item_check": _window_check})
    respect_busy: bool = True
    skippable: tuple[str, ...] = ()  # gates a `critical: true` manifest may skip
    backoff_initial_s: float = field(default=30.0, metadata=_range(0.01, 86400))
    backoff_max_s: float = field(default=3600.0, metadata=_range(0.01, 604800))


@dataclass(frozen=True, slots=True)
class GatesConfig:
    model: GateConfig = GateConfig(cpu_max_percent=90.0, temp_max_c=85.0)
    firmware: GateConfig = GateConfig(battery_min_percent=40.0, load_max=1.5, temp_max_c=80.0,
                                      mem_free_min_mb=64.0)


@dataclass(frozen=True, slots=True)
class FirmwareConfig:
    installer: Literal["script", "rauc", "swupdate", "mender"] = "rauc"
    mode: Literal["direct", "privileged"] = "privileged"  # privileged: edgeagent-installer.service
    commands: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per-op overrides
    command_timeout_s: float = field(default=600.0, metadata=_range(1, 86400))
    version_file: str = "/etc/edgeagent/firmware-version"
    health_timeout_s: float = field(default=300.0, metadata=_range(1, 86400))
    health_command: tuple[str, ...] = ()
    max_boot_attempts: int = field(default=3, metadata=_range(1, 100))


@dataclass(frozen=True, slots=True)
class UpdatesConfig:
    enabled: bool = True
    trusted_keys: dict[str, str] = field(default_factory=dict)  # key id -> PEM public key file
    max_artifact_mb: float = field(default=512.0, metadata=_range(0.001, 1_000_000))
    max_chunk_kb: float = field(default=1024.0, metadata=_range(1, 262_144))
    request_interval_s: float = field(default=10.0, metadata=_range(0.05, 86400))
    max_requests: int = field(default=32, metadata=_range(1, 100_000))
    # flow control: chunks are requested at most this far ahead of what is on disk, which bounds
    # the memory a transfer can take in the MQTT receive path
    request_window_kb: float = field(default=2048.0, metadata=_range(16, 1_048_576))
    # a model bundle may unpack to at most artifact size x this (decompression bombs stop early)
    max_unpacked_ratio: float = field(default=20.0, metadata=_range(1, 10_000))
    model_install_timeout_s: float = field(default=600.0, metadata=_range(1, 86400))
    gates: GatesConfig = GatesConfig()
    firmware: FirmwareConfig = FirmwareConfig()


def _rule_expr_check(value: str) -> str | None:
    """Parsed once at load by the rules' own parser: `unexpected token ')' at column 12`."""
    if not value:
        return "expected a condition"
    from edgeagent.rules.engine import check_expression  # late: rules import this module

    return check_expression(value)


def _rule_action_check(value: str) -> str | None:
    from edgeagent.rules.engine import check_action

    return check_action(value)


@dataclass(frozen=True, slots=True)
class RuleConfig:
    name: str = field(default="", metadata=_check(lambda v: None if v else "expected a non-empty name",
                                                  required=True))
    when: str = field(default="", metadata=_check(_rule_expr_check, required=True))
    for_s: float = field(default=0.0, metadata={"key": "for", "duration": True, **_range(0, 604800)})
    clear_when: str = field(default="", metadata=_check(lambda v: _rule_expr_check(v) if v else None))
    cooldown_s: float = field(default=0.0, metadata={"key": "cooldown", "duration": True,
                                                     **_range(0, 604800)})
    then: tuple[str, ...] = field(default=(), metadata={"item_check": _rule_action_check})


@dataclass(frozen=True, slots=True)
class PowerSaveConfig:
    monitor_factor: float = field(default=4.0, metadata=_range(1, 1000))
    telemetry_factor: float = field(default=4.0, metadata=_range(1, 1000))
    inference_factor: float = field(default=2.0, metadata=_range(1, 1000))


@dataclass(frozen=True, slots=True)
class BusyConfig:
    file: str = ""  # while this file exists the device is busy (e.g. a critical machine operation)
    topic: str = ""  # local MQTT topic carrying "1"/"0" (on the sensor broker)


@dataclass(frozen=True, slots=True)
class RemoteConfigConfig:
    enabled: bool = True
    confirm_timeout_s: float = field(default=60.0, metadata=_range(1, 86400))


@dataclass(frozen=True, slots=True)
class Config:
    device: DeviceConfig = DeviceConfig()
    agent: AgentConfig = AgentConfig()
    logging: LoggingConfig = LoggingConfig()
    mqtt: MqttConfig = MqttConfig()
    monitor: MonitorConfig = MonitorConfig()
    sensors: SensorsConfig = SensorsConfig()
    inference: InferenceConfig = InferenceConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    spool: SpoolConfig = SpoolConfig()
    updates: UpdatesConfig = UpdatesConfig()
    rules: tuple[RuleConfig, ...] = ()
    power_save: PowerSaveConfig = PowerSaveConfig()
    busy: BusyConfig = BusyConfig()
    config: RemoteConfigConfig = RemoteConfigConfig()

    @property
    def state_dir(self) -> Path:
        return Path(self.device.state_dir)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.device.id


# --------------------------------------------------------------------------- builder


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in typing.get_args(tp))
    if origin is tuple:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"an array of {plural.get(typing.get_args(tp)[0], 'values')}"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return str(tp)


class _Builder:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def build(self, cls: type[Any], raw: object, path: str) -> Any:
        if not isinstance(raw, Mapping):
            self.err(path or "<root>", f"expected a table, got {_describe(raw)}")
            return cls()
        hints = typing.get_type_hints(cls)
        fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                where = f"{path}.{key}" if path else str(key)
                near = [k for k in fields if _close(str(key), k)]
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.err(where, f"unknown key{hint}; known keys: {', '.join(sorted(fields))}")
        kwargs: dict[str, Any] = {}
        for key, f in fields.items():
            if key not in raw:
                if f.metadata.get("required"):
                    self.err(f"{path}.{key}" if path else key, "required key is missing")
                continue
            where = f"{path}.{key}" if path else key
            value = self.convert(hints[f.name], raw[key], where, f.metadata)
            if value is not _INVALID:
                kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # pragma: no cover - schema bug, not user input
            self.err(path or "<root>", str(exc))
            return cls()

    def convert(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            return self.convert(inner[0], value, path, meta)
        if isinstance(value, EnvStr) and tp is str:
            value = str(value)
        if meta.get("duration"):
            try:
                value = parse_duration_s(value)
            except ValueError as exc:
                self.err(path, f"{exc}, got {_describe(value)}")
                return _INVALID
        if dataclasses.is_dataclass(tp):
            return self.build(typing.cast(type[Any], tp), value, path)
        if origin is tuple:
            if not isinstance(value, list):
                self.err(path, f"expected {_type_name(tp)}, got {_describe(value)}")
                return _INVALID
            items = [self.convert(args[0], v, f"{path}[{i}]", {"check": meta.get("item_check")})
                     for i, v in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else tuple(items)
        if origin is dict:
            if not isinstance(value, Mapping):
                self.err(path, f"expected a table, got {_describe(value)}")
                return _INVALID
            out = {str(k): self.convert(args[1], v, f"{path}.{k}", {}) for k, v in value.items()}
            return _INVALID if any(v is _INVALID for v in out.values()) else out
        if origin is Literal:
            if value not in args or isinstance(value, bool):
                self.err(path, f"expected {_type_name(tp)}, got {_describe(value)}")
                return _INVALID
            return value
        if isinstance(value, EnvStr) and tp in (int, float, bool):
            value = _from_env_str(tp, value)
        ok = (
            (tp is bool and isinstance(value, bool))
            or (tp is int and isinstance(value, int) and not isinstance(value, bool))
            or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (tp is str and isinstance(value, str))
        )
        if not ok:
            extra = ""
            if meta.get("min") is not None and meta.get("max") is not None:
                lo, hi = meta["min"], meta["max"]
                extra = f" {_num(lo)}-{_num(hi)}"
            self.err(path, f"expected {_type_name(tp)}{extra}, got {_describe(value)}")
            return _INVALID
        if tp is float:
            value = float(typing.cast(float, value))
            if not math.isfinite(value):
                self.err(path, f"expected a finite number, got {value}")
                return _INVALID
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (lo is not None and value < lo) or (hi is not None and value > hi)
        ):
            rng = f"{_num(lo)}-{_num(hi)}" if lo is not None and hi is not None else (
                f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}")
            self.err(path, f"expected {_type_name(tp)} {rng}, got {_describe(value)}")
            return _INVALID
        check = meta.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                self.err(path, problem)
                return _INVALID
        return value


_INVALID: Any = object()


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _close(a: str, b: str) -> bool:
    """Cheap typo detector: same length +-1 and at most 2 differing characters."""
    if abs(len(a) - len(b)) > 1:
        return False
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


# --------------------------------------------------------------------------- layers


class EnvStr(str):
    """A string that came out of ${ENV} substitution: may stand for a number or boolean
    (`port = "${MQTT_PORT:-1883}"`), since the environment only holds strings."""


def _from_env_str(tp: Any, value: EnvStr) -> object:
    text = value.strip()
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        return value
    try:
        return int(text) if tp is int else float(text)
    except ValueError:
        return value


def substitute_env(raw: object, env: Mapping[str, str], path: str, errors: list[str]) -> object:
    """Replace ${VAR} and ${VAR:-default} in every string; a missing variable is an error."""
    if isinstance(raw, str) and ENV_RE.search(raw):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path}: environment variable {name} is not set")
            return ""

        return EnvStr(ENV_RE.sub(repl, raw))
    if isinstance(raw, dict):
        return {k: substitute_env(v, env, f"{path}.{k}" if path else k, errors) for k, v in raw.items()}
    if isinstance(raw, list):
        return [substitute_env(v, env, f"{path}[{i}]", errors) for i, v in enumerate(raw)]
    return raw


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
    b = _Builder()
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
    if cfg.mqtt.reconnect_initial_s > cfg.mqtt.reconnect_max_s:
        errors.append("mqtt.reconnect_initial_s: expected at most mqtt.reconnect_max_s")
    if bool(cfg.mqtt.tls.cert_file) != bool(cfg.mqtt.tls.key_file):
        errors.append("mqtt.tls: cert_file and key_file go together (mutual TLS needs both)")
    names = [r.name for r in cfg.rules]
    for i, r in enumerate(cfg.rules):
        if r.name and names.count(r.name) > 1 and names.index(r.name) != i:
            errors.append(f"rules[{i}].name: duplicate rule name {r.name!r}")
    for kind in ("model", "firmware"):
        gate: GateConfig = getattr(cfg.updates.gates, kind)
        for i, g in enumerate(gate.skippable):
            if g not in GATE_NAMES:
                errors.append(f"updates.gates.{kind}.skippable[{i}]: unknown gate {g!r}; "
                              f"known: {', '.join(GATE_NAMES)}")
    return errors


GATE_NAMES = ("battery", "load", "cpu", "memory", "disk", "temperature", "network", "window", "busy")


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
        f"runtime={i.runtime}  threads={i.num_threads}",
        f"telemetry   every {t.interval_s:g}s  batch<={t.batch_max}  spool<={cfg.spool.max_mb:g} MB",
        f"updates     {'on' if cfg.updates.enabled else 'off'}  "
        f"keys={','.join(cfg.updates.trusted_keys) or '-'}"
        f"  firmware={cfg.updates.firmware.installer}/{cfg.updates.firmware.mode}",
        f"rules       {len(cfg.rules)}: {', '.join(r.name for r in cfg.rules) or '-'}",
        f"logging     {cfg.logging.level} ({cfg.logging.format})",
    ]
    return "\n".join(lines)
