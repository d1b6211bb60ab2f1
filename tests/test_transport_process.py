"""The agent as a real process (`edgeagent run`) against a real Mosquitto: outages, kill -9, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgeagent.transport import Spool
from tests.broker import Broker
from tests.transport_util import Observer, assert_retained_shutdown, contiguous
from tests.util import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    def __init__(self, tmp_path: Path, port: int, keepalive_s: int = 5) -> None:
        self.state = tmp_path / "state"
        self.config = tmp_path / "agent.toml"
        self.log = tmp_path / "agent.log"
        self.config.write_text(f"""
[device]
id = "dev1"
state_dir = "{self.state}"

[agent]
health_interval_s = 0.2

[mqtt]
host = "127.0.0.1"
port = {port}
keepalive_s = {keepalive_s}
reconnect_initial_s = 0.1
reconnect_max_s = 1.0

[mqtt.tls]
enabled = false

[inference]
enabled = false

[telemetry]
interval_s = 0.1
batch_wait_s = 0
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        out = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        cmd = [sys.executable, "-m", "edgeagent.cli", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out)
        out.close()
        return self

    def health(self) -> dict[str, Any]:
        try:
            h: dict[str, Any] = json.loads((self.state / "health.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return h if self.proc and h.get("pid") == self.proc.pid else {}

    def last_seq(self) -> int:
        return int(self.health().get("sections", {}).get("telemetry", {}).get("last_seq", 0))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agent_log(tmp_path: Path) -> Any:
    yield
    log = tmp_path / "agent.log"
    if log.exists():
        sys.stderr.write(log.read_text()[-4000:])


def test_outages_and_kill9_lose_no_sample(tmp_path: Path, agent_log: None) -> None:
    broker = Broker(workdir=tmp_path / "broker").start()
    obs = Observer(broker.port)
    agent = AgentProcess(tmp_path, broker.port).start()
    try:
        wait_until(lambda: len(obs.seqs()) >= 20, 30, message="telemetry flowing")

        # 1. a 10 s outage at 10 Hz
        broker.stop()
        down_at = agent.last_seq()
        wait_until(lambda: agent.last_seq() >= down_at + 100, 30, message="100 samples spooled")
        broker.start()
        target = agent.last_seq()
        wait_until(lambda: contiguous(obs.seqs(), 1, target), 30, message="backlog delivered")

        # 2. another outage, with kill -9 of the agent in the middle and a restart
        broker.stop()
        down_at = agent.last_seq()
        wait_until(lambda: agent.last_seq() >= down_at + 50, 30, message="50 samples spooled")
        agent.kill9()
        killed_at = max(agent.last_seq(), down_at + 50)
        agent.start()
        wait_until(lambda: agent.last_seq() >= killed_at + 50, 30, message="restarted agent samples")
        assert agent.last_seq() > killed_at  # seq continued, it did not start over
        broker.start()
        target = agent.last_seq()
        wait_until(lambda: contiguous(obs.seqs(), 1, target), 30, message="everything delivered")
        seqs = obs.seqs()
        assert set(range(1, max(seqs) + 1)) == set(seqs)  # no gap anywhere (duplicates allowed)

        assert agent.terminate() == 0
        # the clean stop flushed everything, the final sample included: the spool is empty
        spool = Spool(agent.state / "spool.sqlite", 1 << 20, "dev1")
        spool.open()
        final, backlog = spool.last_seq["telemetry"], spool.count
        spool.close()
        assert backlog == 0
        wait_until(lambda: contiguous(obs.seqs(), 1, final), 10, message="the final sample")
    finally:
        agent.stop()
        obs.close()
        broker.stop()


def test_status_last_will_and_clean_shutdown(tmp_path: Path, broker: Broker, agent_log: None) -> None:
    keepalive_s = 5
    obs = Observer(broker.port, ("edge/dev1/status",))
    agent = AgentProcess(tmp_path, broker.port, keepalive_s).start()

    def last() -> dict[str, Any]:
        st = obs.on("edge/dev1/status")
        return st[-1] if st else {}

    try:
        wait_until(lambda: last().get("state") == "online", 30, message="online")
        assert last()["agent"] and isinstance(last()["ts"], float)
        t0 = time.monotonic()
        agent.kill9()
        wait_until(lambda: last().get("reason") == "connection-lost", 1.5 * keepalive_s, message="last will")
        assert last()["state"] == "offline"
        assert time.monotonic() - t0 <= 1.5 * keepalive_s

        agent.start()
        wait_until(lambda: last().get("state") == "online", 30, message="online again")
        assert agent.terminate() == 0
        wait_until(lambda: last().get("reason") == "shutdown", 10, message="clean offline")
        assert last()["state"] == "offline"
    finally:
        agent.stop()
        obs.close()
    assert_retained_shutdown(broker.port)
    assert os.path.exists(agent.state / "spool.sqlite")
