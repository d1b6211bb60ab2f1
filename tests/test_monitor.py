"""Monitor: sampling with a fake psutil and a fake /sys tree, one real sample, the hub component."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import time
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from edgeagent.core import config as cfgmod
from edgeagent.core.config import MonitorConfig
from edgeagent.core.live import LiveConfig
from edgeagent.core.live import Metrics as MetricsFeed
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.monitor.component import MonitorComponent
from edgeagent.monitor.sampler import (
    Metrics,
    Sampler,
    decode_throttled,
    parse_power,
    parse_throttled,
    pick_temperature,
)
from tests.util import async_wait_until

MIB = 1024 * 1024
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")
Temp = namedtuple("Temp", "label current high critical")
NetIO = namedtuple("NetIO", "bytes_sent bytes_recv")


def cpu(user: float, idle: float, system: float = 0.0, iowait: float = 0.0) -> CpuTimes:
    return CpuTimes(user, 0.0, system, idle, iowait, 0.0, 0.0, 0.0, 0.0, 0.0)


class FakeProcess:
    def __init__(self, ps: FakePsutil) -> None:
        self.ps = ps

    def cpu_times(self) -> Any:
        return SimpleNamespace(user=self.ps.agent_cpu_s, system=0.0)

    def memory_info(self) -> Any:
        return SimpleNamespace(rss=self.ps.agent_rss)


class FakePsutil:
    """Implements the part of psutil's API the sampler uses; readings are plain attributes."""

    def __init__(self) -> None:
        self.cpus = [cpu(0, 0), cpu(0, 0)]
        self.load = (0.5, 0.25, 0.125)
        self.vm = SimpleNamespace(percent=40.0, available=512 * MIB)
        self.swap = SimpleNamespace(total=0, percent=0.0)
        self.disks: dict[str, Any] = {"/": SimpleNamespace(free=1000 * MIB, percent=75.0)}
        self.temps: dict[str, list[Temp]] = {}
        self.battery: Any = None
        self.net: dict[str, NetIO] = {}
        self.agent_cpu_s = 0.0
        self.agent_rss = 20 * MIB

    def cpu_times(self, percpu: bool = False) -> list[CpuTimes]:
        assert percpu
        return list(self.cpus)

    def getloadavg(self) -> tuple[float, float, float]:
        return self.load

    def virtual_memory(self) -> Any:
        return self.vm

    def swap_memory(self) -> Any:
        return self.swap

    def disk_usage(self, path: str) -> Any:
        if path not in self.disks:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.disks[path]

    def sensors_temperatures(self) -> dict[str, list[Temp]]:
        return self.temps

    def sensors_battery(self) -> Any:
        return self.battery

    def net_io_counters(self, pernic: bool = False) -> dict[str, NetIO]:
        assert pernic
        return dict(self.net)

    def Process(self, pid: int | None = None) -> FakeProcess:
        return FakeProcess(self)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Runner:
    def __init__(self, output: str = "throttled=0x0\n", fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.output = output
        self.fail = fail

    def __call__(self, argv: Sequence[str], timeout_s: float) -> str:
        self.calls.append(list(argv))
        if self.fail:
            raise OSError("VCHI initialization failed")
        return self.output


def make(tmp_path: Path, ps: FakePsutil | None = None, runner: Runner | None = None,
         which: str | None = None, **cfg: Any) -> tuple[Sampler, FakePsutil, Clock, Runner]:
    ps = ps or FakePsutil()
    clock = Clock()
    runner = runner or Runner()
    sampler = Sampler(MonitorConfig(**cfg), ps=ps, root=tmp_path, run=runner,
                      which=lambda name: which, monotonic=clock)
    return sampler, ps, clock, runner


def put(root: Path, rel: str, text: str) -> Path:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "edgeagent.monitor.sampler" and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- pure parts


def test_decode_throttled_flags() -> None:
    flags = decode_throttled(0x50005)
    assert flags["raw"] == "0x50005"
    assert flags["under_voltage"] and flags["throttled"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"]
    assert not flags["freq_capped"] and not flags["soft_temp_limit"]
    assert not flags["freq_capped_occurred"] and not flags["soft_temp_limit_occurred"]
    hot = decode_throttled(0x80008)
    assert hot["soft_temp_limit"] and hot["soft_temp_limit_occurred"] and not hot["throttled"]
    assert not any(v for k, v in decode_throttled(0).items() if k != "raw")


def test_parse_throttled_and_power() -> None:
    assert parse_throttled("throttled=0x50005\n") == 0x50005
    assert parse_throttled("50005\n") == 0x50005  # the sysfs file prints bare hex
    with pytest.raises(ValueError, match="get_throttled"):
        parse_throttled("error=1 error_msg=\"Command not registered\"")
    assert parse_power("1\n") is True and parse_power("0") is False
    assert parse_power("Charging") is True and parse_power("Full\n") is True
    assert parse_power("Discharging") is False and parse_power("Not charging") is True
    assert parse_power("Unknown") is None
    with pytest.raises(ValueError):
        parse_power("maybe")


def test_pick_temperature_prefers_configured_then_cpu_sensors() -> None:
    temps = {"acpitz": [Temp("", 61.0, None, None)],
             "coretemp": [Temp("Package id 0", 54.0, 80, 100), Temp("Core 0", 55.5, 80, 100)],
             "nvme": [Temp("Composite", 70.0, None, None)]}
    assert pick_temperature(temps) == 55.5  # the hottest core of the CPU sensor, not the NVMe
    assert pick_temperature(temps, "acpitz") == 61.0
    assert pick_temperature(temps, "no-such") == 55.5
    assert pick_temperature({"cpu-thermal": [Temp("", 48.3, None, None)]}) == 48.3  # '-' vs '_'
    assert pick_temperature({"nvme": [Temp("", 70.0, None, None)]}) is None
    assert pick_temperature({"coretemp": [Temp("", float("nan"), None, None)]}) is None


def test_metrics_as_dict_omits_absent_values() -> None:
    m = Metrics(ts=5.0, cpu_percent=12.5, cpu_per_core=(10.0, 15.0), disks={"/": {"free_mb": 1.0}})
    d = m.as_dict()
    assert d == {"cpu_percent": 12.5, "cpu_per_core": [10.0, 15.0], "disks": {"/": {"free_mb": 1.0}}}
    json.dumps(d)


# --------------------------------------------------------------------------- fake psutil / sysfs


def test_cpu_memory_disk_and_agent_from_fake_readings(tmp_path: Path) -> None:
    sampler, ps, clock, _ = make(tmp_path, disk_paths=("/", "/data"))
    ps.disks["/data"] = SimpleNamespace(free=2048 * MIB, percent=10.0)
    ps.cpus = [cpu(100, 900), cpu(200, 800)]
    ps.agent_cpu_s = 1.0
    first = sampler.sample(1.0).as_dict()
    assert "cpu_percent" not in first and "agent_cpu_percent" not in first  # rates need two samples
    ps.cpus = [cpu(150, 950), cpu(290, 810, iowait=0)]  # core0 50/100 busy, core1 90/100
    ps.agent_cpu_s = 1.5
    clock.t += 10.0
    d = sampler.sample(11.0).as_dict()
    assert d["cpu_per_core"] == [50.0, 90.0]
    assert d["cpu_percent"] == 70.0
    assert d["agent_cpu_percent"] == 5.0
    assert d["agent_rss_mb"] == 20.0
    assert (d["load1"], d["load5"], d["load15"]) == (0.5, 0.25, 0.12)
    assert d["mem_used_percent"] == 40.0 and d["mem_available_mb"] == 512.0
    assert d["disk_free_mb"] == 1000.0
    assert d["disks"] == {"/": {"free_mb": 1000.0, "used_percent": 75.0},
                          "/data": {"free_mb": 2048.0, "used_percent": 10.0}}


def test_absent_sensors_are_omitted_not_faked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.monitor.sampler")
    sampler, _, clock, runner = make(tmp_path, disk_paths=("/missing", "/"))
    sampler.sample(0.0)
    clock.t += 1
    d = sampler.sample(1.0).as_dict()
    assert set(d) == {"cpu_percent", "cpu_per_core", "load1", "load5", "load15", "mem_used_percent",
                      "mem_available_mb", "disks", "agent_rss_mb", "agent_cpu_percent"}
    assert None not in d.values()
    assert "disk_free_mb" not in d  # it is the first configured path, which is missing
    assert list(d["disks"]) == ["/"]
    assert runner.calls == []
    assert len([w for w in warnings_of(caplog) if "/missing" in w]) == 1  # logged once, not per sample


def test_swap_reported_when_configured(tmp_path: Path) -> None:
    sampler, ps, _, _ = make(tmp_path)
    ps.swap = SimpleNamespace(total=100 * MIB, percent=12.34)
    assert sampler.sample(0.0).swap_used_percent == 12.3


def test_net_rates_between_samples_with_counter_reset(tmp_path: Path) -> None:
    sampler, ps, clock, _ = make(tmp_path)
    ps.net = {"lo": NetIO(10**9, 10**9), "eth0": NetIO(500, 1000)}
    first = sampler.sample(0.0).as_dict()
    assert "net_rx_bps" not in first and "net_tx_bps" not in first
    clock.t += 2.0
    ps.net = {"lo": NetIO(2 * 10**9, 2 * 10**9), "eth0": NetIO(1500, 5000)}
    d = sampler.sample(2.0).as_dict()
    assert (d["net_rx_bps"], d["net_tx_bps"]) == (2000.0, 500.0)  # loopback is not counted
    clock.t += 1.0
    ps.net = {"eth0": NetIO(50, 100), "wlan0": NetIO(10**6, 10**6)}  # eth0 reset, wlan0 new
    d = sampler.sample(3.0).as_dict()
    assert (d["net_rx_bps"], d["net_tx_bps"]) == (100.0, 50.0)
    clock.t += 1.0
    ps.net = {"eth0": NetIO(60, 130), "wlan0": NetIO(10**6 + 400, 10**6 + 1000)}
    d = sampler.sample(4.0).as_dict()
    assert (d["net_rx_bps"], d["net_tx_bps"]) == (1030.0, 410.0)


def test_net_interfaces_selects(tmp_path: Path) -> None:
    sampler, ps, clock, _ = make(tmp_path, net_interfaces=("wlan0",))
    ps.net = {"eth0": NetIO(0, 0), "wlan0": NetIO(0, 0)}
    sampler.sample(0.0)
    clock.t += 1.0
    ps.net = {"eth0": NetIO(999, 999), "wlan0": NetIO(7, 3)}
    d = sampler.sample(1.0).as_dict()
    assert (d["net_rx_bps"], d["net_tx_bps"]) == (3.0, 7.0)


def test_pi_throttled_from_sysfs_without_forking(tmp_path: Path) -> None:
    put(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "50000\n")
    sampler, _, _, runner = make(tmp_path, which="/usr/bin/vcgencmd")
    t = sampler.sample(0.0).throttled
    assert t is not None and t["raw"] == "0x50000"
    assert t["under_voltage_occurred"] and t["throttled_occurred"] and not t["under_voltage"]
    assert runner.calls == []


def test_pi_throttled_from_vcgencmd_cached(tmp_path: Path) -> None:
    runner = Runner("throttled=0x4\n")
    sampler, _, clock, _ = make(tmp_path, runner=runner, which="/usr/bin/vcgencmd",
                                throttled_interval_s=10.0)
    seen = []
    for _ in range(25):
        seen.append(sampler.sample(clock.t).throttled)
        clock.t += 1.0
    assert runner.calls == [["/usr/bin/vcgencmd", "get_throttled"]] * 3  # t = 0, 10, 20
    assert all(t is not None and t["throttled"] and t["raw"] == "0x4" for t in seen)


def test_vcgencmd_failure_is_omitted_and_not_retried_every_sample(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.monitor.sampler")
    runner = Runner(fail=True)
    sampler, _, clock, _ = make(tmp_path, runner=runner, which="/usr/bin/vcgencmd",
                                throttled_interval_s=10.0)
    for _ in range(15):
        assert sampler.sample(clock.t).throttled is None
        clock.t += 1.0
    assert len(runner.calls) == 2
    assert len([w for w in warnings_of(caplog) if "throttled" in w]) == 1
    runner.fail, runner.output = False, "throttled=0x1"
    clock.t += 10.0
    t = sampler.sample(clock.t).throttled
    assert t is not None and t["under_voltage"]


def test_throttled_disabled_or_absent(tmp_path: Path) -> None:
    put(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "5\n")
    sampler, _, _, runner = make(tmp_path, which="/usr/bin/vcgencmd", throttled=False)
    assert sampler.sample(0.0).throttled is None
    sampler, _, _, runner = make(tmp_path / "elsewhere", which=None)
    assert sampler.sample(0.0).throttled is None
    assert runner.calls == []


@pytest.mark.parametrize("rel", ["sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load",
                                 "sys/devices/platform/17000000.ga10b/load",
                                 "sys/class/devfreq/17000000.ga10b/device/load"])
def test_jetson_gpu_load_per_mille(tmp_path: Path, rel: str) -> None:
    put(tmp_path, rel, "537\n")
    sampler, _, _, _ = make(tmp_path)
    assert sampler.sample(0.0).gpu_load_percent == 53.7


def test_jetson_gpu_load_configured_file_and_bad_value(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.monitor.sampler")
    path = put(tmp_path, "custom/gpu_load", "1000")
    sampler, _, _, _ = make(tmp_path, jetson_gpu_load_file="/custom/gpu_load")
    assert sampler.sample(0.0).gpu_load_percent == 100.0
    path.write_text("garbage\n")
    assert sampler.sample(1.0).gpu_load_percent is None
    assert sampler.sample(2.0).gpu_load_percent is None
    assert len([w for w in warnings_of(caplog) if "gpu" in w]) == 1
    path.write_text("1500\n")  # not per mille: a bad reading, not 150 %
    assert sampler.sample(3.0).gpu_load_percent is None
    path.write_text("20\n")
    assert sampler.sample(4.0).gpu_load_percent == 2.0
    assert make(tmp_path / "none")[0].sample(0.0).gpu_load_percent is None


def test_battery_and_power_files_take_precedence(tmp_path: Path) -> None:
    put(tmp_path, "ups/capacity", "87%\n")
    put(tmp_path, "ups/status", "Discharging\n")
    ps = FakePsutil()
    ps.battery = SimpleNamespace(percent=20.0, power_plugged=True)
    sampler, _, _, _ = make(tmp_path, ps=ps, battery_file="/ups/capacity", power_file="/ups/status")
    d = sampler.sample(0.0).as_dict()
    assert (d["battery_percent"], d["on_external_power"]) == (87.0, False)
    # only the power file configured: the percentage still comes from psutil
    sampler, _, _, _ = make(tmp_path, ps=ps, power_file="/ups/status")
    d = sampler.sample(0.0).as_dict()
    assert (d["battery_percent"], d["on_external_power"]) == (20.0, False)
    # nothing configured: psutil alone
    d = make(tmp_path, ps=ps)[0].sample(0.0).as_dict()
    assert (d["battery_percent"], d["on_external_power"]) == (20.0, True)


def test_power_status_values(tmp_path: Path) -> None:
    path = put(tmp_path, "sys/class/power_supply/ups/status", "Full\n")
    sampler, _, _, _ = make(tmp_path, power_file="/sys/class/power_supply/ups/status")
    assert sampler.sample(0.0).on_external_power is True
    path.write_text("Unknown\n")
    assert sampler.sample(1.0).on_external_power is None
    path.write_text("0\n")
    assert sampler.sample(2.0).on_external_power is False


def test_bad_battery_file_is_omitted_not_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.monitor.sampler")
    ps = FakePsutil()
    ps.battery = SimpleNamespace(percent=20.0, power_plugged=None)
    sampler, _, _, _ = make(tmp_path, ps=ps, battery_file="/ups/missing")
    for i in range(3):
        d = sampler.sample(float(i)).as_dict()
        assert "battery_percent" not in d  # the configured source failed: no psutil stand-in
        assert "on_external_power" not in d  # psutil does not know
    put(tmp_path, "ups/missing", "140\n")
    assert sampler.sample(3.0).battery_percent is None  # not a percentage
    assert len([w for w in warnings_of(caplog) if "battery_file" in w]) == 1
    (tmp_path / "ups/missing").write_text("99.5\n")
    assert sampler.sample(4.0).battery_percent == 99.5


def test_temperature_from_psutil_preferring_configured(tmp_path: Path) -> None:
    ps = FakePsutil()
    ps.temps = {"cpu_thermal": [Temp("", 51.2, None, None)], "rp1_adc": [Temp("", 60.0, None, None)]}
    assert make(tmp_path, ps=ps)[0].sample(0.0).temp_c == 51.2
    assert make(tmp_path, ps=ps, temp_sensor="rp1_adc")[0].sample(0.0).temp_c == 60.0


def test_temperature_falls_back_to_thermal_zones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeagent.monitor.sampler")
    ps = FakePsutil()
    ps.temps = {"nvme": [Temp("", 40.0, None, None)]}  # present, but not a CPU sensor
    put(tmp_path, "sys/class/thermal/thermal_zone0/type", "iwlwifi_1\n")
    put(tmp_path, "sys/class/thermal/thermal_zone0/temp", "58000\n")
    put(tmp_path, "sys/class/thermal/thermal_zone1/type", "cpu-thermal\n")
    put(tmp_path, "sys/class/thermal/thermal_zone1/temp", "47500\n")
    sampler, _, _, _ = make(tmp_path, ps=ps)
    assert sampler.sample(0.0).temp_c == 47.5  # the CPU zone, not the hottest one
    (tmp_path / "sys/class/thermal/thermal_zone1/temp").write_text("not a number\n")
    assert sampler.sample(1.0).temp_c == 58.0  # no CPU zone readable: the hottest that reads
    assert sampler.sample(2.0).temp_c == 58.0
    assert len([w for w in warnings_of(caplog) if "thermal_zone1" in w]) == 1
    (tmp_path / "sys/class/thermal/thermal_zone0/temp").write_text("-273150\n")  # a faulty sensor
    assert sampler.sample(3.0).temp_c is None


def test_no_temperature_anywhere(tmp_path: Path) -> None:
    assert make(tmp_path)[0].sample(0.0).temp_c is None
    no_sensors = type("NoSensors", (FakePsutil,), {"sensors_temperatures": None,
                                                   "sensors_battery": None})()
    d = make(tmp_path, ps=no_sensors)[0].sample(0.0).as_dict()  # platforms without the functions
    assert "temp_c" not in d and "battery_percent" not in d


def test_configure_applies_new_section_and_keeps_rates(tmp_path: Path) -> None:
    sampler, ps, clock, _ = make(tmp_path)
    ps.net = {"eth0": NetIO(0, 0)}
    sampler.sample(0.0)
    put(tmp_path, "custom/gpu", "250")
    sampler.configure(MonitorConfig(jetson_gpu_load_file="/custom/gpu", disk_paths=("/",)))
    clock.t += 1.0
    ps.net = {"eth0": NetIO(10, 20)}
    m = sampler.sample(1.0)
    assert m.gpu_load_percent == 25.0  # probes start over with the new paths
    assert (m.net_rx_bps, m.net_tx_bps) == (20.0, 10.0)  # the rate baseline survived


# --------------------------------------------------------------------------- this machine


def test_real_sample_on_this_machine() -> None:
    sampler = Sampler(MonitorConfig())
    sampler.sample(0.0)
    d = sampler.sample(1.0).as_dict()  # rates over however little time passed: still valid
    json.dumps(d)
    assert 0.0 <= d["cpu_percent"] <= 100.0
    assert len(d["cpu_per_core"]) == psutil.cpu_count()
    assert all(0.0 <= c <= 100.0 for c in d["cpu_per_core"])
    assert d["load1"] >= 0.0 and d["load5"] >= 0.0 and d["load15"] >= 0.0
    assert 0.0 < d["mem_used_percent"] < 100.0
    assert 0.0 < d["mem_available_mb"] < psutil.virtual_memory().total / MIB
    assert d["disk_free_mb"] > 0.0 and d["disks"]["/"]["free_mb"] == d["disk_free_mb"]
    assert d["net_rx_bps"] >= 0.0 and d["net_tx_bps"] >= 0.0
    assert 1.0 < d["agent_rss_mb"] < 1024.0
    assert 0.0 <= d["agent_cpu_percent"] <= 100.0 * psutil.cpu_count()
    if "temp_c" in d:
        assert -40.0 <= d["temp_c"] <= 150.0
    if "swap_used_percent" in d:
        assert 0.0 <= d["swap_used_percent"] <= 100.0


# --------------------------------------------------------------------------- component


def test_component_publishes_at_the_configured_interval(tmp_path: Path) -> None:
    def cfg(interval_s: float) -> cfgmod.Config:
        return cfgmod.build({"device": {"id": "t", "state_dir": str(tmp_path)},
                             "monitor": {"interval_s": interval_s}})

    async def main() -> None:
        live, feed = LiveConfig(cfg(3600)), MetricsFeed()
        live.slowdown["monitor"] = 8.0  # power_save
        seen: list[float] = []
        feed.subscribe(lambda m: seen.append(time.monotonic()))
        comp = MonitorComponent(live, feed)
        assert comp.name == "monitor"
        async with comp:
            assert comp.section()["samples"] == 0
            task = asyncio.create_task(comp.run(), name="monitor-test")
            try:
                # the first sample comes at once, then the loop waits out the (long) interval...
                await async_wait_until(lambda: len(seen) >= 1, 30.0, message="first sample")
                assert "cpu_percent" not in feed.latest  # rates need two samples: not faked
                assert "mem_used_percent" in feed.latest
                assert abs(feed.ts - time.time()) < 30.0
                # ...until a live config change, which applies at once: 0.05 s x factor 8 = 0.4 s
                live.replace(cfg(0.05))
                await async_wait_until(lambda: len(seen) >= 5, 30.0, message="5 samples")
                # interval x factor (0.4 s), not the bare interval (0.05 s); publish times also
                # carry the worker thread's jitter, hence the margins
                gaps = [b - a for a, b in itertools.pairwise(seen)]
                assert min(gaps) >= 0.2 and (seen[-1] - seen[0]) / len(gaps) >= 0.3, gaps
                assert "cpu_percent" in feed.latest
                section = comp.section()
                assert section["interval_s"] == 0.4
                assert section["samples"] == len(seen) and section["mean_sample_cpu_ms"] > 0
            finally:
                await cancel_and_wait(task)

    asyncio.run(main())


def test_cli_metrics_prints_samples(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[monitor]\ninterval_s = 0.1\ndisk_paths = ["/"]\n')
    out = subprocess.run([sys.executable, "-m", "edgeagent.cli", "metrics", "-c", str(cfg), "-n", "2"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all("cpu_percent" in m and "disk_free_mb" in m for m in lines)
    cfg.write_text("[monitor]\ninterval_s = 0\n")
    bad = subprocess.run([sys.executable, "-m", "edgeagent.cli", "metrics", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "monitor.interval_s" in bad.stderr and bad.stdout == ""
