"""The retained status says which groups and hardware the device has (from `[device]`), and the fleet
tools file it under them: a real agent process against a real Mosquitto."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import config as cfgmod
from edgeagent.core import protocol
from edgeagent.ops.fleet.state import FleetState, Thresholds
from edgeagent.ops.fleet.watch import select
from edgeagent.transport.component import status_payload
from tests.broker import Broker
from tests.transport_util import Observer
from tests.util import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_status_payload_carries_the_configs_groups_and_hardware() -> None:
    device = cfgmod.build({"device": {"id": "d1", "groups": ["line3", "rpi4"], "hardware": "rpi4"}}).device
    payload = status_payload({"inference": {"model": "m@2"}}, device)
    assert payload["groups"] == ["line3", "rpi4"] and payload["hardware"] == "rpi4"
    assert payload["model"] == {"name": "m", "version": "2"}
    bare = protocol.status_online()
    assert bare["groups"] == [] and bare["hardware"] == ""


def test_status_names_the_cpu_the_agent_runs_on() -> None:
    """`hardware` is what the config says; `arch` is what the process sees (aarch64 on a Pi)."""
    device = cfgmod.build({"device": {"id": "d1", "hardware": "rpi4"}}).device
    payload = status_payload({}, device)
    assert payload["arch"] == platform.machine() != ""
    assert protocol.status_online()["arch"] == platform.machine()


@pytest.mark.integration
def test_the_retained_status_has_groups_and_hardware_and_the_fleet_files_it(tmp_path: Path,
                                                                           broker: Broker) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "grp1"
groups = ["line3", "rpi4"]
hardware = "rpi4"
state_dir = "{tmp_path / 'state'}"

[mqtt]
host = "127.0.0.1"
port = {broker.port}
reconnect_initial_s = 0.1
reconnect_max_s = 1.0

[mqtt.tls]
enabled = false

[inference]
enabled = false
""")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "edgeagent.cli", "run", "-c", str(cfg)], cwd=ROOT,
                                 stdout=out, stderr=out)
    watcher = Observer(broker.port, ("edge/grp1/status",), client_id="watcher-online")
    try:
        wait_until(lambda: any(m.get("state") == "online" for m in watcher.on("edge/grp1/status")), 30,
                   message=f"online status; agent log: {log}")
    finally:
        watcher.close()
    # a fleet collector that connects later gets the retained copy
    late = Observer(broker.port, ("edge/grp1/status",), client_id="watcher-late")
    try:
        wait_until(lambda: late.on_raw("edge/grp1/status"), 10, message="retained status")
        with late.lock:
            topic, raw, retained = next(m for m in late.messages if m[0] == "edge/grp1/status")
    finally:
        late.close()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
    status: dict[str, Any] = protocol.loads_object(topic, raw)
    assert retained and status["state"] == "online"
    assert status["groups"] == ["line3", "rpi4"] and status["hardware"] == "rpi4"

    fleet = FleetState()
    now = time.time()
    fleet.ingest(topic, raw, now)
    [dev] = fleet.snapshot()
    assert dev["groups"] == ["line3", "rpi4"] and dev["hardware"] == "rpi4"
    assert [d["device"] for d in select(fleet.snapshot(), now, Thresholds(), group="line3")] == ["grp1"]
    assert select(fleet.snapshot(), now, Thresholds(), group="line4") == []
    # survives a collector restart (the store keeps snapshots)
    again = FleetState()
    again.restore(fleet.snapshot())
    assert again.snapshot()[0]["hardware"] == "rpi4"
