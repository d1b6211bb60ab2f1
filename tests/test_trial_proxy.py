"""The field trial's fault proxy against a real Mosquitto: pass-through, outage, stall, reset."""

from __future__ import annotations

import socket
import subprocess

from fieldtrial.proxy import FaultProxy
from tests.broker import Broker


def pub(port: int, timeout: float = 5) -> int:
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "t/x", "-m", "1",
                           "-q", "1"], capture_output=True, timeout=timeout).returncode


def test_proxy_passes_and_injects_outages(broker: Broker) -> None:
    proxy = FaultProxy("127.0.0.1", broker.port).start()
    try:
        assert pub(proxy.port) == 0
        proxy.set_faults(down=True)
        assert pub(proxy.port) != 0  # connection refused/closed: an outage
        proxy.set_faults(down=False, latency_ms=20)
        assert pub(proxy.port) == 0
        # a stalled link keeps TCP open but nothing moves: the client times out
        proxy.set_faults(stall=True, latency_ms=0)
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(bytes([0x10, 0x0C, 0x00, 0x04]) + b"MQTT" + bytes([4, 2, 0, 5, 0, 0]))  # CONNECT
        s.settimeout(0.5)
        try:
            got = s.recv(10)
        except TimeoutError:
            got = b"timeout"
        assert got == b"timeout"
        proxy.set_faults(stall=False)
        s.settimeout(5)
        assert s.recv(4)[:1] == b"\x20"  # the CONNACK comes through once the stall ends
        s.close()
        assert proxy.connections >= 3
    finally:
        proxy.stop()
