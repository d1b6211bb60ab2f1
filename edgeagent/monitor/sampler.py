"""Board metrics: psutil and a few sysfs files sampled into a `Metrics` value (DESIGN.md names).

`Sampler` is pure and synchronous (psutil-like module, sysfs root and command runner injected, so
tests fake readings and a /sys tree); `MonitorComponent` (component.py) runs it off the event
loop at the configured interval and publishes the result. A sensor the board lacks is omitted,
never faked; a sensor that fails is omitted and logged once, and never stops the other readings.
Probing for optional hardware (thermal zones, Jetson GPU, Pi firmware, vcgencmd, batteries) is
cached: a hit is kept until it fails to read, a miss is retried every `REDISCOVER_S`.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import shutil
import subprocess
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgeagent.core.config import MonitorConfig
from edgeagent.core.logs import Once

log = logging.getLogger(__name__)

MIB = 1024 * 1024
REDISCOVER_S = 300.0  # a missing sensor is probed again this often (USB UPS plugged in later, ...)
VCGENCMD_TIMEOUT_S = 3.0
TEMP_RANGE_C = (-40.0, 150.0)  # outside this a reading is a sensor fault, not a temperature

# psutil sensor names (lower case, '-' -> '_') that measure the CPU/SoC, best first
CPU_SENSORS = ("cpu_thermal", "coretemp", "k10temp", "zenpower", "soc_thermal", "cpu", "tj_thermal",
               "cpu_thermal_zone", "thermal_zone0")
THROTTLED_SYSFS_GLOBS = ("sys/devices/platform/soc/soc:firmware/get_throttled",
                         "sys/devices/platform/soc*/*firmware/get_throttled")
# Jetson GPU load files (per mille), tried after `monitor.jetson_gpu_load_file`
GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load",
                  "sys/devices/platform/17000000.ga10b/load", "sys/devices/17000000.ga10b/load",
                  "sys/devices/platform/bus@0/17000000.gpu/load", "sys/devices/platform/17000000.gpu/load",
                  "sys/devices/17000000.gv11b/load", "sys/devices/platform/17000000.gv11b/load",
                  "sys/devices/57000000.gpu/load")
GPU_DEVFREQ_GLOB = "sys/class/devfreq/*/device/load"
GPU_DEVFREQ_NAMES = ("gpu", "ga10b", "gv11b", "gp10b", "gm20b")
# Raspberry Pi firmware get_throttled bits
THROTTLED_BITS = {
    "under_voltage": 0, "freq_capped": 1, "throttled": 2, "soft_temp_limit": 3,
    "under_voltage_occurred": 16, "freq_capped_occurred": 17, "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}

T = TypeVar("T")
Runner = Callable[[Sequence[str], float], str]  # argv, timeout_s -> stdout; raises on failure


def run_command(argv: Sequence[str], timeout_s: float) -> str:
    """The real runner: a short-lived child with a timeout (only vcgencmd uses it)."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                          check=True).stdout


