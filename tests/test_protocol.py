"""Wire protocol helpers: strict parsing, builders that keep DESIGN.md's names."""

from __future__ import annotations

import pytest

from edgeagent.core import protocol
from edgeagent.core.errors import ProtocolError


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"job": "j"}', "protocol version"),
    (b'{"v": 2}', "protocol version"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
    (b'{"v": 1, "size": 1' + b"0" * 5000 + b"}", "malformed JSON"),
])
def test_loads_object_rejects_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.loads_object("edge/d/updates/j/manifest", payload)
    assert reason in info.value.reason and info.value.topic == "edge/d/updates/j/manifest"


def test_topics_and_builders_follow_design() -> None:
    t = protocol.Topics("edge", "pi-7")
    assert (t.status, t.telemetry, t.events) == (
        "edge/pi-7/status", "edge/pi-7/telemetry", "edge/pi-7/events")
    assert t.job_status("J1") == "edge/pi-7/updates/J1/status"
    assert t.group_updates_filter("line3") == "edge/group/line3/updates/+/#"
    ev = protocol.event("pi-7", 3, "anomaly", "warning", "score 0.9", {"score": 0.9}, ts=1.0)
    assert ev == {"v": 1, "device": "pi-7", "seq": 3, "ts": 1.0, "kind": "anomaly", "severity": "warning",
                  "message": "score 0.9", "data": {"score": 0.9}}
    with pytest.raises(ValueError):
        protocol.job_status("J", "model", "m", "1", "exploded")
    assert protocol.canonical({"b": 1, "a": "é", "sig": {"x": 1}}) == '{"a":"é","b":1}'.encode()
