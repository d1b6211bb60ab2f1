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
PIPELINE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}\Z")
RESERVED_PIPELINE_NAMES = ("inference", "mqtt", "pipelines", "default")
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
    protocol: Literal["auto", "5", "3.1.1"] = "auto"  # auto: 5, falling back to 3.1.1 (remembered)
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


def _stopbits_check(value: float) -> str | None:
    return None if value in (1, 1.5, 2) else f"expected 1, 1.5 or 2, got {value:g}"


def _channel_name_check(value: str) -> str | None:
    """Channel names are rule names (`temperature_c > 60`) and telemetry keys."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
        return None
    return f"expected a name of letters, digits and '_' (not starting with a digit), got {value!r}"


_CHANNEL = {"item_check": _channel_name_check}


@dataclass(frozen=True, slots=True)
class SerialSensorConfig:
    """A line-oriented device on a serial port (USB-serial, UART): one sample per line."""

    device: str = "/dev/ttyUSB0"  # prefer a stable /dev/serial/by-id/... path
    baud: int = field(default=115200, metadata=_range(50, 4_000_000))
    bytesize: int = field(default=8, metadata=_range(5, 8))
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = field(default=1.0, metadata=_check(_stopbits_check))
    format: Literal["csv", "kv"] = "csv"  # csv: `1.0,2.0,3.0`; kv: `ax=1.0 ay=2.0 az=3.0`
    columns: tuple[str, ...] = field(default=("ax", "ay", "az"), metadata=_CHANNEL)  # csv order / kv keys
    separator: str = ","  # between csv columns (kv pairs split on whitespace, ',' or ';')
    # no complete line for this long: the device counts as gone (closed, reopened with backoff)
    timeout_s: float = field(default=5.0, metadata=_range(0.1, 3600))


@dataclass(frozen=True, slots=True)
class ModbusRegisterConfig:
    """One channel of a Modbus device: where its value lives and how to scale it."""

    name: str = field(default="", metadata=_check(_channel_name_check, required=True))
    table: Literal["holding", "input"] = "holding"
    address: int = field(default=0, metadata=_range(0, 65535))  # 0-based (register 40001 is 0)
    type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "uint16"
    word_order: Literal["big", "little"] = "big"  # 32-bit types: "big" puts the high word first
    scale: float = 1.0  # value = raw x scale + offset
    offset: float = 0.0
    unit: str = ""
    min: float | None = None  # a scaled value outside min..max is counted and dropped
    max: float | None = None


@dataclass(frozen=True, slots=True)
class ModbusSensorConfig:
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str = "127.0.0.1"  # tcp
    port: int = field(default=502, metadata=_range(1, 65535))
    device: str = "/dev/ttyUSB0"  # rtu: the RS-485 adapter
    baud: int = field(default=9600, metadata=_range(50, 4_000_000))
    bytesize: int = field(default=8, metadata=_range(5, 8))
    parity: Literal["N", "E", "O"] = "N"
    stopbits: float = field(default=1.0, metadata=_check(_stopbits_check))
    unit_id: int = field(default=1, metadata=_range(0, 247))
    timeout_s: float = field(default=1.0, metadata=_range(0.01, 60))
    registers: tuple[ModbusRegisterConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class IioSensorConfig:
    """A Linux Industrial I/O device (accelerometer, ADC, IMU) under a sysfs root."""

    root: str = "/sys/bus/iio/devices"
    device: str = ""  # its `name` ("adxl345") or directory ("iio:device0"); empty: the only device
    channels: tuple[str, ...] = field(default=("accel_x", "accel_y", "accel_z"), metadata=_CHANNEL)
    # sysfs: read in_<channel>_raw per sample; buffered: the /dev/iio:deviceN FIFO with scan_elements
    # (the driver must support it); auto: buffered when the device has scan_elements
    mode: Literal["auto", "sysfs", "buffered"] = "sysfs"
    dev_dir: str = "/dev"  # where the iio:deviceN character devices are
    # the IIO ABI gives m/s^2; "g" converts acceleration channels (models trained in g, as ours)
    accel_unit: Literal["m/s^2", "g"] = "m/s^2"


@dataclass(frozen=True, slots=True)
class WindowConfig:
    size: int = field(default=256, metadata=_range(1, 1_000_000))
    stride: int = field(default=16, metadata=_range(1, 1_000_000))


@dataclass(frozen=True, slots=True)
class SensorsConfig:
    source: Literal["simulated", "csv", "mqtt", "serial", "modbus", "iio"] = "simulated"
    rate_hz: float = field(default=1600.0, metadata=_range(0.01, 1e6))  # bus sources: the poll rate
    channels: int = field(default=3, metadata=_range(1, 64))  # simulated/csv/mqtt; bus sources name theirs
    # bus sources: the named channels the model gets, in this order (empty: all, in the source's order)
    select: tuple[str, ...] = field(default=(), metadata=_CHANNEL)
    units: dict[str, str] = field(default_factory=dict)  # channel -> unit (overrides the source's)
    limits: dict[str, tuple[float, ...]] = field(default_factory=dict)  # channel -> [min, max]
    retry_initial_s: float = field(default=1.0, metadata=_range(0.01, 3600))  # a lost device: backoff
    retry_max_s: float = field(default=30.0, metadata=_range(0.01, 86400))
    simulated: SimulatedSensorConfig = SimulatedSensorConfig()
    csv: CsvSensorConfig = CsvSensorConfig()
    mqtt: MqttSensorConfig = MqttSensorConfig()
    serial: SerialSensorConfig = SerialSensorConfig()
    modbus: ModbusSensorConfig = ModbusSensorConfig()
    iio: IioSensorConfig = IioSensorConfig()
    window: WindowConfig = WindowConfig()


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    enabled: bool = True
    runtime: Literal["auto", "tflite-runtime", "litert"] = "auto"
    model: str = "vibration-anomaly"
    model_variant: Literal["int8", "float"] = "int8"  # which shipped file seeds the store
    num_threads: int = field(default=1, metadata=_range(1, 64))
    delegate: str = ""  # e.g. "libedgetpu.so.1" for a Coral USB stick
    # interpreter threads all pipelines share (0: no budget; each pipeline takes its num_threads)
    threads_budget: int = field(default=0, metadata=_range(0, 256))
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


def _pipeline_name_check(value: str) -> str | None:
    if not PIPELINE_NAME_RE.match(value):
        return (f"expected 1-32 letters, digits or '_', starting with a letter (rules read its figures as "
                f"NAME.anomaly_rate_1m), got {value!r}")
    if value in RESERVED_PIPELINE_NAMES:
        return f"{value!r} is reserved (a section name rules read); pick another name"
    return None


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """One [[pipelines]] entry: a source, its windows, a model and how its output is read (head)."""

    name: str = field(default="", metadata=_check(_pipeline_name_check, required=True))
    source: SensorsConfig = SensorsConfig()  # the [sensors] table's shape
    window: WindowConfig | None = None  # default: source.window
    model: str = field(default="", metadata=_check(lambda v: None if v else "expected a model name",
                                                   required=True))
    model_variant: Literal["int8", "float"] = "int8"
    # how the output is read; "auto": as the model's model.toml says (`output`)
    head: Literal["auto", "classes", "autoencoder", "regression"] = "auto"
    num_threads: int = field(default=0, metadata=_range(0, 64))  # 0: a share of inference.threads_budget
    threshold: float | None = None  # default: calibrated (calibrate_windows), else the model's model.toml
    clear_threshold: float | None = None
    # autoencoder: learn the threshold from the first N windows (a healthy baseline), kept in the state dir
    calibrate_windows: int = field(default=0, metadata=_range(0, 1_000_000))
    calibrate_sigma: float = field(default=4.0, metadata=_range(0.1, 100))  # threshold = mean + k * std
    unit: str = ""  # regression: the value's unit; default: the model's model.toml


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
    pipelines: tuple[PipelineConfig, ...] = ()  # empty: one pipeline from [sensors] + [inference]
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
