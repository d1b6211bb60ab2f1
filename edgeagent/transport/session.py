"""The MQTT session to the cloud broker: connect forever, presence, subscriptions, publishing.

One long-lived task (`mqtt-session`) loops: connect (MQTT 5 or 3.1.1, or 5 falling back to 3.1.1:
transport/negotiate.py; TLS/mTLS, persistent
session, last will "offline"/"connection-lost") -> publish retained "online" -> (re)subscribe the
router's filters -> run the receiver, the spool publisher, the pinger and the late-subscriber until
one of them fails -> reconnect after an exponential backoff with jitter. `shutdown()` lets the
publisher flush for a moment, publishes "offline"/"shutdown" and disconnects cleanly, so the broker
does not send the last will.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeagent.core import paho_io
from edgeagent.core.backoff import backoff_s
from edgeagent.core.config import Config, MqttConfig
from edgeagent.core.errors import EdgeAgentError
from edgeagent.core.logs import Once
from edgeagent.core.protocol import Topics, dumps, status_offline
from edgeagent.core.tasks import wait_event
from edgeagent.transport.intake import Intake, IntakeStats, max_packet_bytes, receive_maximum
from edgeagent.transport.negotiate import ProtocolChoice
from edgeagent.transport.outbox import SpoolOutbox
from edgeagent.transport.publisher import Publisher, PublishStats
from edgeagent.transport.router import SessionRouter
from edgeagent.transport.spool import Spool

if TYPE_CHECKING:  # aiomqtt (and paho, ssl: ~7 MiB) load only when a broker is configured
    import aiomqtt

log = logging.getLogger(__name__)

STATUS_REFRESH_S = 2.0  # how often the retained status is checked against the running model/firmware

PING_INTERVAL_S = 30.0
FIRST_PING_S = 1.0
STABLE_CONNECTION_S = 30.0  # a connection that lasted this long resets the backoff


class ConnectFailed(EdgeAgentError):
    """The broker could not be reached or refused us; `reason` is what to tell the operator."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"cannot connect to {host}:{port}: {reason}")


class _PahoErrors(logging.Handler):
    """Keeps paho's last error line (e.g. the TLS alert behind a refused client certificate)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.last = record.getMessage()
        except Exception:  # a logging handler must never raise
            self.last = str(record.msg)


def _retrieve_disconnect(client: aiomqtt.Client) -> None:
    """aiomqtt sets the reason of an unexpected disconnect on a future that nothing awaits once we
    have left the connected phase: read it, so asyncio does not log "Future exception was never
    retrieved" (we log the reason ourselves)."""
    fut = getattr(client, "_disconnected", None)
    if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
        fut.exception()


def describe_error(exc: BaseException, paho_error: str | None) -> str:
    """One clear line for a failed connect: the TLS problem, the CONNACK reason, or the OS error."""
    import aiomqtt

    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiomqtt.MqttCodeError) and exc.rc is not None:
        text = f"refused by broker: {exc}"
    if paho_error and (text in ("Operation timed out", "") or "connection lost" in text.lower()):
        text = paho_error
    return text


