"""Fleet state without a broker: seq accounting, ingestion rules, trouble ranking (fake clock)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeagent.core import protocol
from edgeagent.core.errors import ProtocolError
from edgeagent.ops.fleet.state import (
    DeviceState,
    FleetState,
    SeqTracker,
    Thresholds,
    is_stale,
    sort_by_trouble,
    troubles,
)
from edgeagent.ops.fleet.watch import device_row, select

T0 = 1_800_000_000.0


def tele(device: str, *seqs: int, ts: float = T0, **sections: object) -> bytes:
    samples = [{"seq": s, "ts": ts + i, **sections} for i, s in enumerate(seqs)]
    return protocol.dumps(protocol.telemetry(device, samples))


def ev(device: str, seq: int, kind: str = "anomaly") -> bytes:
    return protocol.dumps(protocol.event(device, seq, kind, "warning", "x", ts=T0))


# ---- SeqTracker ---------------------------------------------------------------------------------

def test_gaps_are_counted_per_missing_seq_and_duplicates_never():
    t = SeqTracker()
    for s in (1, 2, 5, 5, 2, 6, 10):
        t.observe(s)
    assert (t.gaps, t.duplicates, t.received, t.last) == (2 + 3, 2, 5, 10)


def test_a_late_arrival_fills_its_gap_and_a_second_copy_is_a_duplicate():
    t = SeqTracker()
    for s in (1, 4, 3, 3, 2):
        t.observe(s)
    assert (t.gaps, t.duplicates, t.received) == (0, 1, 4)
    assert t.missing == []


def test_a_fill_in_the_middle_of_a_range_splits_it():
    t = SeqTracker()
    for s in (1, 10, 5):
        t.observe(s)
    assert t.gaps == 7
    assert t.missing == [[2, 4], [6, 9]]


def test_a_seq_restarting_at_one_is_a_reset_not_a_duplicate():
    t = SeqTracker()
    for s in (1, 2, 3, 1, 2):
        t.observe(s)
    assert (t.resets, t.duplicates, t.gaps, t.last) == (1, 0, 0, 2)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=1, max_size=200))
def test_gaps_equal_the_missing_values_for_any_in_order_stream_with_redeliveries(plan):
    # plan[i] = (delivered?, extra copies) for seq 2..n+1; seq 1 always arrives (the first seen)
    t = SeqTracker()
    t.observe(1)
    delivered = [1]
    for i, (sent, copies) in enumerate(plan, start=2):
        if sent:
            for _ in range(1 + copies):
                t.observe(i)
            delivered.append(i)
    assert t.gaps == delivered[-1] - len(delivered)
    assert t.received == len(delivered)
    assert t.duplicates == sum(c for s, c in plan if s)


# ---- ingestion ----------------------------------------------------------------------------------

def test_status_telemetry_events_and_jobs_build_the_device():
    fs = FleetState("edge")
    fs.ingest("edge/d1/status", protocol.dumps(protocol.status_online(
        {"name": "m", "version": "1.2.0"}, {"version": "7", "slot": "b"}, ts=T0)), T0)
    out = fs.ingest("edge/d1/telemetry", tele("d1", 1, 2, metrics={"cpu_percent": 12.5, "temp_c": 60},
                                              inference={"p95_ms": 8.0}), T0 + 2)
    assert [r[1] for r in out.samples] == [1, 2]
    fs.ingest("edge/d1/events", ev("d1", 1), T0 + 2)
    fs.ingest("edge/d1/updates/j1/status", protocol.dumps(
        protocol.job_status("j1", "model", "m", "1.3.0", "downloading", progress=0.5, ts=T0)), T0 + 2)
    d = fs.snapshot()[0]
    assert d["state"] == "online" and d["model"] == "m@1.2.0" and d["firmware"] == "7 (b)"
    assert d["metrics"]["cpu_percent"] == 12.5 and d["inference"]["p95_ms"] == 8.0
    assert d["anomalies_total"] == 1 and d["jobs"][0]["progress"] == 0.5
    assert d["interval_s"] == pytest.approx(1.0)
    assert fs.stats.samples == 2 and fs.stats.lag_s == 0.0


def test_every_section_of_a_sample_is_optional():
    fs = FleetState("edge")
    out = fs.ingest("edge/d1/telemetry", tele("d1", 7), T0)
    assert out.samples[0][:3] == ("d1", 7, T0)
    assert all(v is None for v in out.samples[0][4:])


@pytest.mark.parametrize("topic,payload", [
    ("edge/d1/telemetry", b"{not json"),
    ("edge/d1/telemetry", b"[1,2]"),
    ("edge/d1/telemetry", b'{"v":2,"device":"d1","samples":[]}'),
    ("edge/d1/telemetry", b'{"v":1,"device":"other","samples":[]}'),
    ("edge/d1/telemetry", b'{"v":1,"device":"d1","samples":{}}'),
    ("edge/d1/events", b'{"v":1,"device":"d1","seq":"1","ts":1,"kind":"rule"}'),
    ("edge/d1/status", b'{"v":1,"state":"sleeping"}'),
    ("edge/d1/events", b'{"v":1,"device":"d1","seq":1,"ts":1' + b"0" * 400 + b',"kind":"rule"}'),
    ("edge/d1/events", b'{"v":1,"device":"d1","seq":1,"ts":1,"kind":"rule","data":'
     + b"[" * 100000 + b"]" * 100000 + b"}"),
    ("edge/d1/updates/j/status", b'{"v":1,"state":"exploded"}'),
    ("edge/d1/config/reported", b'{"v":1}'),
    ("edge/group/g1/updates/j/status", b'{"v":1,"state":"received"}'),
    ("other/d1/status", b'{"v":1,"state":"online"}'),
])
def test_bad_input_is_rejected_and_changes_nothing(topic, payload):
    fs = FleetState("edge")
    fs.ingest("edge/d1/telemetry", tele("d1", 1), T0)
    before = json.dumps(fs.snapshot(), sort_keys=True)
    with pytest.raises(ProtocolError):
        fs.ingest(topic, payload, T0 + 1)
    assert json.dumps(fs.snapshot(), sort_keys=True) == before
    assert fs.stats.messages["invalid"] == 1


def test_samples_missing_seq_or_ts_are_skipped_and_counted():
    fs = FleetState("edge")
    samples = [{"seq": 1, "ts": T0}, {"ts": T0}, {"seq": True, "ts": T0}]
    payload = protocol.dumps(protocol.telemetry("d1", samples))
    out = fs.ingest("edge/d1/telemetry", payload, T0)
    assert len(out.samples) == 1
    assert fs.snapshot()[0]["invalid"] == 2


def test_telemetry_and_event_seqs_are_separate_streams_and_redeliveries_are_not_stored_twice():
    fs = FleetState("edge")
    for s in (1, 2, 4):
        fs.ingest("edge/d1/telemetry", tele("d1", s), T0)
    assert fs.ingest("edge/d1/telemetry", tele("d1", 4), T0).samples == []
    for s in (1, 3, 3, 6):
        fs.ingest("edge/d1/events", ev("d1", s), T0)
    d = fs.snapshot()[0]
    assert d["telemetry"]["gaps"] == 1 and d["telemetry"]["duplicates"] == 1
    assert d["events"]["gaps"] == 3 and d["events"]["duplicates"] == 1
    assert d["anomalies_total"] == 3
    assert fs.stats.gaps == 4 and fs.stats.duplicates == 2


def test_without_gap_tracking_a_partial_stream_reports_no_loss():
    fs = FleetState("edge", track_gaps=False)
    for s in (1, 3, 5):
        fs.ingest("edge/d1/telemetry", tele("d1", s), T0)
    d = fs.snapshot()[0]
    assert d["telemetry"]["gaps"] == 0 and d["telemetry"]["received"] == 3


def test_a_collector_restart_keeps_seq_continuity():
    fs = FleetState("edge")
    for s in (1, 2, 3):
        fs.ingest("edge/d1/telemetry", tele("d1", s), T0)
    again = FleetState("edge")
    again.restore(json.loads(json.dumps(fs.snapshot())))
    again.ingest("edge/d1/telemetry", tele("d1", 3), T0)
    again.ingest("edge/d1/telemetry", tele("d1", 6), T0)
    d = again.snapshot()[0]
    assert (d["telemetry"]["duplicates"], d["telemetry"]["gaps"], d["telemetry"]["received"]) == (1, 2, 4)


def test_a_cleared_retained_status_is_ignored():
    fs = FleetState("edge")
    assert fs.ingest("edge/d1/status", b"", T0).samples == []
    assert fs.snapshot() == []


# ---- trouble -------------------------------------------------------------------------------------

def _fleet() -> FleetState:
    fs = FleetState("edge")
    online = protocol.dumps(protocol.status_online(ts=T0))
    for d in ("ok", "hot", "busy", "gone", "quiet", "upd"):
        fs.ingest(f"edge/{d}/status", online, T0)
        fs.ingest(f"edge/{d}/telemetry", tele(d, 1, 2, metrics={"cpu_percent": 10, "temp_c": 50}), T0 + 1)
    fs.ingest("edge/gone/status", protocol.dumps(protocol.status_offline("connection-lost")), T0 + 2)
    fs.ingest("edge/upd/updates/j/status", protocol.dumps(
        protocol.job_status("j", "model", "m", "2", "downloading", progress=0.2)), T0 + 2)
    for d, metrics in (("ok", {}), ("hot", {"temp_c": 80}), ("busy", {"cpu_percent": 97}), ("upd", {})):
        fs.ingest(f"edge/{d}/telemetry", tele(d, 3, ts=T0 + 9, metrics=metrics), T0 + 9)
    return fs


def test_devices_sort_worst_first_and_stale_needs_n_intervals_of_silence():
    fs = _fleet()
    th = Thresholds(stale_intervals=3, stuck_update_s=100)
    devs = {d["device"]: d for d in fs.snapshot()}
    now = T0 + 9.5
    assert not is_stale(devs["ok"], now, th)
    assert is_stale(devs["quiet"], now, th)        # last sample at T0+1, interval 1 s
    assert troubles(devs["gone"], now, th) == ["offline"]
    assert troubles(devs["upd"], now, th) == ["updating"]
    assert troubles(devs["upd"], T0 + 200, th)[:2] == ["stale", "update-stuck"]
    order = [d["device"] for d in sort_by_trouble(list(devs.values()), now, th)]
    assert order == ["gone", "quiet", "hot", "busy", "upd", "ok"]


def test_watch_rows_filter_by_state_and_group():
    fs = _fleet()
    th = Thresholds()
    now = T0 + 9.5
    devs = fs.snapshot()
    assert [d["device"] for d in select(devs, now, th, state="offline")] == ["gone"]
    assert [d["device"] for d in select(devs, now, th, state="updating")] == ["upd"]
    assert [d["device"] for d in select(devs, now, th, state="ok")] == ["ok"]
    assert select(devs, now, th, group="line3") == []
    row = device_row(devs[0], now, th)
    assert set(row) >= {"device", "state", "troubles", "last_seen_ago_s", "update", "telemetry", "events"}
    json.dumps(row)


SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400)
           | st.floats(allow_nan=False) | st.text(max_size=5))
JSON = st.recursive(SCALARS, lambda kids: (st.lists(kids, max_size=4)
                                           | st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                    max_leaves=20)
FIELDS = st.sampled_from(["seq", "ts", "metrics", "inference", "spool", "state", "progress", "kind", "model",
                          "groups", "samples", "device", "data", "firmware"])


@given(st.sampled_from(["status", "telemetry", "events", "updates/j/status"]),
       st.dictionaries(FIELDS, JSON, max_size=6),
       st.lists(st.dictionaries(FIELDS, JSON, max_size=6), max_size=3))
def test_any_json_either_ingests_or_raises_protocol_error(kind, body, samples):
    fs = FleetState("edge")
    msg = {"v": 1, "device": "d1", **body}
    if kind == "telemetry" and "samples" not in body:
        msg["samples"] = samples
    try:
        fs.ingest(f"edge/d1/{kind}", json.dumps(msg).encode(), T0)
    except ProtocolError:
        return
    json.dumps(fs.snapshot())


def test_config_reports_are_kept_per_device_and_bad_ones_rejected():
    fs = FleetState("edge", Thresholds())
    report = protocol.config_reported(7, "ab" * 32, "rolled_back", "broker unreachable", ts=T0)
    fs.ingest("edge/d1/config/reported", protocol.dumps(report), T0 + 1)
    (snap,) = fs.snapshot()
    assert snap["config"]["version"] == 7 and snap["config"]["state"] == "rolled_back"
    assert snap["config"]["reason"] == "broker unreachable"
    assert DeviceState.from_dict(snap).config == snap["config"]  # survives a collector restart
    for bad in ({"v": 1, "version": "7", "state": "applied"}, {"v": 1, "version": 8, "state": "maybe"}):
        with pytest.raises(ProtocolError):
            fs.ingest("edge/d1/config/reported", json.dumps(bad).encode(), T0 + 2)
    assert fs.snapshot()[0]["config"]["version"] == 7  # state untouched by bad input
