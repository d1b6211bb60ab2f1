"""Broker URLs and paho clients for the operator tools (collector, watch, simulate)."""

from __future__ import annotations

import select
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.core.errors import EdgeAgentError


class BrokerUrlError(EdgeAgentError):
    """A --broker URL we cannot use."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"broker URL {url!r}: {reason}")


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """mqtt://[user[:password]@]host[:port] or mqtts://... (TLS, default port 8883)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str, ca_file: str | None = None, cert_file: str | None = None,
              key_file: str | None = None) -> BrokerUrl:
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise BrokerUrlError(url, f"scheme must be mqtt or mqtts, not {parts.scheme!r}")
        if not parts.hostname:
            raise BrokerUrlError(url, "no host")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise BrokerUrlError(url, str(exc)) from exc
        return cls(host=parts.hostname, port=port, tls=tls,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None,
                   ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def make_client(url: BrokerUrl, client_id: str, mqtt5: bool = True,
                clean_start: bool = True, manual_ack: bool = False) -> mqtt.Client:
    """A paho client with auth and TLS set; not connected yet. With `manual_ack` the caller
    acknowledges each QoS 1 message (`client.ack`) once it has kept it."""
    if mqtt5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, manual_ack=manual_ack)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=clean_start, protocol=MQTTProtocolVersion.MQTTv311,
                             manual_ack=manual_ack)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        client.tls_set(ca_certs=url.ca_file, certfile=url.cert_file, keyfile=url.key_file,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(1, 30)
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int = 0) -> Properties | None:
    """MQTT 5 CONNECT properties: keep the session (queued QoS 1 messages) for a while; let at most
    `receive_maximum` messages be unacknowledged at once (0: the broker's default)."""
    if session_expiry_s <= 0 and receive_maximum <= 0:
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s > 0:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum > 0:
        props.ReceiveMaximum = min(receive_maximum, 65535)
    return props


def connect_and_wait(client: mqtt.Client, url: BrokerUrl, keepalive_s: int, timeout_s: float = 10.0,
                     clean_start: bool = True, session_expiry_s: int = 0, mqtt5: bool = True,
                     receive_maximum: int = 0, threaded: bool = True) -> None:
    """Connect, start paho's network thread, and wait for CONNACK; raise ConnectionError if refused.
    With `threaded=False` no thread is started: the caller runs paho's I/O (loop_read/loop_write/
    loop_misc) from then on, as the pooled simulator does."""
    done = threading.Event()
    result: list[str] = []
    previous: Any = client.on_connect

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        result.append(str(reason))
        failed = getattr(reason, "is_failure", False)
        if not failed and previous is not None:
            previous(c, userdata, flags, reason, props)
        done.set()

    client.on_connect = on_connect
    try:
        if mqtt5:
            client.connect(url.host, url.port, keepalive_s, clean_start=clean_start,
                           properties=connect_properties(session_expiry_s, receive_maximum))
        else:
            client.connect(url.host, url.port, keepalive_s)
    except OSError as exc:
        raise ConnectionError(f"cannot reach broker {url.host}:{url.port}: {exc}") from exc
    if threaded:
        client.loop_start()
    else:
        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            sock = client.socket()
            if sock is None:
                break
            select.select([sock], [sock] if client.want_write() else [], [], 0.05)
            client.loop_write()
            client.loop_read()
    if not done.wait(timeout_s if threaded else 0.0):
        client.loop_stop()
        raise ConnectionError(f"no CONNACK from {url.host}:{url.port} within {timeout_s}s")
    client.on_connect = previous
    if result and result[0] != "Success":
        client.loop_stop()
        raise ConnectionError(f"broker {url.host}:{url.port} refused the connection: {result[0]}")