class Session:
    def __init__(self, config: Callable[[], Config], topics: Topics, spool: Spool, outbox: SpoolOutbox,
                 router: SessionRouter, status: Callable[[], dict[str, Any]]) -> None:
        self._config = config
        self.topics = topics
        self.spool = spool
        self.outbox = outbox
        self.router = router
        self._status = status
        self.connected_since: float | None = None
        self.rtt_ms: float | None = None
        self.connects = 0
        self.failed_connects = 0
        self.last_error: str | None = None
        self.refused = 0  # publishes the broker acknowledged with a failure reason (MQTT 5)
        self.stats = PublishStats()
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        self._publisher: Publisher | None = None
        self._client: aiomqtt.Client | None = None  # while connected: for `publish_now`
        self._task: asyncio.Task[None] | None = None
        self._once = Once(log)
        self._paho_errors = _PahoErrors()
        self._paho_log = logging.getLogger(f"edgeagent.transport.paho.{id(self):x}")
        self._paho_log.propagate = False
        self._paho_log.setLevel(logging.ERROR)
        self._paho_log.addHandler(self._paho_errors)
        self._pings: dict[int, float] = {}
        self._ping_ids = itertools.count(1)
        self.intake = IntakeStats()
        self._intake: Intake | None = None  # the current client's (one client per connect)
        self._choice: ProtocolChoice | None = None  # which MQTT version (mqtt.protocol "auto")

    @property
    def ping_topic(self) -> str:
        return f"{self.topics.base}/ping"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def provider(self) -> dict[str, Any]:
        return {"connected": self.connected, "since": self.connected_since, "rtt_ms": self.rtt_ms,
                "reconnects": max(0, self.connects - 1), "last_error": self.last_error,
                "refused": self.refused, "failed_connects": self.failed_connects,
                "published_messages": self.stats.messages, "published_samples": self.stats.samples,
                "received_messages": self.intake.received, "dropped_incoming": self.intake.dropped,
                "express_incoming": self.intake.express,
                "protocol": self._choice.negotiated if self._choice is not None else None}

    async def publish_now(self, topic: str, payload: bytes, timeout_s: float = 30.0) -> None:
        """Publish one QoS 1 message straight away, bypassing the spool (bulk transfers whose
        sender paces them, e.g. support bundle chunks), and wait for its PUBACK.
        ConnectionError when not connected or the connection drops; the caller retries."""
        client = self._client
        if client is None or not self.connected:
            raise ConnectionError("not connected to the broker")
        try:
            await client.publish(topic, payload, qos=1, timeout=timeout_s)
        except aiomqtt.MqttError as exc:
            raise ConnectionError(f"publish failed: {exc}") from exc

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.router.start()
        self._task = asyncio.create_task(self._run(), name="mqtt-session")

    async def shutdown(self, flush_s: float, close_s: float) -> None:
        """Flush pending rows for up to flush_s, then publish "shutdown" and disconnect cleanly."""
        pub = self._publisher
        if pub is not None and self.connected:
            pub.flushing = True
            self.outbox.wakeup.set()
            deadline = time.monotonic() + flush_s
            while self.spool.count or self.spool.states_pending or self.outbox.deferred:
                left = deadline - time.monotonic()
                if left <= 0 or not self.connected:
                    break
                pub.progress.clear()
                await wait_event(pub.progress, left)
        self._stop.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), close_s)
            except asyncio.TimeoutError:
                log.warning("MQTT session did not close in time; cancelling it")
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            except Exception:
                log.exception("MQTT session ended with an error")
        await self.router.stop()
        self._paho_log.removeHandler(self._paho_errors)

    # ------------------------------------------------------------------ connect loop

    async def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            cfg = self._config()
            m = cfg.mqtt
            choice = self._choice
            if choice is None or choice.configured != m.protocol:
                choice = self._choice = ProtocolChoice(m.protocol, cfg.state_dir)
            try:
                client, version = await self._open(cfg, choice)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.failed_connects += 1
                reason = exc.reason if isinstance(exc, ConnectFailed) else f"{type(exc).__name__}: {exc}"
                await self._retry_later(m, attempt, f"cannot connect to broker {m.host}:{m.port}: {reason}",
                                        reason)
                continue
            started = time.monotonic()
            self.connects += 1
            no_delay(client)
            self._once.reset("lost")
            choice.connected(version)
            log.info("connected to broker", extra={"kv": {"host": m.host, "port": m.port,
                                                          "client_id": cfg.client_id,
                                                          "protocol": version}})
            try:
                try:
                    await self._connected_phase(client, cfg)
                finally:
                    self._set_connected(False)
                    with contextlib.suppress(Exception, asyncio.TimeoutError):
                        await asyncio.wait_for(client.__aexit__(None, None, None), m.connect_timeout_s)
                    _retrieve_disconnect(client)
                # clean stop: the broker got DISCONNECT, so it will not send the last will
                log.info("disconnected from broker", extra={"kv": {"reason": "shutdown"}})
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started >= STABLE_CONNECTION_S:
                    attempt = 0
                attempt += 1
                reason = f"{type(exc).__name__}: {exc}"
                await self._retry_later(m, attempt, f"connection to broker lost: {reason}", "lost")

    async def _retry_later(self, m: MqttConfig, attempt: int, message: str, key: str) -> None:
        delay = backoff_s(attempt, m.reconnect_initial_s, m.reconnect_max_s)
        self.last_error = message
        self._once.warning(key, "%s; retrying in %.1fs", message, delay,
                           extra={"kv": {"attempt": attempt, "retry_in_s": round(delay, 2)}})
        await wait_event(self._stop, delay)

    async def _open(self, cfg: Config, choice: ProtocolChoice) -> tuple[aiomqtt.Client, str]:
        """Connect with the version `choice` names first; with "auto", a broker that refuses or
        ignores MQTT 5 gets a 3.1.1 CONNECT right away. The client and the version that worked."""
        version = choice.first
        client = self._make_client(cfg, version)
        try:
            await self._connect(client, cfg.mqtt)
            return client, version
        except ConnectFailed as exc:
            other = choice.fallback(version, exc.reason)
            if other is None:
                raise
            log.info("MQTT %s refused (%s): trying MQTT %s", version, exc.reason, other,
                     extra={"kv": {"protocol": other}})
            first = exc
        client = self._make_client(cfg, other)
        try:
            await self._connect(client, cfg.mqtt)
        except ConnectFailed as exc:
            raise ConnectFailed(exc.host, exc.port, f"MQTT {version}: {first.reason}; "
                                                    f"MQTT {other}: {exc.reason}") from exc
        return client, other

    def _make_client(self, cfg: Config, version: str) -> aiomqtt.Client:
        import aiomqtt

        m = cfg.mqtt
        v5 = version == "5"
        device = cfg.device
        will = aiomqtt.Will(self.topics.status, dumps(status_offline(
            "connection-lost", groups=device.groups, hardware=device.hardware)), qos=1, retain=True)
        tls_params = None
        if m.tls.enabled:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=m.tls.ca_file or None, certfile=m.tls.cert_file or None,
                keyfile=m.tls.key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT,
                cert_reqs=ssl.CERT_NONE if m.tls.insecure_skip_verify else ssl.CERT_REQUIRED)
        max_packet = max_packet_bytes(cfg.updates.max_chunk_kb)
        receive_max = receive_maximum(max_packet)
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if m.session_expiry_s > 0:
                props.SessionExpiryInterval = m.session_expiry_s
            # the broker drops what we would refuse anyway, and stops sending while we are behind
            props.MaximumPacketSize = max_packet
            props.ReceiveMaximum = receive_max
        kwargs: dict[str, Any] = {}
        if v5:
            kwargs["clean_start"] = m.session_expiry_s == 0
            kwargs["properties"] = props
        else:
            kwargs["clean_session"] = m.session_expiry_s == 0
        client = aiomqtt.Client(
            m.host, m.port, identifier=cfg.client_id, username=m.username or None,
            password=m.password or None, logger=self._paho_log,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will, keepalive=m.keepalive_s, timeout=m.connect_timeout_s, tls_params=tls_params,
            tls_insecure=True if (m.tls.enabled and m.tls.insecure_skip_verify) else None,
            max_inflight_messages=20, max_queued_incoming_messages=Intake.queue_size(receive_max),
            **kwargs)
        self._intake = Intake(client, max_packet, receive_max, self._once, self.intake, self.router.take)
        client.pending_calls_threshold = 10_000  # our window bounds in-flight calls; no warning spam
        paho = client._client
        paho_io.install(paho, asyncio.get_running_loop())
        on_publish = paho.on_publish

        def refused(*args: Any) -> None:
            # MQTT 5 PUBACK reason >= 0x80 (e.g. the ACL said no): the row is still deleted, since
            # a retry would be refused again, but the operator must hear about it
            rc = args[3] if len(args) > 3 else None
            if getattr(rc, "is_failure", False):
                self.refused += 1
                self._once.warning(f"refused:{rc}", "broker refused a publish: %s", rc,
                                   extra={"kv": {"refused": self.refused}})
            if on_publish is not None:
                on_publish(*args)

        paho.on_publish = refused
        return client

    async def _connect(self, client: aiomqtt.Client, m: MqttConfig) -> None:
        """client.__aenter__, but a connection the broker drops before CONNACK (a refused client
        certificate) fails at once with paho's reason instead of waiting for the timeout."""
        loop = asyncio.get_running_loop()
        dropped: asyncio.Future[Any] = loop.create_future()
        paho = client._client
        original = paho.on_disconnect

        def on_disconnect(*args: Any) -> None:
            def note() -> None:
                if not dropped.done():
                    dropped.set_result(str(args[3]) if len(args) > 3 else "disconnected")
            loop.call_soon_threadsafe(note)
            if original is not None:
                original(*args)

        paho.on_disconnect = on_disconnect
        self._paho_errors.last = None
        enter: asyncio.Future[Any] = asyncio.ensure_future(client.__aenter__())
        try:
            done, _ = await asyncio.wait({enter, dropped}, timeout=m.connect_timeout_s + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            enter.cancel()
            raise
        if enter in done:
            try:
                enter.result()
            except Exception as exc:
                raise ConnectFailed(m.host, m.port, describe_error(exc, self._paho_errors.last)) from exc
            return
        enter.cancel()
        with contextlib.suppress(BaseException):
            await enter
        with contextlib.suppress(Exception):
            paho.disconnect()
        reason = self._paho_errors.last or (dropped.result() if dropped.done() else "no CONNACK in time")
        raise ConnectFailed(m.host, m.port, f"connection closed before CONNACK: {reason}")

    # ------------------------------------------------------------------ connected

    async def _connected_phase(self, client: aiomqtt.Client, cfg: Config) -> None:
        timeout_s = max(5.0, float(cfg.mqtt.keepalive_s))
        # reading (and acknowledging, by hand) starts before we wait for our first PUBACK: a broker
        # that re-sends a resumed session's unacknowledged messages first and waits for their
        # PUBACKs before it reads ours (amqtt, MQTT 3.1.1) would otherwise wait for us as we wait
        # for it, until both time out
        receiver = asyncio.create_task(self._receive(client), name="mqtt-receive")
        try:
            status = self._status()
            await client.publish(self.topics.status, dumps(status), qos=1, retain=True, timeout=timeout_s)
            subscribed: set[str] = set()
            await self._subscribe(client, [self.ping_topic, *self.router.filters], subscribed, timeout_s)
        except BaseException:
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver
            raise
        self._set_connected(True)
        self._client = client
        publisher = Publisher(self.spool, self.outbox, self.topics, self._config, self.stats)
        self._publisher = publisher
        tasks = [
            receiver,
            asyncio.create_task(publisher.run(client, timeout_s), name="mqtt-publish-spool"),
            asyncio.create_task(self._late_subscribe(client, subscribed, timeout_s), name="mqtt-subscribe"),
            asyncio.create_task(self._ping(client), name="mqtt-ping"),
            asyncio.create_task(self._refresh_status(client, status, timeout_s), name="mqtt-status"),
        ]
        stop = asyncio.create_task(self._stop.wait(), name="mqtt-stop")
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (*tasks, stop):
                t.cancel()
            for t in (*tasks, stop):
                with contextlib.suppress(BaseException):
                    await t
            self._publisher = None
            self._client = None
        if stop in done:
            offline = status_offline("shutdown", time.time(), groups=cfg.device.groups,
                                     hardware=cfg.device.hardware)
            await client.publish(self.topics.status, dumps(offline), qos=1, retain=True,
                                 timeout=min(timeout_s, 3.0))
            return
        for t in tasks:
            exc = t.exception() if t in done and not t.cancelled() else None
            if exc is not None:
                raise exc
        raise ConnectionError("a session task ended unexpectedly")

    async def _refresh_status(self, client: aiomqtt.Client, published: dict[str, Any],
                              timeout_s: float) -> None:
        """Re-publish the retained "online" status when the model or firmware it names changes
        (the model is often still loading at connect; a hot swap changes it)."""
        def identity(s: dict[str, Any]) -> tuple[object, object]:
            return s.get("model"), s.get("firmware")

        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            status = self._status()
            if identity(status) != identity(published):
                await client.publish(self.topics.status, dumps(status), qos=1, retain=True,
                                     timeout=timeout_s)
                published = status

    def _set_connected(self, value: bool) -> None:
        if value:
            self._connected.set()
            self.connected_since = time.time()
        else:
            self._connected.clear()
            self.connected_since = None
        self.router.set_connected(value)

    async def _subscribe(self, client: aiomqtt.Client, filters: list[str], subscribed: set[str],
                         timeout_s: float) -> None:
        for f in filters:
            if f in subscribed:
                continue
            codes = await client.subscribe(f, qos=1, timeout=timeout_s)
            subscribed.add(f)
            self.router.active.add(f)
            refused = [c for c in codes if (getattr(c, "value", c) or 0) >= 0x80]
            if refused:
                self._once.warning(f"suback:{f}", "broker refused a subscription",
                                   extra={"kv": {"filter": f, "reason": str(refused[0])}})

    async def _late_subscribe(self, client: aiomqtt.Client, subscribed: set[str], timeout_s: float) -> None:
        while True:
            await self.router.wait_new_filter()
            await self._subscribe(client, self.router.filters, subscribed, timeout_s)

    async def _receive(self, client: aiomqtt.Client) -> None:
        """One message at a time into the router; waiting for room there is what stops the
        reading (the broker holds what is not acknowledged yet)."""
        intake = self._intake
        assert intake is not None, "_make_client sets it"
        async for message in client.messages:
            intake.taken(message)
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else (
                str(message.payload).encode() if message.payload is not None else b"")
            if topic == self.ping_topic:
                self._pong(payload)
            elif not await self.router.put(topic, payload):
                log.debug("message without a handler", extra={"kv": {"topic": topic}})
            intake.done(message)
        raise ConnectionError("message stream ended")

    async def _ping(self, client: aiomqtt.Client) -> None:
        """A QoS 0 round trip through the broker on P/D/ping: the updates gates' network quality."""
        await asyncio.sleep(FIRST_PING_S)
        while True:
            n = next(self._ping_ids)
            self._pings = {k: v for k, v in self._pings.items() if time.monotonic() - v < 2 * PING_INTERVAL_S}
            self._pings[n] = time.monotonic()
            await client.publish(self.ping_topic, dumps({"v": 1, "n": n}), qos=0)
            await asyncio.sleep(PING_INTERVAL_S)

    def _pong(self, payload: bytes) -> None:
        try:
            n = json.loads(payload)["n"]
            if not isinstance(n, int) or isinstance(n, bool):
                return
            sent = self._pings.pop(n)
        except (ValueError, KeyError, TypeError, RecursionError):
            return  # not ours (another session of the same device, or a stray or hostile message)
        self.rtt_ms = round((time.monotonic() - sent) * 1000.0, 2)


def no_delay(client: aiomqtt.Client) -> None:
    """TCP_NODELAY on the broker socket: small packets (PUBACKs, chunk requests, pings) go out at
    once. With Nagle's algorithm each waits for the TCP ACK of the one before, which a delayed-ACK
    peer holds for 40 ms: that stalls a transfer under ReceiveMaximum and slows every round trip."""
    sock = client._client.socket()  # paho's socket (plain or TLS)
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
