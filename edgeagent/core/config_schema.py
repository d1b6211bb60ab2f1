"""The config schema: frozen dataclasses whose field names are the TOML keys.

Annotations are the expected types and `metadata` carries ranges and checks (see config_builder);
defaults live here and nowhere else. Pure data plus pure checks: loading is core/config.py's job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeagent.core.expr import check_expression
from edgeagent.core.windows import parse_window

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ACTION_CHECK = "action"  # RuleConfig.then items: resolved by the builder's named checks
GATE_NAMES = ("battery", "load", "cpu", "memory", "disk", "temperature", "network", "window", "busy")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"min": lo, "max": hi, "lo_open": lo_open}


def _check(fn: Callable[[Any], str | None], **extra: Any) -> dict[str, Any]:
    """A field check returning an error message (without the key path) or None."""
    return {"check": fn, **extra}


def _device_id_check(value: str) -> str | None:
    if not DEVICE_ID_RE.match(value):
        return (f"expected 1-64 characters of letters, digits, '.', '_' or '-' (it is part of MQTT "
                f"topics), got {value!r}")
    return None


def _level_check(value: str) -> str | None:
    ok = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    return None if value.upper() in ok else f"expected one of {', '.join(ok)}, got {value!r}"


def _window_check(value: str) -> str | None:
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
    # the recent lines kept in memory for a support bundle (whichever bound is reached first)
    ring_lines: int = field(default=2000, metadata=_range(1, 1_000_000))
    ring_kb: float = field(default=512.0, metadata=_range(1, 1_048_576))


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
    # cap of the download rate for metered or shared links (0: none); chunk requests are paced to it
    max_rate_bytes_s: float = field(default=0.0, metadata=_range(0, 10_000_000_000))
    # a model bundle may unpack to at most artifact size x this (decompression bombs stop early)
    max_unpacked_ratio: float = field(default=20.0, metadata=_range(1, 10_000))
    model_install_timeout_s: float = field(default=600.0, metadata=_range(1, 86400))
    gates: GatesConfig = GatesConfig()
    firmware: FirmwareConfig = FirmwareConfig()


def _rule_expr_check(value: str) -> str | None:
    """Parsed once at load by the rules' own parser: `unexpected token ')' at column 12`."""
    if not value:
        return "expected a condition"
    return check_expression(value)


@dataclass(frozen=True, slots=True)
class RuleConfig:
    name: str = field(default="", metadata=_check(lambda v: None if v else "expected a non-empty name",
                                                  required=True))
    when: str = field(default="", metadata=_check(_rule_expr_check, required=True))
    for_s: float = field(default=0.0, metadata={"key": "for", "duration": True, **_range(0, 604800)})
    clear_when: str = field(default="", metadata=_check(lambda v: _rule_expr_check(v) if v else None))
    cooldown_s: float = field(default=0.0, metadata={"key": "cooldown", "duration": True,
                                                     **_range(0, 604800)})
    # a named check: validating `set:` values needs the whole schema, so the builder supplies it
    then: tuple[str, ...] = field(default=(), metadata={"item_check": ACTION_CHECK})


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
class SupportConfig:
    """Remote diagnostics (`P/D/support/J/request`): bundle pulls and log level on request."""

    enabled: bool = True
    # chunks are published straight through the session at most this fast, so telemetry keeps its rate
    rate_kbps: float = field(default=256.0, metadata=_range(1, 1_048_576))
    chunk_kb: float = field(default=64.0, metadata=_range(4, 1024))
    # a support bundle (compressed) stays within this; what does not fit is listed as omitted
    max_bundle_mb: float = field(default=5.0, metadata=_range(0.01, 1024))
    max_lines: int = field(default=5000, metadata=_range(0, 1_000_000))  # log lines a request may ask for
    max_log_level_s: float = field(default=3600.0, metadata=_range(1, 86400))
    # a request signed to live longer than this is refused: it bounds how long a job id must be remembered
    max_request_ttl_s: float = field(default=86400.0, metadata=_range(1, 604800))


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
    support: SupportConfig = SupportConfig()

    @property
    def state_dir(self) -> Path:
        return Path(self.device.state_dir)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.device.id