@dataclass(frozen=True, slots=True)
class Metrics:
    """One sample; None means the board has no such sensor (or it could not be read)."""

    ts: float
    cpu_percent: float | None = None
    cpu_per_core: tuple[float, ...] | None = None
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    mem_used_percent: float | None = None
    mem_available_mb: float | None = None
    swap_used_percent: float | None = None
    disk_free_mb: float | None = None
    disks: Mapping[str, Mapping[str, float]] | None = None  # path -> {free_mb, used_percent}
    temp_c: float | None = None
    net_rx_bps: float | None = None
    net_tx_bps: float | None = None
    battery_percent: float | None = None
    on_external_power: bool | None = None
    agent_rss_mb: float | None = None
    agent_cpu_percent: float | None = None
    throttled: Mapping[str, Any] | None = None  # Raspberry Pi firmware flags + "raw" hex
    gpu_load_percent: float | None = None  # Jetson

    def as_dict(self) -> dict[str, Any]:
        """The `metrics` object of telemetry (DESIGN.md names): absent values are left out, no ts."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "ts":
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
            out[f.name] = value
        return out


# --------------------------------------------------------------------------- parsing (pure)


def decode_throttled(raw: int) -> dict[str, Any]:
    """Raspberry Pi `get_throttled` bits -> named flags (now / has occurred since boot) + raw hex."""
    out: dict[str, Any] = {"raw": hex(raw)}
    for name, bit in THROTTLED_BITS.items():
        out[name] = bool(raw >> bit & 1)
    return out


def parse_throttled(text: str) -> int:
    """`throttled=0x50005` (vcgencmd) or `50005` (sysfs, hex) -> int; ValueError otherwise."""
    value = text.strip()
    if value.startswith("throttled="):
        value = value[len("throttled="):]
    try:
        return int(value, 16)
    except ValueError:
        raise ValueError(f"unexpected get_throttled output {text.strip()[:40]!r}") from None


def parse_power(text: str) -> bool | None:
    """A power file: 1/0 (an AC `online` file, a UPS HAT) or a power_supply `status`.
    None for "Unknown"; ValueError for anything else."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "online", "charging", "full", "not charging"):
        return True
    if value in ("0", "false", "no", "off", "offline", "discharging"):
        return False
    if value == "unknown":
        return None
    raise ValueError(f"expected 1/0 or Charging/Discharging/Full, got {text.strip()[:40]!r}")


def parse_percent(text: str) -> float:
    value = float(text.strip().rstrip("%"))
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"expected a percentage 0-100, got {text.strip()[:40]!r}")
    return value


def _valid_temp(value: object) -> bool:
    return (isinstance(value, (int, float)) and math.isfinite(value)
            and TEMP_RANGE_C[0] <= value <= TEMP_RANGE_C[1])


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def pick_temperature(temps: Mapping[str, Sequence[Any]], preferred: str = "") -> float | None:
    """The hottest valid reading of the preferred sensor, else of the first CPU-ish one."""
    by_name = {_norm(k): v for k, v in temps.items()}
    order = ([_norm(preferred)] if preferred else []) + list(CPU_SENSORS)
    for name in order:
        values = [float(e.current) for e in by_name.get(name, ()) if _valid_temp(e.current)]
        if values:
            return round(max(values), 1)
    return None


def _cpu_total(t: Any) -> float:
    # guest time is already counted in user/nice (psutil does the same)
    return float(sum(t)) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _cpu_busy(t: Any) -> float:
    return _cpu_total(t) - float(t.idle) - getattr(t, "iowait", 0.0)


def _percent(part: float, whole: float) -> float:
    if whole <= 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * part / whole)), 1)


# --------------------------------------------------------------------------- sampler


