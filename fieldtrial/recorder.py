"""The trial's own witness: a paho client straight to the broker (not through the fault proxy), with a
persistent session and QoS 1, recording every telemetry seq, event seq, status and job status per
device. Verification uses only what it saw, not the code under test's own counters."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass
class DeviceLog:
    telemetry: set[int] = field(default_factory=set)
    telemetry_msgs: int = 0
    telemetry_dups: int = 0
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each telemetry message
    events: set[int] = field(default_factory=set)
    event_dups: int = 0
    update_events: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_changes: list[tuple[float, str, str]] = field(default_factory=list)  # (mono, state, reason)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # job -> last retained status
    job_states: dict[str, list[str]] = field(default_factory=dict)  # job -> states seen, in order
    bad_payloads: int = 0


class Recorder:
    def __init__(self, port: int, prefix: str = "edge", client_id: str = "trial-recorder") -> None:
        self.prefix = prefix
        self.devices: dict[str, DeviceLog] = defaultdict(DeviceLog)
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.connects = 0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 2)  # paho: whole seconds (first retry is immediate)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        c.connect_async("127.0.0.1", port, keepalive=10, clean_start=False, properties=props)
        self.client = c

    def start(self, timeout_s: float = 15.0) -> Recorder:
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            raise RuntimeError("recorder could not connect to the broker")
        return self

    def _on_connect(self, c: mqtt.Client, userdata: object, flags: object, rc: Any,
                    props: object = None) -> None:
        if getattr(rc, "is_failure", False):
            return
        self.connects += 1
        p = self.prefix
        c.subscribe([(f"{p}/+/telemetry", 1), (f"{p}/+/events", 1), (f"{p}/+/status", 1),
                     (f"{p}/+/updates/+/status", 1)])
        self.connected.set()

    def _on_message(self, c: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        parts = m.topic.split("/")
        if len(parts) < 3:
            return
        device = parts[1]
        try:
            doc = json.loads(m.payload)
        except ValueError:
            doc = None
        with self.lock:
            d = self.devices[device]
            if not isinstance(doc, dict):
                d.bad_payloads += 1
                return
            kind = parts[2]
            if kind == "telemetry" and len(parts) == 3:
                d.telemetry_msgs += 1
                d.arrivals.append(now)
                for s in doc.get("samples", []):
                    seq = s.get("seq")
                    if isinstance(seq, int):
                        if seq in d.telemetry:
                            d.telemetry_dups += 1
                        d.telemetry.add(seq)
            elif kind == "events" and len(parts) == 3:
                seq = doc.get("seq")
                if isinstance(seq, int):
                    if seq in d.events:
                        d.event_dups += 1
                    d.events.add(seq)
                if doc.get("kind") == "update":
                    d.update_events.append(doc)
            elif kind == "status" and len(parts) == 3:
                d.status = doc
                d.status_changes.append((now, str(doc.get("state")), str(doc.get("reason", ""))))
            elif kind == "updates" and len(parts) == 5 and parts[4] == "status":
                job = str(doc.get("job", parts[3]))
                d.jobs[job] = doc
                seen = d.job_states.setdefault(job, [])
                if not seen or seen[-1] != doc.get("state"):
                    seen.append(str(doc.get("state")))

    def last_arrival(self, device: str) -> float:
        with self.lock:
            a = self.devices[device].arrivals
            return a[-1] if a else 0.0

    def received(self, device: str) -> tuple[set[int], set[int]]:
        with self.lock:
            d = self.devices[device]
            return set(d.telemetry), set(d.events)

    def job(self, device: str, job: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.devices[device].jobs.get(job, {}))

    def online(self, device: str) -> bool:
        with self.lock:
            return self.devices[device].status.get("state") == "online"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
