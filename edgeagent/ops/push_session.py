"""The operator's MQTT session for one job: persistent, so a broker restart mid-push loses nothing.

One client id per job (`edgeagent-push-<job>`), `clean_start` off and a session expiry: the broker
keeps our subscriptions (job status, chunk requests) and the QoS 1 messages for us while we are
away, paho reconnects by itself and sends again what was not acknowledged. `serve` runs the Pusher
again if a publish fails while the broker is gone (the same manifest is a no-op on a device).
`edgeagent push` and the field trial use both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client

if TYPE_CHECKING:
    from edgeagent.ops.push import Pusher, PushResult

log = logging.getLogger(__name__)

CLIENT_ID_MAX = 64  # what every broker accepts (MQTT 3.1.1 guarantees 23, Mosquitto takes more)
KEEPALIVE_S = 30
SESSION_EXPIRY_MAX_S = 86400


def job_client_id(role: str, job: str) -> str:
    return f"edgeagent-{role}-{job}"[:CLIENT_ID_MAX]


def open_session(url: BrokerUrl, client_id: str, session_expiry_s: int, retry_s: float = 0.0,
                 keepalive_s: int = KEEPALIVE_S) -> Any:
    """A connected paho client with a persistent session; the first connect is retried for
    `retry_s` while the broker is down (ConnectionError after that)."""
    deadline = time.monotonic() + retry_s
    expiry = max(1, min(session_expiry_s, SESSION_EXPIRY_MAX_S))
    while True:
        client = make_client(url, client_id, clean_start=False)
        try:
            connect_and_wait(client, url, keepalive_s, clean_start=False, session_expiry_s=expiry)
            return client
        except ConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def close_session(client: Any) -> None:
    """Disconnect and let the broker drop the session (expiry 0): the job is over for us."""
    props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.disconnect(properties=props)  # not connected: the session expires by itself
    client.loop_stop()


def serve(client: Any, make_pusher: Callable[[], Pusher], timeout_s: float) -> PushResult:
    """Run a Pusher until it finishes or `timeout_s` passes; if the broker went away under it (paho
    raises "not currently connected"), wait for paho's reconnect and run it again: the same manifest
    is a no-op on the device and it asks again for the chunks it lacks."""
    start = time.monotonic()
    end = start + timeout_s
    carried: PushResult | None = None
    while True:
        pusher = make_pusher()
        if carried is not None:
            pusher.result = carried  # what the devices said and what was sent so far
        carried = pusher.result
        try:
            pusher.run(max(1.0, end - time.monotonic()))
            if pusher.finished() or time.monotonic() >= end:
                break
        except (RuntimeError, ValueError) as exc:
            if time.monotonic() >= end:
                raise
            log.info("push of %s interrupted (%s); serving it again once reconnected", pusher.job, exc)
        while not client.is_connected() and time.monotonic() < end:
            time.sleep(0.2)
        if time.monotonic() >= end:
            break
    carried.seconds = time.monotonic() - start
    return carried