class Sampler:
    """Reads every sensor the board has; rates (CPU, network, agent CPU) need two samples."""

    def __init__(self, config: MonitorConfig, *, ps: Any = None, root: Path | str = "/",
                 run: Runner = run_command, which: Callable[[str], str | None] = shutil.which,
                 pid: int | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        if ps is None:
            import psutil

            ps = psutil
        self.config = config
        self._ps = ps
        self._root = Path(root)
        self._run = run
        self._which = which
        self._pid = pid
        self._monotonic = monotonic
        self._once = Once(log)
        self._process: Any = None
        self._discovered: dict[str, tuple[Any, float]] = {}
        self._prev_cpu: Any = None
        self._prev_net: tuple[float, dict[str, tuple[int, int]]] | None = None
        self._prev_agent: tuple[float, float] | None = None
        self._vcgencmd_cache: tuple[float, dict[str, Any]] | None = None
        self._readers: tuple[tuple[str, Callable[[float], dict[str, Any]]], ...] = (
            ("cpu", self._cpu), ("load", self._load), ("memory", self._memory), ("swap", self._swap),
            ("disk", self._disks), ("temperature", self._temperature), ("network", self._network),
            ("power", self._power), ("agent", self._agent), ("throttled", self._throttled),
            ("gpu", self._gpu),
        )

    def configure(self, config: MonitorConfig) -> None:
        """Apply a new monitor section live; rate baselines survive, probes start over."""
        if config != self.config:
            self.config = config
            self._discovered.clear()
            self._vcgencmd_cache = None

    def sample(self, now: float) -> Metrics:
        """One reading of everything (blocking: /proc, /sys and maybe a vcgencmd child)."""
        mono = self._monotonic()
        values: dict[str, Any] = {}
        for key, reader in self._readers:
            got = self._guard(key, reader, mono)
            if got:
                values.update(got)
        return Metrics(ts=now, **values)

    # -- helpers

    def _guard(self, key: str, fn: Callable[..., T], *args: Any) -> T | None:
        """The one place a failing sensor is caught: omitted, logged once, the rest goes on."""
        try:
            result = fn(*args)
        except Exception as exc:
            self._once.warning(key, "monitor: cannot read %s: %s", key, exc,
                               extra={"kv": {"sensor": key, "error": type(exc).__name__}})
            return None
        if result is not None and result != {}:  # a reading, not "nothing new" (cached vcgencmd)
            self._once.reset(key)
        return result

    def _path(self, path: str) -> Path:
        return self._root / path.lstrip("/")

    def _read(self, path: Path) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(256)

    def _discover(self, key: str, mono: float, probe: Callable[[], T | None]) -> T | None:
        """Probe for optional hardware once; a miss is probed again after REDISCOVER_S."""
        hit = self._discovered.get(key)
        if hit is not None and (hit[0] is not None or mono - hit[1] < REDISCOVER_S):
            return typing.cast("T | None", hit[0])
        value = probe()
        self._discovered[key] = (value, mono)
        return value

    def _forget(self, key: str) -> None:
        """Probe again on the next sample (the hardware may have changed)."""
        self._discovered.pop(key, None)

    def _miss(self, key: str, mono: float) -> None:
        """Treat as absent until the next probe, REDISCOVER_S from now."""
        self._discovered[key] = (None, mono)

    # -- readers: each returns the Metrics fields it found

    def _cpu(self, mono: float) -> dict[str, Any]:
        per = self._ps.cpu_times(percpu=True)
        prev, self._prev_cpu = self._prev_cpu, per
        if prev is None or len(prev) != len(per):  # first sample, or a core went on/offline
            return {}
        cores: list[float] = []
        busy_all = total_all = 0.0
        for a, b in zip(prev, per, strict=True):
            total = _cpu_total(b) - _cpu_total(a)
            busy = _cpu_busy(b) - _cpu_busy(a)
            cores.append(_percent(busy, total))
            busy_all += busy
            total_all += total
        return {"cpu_percent": _percent(busy_all, total_all), "cpu_per_core": tuple(cores)}

    def _load(self, mono: float) -> dict[str, Any]:
        l1, l5, l15 = self._ps.getloadavg()
        return {"load1": round(l1, 2), "load5": round(l5, 2), "load15": round(l15, 2)}

    def _memory(self, mono: float) -> dict[str, Any]:
        vm = self._ps.virtual_memory()
        return {"mem_used_percent": round(float(vm.percent), 1),
                "mem_available_mb": round(vm.available / MIB, 1)}

    def _swap(self, mono: float) -> dict[str, Any]:
        sw = self._ps.swap_memory()
        if not sw.total:  # no swap configured: nothing to report
            return {}
        return {"swap_used_percent": round(float(sw.percent), 1)}

    def _disks(self, mono: float) -> dict[str, Any]:
        disks: dict[str, dict[str, float]] = {}
        for path in self.config.disk_paths:
            du = self._guard(f"disk {path}", self._ps.disk_usage, path)
            if du is not None:
                disks[path] = {"free_mb": round(du.free / MIB, 1), "used_percent": round(du.percent, 1)}
        if not disks:
            return {}
        out: dict[str, Any] = {"disks": disks}
        first = self.config.disk_paths[0]
        if first in disks:
            out["disk_free_mb"] = disks[first]["free_mb"]
        return out

    def _temperature(self, mono: float) -> dict[str, Any]:
        temp = None
        if self._discover("psutil-temps", mono, self._probe_psutil_temps):
            temps = self._ps.sensors_temperatures()
            temp = pick_temperature(temps, self.config.temp_sensor)
            if not temps:
                self._forget("psutil-temps")
        if temp is None:
            zones = self._discover("thermal-zones", mono, self._probe_thermal_zones)
            if zones:
                temp = self._read_zones(zones)
        return {} if temp is None else {"temp_c": temp}

    def _probe_psutil_temps(self) -> bool | None:
        fn = getattr(self._ps, "sensors_temperatures", None)
        return True if fn is not None and fn() else None

    def _probe_thermal_zones(self) -> list[tuple[Path, str]] | None:
        """Thermal zones as (temp file, normalised type); CPU-ish ones first."""
        base = self._path(self.config.thermal_dir)
        zones: list[tuple[Path, str]] = []
        for d in sorted(glob.glob(str(base / "thermal_zone*"))):
            kind = _norm(self._guard(f"thermal type {d}", self._read, Path(d) / "type") or "")
            zones.append((Path(d) / "temp", kind))
        preferred = _norm(self.config.temp_sensor)
        rank = {name: i for i, name in enumerate([preferred, *CPU_SENSORS] if preferred else CPU_SENSORS)}
        zones.sort(key=lambda z: rank.get(z[1], len(rank)))
        return zones or None

    def _read_zones(self, zones: list[tuple[Path, str]]) -> float | None:
        """The first CPU-ish zone that reads; without one, the hottest zone (a safe bound)."""
        readings: list[float] = []
        for path, kind in zones:
            value = self._guard(f"thermal {path}", lambda p: int(self._read(p).strip()) / 1000.0, path)
            if value is None:
                continue
            if not _valid_temp(value):
                self._once.warning(f"thermal range {path}", "monitor: ignoring %s reading of %s C",
                                   path, value)
                continue
            if kind in CPU_SENSORS or (kind and kind == _norm(self.config.temp_sensor)):
                return round(value, 1)
            readings.append(value)
        return round(max(readings), 1) if readings else None

    def _network(self, mono: float) -> dict[str, Any]:
        counters = self._ps.net_io_counters(pernic=True)
        wanted = self.config.net_interfaces
        now = {name: (c.bytes_recv, c.bytes_sent) for name, c in counters.items()
               if (name in wanted if wanted else name != "lo")}
        prev, self._prev_net = self._prev_net, (mono, now)
        if prev is None or mono <= prev[0] or not now:  # first sample, or no interface to count
            return {}
        rx = tx = 0
        for name, (r, t) in now.items():
            if name not in prev[1]:
                continue  # appeared since the last sample: its counters are not a rate yet
            pr, pt = prev[1][name]
            # a counter that went down was reset (interface re-created, driver reload): count
            # what it has seen since, never a negative rate
            rx += r - pr if r >= pr else r
            tx += t - pt if t >= pt else t
        dt = mono - prev[0]
        return {"net_rx_bps": round(rx / dt, 1), "net_tx_bps": round(tx / dt, 1)}

    def _power(self, mono: float) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {}
        if cfg.battery_file:
            value = self._guard("battery_file", lambda p: parse_percent(self._read(p)),
                                self._path(cfg.battery_file))
            if value is not None:
                out["battery_percent"] = round(value, 1)
        if cfg.power_file:
            power = self._guard("power_file", lambda p: parse_power(self._read(p)),
                                self._path(cfg.power_file))
            if power is not None:
                out["on_external_power"] = power
        if cfg.battery_file and cfg.power_file:
            return out  # both configured: psutil is not asked at all
        if self._discover("psutil-battery", mono, self._probe_psutil_battery):
            batt = self._ps.sensors_battery()
            if batt is None:
                self._forget("psutil-battery")
                return out
            if not cfg.battery_file and batt.percent is not None:
                out["battery_percent"] = round(float(batt.percent), 1)
            if not cfg.power_file and batt.power_plugged is not None:
                out["on_external_power"] = bool(batt.power_plugged)
        return out

    def _probe_psutil_battery(self) -> bool | None:
        fn = getattr(self._ps, "sensors_battery", None)
        return True if fn is not None and fn() is not None else None

    def _agent(self, mono: float) -> dict[str, Any]:
        if self._process is None:
            self._process = self._ps.Process(self._pid)
        times = self._process.cpu_times()
        cpu_s = float(times.user + times.system)
        out: dict[str, Any] = {"agent_rss_mb": round(self._process.memory_info().rss / MIB, 1)}
        prev, self._prev_agent = self._prev_agent, (mono, cpu_s)
        if prev is not None and mono > prev[0]:
            # CPU times tick in 10 ms steps: over a very short gap the quotient can exceed what the
            # cores can do, so bound it by them
            most = 100.0 * (os.cpu_count() or 1)
            pct = 100.0 * (cpu_s - prev[1]) / (mono - prev[0])
            out["agent_cpu_percent"] = round(min(most, max(0.0, pct)), 2)
        return out

    def _throttled(self, mono: float) -> dict[str, Any]:
        if not self.config.throttled:
            return {}
        path = self._discover("throttled-sysfs", mono, self._probe_throttled_sysfs)
        if path is not None:  # no fork: the firmware value straight from sysfs
            text = self._guard("throttled sysfs", self._read, path)
            if text is not None:
                return {"throttled": decode_throttled(parse_throttled(text))}
            self._miss("throttled-sysfs", mono)  # unreadable: vcgencmd until the next probe
        binary = self._discover("vcgencmd", mono, lambda: self._which("vcgencmd"))
        if binary is None:
            return {}
        cached = self._vcgencmd_cache
        if cached is None or mono - cached[0] >= self.config.throttled_interval_s:
            # vcgencmd forks a child: run it at most every throttled_interval_s, even when it
            # fails (and then report nothing until the next try rather than a stale value)
            self._vcgencmd_cache = (mono, {})
            text = self._run([binary, "get_throttled"], VCGENCMD_TIMEOUT_S)
            cached = (mono, decode_throttled(parse_throttled(text)))
            self._vcgencmd_cache = cached
        flags = cached[1]
        return {"throttled": flags} if flags else {}

    def _probe_throttled_sysfs(self) -> Path | None:
        for pattern in THROTTLED_SYSFS_GLOBS:
            for hit in sorted(glob.glob(str(self._root / pattern))):
                return Path(hit)
        return None

    def _gpu(self, mono: float) -> dict[str, Any]:
        path = self._discover("gpu-load", mono, self._probe_gpu)
        if path is None:
            return {}
        try:
            text = self._read(path)
        except OSError:
            self._miss("gpu-load", mono)
            raise
        per_mille = int(text.strip())
        if not 0 <= per_mille <= 1000:
            raise ValueError(f"{path}: expected 0-1000 (per mille), got {text.strip()[:20]!r}")
        return {"gpu_load_percent": round(per_mille / 10.0, 1)}

    def _probe_gpu(self) -> Path | None:
        configured = self.config.jetson_gpu_load_file
        candidates = [self._path(configured)] if configured else []
        candidates += [self._root / p for p in GPU_LOAD_FILES]
        for path in candidates:
            if path.is_file():
                return path
        for hit in sorted(glob.glob(str(self._root / GPU_DEVFREQ_GLOB))):
            name = Path(hit).parent.parent.name.lower()
            if any(n in name for n in GPU_DEVFREQ_NAMES):
                return Path(hit)
        return None


__all__ = ["Metrics", "Sampler", "decode_throttled", "pick_temperature"]
