"""Helpers for the transport tests: an observing MQTT client, configs, an agent in-process."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.core import config as cfgmod
from edgeagent.core.config import Config, merge_layers


class Observer:
    """A paho client in its own thread that records every message it gets (persistent session,
    reconnects by itself, so it also sees what the broker queued while it was away)."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("edge/#",), client_id: str = "observer",
                 tls: tuple[Path, Path, Path] | None = None, mqtt5: bool = True) -> None:
        """mqtt5=False: MQTT 3.1.1 with a persistent session (clean_session off), for 3.1.1 brokers."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.topics = topics
        c = (mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5) if mqtt5 else
             mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=False))
        if tls:
            ca, cert, key = tls
            c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key),
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        c.reconnect_delay_set(0.05, 0.5)
        if mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            c.connect_async("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
        else:
            c.connect_async("127.0.0.1", port, keepalive=30)
        c.loop_start()
        self.client = c
        if not self.connected.wait(10):
            raise AssertionError("observer could not connect")

    def _on_connect(self, c: mqtt.Client, userdata: object, flags: object, rc: Any,
                    props: object = None) -> None:
        if getattr(rc, "is_failure", False):
            return
        for t in self.topics:
            c.subscribe(t, qos=1)
        self.connected.set()

    def _on_message(self, c: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))

    def on(self, topic: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t == topic]

    def on_raw(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def seqs(self, device: str = "dev1", prefix: str = "edge") -> list[int]:
        return [s["seq"] for m in self.on(f"{prefix}/{device}/telemetry") for s in m["samples"]]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_config(state_dir: Path, port: int | None, **sections: Mapping[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "device": {"id": "dev1", "state_dir": str(state_dir), "groups": ["line3"]},
        "mqtt": {"host": "127.0.0.1" if port else "", "port": port or 1883, "keepalive_s": 5,
                 "reconnect_initial_s": 0.05, "reconnect_max_s": 0.5, "connect_timeout_s": 5,
                 "tls": {"enabled": False}},
        "inference": {"enabled": False},
        "telemetry": {"interval_s": 0.1, "batch_wait_s": 0},
    }
    return cfgmod.build(merge_layers(raw, sections))


def contiguous(seqs: list[int], first: int, last: int) -> bool:
    return set(range(first, last + 1)) <= set(seqs)


def assert_retained_shutdown(port: int, device: str = "dev1", timeout_s: float = 10.0) -> None:
    """A newcomer sees the retained clean "offline"/"shutdown", not the last will."""
    from tests.util import wait_until

    topic = f"edge/{device}/status"
    late = Observer(port, (topic,), client_id="late")
    try:
        wait_until(lambda: late.on(topic), timeout_s)
        assert late.on(topic)[-1]["reason"] == "shutdown"
    finally:
        late.close()
