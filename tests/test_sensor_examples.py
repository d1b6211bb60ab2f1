"""Each shipped configs/examples/*.toml of a bus source, as a user runs it (only ${ENV} differs),
against its peer on this machine and a real Mosquitto: scaled values in telemetry, windows reach
the model, an unplugged device is an event and comes back without restarting the agent."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.agent import Agent
from edgeagent.core import config as cfgmod
from tests.broker import Broker
from tests.sensor_peers import LineFeeder, ModbusRtuPeer, ModbusTcpPeer, PtyDevice, iio_tree
from tests.transport_util import Observer
from tests.util import async_wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "configs" / "examples"
BUS_EXAMPLES = ("serial.toml", "modbus-tcp.toml", "modbus-rtu.toml", "iio.toml")


def _env(broker: Broker, tmp_path: Path, device: str, **extra: str) -> dict[str, str]:
    return {"EDGEAGENT_MQTT_HOST": "127.0.0.1", "EDGEAGENT_MQTT_PORT": str(broker.port),
            "EDGEAGENT_STATE_DIR": str(tmp_path / "state"), "EDGEAGENT_DEVICE_ID": device, **extra}


@pytest.mark.parametrize("name", BUS_EXAMPLES)
def test_example_passes_check_config(name: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeagent.cli", "check-config", "-c", str(EXAMPLES / name)],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "EDGEAGENT_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"{name}: OK" in proc.stdout


class Run:
    """The agent on an example config, in this event loop, watched through the broker."""

    def __init__(self, path: Path, env: dict[str, str], broker: Broker) -> None:
        self.cfg = cfgmod.load(path, env=env)
        self.device = self.cfg.device.id
        self.obs = Observer(broker.port, topics=(f"edge/{self.device}/#",), client_id=f"obs-{self.device}")
        self.agent = Agent(self.cfg)
        self.task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> Run:
        self.task = asyncio.create_task(self.agent.run(), name="agent")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.agent.request_stop("test over")
        assert self.task is not None
        assert await asyncio.wait_for(self.task, 30) == 0
        self.obs.close()

    def samples(self) -> list[dict[str, Any]]:
        return [s for m in self.obs.on(f"edge/{self.device}/telemetry") for s in m["samples"]]

    def sensors(self) -> dict[str, Any]:
        with_sensors = [s["sensors"] for s in self.samples() if "sensors" in s]
        return with_sensors[-1] if with_sensors else {}

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.obs.on(f"edge/{self.device}/events") if e["kind"] == kind]

    def inferred(self) -> int:
        counts = [s.get("inference", {}).get("count", 0) for s in self.samples()]
        return max(counts, default=0)

    async def until(self, predicate: Callable[[], object], what: str, timeout_s: float = 40) -> None:
        await async_wait_until(predicate, timeout_s, interval_s=0.1, message=what)
        assert self.task is not None and not self.task.done(), "the agent stopped"


async def _unplug_replug(run: Run, unplug: Callable[[], Any], replug: Callable[[], Any]) -> None:
    await run.until(lambda: run.sensors().get("state") == "ok", "sensor ok")
    await unplug()
    await run.until(lambda: run.sensors().get("state") == "down" and run.events("sensor"), "down + event")
    await replug()
    await run.until(lambda: run.sensors().get("state") == "ok" and len(run.events("sensor")) >= 2,
                    "back + event")
    lost, back = run.events("sensor")[:2]
    assert lost["severity"] == "warning" and back["severity"] == "info"


def test_serial_example(broker: Broker, tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "ttyUSB0")

    async def main() -> None:
        env = _env(broker, tmp_path, "ex-serial", EDGEAGENT_SERIAL_DEVICE=str(dev.path))
        with LineFeeder(dev, lambda i: b"0.02,-0.01,%.4f\n" % (1.0 + (i % 7) / 1000)) as feeder:
            async with Run(EXAMPLES / "serial.toml", env, broker) as run:
                await run.until(lambda: run.inferred() > 20, "windows served by the model")
                ch = run.sensors()["channels"]
                assert ch["ax"] == {"value": 0.02, "unit": "g"} and ch["az"]["unit"] == "g"
                feeder.extra += [b"not,a,number\n", b"1,2\n"]
                await run.until(lambda: run.sensors().get("malformed", 0) >= 2, "garbage in telemetry")

                async def unplug() -> None:
                    dev.unplug()

                async def replug() -> None:
                    dev.replug()
                await _unplug_replug(run, unplug, replug)
                served = run.inferred()
                await run.until(lambda: run.inferred() > served + 20, "the model serves again")
    try:
        asyncio.run(main())
    finally:
        dev.close()


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_modbus_example(transport: str, broker: Broker, tmp_path: Path) -> None:
    async def main() -> None:
        if transport == "tcp":
            peer: ModbusTcpPeer | ModbusRtuPeer = ModbusTcpPeer()
            extra = {"EDGEAGENT_MODBUS_HOST": "127.0.0.1", "EDGEAGENT_MODBUS_PORT": str(peer.port)}
        else:
            peer = ModbusRtuPeer(tmp_path)
            extra = {"EDGEAGENT_MODBUS_SERIAL": str(peer.agent_path)}
        await peer.set_holding(0, [215, 400])  # 21.5 °C, 40.0 %
        await peer.start()
        try:
            env = _env(broker, tmp_path, f"ex-modbus-{transport}", **extra)
            async with Run(EXAMPLES / f"modbus-{transport}.toml", env, broker) as run:
                def humidity() -> object:
                    return run.sensors().get("channels", {}).get("humidity_pct", {}).get("value")
                await run.until(humidity, "values in telemetry")
                ch = run.sensors()["channels"]
                assert ch["temperature_c"] == {"value": pytest.approx(21.5), "unit": "°C"}
                assert ch["humidity_pct"] == {"value": pytest.approx(40.0), "unit": "%"}
                assert "inference" not in run.samples()[-1]
                # the rule reads the channel by name: 61.2 °C raises the alert
                await peer.set_holding(0, [612])
                def alerted() -> bool:
                    return any(e["data"].get("rule") == "cabinet-hot" for e in run.events("rule"))
                await run.until(alerted, "the cabinet-hot alert")
                alert = next(e for e in run.events("rule") if e["data"].get("rule") == "cabinet-hot")
                assert alert["severity"] == "critical"
                assert alert["data"]["values"]["temperature_c"] == pytest.approx(61.2)
                await _unplug_replug(run, peer.stop, peer.start)
        finally:
            await peer.stop()
    asyncio.run(main())


def test_iio_example(broker: Broker, tmp_path: Path) -> None:
    root = tmp_path / "iio"
    iio_tree(root, raw=(3, -3, 256))

    async def main() -> None:
        env = _env(broker, tmp_path, "ex-iio", EDGEAGENT_IIO_ROOT=str(root))
        async with Run(EXAMPLES / "iio.toml", env, broker) as run:
            await run.until(lambda: run.inferred() > 10, "windows served by the model")
            ch = run.sensors()["channels"]
            assert ch["accel_z"]["unit"] == "g"
            assert ch["accel_z"]["value"] == pytest.approx(256 * 0.0383 / 9.80665, rel=1e-4)

            async def unplug() -> None:
                shutil.rmtree(root / "iio:device0")

            async def replug() -> None:
                iio_tree(root, raw=(3, -3, 256))
            await _unplug_replug(run, unplug, replug)
    asyncio.run(main())
