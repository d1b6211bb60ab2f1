"""One loop for reading a topic on a local broker (sensor samples, the busy flag): subscribe, hand
each payload on, and reconnect with backoff for as long as the caller iterates."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from edgeagent.core.backoff import backoff_s

log = logging.getLogger(__name__)


@dataclass
class LocalSubscription:
    """Where and what to read; `subscribed` is set while subscribed (tests and callers wait on it)."""

    host: str
    port: int
    topic: str
    qos: int = 0
    username: str | None = None
    password: str | None = None
    label: str = "local MQTT"
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0  # successful (re)subscriptions

    async def payloads(self) -> AsyncIterator[bytes]:
        """Every message's payload as bytes, across reconnects; never ends by itself."""
        import aiomqtt  # lazily: only these features need a second client (the training venv has none)

        attempt = 0
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username=self.username,
                                          password=self.password) as client:
                    await client.subscribe(self.topic, qos=self.qos)
                    attempt = 0
                    self.connects += 1
                    self.subscribed.set()
                    async for message in client.messages:
                        raw = message.payload
                        yield raw if isinstance(raw, bytes) else (
                            bytes(raw) if isinstance(raw, bytearray) else
                            raw.encode() if isinstance(raw, str) else json.dumps(raw).encode())
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                attempt += 1
                delay = backoff_s(attempt, 1.5, 1.5 ** 10, jitter=1.0)
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "%s %s on %s:%d: %s; retrying in %.1fs", self.label, self.topic, self.host,
                        self.port, exc, delay)
                await asyncio.sleep(delay)
