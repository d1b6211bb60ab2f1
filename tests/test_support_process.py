"""Support requests end to end: a real Mosquitto, a real `edgeagent run` process, and the operator's
`edgeagent support pull|log-level` commands as processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import protocol, signing
from edgeagent.ops.support import build_request
from tests.broker import Broker
from tests.transport_util import Observer
from tests.updates_helpers import KEY_ID, ROOT, config_toml, make_keys, make_raw
from tests.util import wait_until

pytestmark = pytest.mark.integration

RATE_KBPS = 64.0
CHUNK_KB = 16.0
PLANTED_PASSWORD = "hunter2-planted-secret"
PLANTED = 320 * 1024  # incompressible bytes in the bundle, so the pull lasts a few seconds


class Agent:
    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.tmp = tmp
        self.key, pub = make_keys(tmp / "keys")
        self.keyfile = tmp / "keys" / f"{KEY_ID}.key"
        raw = make_raw(tmp, pub, broker.port, support={"rate_kbps": RATE_KBPS, "chunk_kb": CHUNK_KB},
                       telemetry={"interval_s": 0.1, "batch_wait_s": 0},
                       agent={"shutdown_timeout_s": 5, "health_interval_s": 0.2})
        # a planted secret: the broker takes any credentials (anonymous allowed), the bundle must not
        raw["mqtt"].update(username="dev1", password=PLANTED_PASSWORD)
        self.conf = tmp / "agent.toml"
        self.conf.write_text(config_toml(raw))
        self.log = tmp / "agent.log"
        with open(self.log, "wb") as out:
            argv = [sys.executable, "-m", "edgeagent.cli", "run", "--config", str(self.conf)]
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: broker.log().count("dev1 1 edge/dev1/support/+/request") >= 1, 30,
                   message="agent subscribed to support requests")

    def health(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.tmp / "state" / "health.json").read_text()))
        except (OSError, ValueError):
            return {}

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agent(tmp_path: Path, broker: Broker) -> Iterator[Agent]:
    a = Agent(tmp_path, broker)
    yield a
    a.stop()


@pytest.fixture
def observer(broker: Broker) -> Iterator[Observer]:
    o = Observer(broker.port, ("edge/dev1/#",), client_id=f"obs-{time.monotonic_ns()}")
    yield o
    o.close()


def operator(broker: Broker, agent: Agent, *argv: str,
             timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeagent.cli", "support", *argv, "--key", str(agent.keyfile),
           "--key-id", KEY_ID, "--broker", broker.url, "--timeout", "30s"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def job_topics(observer: Observer, job: str) -> list[str]:
    with observer.lock:
        return [t for t, _, _ in observer.messages if t.startswith(f"edge/dev1/support/{job}/")
                and not t.endswith("/request")]


def test_a_signed_pull_returns_a_verified_bundle_and_telemetry_keeps_its_rate(
        tmp_path: Path, broker: Broker, agent: Agent, observer: Observer) -> None:
    for i in range(5):  # a bundle carries the last 64 KiB of each job's log: five jobs' worth
        planted = tmp_path / "state" / "updates" / f"big{i}" / "log.txt"
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(os.urandom(PLANTED // 5))
    wait_until(lambda: observer.seqs(), 20, message="telemetry flowing")
    out = tmp_path / "pulled" / "dev1.tar.gz"
    t0 = time.monotonic()
    seq_before = max(observer.seqs())
    done = operator(broker, agent, "pull", "--device", "dev1", "--lines", "50", "-o", str(out))
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr + agent.logs()[-3000:]

    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert sha in done.stdout and f"{len(data)} bytes" in done.stdout
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert {f"updates/big{i}/log.tail.txt" for i in range(5)} <= set(names)
    with tarfile.open(out) as tar:  # no member holds the password or the signing key's bytes
        contents = [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    secret_key = agent.keyfile.read_bytes().strip()
    assert not [c for c in contents if PLANTED_PASSWORD.encode() in c or secret_key in c]
    assert any(b"<redacted>" in c for c in contents), "the password's place says it was redacted"
    job = next(t.split("/")[3] for t, _, _ in observer.messages if t.endswith("/manifest"))
    manifest = observer.on(f"edge/dev1/support/{job}/manifest")[0]
    assert (manifest["size"], manifest["sha256"]) == (len(data), sha)
    assert manifest["chunks"] == -(-len(data) // int(CHUNK_KB * 1024))
    wait_until(lambda: observer.on(f"edge/dev1/support/{job}/status")[-1]["state"] == "done", 10)
    assert not list((tmp_path / "state" / "support").glob("*.tar.gz")), "the device keeps no copy"

    # paced: the chunks after the first took at least (size - one chunk) / rate
    assert elapsed >= (len(data) - CHUNK_KB * 1024) / (RATE_KBPS * 1024) * 0.9
    # telemetry kept flowing during the pull, with no gap: samples every 0.1 s
    wait_until(lambda: max(observer.seqs()) > seq_before + elapsed / 0.1 * 0.5, 10,
               message="telemetry kept its rate during the pull")
    seqs = observer.seqs()
    assert set(range(min(seqs), max(seqs) + 1)) <= set(seqs), "a telemetry sequence gap"

    # the same signed request again (a replay by whoever read it off the broker): nothing is sent
    sent_before = len(job_topics(observer, job))
    recorded = observer.on_raw(f"edge/dev1/support/{job}/request")[0]  # the operator's own bytes
    observer.publish(f"edge/dev1/support/{job}/request", recorded)
    wait_until(lambda: any(e["data"].get("reason") == "replay" for e in observer.on("edge/dev1/events")), 10,
               message="replay refused")
    time.sleep(0.5)
    assert len(job_topics(observer, job)) == sent_before
    assert observer.on(f"edge/dev1/support/{job}/status")[-1]["state"] == "done"


def test_unsigned_expired_and_forged_requests_are_refused_without_amplification(
        broker: Broker, agent: Agent, observer: Observer) -> None:
    unsigned = build_request("u1", "bundle", device="dev1")
    observer.publish("edge/dev1/support/u1/request", protocol.dumps(unsigned))
    expired = signing.sign(build_request("x1", "bundle", device="dev1", issued_at=time.time() - 700),
                           agent.key, KEY_ID)
    observer.publish("edge/dev1/support/x1/request", protocol.dumps(expired))
    wait_until(lambda: observer.on("edge/dev1/support/u1/status"), 10, message="unsigned refused")
    wait_until(lambda: observer.on("edge/dev1/support/x1/status"), 10, message="expired refused")
    assert observer.on("edge/dev1/support/u1/status")[-1]["state"] == "refused"
    assert "not signed" in observer.on("edge/dev1/support/u1/status")[-1]["reason"]
    assert observer.on("edge/dev1/support/x1/status")[-1]["state"] == "refused"
    assert "expired" in observer.on("edge/dev1/support/x1/status")[-1]["reason"]

    # a flood of forgeries: one event, no more retained statuses, nothing sent
    for i in range(40):
        observer.client.publish(f"edge/dev1/support/f{i}/request", protocol.dumps(
            build_request(f"f{i}", "bundle", device="dev1")), qos=1)
    wait_until(lambda: agent.health().get("sections", {}).get("support", {}).get("refused", {})
               .get("signature", 0) >= 41, 20, message="every forgery counted")
    with observer.lock:
        topics = [t for t, _, _ in observer.messages]
    assert not [t for t in topics if "/support/f" in t and not t.endswith("/request")]
    assert not [t for t in topics if t.endswith("/manifest") or "/chunk/" in t]
    refusals = [e for e in observer.on("edge/dev1/events") if e["kind"] == "support"]
    assert sorted(e["data"]["reason"] for e in refusals) == ["expired", "signature"]
    assert "refused (signature)" in agent.logs() and "refused (expired)" in agent.logs()


def test_log_level_is_raised_for_a_while_then_restored(broker: Broker, agent: Agent,
                                                       observer: Observer) -> None:
    def level() -> Any:
        return agent.health().get("sections", {}).get("support", {}).get("log_level")

    def forge_two(tag: str) -> None:  # the second refusal of a window is logged at DEBUG only
        for i in range(2):
            observer.publish(f"edge/dev1/support/{tag}{i}/request",
                             protocol.dumps(build_request(f"{tag}{i}", "bundle", device="dev1")))

    assert level() is None
    done = operator(broker, agent, "log-level", "--device", "dev1", "--level", "DEBUG", "--for", "4s")
    assert done.returncode == 0, done.stderr
    assert "log level DEBUG" in done.stdout
    wait_until(lambda: (level() or {}).get("level") == "DEBUG", 5, message="DEBUG reported")
    forge_two("a")
    wait_until(lambda: "level=DEBUG" in agent.logs(), 5, message="DEBUG lines logged")
    wait_until(lambda: level() is None, 10, message="level restored")
    assert "log level back to INFO" in agent.logs()
    n = agent.logs().count("level=DEBUG")
    forge_two("b")
    wait_until(lambda: agent.health().get("sections", {}).get("support", {}).get("refused", {})
               .get("signature", 0) >= 4, 10, message="refusals counted")
    assert agent.logs().count("level=DEBUG") == n, "still logging at DEBUG"
