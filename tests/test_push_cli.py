"""`edgeagent push` and `push cancel` as an operator runs them, against a real Mosquitto and real
agents (tests.updates_agent processes: transport + updates + a fake model installer): unknown
device, deferred jobs, a group of three, cancel, and a broker restart in the middle of a push."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent import cli
from tests.broker import Broker
from tests.test_updates_process import AgentProc
from tests.transport_util import Observer
from tests.updates_helpers import KEY_ID, MODEL, ROOT, make_keys, make_raw, push_table
from tests.util import wait_until

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "edgeagent.cli"]


class Fleet:
    """Agents as processes, each in its own dir under tmp, all trusting one key."""

    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.tmp, self.broker = tmp, broker
        _, self.pub = make_keys(tmp / "keys")
        self.key = str(tmp / "keys" / f"{KEY_ID}.key")
        self.agents: dict[str, AgentProc] = {}

    def start(self, device: str, *extra: str, hardware: str = "rpi4", **sections: Any) -> AgentProc:
        d = self.tmp / device
        d.mkdir()
        raw = make_raw(d, self.pub, self.broker.port, device=device, **sections)
        raw["device"]["hardware"] = hardware
        agent = AgentProc(d, raw, "--fake-models", str(d / "store"), *extra).start()
        self.agents[device] = agent
        wait_until(lambda: f"{device} 1 edge/group/line1/updates/+/#" in self.broker.log(), 30,
                   message=f"{device} subscribed")
        return agent

    def base(self, *target: str) -> list[str]:
        return [*CLI, "push", "--broker", self.broker.url, "--key", self.key, "--key-id", KEY_ID, *target]

    def push(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base(), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker)
    yield f
    f.stop()
    for device, agent in f.agents.items():
        if agent.proc is not None and agent.proc.returncode not in (None, 0, -15):
            sys.stderr.write(f"--- {device}\n{agent.logs()[-3000:]}")


def in_process(*argv: str) -> tuple[int, str, str, float]:
    """`edgeagent ...` in this process (interpreter start-up excluded from the time taken)."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue(), time.monotonic() - t0


def test_unknown_device_or_group_is_said_at_once_and_bad_files_are_not_sent(tmp_path: Path,
                                                                           broker: Broker) -> None:
    key = tmp_path / "keys" / f"{KEY_ID}.key"
    make_keys(tmp_path / "keys")
    obs = Observer(broker.port, ("edge/#",), client_id="obs-unknown")
    try:
        obs.publish("edge/dev1/status", b'{"v":1,"state":"online","groups":["line1"],"hardware":"rpi4"}',
                    retain=True)
        common = ["push", "--broker", broker.url, "--key", str(key), "--key-id", KEY_ID, "--kind", "model",
                  "--name", "vibration-anomaly", "--version", "2.0.0"]
        rc, _, err, took = in_process(*common, "--device", "dev9", str(MODEL))
        assert rc == 1 and took < 2.0, (took, err)
        assert "not sent: unknown device dev9: no retained status on edge/dev9/status" in err
        rc, _, err, took = in_process(*common, "--group", "line9", str(MODEL))
        assert rc == 1 and took < 2.0, (took, err)
        assert "no device of group line9" in err and "groups seen: line1" in err
        # checked before anything is sent (exit 2): the name, the version, the TFLite header
        not_tflite = tmp_path / "model.tflite"
        not_tflite.write_bytes(b"\x1c\x00\x00\x00TFL2" + bytes(64))
        for args, needle in [(("--name", "bad/name"), "name 'bad/name'"),
                             (("--version", "v2"), "version 'v2'"),
                             ((), "not a TFLite model: bytes 4-8 are b'TFL2'")]:
            argv = [*common, "--device", "dev1", *args, str(not_tflite if not args else MODEL)]
            rc, _, err, _ = in_process(*argv)
            assert rc == 2 and needle in err and "not sent" in err, err
        assert not [t for t, _, _ in obs.messages if "/updates/" in t]
    finally:
        obs.close()


