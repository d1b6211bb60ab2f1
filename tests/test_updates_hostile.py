"""Issue 21 end to end: a publisher without a signing key replays what it saw, with two real agents,
a real broker and the real `edgeagent push`. A manifest pushed for devA is refused on devB's topics
(its audience is signed), and a job's own manifest published on its cancel topic cancels nothing
(its type is signed)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.core import signing
from tests.broker import Broker
from tests.test_updates_process import AgentProc
from tests.updates_helpers import KEY_ID, MODEL, ROOT, StatusWatcher, make_keys, make_raw, push_table, signed
from tests.util import wait_until

pytestmark = pytest.mark.integration


class Eavesdropper:
    """The attacker's view of the broker: every manifest and event it can read, and publish rights."""

    def __init__(self, port: int) -> None:
        self.manifests: dict[str, bytes] = {}  # topic -> payload
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"eve-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge/+/updates/+/manifest", qos=1)
        self.client.subscribe("edge/+/events", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            if msg.topic.endswith("/manifest"):
                self.manifests[msg.topic] = bytes(msg.payload)
            else:
                self.events.append({"topic": msg.topic, **json.loads(msg.payload)})

    def said(self, device: str, text: str) -> bool:
        with self.lock:
            return any(e["topic"] == f"edge/{device}/events" and text in json.dumps(e) for e in self.events)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def eve(broker: Broker) -> Iterator[Eavesdropper]:
    e = Eavesdropper(broker.port)
    yield e
    e.close()


def start_agent(tmp: Path, pub: Path, broker: Broker, device: str) -> AgentProc:
    d = tmp / device
    d.mkdir()
    agent = AgentProc(d, make_raw(d, pub, broker.port, device=device), "--fake-models", str(d / "store"))
    agent.start()
    wait_until(lambda: f"{device} 1 edge/{device}/updates/+/#" in broker.log(), 20,
               message=f"{device} subscribed to its updates")
    return agent


def test_replays_to_another_device_or_as_a_cancel_are_refused(tmp_path: Path, broker: Broker,
                                                              eve: Eavesdropper) -> None:
    key, pub = make_keys(tmp_path / "keys")
    dev_a = start_agent(tmp_path, pub, broker, "devA")
    dev_b = start_agent(tmp_path, pub, broker, "devB")
    watch_b = StatusWatcher(broker.port, device="devB")
    try:
        push = subprocess.run(
            [sys.executable, "-m", "edgeagent.cli", "push", "--broker", f"mqtt://127.0.0.1:{broker.port}",
             "--device", "devA", "--kind", "model", "--name", "vibration-anomaly", "--version", "2.0.0",
             "--key", str(tmp_path / "keys" / f"{KEY_ID}.key"), "--key-id", KEY_ID, "--job", "for-a",
             "--chunk-kb", "4", "--timeout", "60s", str(MODEL)],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        assert push_table(push.stdout)["devA"][0] == "succeeded"
        seen = eve.manifests["edge/devA/updates/for-a/manifest"]
        assert json.loads(seen)["targets"] == {"devices": ["devA"]}

        # 1. devA's manifest replayed on devB's topic: refused there, with the reason, nothing fetched
        eve.publish("edge/devB/updates/for-a/manifest", seen)
        wait_until(lambda: watch_b.final("for-a") is not None, 20, message="devB answered the replay")
        final = watch_b.final("for-a")
        assert final is not None and final["state"] == "rejected"
        assert final["reason"] == "not for this device: targets.devices [devA] does not name devB"
        assert not [r for r in watch_b.requests if r["job"] == "for-a"]
        assert not (tmp_path / "devB" / "store" / "vibration-anomaly").exists()
        assert dev_a.job_state("for-a") == "succeeded"

        # 2. a job waiting for its chunks; its own manifest on its cancel topic does not cancel it
        msg = signed(MODEL, key, job="held", version="2.1.0", chunk_size=4096, devices=["devA"])
        eve.publish("edge/devA/updates/held/manifest", json.dumps(msg).encode())
        wait_until(lambda: dev_a.job_state("held") == "downloading", 20, message="held downloading")
        eve.publish("edge/devA/updates/held/cancel", json.dumps(msg).encode())
        wait_until(lambda: eve.said("devA", "type 'manifest' where 'cancel' is expected"), 20,
                   message="devA refused the manifest as a cancel, with the reason")
        assert dev_a.job_state("held") == "downloading"
        # while the real cancel, signed as one, does (the path the replay was refused on is live)
        cancel = signing.sign({"v": 1, "type": "cancel", "job": "held", "issued_at": time.time(),
                               "targets": {"devices": ["devA"]}}, key, KEY_ID)
        eve.publish("edge/devA/updates/held/cancel", json.dumps(cancel).encode())
        wait_until(lambda: dev_a.job_state("held") == "cancelled", 20, message="held cancelled")
    finally:
        watch_b.close()
        dev_a.stop()
        dev_b.stop()
