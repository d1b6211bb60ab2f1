"""The agent as a real process: kill -9 during download and during install, and the firmware A/B
cycle where "reboot" is the test restarting the process (fake A/B installer: two slot dirs + flag)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.push import Pusher
from tests.broker import Broker
from tests.updates_helpers import (
    MODEL,
    ROOT,
    StatusWatcher,
    config_toml,
    fake_ab_commands,
    make_keys,
    make_raw,
    signed,
)
from tests.util import wait_until

pytestmark = pytest.mark.integration


class AgentProc:
    def __init__(self, tmp: Path, raw: dict[str, Any], *extra: str, cli: bool = False) -> None:
        """cli: the production entry point (`edgeagent run`, every default component); else
        tests.updates_agent (transport + updates + a fake model installer the test can hold)."""
        self.tmp = tmp
        self.cli = cli
        self.conf = tmp / "agent.toml"
        self.conf.write_text(config_toml(raw))
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> AgentProc:
        self.runs += 1
        with open(self.tmp / f"agent-{self.runs}.log", "wb") as log:  # the child keeps its own fd
            argv = (["-m", "edgeagent.cli", "run", "--config", str(self.conf)] if self.cli
                    else ["-m", "tests.updates_agent", str(self.conf), *self.extra])
            self.proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def journal(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.tmp / "state" / "journal.json").read_text())
        except (OSError, ValueError):
            return {}
        return {j["job"]: j for j in doc["jobs"]}

    def job_state(self, job: str) -> str | None:
        return self.journal().get(job, {}).get("state")

    def wait_subscribed(self, broker: Broker) -> None:
        """Until the broker logged this run's SUBSCRIBE to the updates topics (the agent is listening)."""
        wait_until(lambda: broker.log().count("dev1 1 edge/dev1/updates/+/#") >= self.runs, 20,
                   message=f"agent run {self.runs} subscribed")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("agent-*.log")))


@pytest.fixture
def watcher(broker: Broker) -> Iterator[StatusWatcher]:
    w = StatusWatcher(broker.port)
    yield w
    w.close()


def push_in_thread(port: int, msg: dict[str, Any], artifact: Path, timeout_s: float = 60) -> Any:
    url = BrokerUrl.parse(f"mqtt://127.0.0.1:{port}")
    client = make_client(url, "push-proc")
    connect_and_wait(client, url, 30)
    try:
        return Pusher(client, "edge", msg, artifact, device="dev1").run(timeout_s, 10.0)
    finally:
        client.disconnect()
        client.loop_stop()