def test_deferred_job_is_reported_with_its_gate_then_cancelled(fleet: Fleet) -> None:
    hour = (time.localtime().tm_hour + 12) % 24  # a window that is not open now
    agent = fleet.start("dev1", updates={"gates": {"model": {
        "maintenance_windows": [f"Mon-Sun {hour:02d}:00-{hour:02d}:01"]}}})
    res = fleet.push("--device", "dev1", "--kind", "model", "--name", "vibration-anomaly",
                     "--version", "2.0.0", "--job", "gated", "--chunk-kb", "4", "--timeout", "8s", str(MODEL))
    assert res.returncode == 1, res.stderr
    assert "dev1: accepted" in res.stderr
    assert "dev1: deferred: outside maintenance windows" in res.stderr and "next try" in res.stderr
    assert "timed out" not in res.stderr + res.stdout
    assert "1 deferred: the device keeps the job" in res.stderr
    state, detail = push_table(res.stdout)["dev1"]
    assert state == "deferred" and "outside maintenance windows" in detail and "next try" in detail
    assert agent.job_state("gated") == "deferred"

    cancel = subprocess.run([*fleet.base("--device", "dev1"), "cancel", "gated"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 0, cancel.stderr
    assert "dev1: cancelled (it was deferred)" in cancel.stderr
    assert push_table(cancel.stdout)["dev1"][0] == "cancelled"
    wait_until(lambda: agent.job_state("gated") == "cancelled", 10, message="journal says cancelled")
    # nothing left to cancel: said so, and an unknown job too
    again = subprocess.run([*fleet.base("--device", "dev1"), "cancel", "gated"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "already cancelled: nothing to cancel" in again.stderr
    unknown = subprocess.run([*fleet.base("--device", "dev1"), "cancel", "nope"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "unknown job nope" in unknown.stderr


def test_group_push_serves_every_member_and_ends_with_a_table(fleet: Fleet) -> None:
    for device in ("devA", "devB"):
        fleet.start(device)
    fleet.start("devC", hardware="rpi5")  # the manifest targets rpi4: devC refuses it
    res = fleet.push("--group", "line1", "--kind", "model", "--name", "vibration-anomaly", "--version",
                     "2.0.0", "--hardware", "rpi4", "--job", "grp", "--chunk-kb", "4", "--timeout", "90s",
                     str(MODEL))
    table = push_table(res.stdout)
    assert sorted(table) == ["devA", "devB", "devC"], res.stdout + res.stderr
    assert table["devA"][0] == table["devB"][0] == "succeeded"
    assert table["devC"][0] == "rejected" and "hardware" in table["devC"][1]
    assert res.returncode == 1  # not every device succeeded
    assert "group line1 (3 devices)" in res.stderr
    for device in ("devA", "devB"):
        assert fleet.agents[device].job_state("grp") == "succeeded"


def test_push_survives_a_broker_restart(fleet: Fleet, tmp_path: Path) -> None:
    gate = tmp_path / "install-gate"
    agent = fleet.start("dev1", "--install-gate", str(gate))
    proc = subprocess.Popen([*fleet.base("--device", "dev1"), "--kind", "model", "--name",
                             "vibration-anomaly", "--version", "2.0.0", "--job", "restart", "--chunk-kb", "4",
                             "--timeout", "120s", str(MODEL)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.communicate(timeout=180)), daemon=True)
    reader.start()
    try:
        wait_until(lambda: agent.job_state("restart") == "installing", 60, message="installing")
        fleet.broker.stop()  # the push and the agent both lose the broker mid-job
        gate.touch()  # the install finishes while the broker is down: its status waits in the spool
        wait_until(lambda: agent.job_state("restart") == "succeeded", 30, message="installed")
        fleet.broker.start()  # a new Mosquitto on the same port, from its persistence file
        reader.join(150)
        assert proc.returncode == 0, out
        stdout, stderr = out
        assert push_table(stdout)["dev1"][0] == "succeeded", stdout + stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cancel_of_an_installing_job_says_how_it_ended(fleet: Fleet, tmp_path: Path) -> None:
    gate = tmp_path / "install-gate"
    agent = fleet.start("dev1", "--install-gate", str(gate))
    push = subprocess.Popen([*fleet.base("--device", "dev1"), "--kind", "model", "--name",
                             "vibration-anomaly", "--version", "2.0.0", "--job", "late", "--chunk-kb", "4",
                             "--timeout", "120s", str(MODEL)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cancel: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: agent.job_state("late") == "installing", 60, message="installing")
        cancel = subprocess.Popen([*fleet.base("--device", "dev1", "--timeout", "60s"), "cancel", "late"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert cancel.stderr is not None
        first = cancel.stderr.readline()  # blocks until the device answered (or the cancel gave up)
        assert first.startswith("dev1: too late: it is installing"), first
        gate.touch()  # the install goes on and ends
        out, err = cancel.communicate(timeout=90)
        assert cancel.returncode == 1  # not cancelled
        assert "dev1: too late (it was installing): it ended succeeded" in err
        assert push_table(out)["dev1"][0] == "not cancelled"
        pushed, _ = push.communicate(timeout=90)
        assert push.returncode == 0 and push_table(pushed)["dev1"][0] == "succeeded"
        assert agent.job_state("late") == "succeeded"
    finally:
        for proc in (push, cancel):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
