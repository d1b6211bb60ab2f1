"""The device context (power, load, memory, disk, heat, network, busy, local time) and update gates.

Gates are pure functions of a DeviceContext and a GateConfig: each failing gate comes back with
the measured value next to its limit (`battery 8% < 30%`), so a deferred job says exactly why.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgeagent.core.backoff import backoff_s
from edgeagent.core.config import GateConfig
from edgeagent.core.windows import next_open, parse_window

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeviceContext:
    now: datetime  # local time (maintenance windows are in local time)
    battery_percent: float | None = None
    on_external_power: bool | None = None
    load_per_core: float | None = None  # load1 / cores, averaged over the recent samples
    cpu_percent: float | None = None  # averaged over the recent samples
    mem_available_mb: float | None = None
    disk_free_mb: float | None = None  # where artifacts are stored (the state dir)
    temp_c: float | None = None
    rtt_ms: float | None = None  # broker round trip; None: unknown (not connected)
    busy: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GateFailure:
    gate: str  # one of config.GATE_NAMES
    reason: str

    def __str__(self) -> str:
        return self.reason


def _n(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.2f}".rstrip("0")


def failing_gates(ctx: DeviceContext, cfg: GateConfig, artifact_bytes: int = 0,
                  critical: bool = False) -> list[GateFailure]:
    """Every gate that forbids applying now; empty means go. Critical skips only `cfg.skippable`."""
    out: list[GateFailure] = []
    if cfg.battery_min_percent is not None and ctx.battery_percent is not None and not ctx.on_external_power \
            and ctx.battery_percent < cfg.battery_min_percent:
        out.append(GateFailure("battery", f"battery {_n(ctx.battery_percent)}% < "
                                          f"{_n(cfg.battery_min_percent)}% (on battery)"))
    if cfg.load_max is not None and ctx.load_per_core is not None and ctx.load_per_core > cfg.load_max:
        out.append(GateFailure("load", f"load {ctx.load_per_core:.2f} per core > {_n(cfg.load_max)}"))
    if cfg.cpu_max_percent is not None and ctx.cpu_percent is not None \
            and ctx.cpu_percent > cfg.cpu_max_percent:
        out.append(GateFailure("cpu", f"cpu {_n(ctx.cpu_percent)}% > {_n(cfg.cpu_max_percent)}%"))
    if cfg.mem_free_min_mb is not None and ctx.mem_available_mb is not None \
            and ctx.mem_available_mb < cfg.mem_free_min_mb:
        out.append(GateFailure("memory", f"memory {_n(ctx.mem_available_mb)} MB free < "
                                         f"{_n(cfg.mem_free_min_mb)} MB"))
    need_mb = artifact_bytes * cfg.disk_margin / MB
    if ctx.disk_free_mb is not None and ctx.disk_free_mb < need_mb:
        out.append(GateFailure("disk", f"disk {_n(ctx.disk_free_mb)} MB free < {_n(need_mb)} MB "
                                       f"(artifact x {_n(cfg.disk_margin)})"))
    if cfg.temp_max_c is not None and ctx.temp_c is not None and ctx.temp_c > cfg.temp_max_c:
        out.append(GateFailure("temperature", f"temperature {_n(ctx.temp_c)} C > {_n(cfg.temp_max_c)} C"))
    if cfg.network_rtt_max_ms is not None:
        if ctx.rtt_ms is None:
            out.append(GateFailure("network", "network: broker round trip unknown (not connected)"))
        elif ctx.rtt_ms > cfg.network_rtt_max_ms:
            out.append(GateFailure("network", f"network rtt {_n(ctx.rtt_ms)} ms > "
                                              f"{_n(cfg.network_rtt_max_ms)} ms"))
    if cfg.maintenance_windows:
        windows = tuple(parse_window(w) for w in cfg.maintenance_windows)
        if not any(w.contains(ctx.now) for w in windows):
            nxt = next_open(windows, ctx.now)
            when = nxt.strftime("%a %H:%M") if nxt else "never"
            out.append(GateFailure("window", f"outside maintenance windows "
                                             f"{', '.join(cfg.maintenance_windows)} (next opens {when})"))
    if cfg.respect_busy and ctx.busy:
        why = ", ".join(f"{src}: {reason}" for src, reason in sorted(ctx.busy.items()))
        out.append(GateFailure("busy", f"busy ({why})"))
    if critical:
        out = [f for f in out if f.gate not in cfg.skippable]
    return out


def next_try_s(attempt: int, cfg: GateConfig, failures: list[GateFailure], ctx: DeviceContext,
               rng: random.Random | None = None) -> float:
    """Seconds until the next evaluation: exponential backoff with full jitter in [0.5, 1] of the
    capped delay; when only the window gate fails, exactly when the next window opens."""
    delay = backoff_s(attempt, cfg.backoff_initial_s, cfg.backoff_max_s, rng)
    if failures and all(f.gate == "window" for f in failures):
        windows = tuple(parse_window(w) for w in cfg.maintenance_windows)
        nxt = next_open(windows, ctx.now)
        if nxt is not None:
            delay = max(1.0, (nxt - ctx.now).total_seconds())
    return delay


class MetricsAverager:
    """Keeps the recent monitor samples so load and CPU gates judge an average, not one spike."""

    def __init__(self, horizon_s: float = 60.0, maxlen: int = 600) -> None:
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, dict[str, Any]]] = deque(maxlen=maxlen)

    def add(self, metrics: Mapping[str, Any], ts: float | None = None) -> None:
        self._samples.append((ts if ts is not None else time.monotonic(), dict(metrics)))

    def mean(self, key: str, now: float | None = None) -> float | None:
        now = now if now is not None else time.monotonic()
        vals = [float(m[key]) for t, m in self._samples
                if now - t <= self.horizon_s and isinstance(m.get(key), (int, float))
                and not isinstance(m.get(key), bool)]
        return sum(vals) / len(vals) if vals else None


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def build_context(metrics: Mapping[str, Any], averager: MetricsAverager | None, busy: Mapping[str, str],
                  rtt_ms: float | None, disk_free_mb: float | None, cores: int,
                  now: datetime | None = None) -> DeviceContext:
    """A DeviceContext from the latest monitor sample (DESIGN.md metric names) and the averages."""
    load1 = averager.mean("load1") if averager else None
    if load1 is None:
        load1 = _num(metrics, "load1")
    cpu = averager.mean("cpu_percent") if averager else None
    if cpu is None:
        cpu = _num(metrics, "cpu_percent")
    power = metrics.get("on_external_power")
    return DeviceContext(
        now=now or datetime.now(),
        battery_percent=_num(metrics, "battery_percent"),
        on_external_power=power if isinstance(power, bool) else None,
        load_per_core=load1 / max(1, cores) if load1 is not None else None,
        cpu_percent=cpu,
        mem_available_mb=_num(metrics, "mem_available_mb"),
        disk_free_mb=disk_free_mb,
        temp_c=_num(metrics, "temp_c"),
        rtt_ms=rtt_ms,
        busy=dict(busy),
    )
