"""Support requests as pure decisions: what is refused and why, the replay record, the pacing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import protocol, signing
from edgeagent.ops.support import build_request
from edgeagent.support import request as rq
from edgeagent.support.component import Pacer
from tests.updates_helpers import KEY_ID, make_keys

NOW = 1_800_000_000.0
BASE = "edge/dev1"
LIMITS = rq.Limits(max_lines=1000, max_log_level_s=3600, max_ttl_s=86400)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    key, pub = make_keys(tmp_path / "keys")
    return key, signing.load_trusted_keys({KEY_ID: str(pub)})


def _check(msg: dict[str, Any] | bytes, trusted: dict[str, Any], seen: rq.Seen, job: str = "j1",
           now: float = NOW) -> rq.SupportRequest:
    payload = msg if isinstance(msg, bytes) else protocol.dumps(msg)
    return rq.check(f"{BASE}/support/{job}/request", payload, base=BASE, trusted=trusted, device_id="dev1",
                    groups=["line1"], seen=seen, limits=LIMITS, now=now)


def _refusal(msg: dict[str, Any] | bytes, trusted: dict[str, Any], seen: rq.Seen, **kw: Any) -> str:
    with pytest.raises(rq.Refused) as info:
        _check(msg, trusted, seen, **kw)
    return info.value.reason


def test_a_signed_bundle_request_is_accepted_with_capped_lines(keys: Any, tmp_path: Path) -> None:
    key, trusted = keys
    msg = signing.sign(build_request("j1", "bundle", device="dev1", lines=10**6, issued_at=NOW), key, KEY_ID)
    req = _check(msg, trusted, rq.Seen(tmp_path / "seen.json"))
    assert (req.job, req.action, req.lines, req.key_id) == ("j1", "bundle", 1000, KEY_ID)


def test_a_log_level_request_is_capped(keys: Any, tmp_path: Path) -> None:
    key, trusted = keys
    msg = signing.sign(build_request("j1", "log_level", device="dev1", level="DEBUG", duration_s=10**6,
                                     issued_at=NOW), key, KEY_ID)
    req = _check(msg, trusted, rq.Seen(tmp_path / "seen.json"))
    assert (req.level, req.duration_s) == ("DEBUG", 3600)


def test_refusals_name_their_reason(keys: Any, tmp_path: Path) -> None:
    key, trusted = keys
    seen = rq.Seen(tmp_path / "seen.json")
    good = build_request("j1", "bundle", device="dev1", issued_at=NOW)
    assert _refusal(good, trusted, seen) == "signature"  # unsigned
    assert _refusal({**signing.sign(good, key, KEY_ID), "lines": 7}, trusted, seen) == "signature"  # forged
    assert _refusal(signing.sign({**good, "type": "cancel"}, key, KEY_ID), trusted, seen) == "signature"
    assert _refusal(b"{not json", trusted, seen) == "malformed"
    assert _refusal(signing.sign(good, key, KEY_ID), trusted, seen, job="j2") == "job"
    other = build_request("j1", "bundle", device="dev2", issued_at=NOW)
    assert _refusal(signing.sign(other, key, KEY_ID), trusted, seen) == "audience"
    assert _refusal(signing.sign(good, key, KEY_ID), trusted, seen, now=NOW + 601) == "expired"
    assert _refusal(signing.sign(good, key, KEY_ID), trusted, seen, now=NOW - 1000) == "future"
    long = build_request("j1", "bundle", device="dev1", issued_at=NOW, ttl_s=86400 * 3)
    assert _refusal(signing.sign(long, key, KEY_ID), trusted, seen) == "malformed"
    odd = {**good, "action": "shell"}
    assert _refusal(signing.sign(odd, key, KEY_ID), trusted, seen) == "malformed"
    with pytest.raises(rq.Refused) as info:
        rq.check(f"{BASE}/support/a+b/request", b"{}", base=BASE, trusted=trusted, device_id="dev1",
                 groups=[], seen=seen, limits=LIMITS, now=NOW)
    assert info.value.reason == "topic"


def test_a_job_seen_before_is_a_replay_across_restarts(keys: Any, tmp_path: Path) -> None:
    key, trusted = keys
    msg = signing.sign(build_request("j1", "bundle", device="dev1", issued_at=NOW), key, KEY_ID)
    seen = rq.Seen(tmp_path / "seen.json")
    req = _check(msg, trusted, seen)
    seen.add(req.job, req.expires, NOW)
    seen.save()
    again = rq.Seen(tmp_path / "seen.json")
    again.load()
    assert _refusal(msg, trusted, again) == "replay"


def test_the_seen_record_is_bounded_and_forgets_expired_ids(tmp_path: Path) -> None:
    seen = rq.Seen(tmp_path / "seen.json", max_ids=3)
    seen.add("old", NOW - 1, NOW - 10)
    for i in range(5):
        seen.add(f"j{i}", NOW + 100 + i, NOW)
    assert sorted(seen.ids) == ["j2", "j3", "j4"]
    seen.save()
    assert json.loads((tmp_path / "seen.json").read_text())["jobs"].keys() == {"j2", "j3", "j4"}
    (tmp_path / "seen.json").write_text("[garbage")
    seen.load()
    assert seen.ids == {}


def test_pacer_holds_the_average_rate() -> None:
    pacer = Pacer(rate_bps=1000.0, now=0.0)
    assert pacer.delay(500, now=0.0) == 0.0  # the first goes at once
    assert pacer.delay(500, now=0.0) == pytest.approx(0.5)
    assert pacer.delay(500, now=0.2) == pytest.approx(0.8)
    assert pacer.delay(500, now=10.0) == 0.0  # idle time is not saved up beyond one send


def test_status_and_manifest_payloads() -> None:
    s = rq.status("j1", "sending", progress=0.123456, ts=1.0, size=10)
    assert s == {"v": 1, "job": "j1", "state": "sending", "reason": "", "progress": 0.1235, "ts": 1.0,
                 "size": 10}
    with pytest.raises(ValueError):
        rq.status("j1", "exploded")
    m = rq.manifest("j1", 100_000, "ab", 65536, [("a", 10)], [("logs/agent.log", "does not fit")])
    assert m["chunks"] == 2 and m["chunk_size"] == 65536
    assert m["files"] == [{"name": "a", "size": 10}]
    assert m["omitted"] == [{"name": "logs/agent.log", "reason": "does not fit"}]
