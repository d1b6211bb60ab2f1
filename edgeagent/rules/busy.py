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

from edgeagent.core.live import LiveConfig
from edgeagent.transport.local import LocalSubscription

log = logging.getLogger(__name__)

SOURCE = "topic"  # the key in LiveConfig.busy
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
    def __init__(self, live: LiveConfig) -> None:
        self.live = live
        cfg = live.config  # host, port and topic are restart-only keys
        self._sub = LocalSubscription(cfg.sensors.mqtt.host, cfg.sensors.mqtt.port, cfg.busy.topic, qos=1,
                                      label="busy topic")
        self.malformed = 0

    @property
    def subscribed(self) -> asyncio.Event:
        """Set while subscribed: tests wait on it."""
        return self._sub.subscribed

    async def run(self) -> None:
        async for payload in self._sub.payloads():
            self.apply(parse_busy(payload, self._sub.topic))

    def apply(self, state: str | bool | None) -> None:
        if state is False:
            self.malformed += 1
            log.log(logging.WARNING if self.malformed == 1 else logging.DEBUG,
                    "ignored a malformed busy message on %s (%d so far)", self.live.config.busy.topic,
                    self.malformed)
            return
        assert not isinstance(state, bool)
        if self.live.busy.get(SOURCE) != state:
            self.live.set_busy(SOURCE, state)
