"""`mqtt.protocol = "auto"`: MQTT 5 where the broker has it (Mosquitto), 3.1.1 where it does not
(amqtt, a real 3.1.1-only broker started by the test), remembered in the state dir."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent.transport.negotiate import (
    PROTOCOL_FILE,
    REFRESH_AFTER_S,
    REPROBE_AFTER_S,
    ProtocolChoice,
    is_version_problem,
    remember,
    remembered,
)
from tests import rig
from tests.amqtt_broker import Amqtt
from tests.broker import Broker
from tests.rig import wiring
from tests.test_transport_process import ROOT, AgentProcess
from tests.transport_util import Observer, make_config
from tests.util import async_wait_until, wait_until


def test_which_failures_mean_no_mqtt5() -> None:
    for reason in ("refused by broker: [code:132] Unsupported protocol version",
                   "connection closed before CONNACK: Keep alive timeout", "Operation timed out",
                   "connection closed before CONNACK: no CONNACK in time"):
        assert is_version_problem(reason), reason
    for reason in ("[Errno 111] Connection refused", "refused by broker: [code:135] Not authorized",
                   "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
                   "[Errno -2] Name or service not known", "refused by broker: Bad user name or password"):
        assert not is_version_problem(reason), reason


def test_choice_forced_auto_remembered_and_reprobed(tmp_path: Path) -> None:
    assert ProtocolChoice("3.1.1", tmp_path).first == "3.1.1"
    forced = ProtocolChoice("5", tmp_path)
    assert forced.fallback("5", "Operation timed out") is None  # "5" means 5
    auto = ProtocolChoice("auto", tmp_path)
    assert auto.first == "5" and remembered(tmp_path) is None
    assert auto.fallback("5", "[Errno 111] Connection refused") is None  # the broker is down
    assert auto.fallback("5", "Operation timed out") == "3.1.1"
    auto.connected("3.1.1")
    assert (tmp_path / PROTOCOL_FILE).read_text() == "3.1.1\n" and auto.first == "3.1.1"
    assert ProtocolChoice("auto", tmp_path).first == "3.1.1"  # the next start
    # a week later, the next start probes 5 again (the broker may have been upgraded)
    later = time.time() + REPROBE_AFTER_S + 60
    assert ProtocolChoice("auto", tmp_path, now=later).first == "5"
    # a forced version neither reads nor writes the file
    forced.connected("5")
    assert remembered(tmp_path) == "3.1.1"
    (tmp_path / PROTOCOL_FILE).write_text("banana\n")
    assert ProtocolChoice("auto", tmp_path).first == "5"
    with pytest.raises(ValueError):
        remember(tmp_path, "4")
    # a reconnect does not touch the disk; a day later the same version is confirmed (mtime)
    remember(tmp_path, "5")
    stamp = (tmp_path / PROTOCOL_FILE).stat().st_mtime
    os.utime(tmp_path / PROTOCOL_FILE, (stamp - 10, stamp - 10))
    remember(tmp_path, "5")
    assert (tmp_path / PROTOCOL_FILE).stat().st_mtime == stamp - 10
    remember(tmp_path, "5", now=time.time() + REFRESH_AFTER_S + 60)
    assert (tmp_path / PROTOCOL_FILE).stat().st_mtime > stamp - 10


@pytest.mark.integration
def test_auto_speaks_5_to_mosquitto_and_says_so(tmp_path: Path, broker: Broker) -> None:
    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        assert w.live.config.mqtt.protocol == "auto"  # the default
        async with rig.transport(w) as transport:
            await asyncio.wait_for(w.router.wait_connected(), 10)
            assert transport.mqtt_section()["protocol"] == "5"
        assert remembered(tmp_path / "state") == "5"

    asyncio.run(main())


@pytest.mark.integration
def test_forced_5_never_falls_back(tmp_path: Path) -> None:
    amqtt = Amqtt(tmp_path / "amqtt").start()

    async def main() -> None:
        cfg = make_config(tmp_path / "state", amqtt.port, mqtt={"protocol": "5", "connect_timeout_s": 0.5,
                                                               "keepalive_s": 5})
        w = wiring(cfg)
        async with rig.transport(w) as transport:
            session = transport.session
            assert session is not None
            await async_wait_until(lambda: session.failed_connects >= 2, 30, message="two failed connects")
            assert not session.connected and session.provider()["protocol"] is None
        assert remembered(tmp_path / "state") is None

    try:
        asyncio.run(main())
    finally:
        amqtt.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_auto_falls_back_to_311_on_amqtt_and_remembers(tmp_path: Path) -> None:
    """The default config against a 3.1.1-only broker: telemetry, retained status, the last will
    on kill -9; the next start speaks 3.1.1 at once; `status` shows it."""
    amqtt = Amqtt(tmp_path / "amqtt").start()
    obs = Observer(amqtt.port, ("edge/#",), client_id="obs311", mqtt5=False)
    agent = AgentProcess(tmp_path, amqtt.port)
    try:
        agent.start()
        wait_until(lambda: len(obs.seqs()) >= 3, 60, message="telemetry over MQTT 3.1.1")
        wait_until(lambda: remembered(agent.state) == "3.1.1", 10, message="3.1.1 remembered")
        log = agent.log.read_text()
        assert "MQTT 5 refused" in log and "speaking MQTT 3.1.1 (negotiated)" in log
        late = Observer(amqtt.port, ("edge/dev1/status",), client_id="late311", mqtt5=False)
        try:
            wait_until(lambda: late.on("edge/dev1/status"), 10, message="retained status")
            assert late.on("edge/dev1/status")[-1]["state"] == "online"
        finally:
            late.close()
        # commands arrive too (QoS 1, acknowledged by hand on 3.1.1 as on 5): a malformed manifest
        # is answered with a retained "rejected" job status
        obs.publish("edge/dev1/updates/junk/manifest", b"{not json")
        wait_until(lambda: obs.on("edge/dev1/updates/junk/status"), 20, message="the device answered")
        assert obs.on("edge/dev1/updates/junk/status")[-1]["state"] == "rejected"
        wait_until(lambda: agent.health().get("sections", {}).get("mqtt", {}).get("protocol") == "3.1.1", 10)
        status = subprocess.run([sys.executable, "-m", "edgeagent.cli", "status", "--state-dir",
                                 str(agent.state)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "MQTT 3.1.1" in status.stdout, status.stdout + status.stderr

        agent.kill9()  # the broker publishes the last will once the keepalive runs out
        wait_until(lambda: any(s.get("state") == "offline" for s in obs.on("edge/dev1/status")), 30,
                   message="last will")
        will = [s for s in obs.on("edge/dev1/status") if s.get("state") == "offline"][-1]
        assert will["reason"] == "connection-lost"

        # the next start goes straight to 3.1.1: no failed MQTT 5 attempt in its log
        mark = len(agent.log.read_text())
        seen = len(obs.seqs())
        agent.start()
        wait_until(lambda: len(obs.seqs()) >= seen + 3, 30, message="telemetry after the restart")
        again = agent.log.read_text()[mark:]
        assert "MQTT 5 refused" not in again and "protocol=3.1.1" in again
    finally:
        agent.stop()
        obs.close()
        amqtt.stop()
        if (log := tmp_path / "agent.log").exists():
            sys.stderr.write(log.read_text()[-3000:])
