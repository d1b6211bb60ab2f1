"""Collectors sharing one PostgreSQL store, against a real Mosquitto and a real PostgreSQL server:
a $share group split, gap events across collectors, kill -9 and restart, a database restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edgeagent.ops.fleet.collector import Collector, CollectorOptions
from edgeagent.ops.fleet.connect import BrokerUrl
from tests.broker import Broker
from tests.pg import PgServer
from tests.util import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeagent.ops.fleet.cli", *args]


def run_json(*args: str) -> Any:
    r = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@contextmanager
def simulate(broker: Broker, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(cli("simulate", "--broker", broker.url, "--pooled", *args), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def finish(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def rows(url: str, query: str = "SELECT count(*) FROM samples") -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


def collector(broker: Broker, url: str, client_id: str, **kw: Any) -> Collector:
    return Collector(CollectorOptions(broker=BrokerUrl.parse(broker.url), store=url, client_id=client_id,
                                      share_group="g1", gap_scan_interval_s=0.5, gap_settle_s=0.5, **kw))


def spawn_collector(broker: Broker, url: str, client_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cli("fleet", "collect", "--broker", broker.url, "--store", url, "--client-id",
                                client_id, "--share-group", "g1", "--report-s", "1"),
                            cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_two_collectors_on_one_share_group_write_one_fleet_with_gap_events(broker: Broker, pg_url: str):
    with collector(broker, pg_url, "ca") as a, collector(broker, pg_url, "cb") as b:
        with simulate(broker, "--devices", "200", "--count", "15", "--interval-s", "0.2",
                      "--drop-every", "7") as sim:
            summary = finish(sim)
        published = summary["samples_published"]
        assert published == 200 * 13 and summary["samples_dropped"] == 400
        wait_until(lambda: rows(pg_url) == published, 60, interval_s=0.2, message="every sample stored")
        assert a.state.stats.samples and b.state.stats.samples, "both collectors got a share"
        assert a.state.stats.samples + b.state.stats.samples == published       # no sample twice
        wait_until(lambda: rows(pg_url, "SELECT count(*) FROM gaps") == 400, 30, interval_s=0.2,
                   message="a gap event for each dropped seq")
    assert rows(pg_url, "SELECT count(*) FROM (SELECT DISTINCT device, seq FROM samples) x") == published
    assert rows(pg_url, "SELECT count(DISTINCT (first_seq, last_seq)) FROM gaps") == 2

    # another machine's view: a separate process with only the URL
    out = run_json("fleet", "watch", "--store", pg_url, "--once", "--json", "--limit", "1000")
    devices = {d["device"]: d for d in out["devices"]}
    assert len(devices) == 200 and out["summary"]["devices"] == 200
    assert all(d["telemetry"]["gaps"] == 2 and d["telemetry"]["received"] == 13 for d in devices.values())
    hist = run_json("fleet", "history", "sim-0042", "--store", pg_url, "--json")
    assert hist["gaps"] == [[7, 7], [14, 14]] and len(hist["samples"]) == 13
    stats = run_json("fleet", "stats", "--store", pg_url, "--json")
    assert sorted(c["id"] for c in stats["collectors"]) == ["ca", "cb"]
    assert stats["rows"]["samples"] == published


def test_kill_9_of_one_collector_loses_nothing_and_its_queue_lands_on_restart(broker: Broker, pg_url: str):
    assert subprocess.run(cli("fleet", "migrate", "--store", pg_url), cwd=ROOT, timeout=60).returncode == 0
    procs = {name: spawn_collector(broker, pg_url, name) for name in ("ka", "kb")}
    try:
        wait_until(lambda: rows(pg_url, "SELECT count(*) FROM collectors") == 2, 30, interval_s=0.2,
                   message="both collectors running")
        with simulate(broker, "--devices", "200", "--count", "40", "--interval-s", "0.2") as sim:
            wait_until(lambda: rows(pg_url) >= 1000, 60, interval_s=0.1, message="collecting")
            procs["ka"].send_signal(signal.SIGKILL)
            procs["ka"].wait(10)
            at_kill = rows(pg_url)
            wait_until(lambda: rows(pg_url) >= at_kill + 1000, 60, interval_s=0.1, message="kb goes on")
            restarted = time.time()
            procs["ka"] = spawn_collector(broker, pg_url, "ka")     # same client id: same session
            summary = finish(sim)
        published = summary["samples_published"]
        assert published == 8000
        wait_until(lambda: rows(pg_url) == published, 60, interval_s=0.2, message="nothing lost")
        landed_sql = "SELECT (info->>'rows_written')::int FROM collectors WHERE id = 'ka'"
        wait_until(lambda: rows(pg_url, landed_sql) > 0, 30, interval_s=0.2,
                   message="the restarted collector wrote what the broker kept for it (heartbeat)")
        landed = rows(pg_url, landed_sql)
        # stamped well before the restart, received after it: what the broker held for the session
        queued = rows(pg_url, f"SELECT count(*) FROM samples WHERE recv > {restarted} "
                              f"AND ts < {restarted} - 1")
        print(f"restarted collector wrote {landed} rows; {queued} were queued by the broker meanwhile")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()


def test_a_database_restart_mid_run_loses_no_sample(broker: Broker, pg_server: PgServer, pg_url: str):
    with collector(broker, pg_url, "cr") as c:
        with simulate(broker, "--devices", "50", "--count", "60", "--interval-s", "0.1") as sim:
            wait_until(lambda: c.rows_written >= 200, 60, message="collecting")
            pg_server.stop()
            try:
                wait_until(lambda: c.write_errors >= 2, 60, message="the writer saw the database go")
                assert c.health()["queue_depth"] > 0
            finally:
                pg_server.start()
            summary = finish(sim)
        published = summary["samples_published"]
        assert published == 3000
        wait_until(lambda: rows(pg_url) == published, 90, interval_s=0.2, message="backlog written")
        assert c.state.stats.samples == published
