"""A hostile publisher (broker access, no signing key) against a real agent process: bounded memory,
aggregated refusals, telemetry keeps flowing."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker import Broker
from tests.test_updates_process import AgentProc
from tests.updates_helpers import MODEL, make_keys, make_raw, signed
from tests.util import wait_until

pytestmark = pytest.mark.integration

MIB = 1 << 20


class Recorder:
    """Telemetry seqs and events of dev1, with their arrival times."""

    def __init__(self, port: int) -> None:
        self.seqs: list[tuple[float, int]] = []
        self.sampled: list[float] = []  # each sample's own ts (wall clock, taken on the device)
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge/dev1/telemetry", qos=1)
        self.client.subscribe("edge/dev1/events", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/events"):
                self.events.append(doc)
            else:
                self.seqs += [(time.monotonic(), s["seq"]) for s in doc["samples"]]
                self.sampled += [s["ts"] for s in doc["samples"]]

    def seqs_after(self, t: float) -> int:
        with self.lock:
            return sum(1 for at, _ in self.seqs if at > t)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RssSampler(threading.Thread):
    """The agent's peak RSS while the flood runs (polled; psutil reads /proc)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self.stop.wait(0.02)


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{uuid.uuid4().hex[:8]}")
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_flood_of_forged_manifests_and_big_chunks(tmp_path: Path, broker: Broker) -> None:
    key, pub = make_keys(tmp_path / "keys")
    raw = make_raw(tmp_path, pub, broker.port, sensors={"rate_hz": 160.0},
                   telemetry={"interval_s": 0.5, "batch_wait_s": 0.1},
                   updates={"request_interval_s": 5.0})
    agent = AgentProc(tmp_path, raw, cli=True)
    rec = Recorder(broker.port)
    hostile = publisher(broker.port)
    agent.start()
    try:
        agent.wait_subscribed(broker)
        assert agent.proc is not None
        # a genuine job in download, so that chunks of a known job are part of the flood
        genuine = signed(MODEL, key, job="real", version="2.0.0", chunk_size=4096)
        hostile.publish("edge/dev1/updates/real/manifest", json.dumps(genuine), qos=1).wait_for_publish(10)
        wait_until(lambda: agent.job_state("real") == "downloading", 20, message="genuine job downloading")
        wait_until(lambda: rec.seqs_after(0) >= 3, 20, message="telemetry before the flood")
        time.sleep(0.5)  # not synchronisation: let the baseline RSS settle after startup
        baseline = psutil.Process(agent.proc.pid).memory_info().rss
        sampler = RssSampler(agent.proc.pid)
        sampler.start()
        events_before = len(rec.events)
        started, started_wall = time.monotonic(), time.time()

        infos = []
        for _ in range(2000):  # random job ids, valid shape, a signature that does not verify
            job = f"forged-{uuid.uuid4().hex[:12]}"
            infos.append(hostile.publish(f"edge/dev1/updates/{job}/manifest",
                                         json.dumps({**genuine, "job": job}), qos=1))
        big = os.urandom(MIB)
        for i in range(200):  # 1 MiB chunks: half for unknown jobs, half for the running one
            job = f"ghost-{i}" if i % 2 else "real"
            infos.append(hostile.publish(f"edge/dev1/updates/{job}/chunk/{i % 7}", big, qos=1))
        for topic in ("edge/dev1/updates/real/chunk/²", "edge/dev1/updates/real/chunk/٣",
                      "edge/dev1/updates/real/chunk/-1", "edge/dev1/updates/real/chunk/ 1",
                      "edge/dev1/updates/real/chunk/1234567890"):
            infos.append(hostile.publish(topic, b"x", qos=1))
        for info in infos:
            info.wait_for_publish(60)
        flood_end, flood_end_wall = time.monotonic(), time.time()
        # the agent has taken the whole flood when it counted it (its updates section in health.json)
        health = tmp_path / "state" / "health.json"

        def refused() -> dict[str, int]:
            try:
                sections = json.loads(health.read_text())["sections"]
                return {**sections["updates"]["refused"], "intake": sections["mqtt"]["dropped_incoming"]}
            except (OSError, ValueError, KeyError):
                return {}

        flood = 2000 + 200 + 5
        # every message of the flood is accounted for: refused by the updates component, or dropped
        # at the intake (counted, acknowledged) when it arrived faster than it could be checked
        wait_until(lambda: sum(refused().values()) >= flood, 120, message="flood counted")
        taken = time.time()  # the agent has taken every message of the flood by now
        wait_until(lambda: rec.seqs_after(flood_end) >= 3, 20, message="telemetry after the flood")
        sampler.stop.set()
        sampler.join(5)
        growth = sampler.peak - baseline
        events = rec.events[events_before:]
        during = sum(1 for ts in rec.sampled if started_wall <= ts <= max(flood_end_wall, taken))
        print(f"\nflood: sent in {flood_end - started:.1f} s, taken in {taken - started_wall:.1f} s, "
              f"RSS baseline {baseline / MIB:.1f} MiB, peak growth {growth / MIB:.1f} MiB, "
              f"events {len(events)}, refused {refused()}, telemetry samples during the flood {during}")
        assert growth < 20 * MIB
        assert len(events) <= 50, [e["message"] for e in events]
        # telemetry went on: samples taken while the flood was being handled, more after it, and
        # no seq missing from before the flood to after it
        assert during > 0 and rec.seqs_after(flood_end) > 0
        seqs = [s for _, s in rec.seqs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert agent.job_state("real") == "downloading"  # the bad chunks did not kill the job
        logs = agent.logs()
        assert "Traceback" not in logs and "ValueError" not in logs
        assert agent.proc.poll() is None
    finally:
        hostile.loop_stop()
        hostile.disconnect()
        rec.close()
        agent.stop()
