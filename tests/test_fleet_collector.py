"""The collector against a real Mosquitto, fed by `edgeagent simulate` processes and raw paho clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import protocol
from edgeagent.ops.fleet.collector import Collector, CollectorOptions
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.fleet.metrics import FleetMetrics, serve
from edgeagent.ops.fleet.state import Thresholds, troubles
from edgeagent.ops.fleet.store_sqlite import Store
from tests.broker import Broker
from tests.util import free_port, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeagent.ops.fleet.cli", *args]


@contextmanager
def simulate(broker: Broker, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cli("simulate", "--broker", broker.url, *args), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def finish(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def collector(broker: Broker, tmp_path: Path | None, **kw: Any) -> Collector:
    opts = CollectorOptions(broker=BrokerUrl.parse(broker.url), store=tmp_path, flush_interval_s=0.05, **kw)
    return Collector(opts)


def device(c: Collector, name: str) -> dict[str, Any]:
    snap = c.state.snapshot({name})
    return snap[0] if snap else {}


def watch_json(db: Path, *args: str) -> dict[str, Any]:
    r = subprocess.run(cli("fleet", "watch", "--db", str(db), "--once", "--json", *args), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_devices_appear_then_go_offline_by_last_will_within_the_keepalive_bound(broker: Broker,
                                                                                  tmp_path: Path):
    db = tmp_path / "fleet.sqlite"
    keepalive_s = 2
    with collector(broker, db) as c, simulate(broker, "--devices", "4", "--per-device-connections",
                                              "--keepalive-s", str(keepalive_s), "--interval-s", "0.2",
                                              "--groups", "line3,rpi4") as sim:
        names = [f"sim-{i:04d}" for i in range(4)]
        wait_until(lambda: all(device(c, n).get("telemetry", {}).get("received", 0) >= 3 for n in names),
                   30, message="4 devices online with samples")
        assert all(device(c, n)["state"] == "online" for n in names)
        wait_until(lambda: len(Store(db, readonly=True).devices()) == 4, 10)
        live = watch_json(db, "--group", "line3", "--stale-intervals", "100")  # not about staleness
        assert {d["device"] for d in live["devices"]} == set(names)
        assert {(d["state"], d["model"]) for d in live["devices"]} == {("online", "vibration-anomaly@1.0.0")}

        # frozen, not killed: the sockets stay open and silent (a dead link, not a closed one), so
        # only the broker's keepalive check (1.5 x keepalive) can publish the last wills
        sim.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        wait_until(lambda: all(device(c, n)["state"] == "offline" for n in names), 30,
                   message="last wills")
        took = time.monotonic() - frozen
        sim.send_signal(signal.SIGKILL)
        assert 1.5 * keepalive_s - 1.0 <= took <= 1.5 * keepalive_s + 2.0, f"offline after {took:.1f}s"
        assert {device(c, n)["reason"] for n in names} == {"connection-lost"}
        wait_until(lambda: watch_json(db)["summary"]["offline"] == 4, 10)
        assert [d["troubles"][0] for d in watch_json(db, "--state", "offline")["devices"]] == ["offline"] * 4


def test_seq_gaps_are_counted_exactly_for_samples_and_events(broker: Broker, tmp_path: Path):
    db = tmp_path / "fleet.sqlite"
    port = free_port()
    with collector(broker, db) as c:
        serve(f"127.0.0.1:{port}", FleetMetrics(c.state.snapshot, c.health, c.opts.thresholds))
        with simulate(broker, "--devices", "5", "--pooled", "--count", "20", "--drop-every", "7",
                      "--interval-s", "0.02") as sim:
            summary = finish(sim)
        assert summary["samples_published"] == 5 * 18 and summary["samples_dropped"] == 5 * 2
        # every message (online and offline status, samples, events) acknowledged by the broker
        # through the pooled clients' buffered reads before the simulator disconnected
        assert summary["acked"] == summary["messages"] >= 5 * 2 + 90
        wait_until(lambda: c.state.stats.samples == 90, 20, message="all samples in")

        # events: a raw device sends seq 1, 2, 5, 5 (redelivery), 3 (late)
        raw = make_client(BrokerUrl.parse(broker.url), "raw-device")
        connect_and_wait(raw, BrokerUrl.parse(broker.url), 10)
        for seq in (1, 2, 5, 5, 3):
            event = protocol.event("raw", seq, "error", "critical", "e")
            raw.publish("edge/raw/events", protocol.dumps(event), qos=1).wait_for_publish(10)
        sample = protocol.dumps(protocol.telemetry("raw", [{"seq": 9, "ts": time.time()}]))
        for _ in range(2):
            raw.publish("edge/raw/telemetry", sample, qos=1).wait_for_publish(10)
        raw.publish("edge/raw/telemetry", b"{broken", qos=1).wait_for_publish(10)
        raw.disconnect()
        raw.loop_stop()
        # the broken payload went last on the same topic and connection: once it is counted, all is in
        wait_until(lambda: c.state.stats.messages["invalid"] == 1, 10)
        assert device(c, "raw")["telemetry"]["duplicates"] == 1

        for i in range(5):
            d = device(c, f"sim-{i:04d}")
            assert d["telemetry"] == {"last_seq": 20, "received": 18, "gaps": 2, "duplicates": 0, "resets": 0}
        raw_dev = device(c, "raw")
        assert raw_dev["events"]["gaps"] == 1 and raw_dev["events"]["duplicates"] == 1
        assert raw_dev["events"]["received"] == 4
        assert c.state.stats.gaps == 5 * 2 + 1

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'edgeagent_device_seq_gaps_total{device="sim-0003",stream="telemetry"} 2.0' in metrics
        assert 'edgeagent_device_seq_gaps_total{device="raw",stream="events"} 1.0' in metrics
        assert "edgeagent_fleet_seq_gaps_total 11.0" in metrics
        assert 'edgeagent_device_online{device="sim-0000"} 0.0' in metrics   # clean stop: "shutdown"
        assert 'edgeagent_device_temperature_celsius{device="sim-0001"}' in metrics

        wait_until(lambda: Store(db, readonly=True).count("samples") == 91, 10)
    with Store(db, readonly=True) as store:
        assert store.sample_seqs("sim-0002") == [s for s in range(1, 21) if s % 7]
    out = watch_json(db)
    by_name = {d["device"]: d for d in out["devices"]}
    assert by_name["sim-0000"]["telemetry"]["gaps"] == 2 and by_name["sim-0000"]["status"] == "offline"
    assert by_name["raw"]["events"]["gaps"] == 1
    hist = subprocess.run(cli("fleet", "history", "raw", "--db", str(db), "--json"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert [e["seq"] for e in json.loads(hist.stdout)["events"]] == [1, 2, 3, 5]


def test_two_collectors_in_a_share_group_split_the_stream_without_loss_or_doubles(broker: Broker,
                                                                                   tmp_path: Path):
    kw: dict[str, Any] = {"share_group": "g1", "track_gaps": False}
    with collector(broker, tmp_path / "a.sqlite", **kw) as a, \
            collector(broker, tmp_path / "b.sqlite", **kw) as b:
        with simulate(broker, "--devices", "10", "--pooled", "--count", "30", "--interval-s", "0.05",
                      "--anomaly-rate", "0.2") as sim:
            summary = finish(sim)
        total = summary["samples_published"]
        assert total == 300
        try:
            wait_until(lambda: a.state.stats.samples + b.state.stats.samples >= total, 30)
            events = summary["events_published"]
            got = lambda: a.state.stats.messages["events"] + b.state.stats.messages["events"]  # noqa: E731
            wait_until(lambda: got() >= events, 10)
        except AssertionError:
            raise AssertionError(f"{summary}: {a.health()} / {b.health()}") from None
        # every collector knows every device: statuses (online, then offline) are read plainly by all,
        # exactly once each, so neither collector lost its session to the other on the way
        wait_until(lambda: a.state.stats.messages["status"] == b.state.stats.messages["status"] == 20, 10)
        assert len(a.state.devices) == len(b.state.devices) == 10
    seqs = []
    for name in ("a", "b"):
        with Store(tmp_path / f"{name}.sqlite", readonly=True) as store:
            seqs.append({(f"sim-{i:04d}", s) for i in range(10) for s in store.sample_seqs(f"sim-{i:04d}")})
    assert seqs[0] and seqs[1], "both collectors got a share"
    assert not seqs[0] & seqs[1], "a sample was delivered twice"
    assert seqs[0] | seqs[1] == {(f"sim-{i:04d}", s) for i in range(10) for s in range(1, 31)}
    assert a.state.stats.samples + b.state.stats.samples == total


def test_a_silent_device_goes_stale_then_delivers_its_backlog_late_but_complete(broker: Broker,
                                                                                tmp_path: Path):
    th = Thresholds(stale_intervals=4, stale_grace_s=0.0)
    db = tmp_path / "fleet.sqlite"
    with collector(broker, db, thresholds=th) as c, simulate(
            broker, "--devices", "2", "--per-device-connections", "--interval-s", "0.2", "--count", "25",
            "--outage", "1.5:2.5:1") as sim:
        wait_until(lambda: "stale" in troubles(device(c, "sim-0000"), time.time(), th), 20,
                   message="sim-0000 stale during its outage")
        assert device(c, "sim-0000")["state"] == "online"          # a clean disconnect: no last will
        assert "stale" not in troubles(device(c, "sim-0001"), time.time(), th)
        finish(sim)
        wait_until(lambda: device(c, "sim-0000")["telemetry"]["received"] == 25, 20)
        tele = device(c, "sim-0000")["telemetry"]
        assert tele["gaps"] == 0 and tele["duplicates"] == 0
        wait_until(lambda: len(Store(db, readonly=True).samples("sim-0000")) == 25, 10)
    samples = Store(db, readonly=True).samples("sim-0000")
    assert [s["seq"] for s in samples] == list(range(1, 26))
    late = [s for s in samples if s["recv"] - s["ts"] > 1.0]
    assert len(late) >= 5, "the spooled samples arrived late"
    assert max(s["spool_backlog"] for s in samples) >= 5     # the device said so while spooling


def test_a_collector_with_a_persistent_session_gets_what_it_missed(broker: Broker, tmp_path: Path):
    db = tmp_path / "fleet.sqlite"
    kw: dict[str, Any] = {"client_id": "fleet-persist", "session_expiry_s": 600, "share_group": None}
    with collector(broker, db, **kw) as c:
        wait_until(c.connected.is_set, 10)
    with simulate(broker, "--devices", "3", "--pooled", "--count", "10", "--interval-s", "0.01") as sim:
        finish(sim)
    with collector(broker, db, **kw) as c:
        wait_until(lambda: c.state.stats.samples == 30, 20, message="queued samples drained")
        assert all(device(c, f"sim-{i:04d}")["telemetry"]["gaps"] == 0 for i in range(3))


def test_collect_cli_serves_metrics_and_stops_cleanly_on_sigterm(broker: Broker, tmp_path: Path):
    port = free_port()
    db = tmp_path / "fleet.sqlite"
    proc = subprocess.Popen(cli("fleet", "collect", "--broker", broker.url, "--db", str(db),
                                "--prometheus", f"127.0.0.1:{port}", "--report-s", "0.1"),
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    return str(r.read().decode())
            except OSError:
                return ""
        wait_until(lambda: "edgeagent_fleet_connected 1.0" in scrape(), 30)
        with simulate(broker, "--devices", "2", "--count", "5", "--interval-s", "0.05") as sim:
            finish(sim)
        wait_until(lambda: "edgeagent_fleet_samples_total 10.0" in scrape(), 20)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "msg/s=" in err, err
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with Store(db, readonly=True) as store:
        assert store.count("samples") == 10


def test_bad_arguments_are_clear_errors(broker: Broker):
    r = subprocess.run(cli("simulate", "--broker", broker.url, "--outage", "soon"), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "AT_S:DURATION_S" in r.stderr
    r = subprocess.run(cli("fleet", "collect", "--broker", "http://x", "--no-db"), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "scheme" in r.stderr
    r = subprocess.run(cli("fleet", "collect", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--no-db"),
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach broker" in r.stderr


def test_history_older_than_the_retention_is_pruned_while_collecting(broker: Broker, tmp_path: Path):
    db = tmp_path / "fleet.sqlite"
    with collector(broker, db, retention_h=1.0 / 3600, prune_interval_s=0.2, snapshot_interval_s=0.1) as c:
        with simulate(broker, "--devices", "2", "--count", "5", "--interval-s", "0.02") as sim:
            finish(sim)
        wait_until(lambda: c.rows_written >= 10, 10, message="the rows were stored first")
        wait_until(lambda: Store(db, readonly=True).count("samples") == 0, 10, message="pruned")
        assert Store(db, readonly=True).count("devices") == 2
