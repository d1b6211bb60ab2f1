"""The `busy.topic` source: a local process (a PLC bridge, a job runner) says the machine is busy.

It subscribes on the local sensor broker (`sensors.mqtt.host/port`) to `busy.topic`, whose payload
is "1"/"true"/"busy" or "0"/"false"/"idle", or JSON `{"busy": true, "reason": "..."}`; publish it
retained so a restarted agent learns the state at once. When the local broker goes away the last
state is kept (a machine operation does not end because a broker restarted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

from edgeagent.core.hub import Hub

log = logging.getLogger(__name__)

SOURCE = "topic"  # the key in hub.busy
_ON = ("1", "true", "busy", "on", "yes")
_OFF = ("0", "false", "idle", "off", "no", "")


def parse_busy(payload: bytes, topic: str) -> str | bool | None:
    """The busy reason (busy), None (not busy) or False (malformed: ignored)."""
    text = payload.decode("utf-8", "replace").strip()
    if text.lower() in _ON:
        return f"{topic} says busy"
    if text.lower() in _OFF:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if isinstance(value, dict) and isinstance(value.get("busy"), bool):
        if not value["busy"]:
            return None
        reason = value.get("reason")
        return f"{topic}: {reason}" if isinstance(reason, str) and reason else f"{topic} says busy"
    return False


class BusyTopicWatcher:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.subscribed = asyncio.Event()  # tests wait on it
        self.malformed = 0

    async def run(self) -> None:
        import aiomqtt  # lazily, like the sensor source: only this feature needs a second client

        cfg = self.hub.config
        host, port, topic = cfg.sensors.mqtt.host, cfg.sensors.mqtt.port, cfg.busy.topic
        attempt = 0
        while True:
            try:
                async with aiomqtt.Client(host, port) as client:
                    await client.subscribe(topic, qos=1)
                    attempt = 0
                    self.subscribed.set()
                    async for message in client.messages:
                        raw = message.payload
                        payload = raw if isinstance(raw, bytes) else str(raw).encode()
                        self.apply(parse_busy(payload, topic))
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                attempt += 1
                delay = random.uniform(0, 1.5 ** min(10, attempt))
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "busy topic %s on %s:%d: %s; retrying in %.1fs", topic, host, port, exc, delay)
                await asyncio.sleep(delay)

    def apply(self, state: str | bool | None) -> None:
        if state is False:
            self.malformed += 1
            log.log(logging.WARNING if self.malformed == 1 else logging.DEBUG,
                    "ignored a malformed busy message on %s (%d so far)", self.hub.config.busy.topic,
                    self.malformed)
            return
        assert not isinstance(state, bool)
        if self.hub.busy.get(SOURCE) != state:
            self.hub.set_busy(SOURCE, state)
