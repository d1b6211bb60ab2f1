"""Deep check of the cloud broker, one step per line so the failing one is named: the host resolves,
the port answers, the TLS handshake passes (the broker's certificate against our CA, ours against its),
and a real MQTT CONNECT with the configured credentials gets a CONNACK that says yes.

The probe connects with its own client id (`<client id>-check`, clean start, no will) so that a running
agent keeps its session and nobody sees it go offline. The same probe (with a SUBSCRIBE) checks a
local MQTT sensor broker.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.check.result import Check, fail, info, ok
from edgeagent.core.config import Config, TlsConfig

PROTOCOL_FILE = "mqtt_protocol"  # written by the session when it negotiated a protocol ("5" | "3.1.1")


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: TlsConfig | None = None
    username: str = ""
    password: str = ""
    client_id: str = "edgeagent-check"


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """What the session's TLS settings amount to (verify the broker unless told not to; mutual TLS
    when a client certificate is configured)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file:
        ctx.load_verify_locations(tls.ca_file)
    else:
        ctx.load_default_certs()
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def resolve(host: str, port: int, timeout_s: float) -> list[Any]:
    """getaddrinfo with a deadline (it has none of its own): in a daemon thread, so a resolver that
    never answers cannot hold the check, nor its exit."""
    out: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            out.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            error.append(exc)

    worker = threading.Thread(target=run, name="check-resolve", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if error:
        raise error[0]
    if worker.is_alive() or not out:
        raise TimeoutError(f"{host} did not resolve within {timeout_s:g}s")
    return out


def reach(ep: Endpoint, timeout_s: float, what: str) -> list[Check]:
    """Resolve, connect, TLS handshake: one line per step, stopping at the first that fails."""
    where = f"{ep.host}:{ep.port}"
    try:
        addrs = resolve(ep.host, ep.port, timeout_s)
    except (socket.gaierror, TimeoutError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else f"no answer within {timeout_s:g}s"
        return [fail(f"{what}.host", f"{ep.host} does not resolve: {why}",
                     "check the name and the board's DNS (resolvectl status)")]
    checks = [ok(f"{what}.host", f"{ep.host} resolves to {addrs[0][4][0]}")]
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout_s)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return [*checks, fail(f"{what}.port", f"cannot connect to {where}: {reason}",
                              "is the broker running and the port open in every firewall on the way?")]
    with sock:
        if ep.tls is None:
            return [*checks, ok(f"{what}.port", f"{where} accepts connections (no TLS)")]
        try:
            ctx = tls_context(ep.tls)
            with ctx.wrap_socket(sock, server_hostname=ep.host) as tsock:
                version = tsock.version()
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
            return [*checks, fail(f"{what}.tls", f"TLS handshake with {where} failed: {reason}",
                                  "mqtt.tls.ca_file must hold the CA that signed the broker's certificate "
                                  "(for its host name); a client certificate must be one the broker trusts")]
    return [*checks, ok(f"{what}.tls", f"{where} handshake ({version})")]


def mqtt_connect(ep: Endpoint, v5: bool, timeout_s: float, subscribe: str = "") -> tuple[bool, str]:
    """(accepted, what the broker said) for one CONNECT (+ SUBSCRIBE) over a fresh connection."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ep.client_id, protocol=proto,
                         clean_session=None if v5 else True)
    if ep.tls is not None:
        client.tls_set_context(tls_context(ep.tls))
        if ep.tls.insecure_skip_verify:
            client.tls_insecure_set(True)
    if ep.username:
        client.username_pw_set(ep.username, ep.password or None)
    client.connect_timeout = timeout_s
    answer: dict[str, Any] = {}
    client.on_connect = lambda _c, _u, _f, rc, _p=None: answer.setdefault("connack", rc)
    client.on_subscribe = lambda _c, _u, _m, rcs, _p=None: answer.setdefault("suback", rcs)
    try:
        client.connect(ep.host, ep.port, keepalive=max(10, int(timeout_s) + 5))
        deadline = time.monotonic() + timeout_s
        while "connack" not in answer and time.monotonic() < deadline:
            # a refusal is a CONNACK and a close: the same loop call may see both
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS and "connack" not in answer:
                return False, "the broker closed the connection before its CONNACK"
        rc = answer.get("connack")
        if rc is None:
            return False, f"no CONNACK within {timeout_s:g}s"
        if rc.is_failure:
            return False, f"refused: {rc}"
        if subscribe:
            client.subscribe(subscribe, qos=0)
            while "suback" not in answer and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    return False, f"the broker closed the connection on SUBSCRIBE {subscribe}"
            codes = answer.get("suback")
            if codes is None:
                return False, f"no SUBACK for {subscribe} within {timeout_s:g}s"
            if any(c.is_failure for c in codes):
                return False, f"SUBSCRIBE {subscribe} refused: {codes[0]}"
        return True, str(rc)
    except (OSError, ssl.SSLError) as exc:
        return False, str(exc) or type(exc).__name__
    finally:
        client.disconnect()
        client.loop(timeout=0.05)  # writes the DISCONNECT and closes the socket


def broker_checks(cfg: Config, timeout_s: float) -> list[Check]:
    m = cfg.mqtt
    if not m.host:
        return [info("mqtt.host", "empty: the agent runs offline and keeps everything in the spool")]
    ep = Endpoint(m.host, m.port, m.tls if m.tls.enabled else None, m.username, m.password,
                  f"{cfg.client_id}-check"[:64])
    checks = reach(ep, timeout_s, "mqtt")
    if checks[-1].status == "FAIL":
        return checks
    tries = {"5": (True,), "3.1.1": (False,)}.get(str(m.protocol), (True, False))  # "auto": 5, then 3.1.1
    said = ""
    for v5 in tries:
        accepted, said = mqtt_connect(ep, v5, timeout_s)
        version = "5" if v5 else "3.1.1"
        if accepted:
            cert = " (client certificate)" if m.tls.cert_file else ""
            who = f" as {m.username!r}" if m.username else cert
            return [*checks, ok("mqtt.login", f"MQTT {version} CONNECT{who} accepted")]
    fix = ("check mqtt.username / mqtt.password (and the ${ENV} they come from) against the broker's "
           "password file, or the client certificate against its ACL")
    if "protocol" in said.lower():
        fix = "the broker may not speak this MQTT version: set mqtt.protocol = \"3.1.1\""
    return [*checks, fail("mqtt.login", f"MQTT {m.protocol} CONNECT to {m.host}:{m.port}: {said}", fix)]


def negotiated_protocol(state_dir: Path) -> Check | None:
    """The protocol the agent last negotiated (`mqtt.protocol = "auto"` records it), as an info line."""
    try:
        text = (state_dir / PROTOCOL_FILE).read_text().strip()
    except OSError:
        return None
    if text not in ("5", "3.1.1"):
        return info("mqtt.protocol", f"{state_dir / PROTOCOL_FILE} holds {text[:20]!r}, not 5 or 3.1.1")
    return info("mqtt.protocol", f"the agent last negotiated MQTT {text}")
