"""The PostgreSQL fleet store on a real server: migrations, idempotent batches, gaps, retention, verbs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from edgeagent.core import protocol
from edgeagent.core.errors import FleetStoreError
from edgeagent.ops.fleet.state import FleetState
from edgeagent.ops.fleet.store import SchemaTooNew, open_store
from edgeagent.ops.fleet.store_pg import DAY_S, MIGRATIONS, PgStore
from tests.pg import PgServer

ROOT = Path(__file__).resolve().parent.parent
NOW = time.time()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent.ops.fleet.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def sample_rows(fs: FleetState, device: str, seqs: range | list[int], t0: float) -> list[tuple[object, ...]]:
    rows = []
    for seq in seqs:
        s = {"seq": seq, "ts": t0 + seq, "metrics": {"cpu_percent": float(seq)}}
        rows += fs.ingest(f"edge/{device}/telemetry", protocol.dumps(protocol.telemetry(device, [s])),
                          t0 + seq).samples
    return rows


def test_migrations_from_empty_and_from_the_previous_version(pg_url: str):
    with PgStore(pg_url, migrate=False) as pg:
        assert pg.schema_version() == 0
        assert pg.migrate(target=1) == [1]           # the previous version's schema
        with pg.conn.cursor() as cur:                # type: ignore[union-attr]
            cur.execute("INSERT INTO devices VALUES ('old', 1, 1, NULL, '{\"device\":\"old\"}')")
        pg.conn.commit()                             # type: ignore[union-attr]
    r = cli("fleet", "migrate", "--check", "--store", pg_url)
    assert r.returncode == 1 and f"{len(MIGRATIONS) - 1} migration(s) pending" in r.stdout
    r = cli("fleet", "migrate", "--store", pg_url)
    applied = ", ".join(str(v) for v in range(2, len(MIGRATIONS) + 1))
    assert r.returncode == 0 and f"schema version {len(MIGRATIONS)} (applied {applied})" in r.stdout, r.stderr
    assert cli("fleet", "migrate", "--check", "--store", pg_url).returncode == 0
    with open_store(pg_url, readonly=True) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert [d["device"] for d in store.devices()] == ["old"]   # data kept across the migration


def test_a_newer_schema_is_refused_with_one_line(pg_url: str):
    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(SchemaTooNew, match="schema version 99 is newer"):
        open_store(pg_url)
    with pytest.raises(SchemaTooNew):
        open_store(pg_url, readonly=True)
    r = cli("fleet", "devices", "--store", pg_url)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "upgrade edgeagent" in r.stderr


def test_an_unreachable_or_empty_database_is_a_clear_error(pg_url: str):
    with pytest.raises(FleetStoreError, match="cannot connect"):
        open_store("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(FleetStoreError, match="empty database"):
        open_store(pg_url, readonly=True)


def test_batches_are_idempotent_and_gaps_are_counted_across_writers(pg_url: str):
    a_state, b_state = FleetState("edge", track_gaps=False), FleetState("edge", track_gaps=False)
    t0 = NOW - 100
    with open_store(pg_url) as a, open_store(pg_url) as b:
        # two collectors share one device's stream: odd seqs to A, even to B, 7..9 lost on the way
        seqs = [s for s in range(1, 21) if s not in (7, 8, 9)]
        a_rows = sample_rows(a_state, "d1", [s for s in seqs if s % 2], t0)
        b_rows = sample_rows(b_state, "d1", [s for s in seqs if not s % 2], t0)
        a.write(a_rows, devices=a_state.take_dirty(), now=NOW)
        b.write(b_rows, devices=b_state.take_dirty(), now=NOW)
        a.write(a_rows[:3], now=NOW)                  # a redelivery after a lost ack
        ev = a_state.ingest("edge/d1/events", protocol.dumps(protocol.event("d1", 1, "rule", "info", "m",
                                                                            ts=t0)), t0)
        job = a_state.ingest("edge/d1/updates/j/status", protocol.dumps(
            protocol.job_status("j", "model", "m", "2", "received", ts=t0)), t0)
        a.write(events=ev.events, jobs=job.jobs, now=NOW)
        b.write(jobs=job.jobs, now=NOW)               # both collectors read job status: one row
        assert a.count("samples") == 17 and a.count("job_log") == 1 and a.count("events") == 1
        assert a.sample_seqs("d1") == seqs
        dev = b.device("d1")
        assert dev is not None
        assert dev["telemetry"]["received"] == 17 and dev["telemetry"]["gaps"] == 3
        assert dev["telemetry"]["last_seq"] == 20
        assert dev["last_sample_recv"] == t0 + 20     # B saw the newest sample: liveness from both
        assert a.gaps("d1") == [(7, 9)]
        assert a.scan_gaps(NOW, settle_s=0) == 1 and a.scan_gaps(NOW, settle_s=0) == 0
        assert a.gap_events("d1") == [{"device": "d1", "first": 7, "last": 9, "found": NOW}]
        # the late arrival of 8 fills part of the gap: counts follow, the gap event stays as history
        a.write(sample_rows(a_state, "d1", [8], t0), now=NOW)
        dev = a.device("d1")
        assert dev is not None and dev["telemetry"]["gaps"] == 2
        assert a.gaps("d1") == [(7, 7), (9, 9)]


def test_retention_drops_old_partitions_keeps_newer_and_readers_go_on(pg_url: str):
    fs = FleetState("edge", track_gaps=False)
    with open_store(pg_url) as store, open_store(pg_url, readonly=True) as reader:
        for days_ago in (3, 2, 0):
            t0 = NOW - days_ago * DAY_S
            store.write(sample_rows(fs, "d1", range(days_ago * 100 + 1, days_ago * 100 + 6), t0),
                        devices=fs.take_dirty(), now=NOW)
        assert isinstance(store, PgStore)
        days = {p[2] for p in store.partitions() if p[0] == "samples"}
        assert len(days) == 3
        assert len(reader.samples("d1")) == 15
        dropped = store.prune(NOW - DAY_S)           # whatever ended a day ago or earlier
        assert dropped == 2
        left = {p[2] for p in store.partitions() if p[0] == "samples"}
        assert left == {int(NOW // DAY_S)}
        assert [s["seq"] for s in reader.samples("d1")] == [1, 2, 3, 4, 5]   # the reader's connection goes on
        assert reader.device("d1") is not None
        # a new batch for a dropped day recreates its partition rather than failing
        store.write(sample_rows(fs, "d1", [301], NOW - 3 * DAY_S), now=NOW)
        assert store.count("samples") == 6


def test_forget_and_stats_verbs(pg_url: str):
    fs = FleetState("edge", track_gaps=False)
    with open_store(pg_url) as store:
        for name in ("d1", "d2"):
            store.write(sample_rows(fs, name, range(1, 4), NOW - 10), devices=fs.take_dirty(), now=NOW,
                        heartbeat={"id": "c1", "samples_per_s": 5.0, "lag_s": 0.1, "host": "h"})
    r = cli("fleet", "stats", "--store", pg_url, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["rows"]["samples"] == 6 and st["rows"]["devices"] == 2
    assert [c["id"] for c in st["collectors"]] == ["c1"] and st["size_bytes"] > 0
    assert len(st["partitions"]["samples"]) == 1
    r = cli("fleet", "stats", "--store", pg_url)
    assert "collector c1 on h" in r.stdout and "samples: 1 partitions" in r.stdout, r.stdout
    r = cli("fleet", "forget", "d1", "ghost", "--store", pg_url)
    assert r.returncode == 1 and "forgot d1" in r.stdout and "unknown device 'ghost'" in r.stderr
    r = cli("fleet", "devices", "--store", pg_url, "--json")
    assert [d["device"] for d in json.loads(r.stdout)] == ["d2"]
    r = cli("fleet", "forget", "--offline-for", "0s", "--store", pg_url)    # d2 never said online
    assert r.returncode == 0 and "forgot d2" in r.stdout


def test_the_documented_roles_can_collect_and_read_and_nothing_more(pg_server: PgServer):
    doc = (ROOT / "docs" / "fleet.md").read_text()
    script = doc.split("```sql\n", 1)[1].split("```", 1)[0]
    r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg_server.url()], input=script,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fs = FleetState("edge", track_gaps=False)
    writer_url, reader_url = pg_server.url("fleet", "fleet"), pg_server.url("fleet", "fleet_ro")
    assert cli("fleet", "migrate", "--store", writer_url).returncode == 0
    with open_store(writer_url) as store:
        store.write(sample_rows(fs, "d1", range(1, 4), NOW - 10), devices=fs.take_dirty(), now=NOW)
        assert store.prune(NOW + 3 * DAY_S) == 1          # it may drop its own partitions
    with open_store(reader_url, readonly=True) as reader:
        assert [d["device"] for d in reader.devices()] == ["d1"]
    with psycopg.connect(reader_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM devices")
    with psycopg.connect(writer_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE TABLE public.intruder (x int)")
