"""The bounded intake between paho and the router: how much a hostile publisher can make us hold.

Three bounds, outermost first:

1. MQTT 5 `MaximumPacketSize` in CONNECT (`max_packet_bytes`): the broker drops a larger message for
   us instead of sending it (MQTT 5, 3.1.2.11.4). MQTT 3.1.1 has no such property: there paho reads
   any packet the broker sends, and only the checks below and the router's byte caps bound what
   waits.
2. MQTT 5 `ReceiveMaximum` plus manual acknowledgement: a QoS 1 message is acknowledged only once
   the router has queued it, and the broker should send at most `receive_maximum` unacknowledged
   ones. When the agent cannot keep up it stops reading and the broker holds the rest (its own
   queue limits apply there; a persistent session redelivers what was unacknowledged after a
   reconnect). Mosquitto 2.0.11 honours it only until the first PUBACK (measured), hence 3.
3. Here, whatever the broker does: what waits in aiomqtt's queue is bounded by `QUEUE_MAX_BYTES`
   and `QUEUE_MAX_MESSAGES` (QoS 0 by `QOS0_MAX_MESSAGES`). A message past a bound, over the
   packet limit (a 3.1.1 broker), or on a topic that is not UTF-8 is dropped, counted
   (`IntakeStats.dropped`, the mqtt section's `dropped_incoming`) and acknowledged (so it does not
   hold an in-flight slot forever).

A message that passes is offered to the router's express lane first (`express`, update chunks):
taken there, it is acknowledged at once and never queued; the taker keeps its own byte bound and
declines when it is full, and the message then waits in the queue like any other.

What a drop costs: a chunk is re-requested by the transfer, a manifest is re-sent by the pushing
operator (or its next push), a desired config is retained and comes again on the next connect.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeagent.core.live import Express
from edgeagent.core.logs import Once

if TYPE_CHECKING:
    import aiomqtt
    import paho.mqtt.client as paho_client

log = logging.getLogger(__name__)

KIB = 1024
# topic (ours are < 300 bytes: prefix/group/G/updates/J/chunk/N), fixed header, packet id and the
# properties a broker forwards (user properties of the publisher: a few KiB at most in practice)
HEADROOM_BYTES = 16 * KIB
# the largest non-chunk message we accept: a signed manifest (updates.inputs.MAX_MANIFEST_BYTES,
# 1 MiB: one sha256 per chunk) or a desired config (remote_config.MAX_PAYLOAD_BYTES, 256 KiB)
MIN_PAYLOAD_BYTES = 1024 * KIB
# the bytes the broker may have in flight to us at once (ReceiveMaximum x MaximumPacketSize); with
# the router's per-handler cap it bounds the payloads held under a flood (#21: RSS growth < 20 MiB)
INFLIGHT_BUDGET_BYTES = 4 << 20
RECEIVE_MAXIMUM_MIN = 2
RECEIVE_MAXIMUM_MAX = 64
QOS0_MAX_MESSAGES = 16  # our own pings; anything else at QoS 0 is not a command
# what may wait in aiomqtt's queue whatever the broker does: measured with Mosquitto 2.0.11, the
# broker honours ReceiveMaximum only until the first PUBACK, so this is the bound that holds
QUEUE_MAX_MESSAGES = 256
QUEUE_MAX_BYTES = INFLIGHT_BUDGET_BYTES


def max_packet_bytes(max_chunk_kb: float) -> int:
    """The MaximumPacketSize we announce: the largest chunk or manifest/config, plus headroom."""
    return max(int(max_chunk_kb * KIB), MIN_PAYLOAD_BYTES) + HEADROOM_BYTES


def receive_maximum(max_packet: int) -> int:
    """How many QoS 1 messages the broker may send unacknowledged: the in-flight byte budget."""
    return max(RECEIVE_MAXIMUM_MIN, min(RECEIVE_MAXIMUM_MAX, INFLIGHT_BUDGET_BYTES // max_packet))


@dataclass
class IntakeStats:
    received: int = 0
    dropped: int = 0  # over a bound or malformed: counted, acknowledged, never queued
    dropped_bytes: int = 0
    queued: int = 0  # waiting in aiomqtt's queue for the receive loop
    queued_bytes: int = 0
    express: int = 0  # taken by the router's express lane as read


class Intake:
    """Wraps one client's paho `on_message`: bounds what waits in aiomqtt's queue; acknowledges
    QoS 1 messages when the receive loop has handed them on (`done`)."""

    def __init__(self, client: aiomqtt.Client, max_packet: int, receive_max: int, once: Once,
                 stats: IntakeStats | None = None, express: Express | None = None) -> None:
        self.max_packet = max_packet
        self.receive_max = receive_max
        self.stats = stats if stats is not None else IntakeStats()
        self._qos0 = 0
        self._once = once
        self._paho: paho_client.Client = client._client
        self._queue: asyncio.Queue[Any] = client._queue
        self._forward = self._paho.on_message
        self._express = express
        self._paho.manual_ack_set(True)
        self._paho.on_message = self._on_message
        self.stats.queued = self.stats.queued_bytes = 0

    @staticmethod
    def queue_size(receive_max: int) -> int:
        """aiomqtt's own queue bound: never reached (we drop first), so aiomqtt never drops silently."""
        return QUEUE_MAX_MESSAGES + 1

    def _on_message(self, client: Any, userdata: Any, message: paho_client.MQTTMessage) -> None:
        size = len(message.payload)
        self.stats.received += 1
        problem = ""
        try:
            message.topic  # noqa: B018 - aiomqtt decodes it and would raise inside paho
        except UnicodeDecodeError:
            problem = "topic is not UTF-8"
        if not problem and size > self.max_packet:
            problem = f"payload of {size} bytes over the {self.max_packet} byte limit"
        elif not problem and message.qos == 0 and self._qos0 >= QOS0_MAX_MESSAGES:
            problem = "too many QoS 0 messages waiting"
        elif not problem and (self.stats.queued >= QUEUE_MAX_MESSAGES or (
                self.stats.queued and self.stats.queued_bytes + size > QUEUE_MAX_BYTES)):
            problem = "intake full (the broker sent past ReceiveMaximum)"
        if problem:
            self.stats.dropped += 1
            self.stats.dropped_bytes += size
            self._once.warning(f"intake:{problem[:12]}", "incoming message dropped: %s", problem,
                               extra={"kv": {"dropped": self.stats.dropped}})
            self._ack(message.mid, message.qos)
            return
        payload = message.payload
        if self._express is not None and self._express(
                message.topic, payload if isinstance(payload, bytes) else bytes(payload)):
            self.stats.express += 1
            self._ack(message.mid, message.qos)
            return
        self.stats.queued += 1
        self.stats.queued_bytes += size
        if message.qos == 0:
            self._qos0 += 1
        if self._forward is not None:
            self._forward(client, userdata, message)

    def taken(self, message: aiomqtt.Message) -> None:
        """The receive loop took `message` out of aiomqtt's queue."""
        self.stats.queued -= 1
        self.stats.queued_bytes -= len(message.payload) if isinstance(message.payload, bytes) else 0
        if message.qos == 0:
            self._qos0 -= 1

    def done(self, message: aiomqtt.Message) -> None:
        """The router holds `message` now: the broker may send the next one."""
        self._ack(message.mid, message.qos)

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._paho.ack(mid, qos)