def test_kill9_during_download_and_during_install(tmp_path: Path, broker: Broker,
                                                  watcher: StatusWatcher) -> None:
    key, pub = make_keys(tmp_path / "keys")
    raw = make_raw(tmp_path, pub, broker.port)
    gate = tmp_path / "install-gate"
    agent = AgentProc(tmp_path, raw, "--fake-models", str(tmp_path / "store"), "--install-gate", str(gate))
    agent.start()
    try:
        data = MODEL.read_bytes()
        msg = signed(MODEL, key, job="k9", version="2.0.0", chunk_size=4096)
        parts = [data[i:i + 4096] for i in range(0, len(data), 4096)]
        agent.wait_subscribed(broker)
        watcher.publish("edge/dev1/updates/k9/manifest", msg)
        wait_until(lambda: agent.job_state("k9") == "downloading", 20)
        half = len(parts) // 2
        for i in range(half):
            watcher.publish(f"edge/dev1/updates/k9/chunk/{i}", parts[i])
        bitmap = tmp_path / "state" / "updates" / "k9" / "bitmap"
        wait_until(lambda: bitmap.exists() and sum(bitmap.read_bytes()) >= max(1, half // 2), 20)
        agent.kill9()
        have = bytes(bitmap.read_bytes())
        assert 0 < sum(have) < len(parts)
        watcher.requests.clear()
        agent.start()
        # the restarted agent asks for what it does not have (QoS 1 may redeliver a chunk that was in
        # flight at the kill, so that can be less than the bitmap said); we answer only requests
        missing = {i for i, h in enumerate(have) if not h}
        answered: set[int] = set()

        def serve_requests() -> bool:
            for r in [r for r in list(watcher.requests) if r["job"] == "k9"]:
                asked = {i for a, b in r["missing"] for i in range(a, b + 1)}
                for i in sorted(asked - answered):
                    watcher.publish(f"edge/dev1/updates/k9/chunk/{i}", parts[i])
                    answered.add(i)
            return agent.job_state("k9") == "installing"

        wait_until(serve_requests, 30, interval_s=0.1, message="download completed through requests")
        # the restarted agent resumed from its bitmap: its first ask starts at a gap, not at 0
        resumed = re.search(r'msg="asking for chunks".* received=(\d+) first=(\d+)',
                            (tmp_path / "agent-2.log").read_text())
        assert resumed, "no resume request logged"
        assert int(resumed.group(1)) >= sum(have) and int(resumed.group(2)) >= min(missing)
        agent.kill9()  # in the middle of the install (the fake installer waits for the gate file)
        gate.write_text("go")
        agent.start()
        wait_until(lambda: agent.job_state("k9") == "succeeded", 30, message="k9 succeeded")
        assert agent.journal()["k9"]["resumes"] == 1
        assert (tmp_path / "store" / "vibration-anomaly" / "2.0.0" / "model.tflite").read_bytes() == data
        wait_until(lambda: watcher.state("k9") == "succeeded", 20)
    finally:
        agent.stop()


def firmware_setup(tmp_path: Path, broker: Broker, **fw: Any) -> tuple[Any, AgentProc, Path]:
    key, pub = make_keys(tmp_path / "keys")
    ab = tmp_path / "ab"
    (tmp_path / "fw-version").write_text("1.0.0\n")
    firmware = {"commands": fake_ab_commands(ab), "health_timeout_s": 10, "max_boot_attempts": 2, **fw}
    raw = make_raw(tmp_path, pub, broker.port, updates={"firmware": firmware},
                   sensors={"rate_hz": 160.0})  # inference is off; keep the rest of the agent light
    agent = AgentProc(tmp_path, raw, cli=True)
    return key, agent, ab


def test_firmware_ab_update_commits_after_reboot(tmp_path: Path, broker: Broker,
                                                watcher: StatusWatcher) -> None:
    key, agent, ab = firmware_setup(tmp_path, broker)
    image = tmp_path / "rootfs-2.0.0.img"
    image.write_bytes(os.urandom(300_000))
    agent.start()
    try:
        agent.wait_subscribed(broker)
        msg = signed(image, key, job="fw2", kind="firmware", name="rootfs", version="2.0.0")
        import threading

        result: list[Any] = []
        pusher = threading.Thread(target=lambda: result.append(push_in_thread(broker.port, msg, image)))
        pusher.start()
        wait_until(lambda: (ab / "reboots").exists(), 60, message="reboot requested")
        assert agent.job_state("fw2") == "rebooting"
        assert (ab / "booted").read_text().strip() == "B" and (ab / "state").read_text().strip() == "trial"
        agent.kill9()  # the "reboot"
        agent.start()
        pusher.join(60)
        assert result and result[0].states == {"dev1": "succeeded"}, result
        ops = (ab / "ops.log").read_text().split("\n")
        assert [o.split(" ")[0] for o in ops if o] == ["slot", "install", "reboot", "slot", "mark-good"]
        assert (ab / "state").read_text().strip() == "good"
        assert (ab / "slot-B" / "rootfs.img").read_bytes() == image.read_bytes()
        journal = json.loads((tmp_path / "state" / "journal.json").read_text())
        assert journal["firmware"] == {"version": "2.0.0", "slot": "B"}
        log = (tmp_path / "state" / "updates" / "fw2" / "log.txt").read_text()
        assert "installed rootfs.img" not in log and "into slot B" in log
    finally:
        agent.stop()


def test_firmware_health_check_fails_and_rolls_back(tmp_path: Path, broker: Broker,
                                                   watcher: StatusWatcher) -> None:
    key, agent, ab = firmware_setup(tmp_path, broker, health_command=[
        sys.executable, "-c", "import sys; print('app self-test failed'); sys.exit(3)"])
    image = tmp_path / "rootfs-2.0.0.img"
    image.write_bytes(os.urandom(100_000))
    agent.start()
    try:
        agent.wait_subscribed(broker)
        msg = signed(image, key, job="fwbad", kind="firmware", name="rootfs", version="2.0.0")
        watcher.publish("edge/dev1/updates/fwbad/manifest", msg)
        wait_until(lambda: agent.job_state("fwbad") == "downloading", 20)
        import threading

        threading.Thread(target=push_in_thread, args=(broker.port, msg, image, 30), daemon=True).start()
        wait_until(lambda: (ab / "reboots").exists(), 60, message="reboot requested")
        agent.kill9()
        agent.start()
        wait_until(lambda: agent.job_state("fwbad") == "rolled_back", 30)
        wait_until(lambda: (ab / "reboots").read_text().strip() == "2", 10, message="reboot into old slot")
        assert (ab / "booted").read_text().strip() == "A" and (ab / "state").read_text().strip() == "bad"
        reason = agent.journal()["fwbad"]["reason"]
        assert "health command failed (exit 3): app self-test failed" in reason
        wait_until(lambda: watcher.state("fwbad") == "rolled_back", 20)
    finally:
        agent.stop()
