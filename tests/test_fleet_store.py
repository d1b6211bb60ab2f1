"""The collector's SQLite store: batches, idempotent rows, retention, read-only access, bad files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.core import protocol
from edgeagent.core.errors import FleetStoreError
from edgeagent.ops.fleet.state import FleetState
from edgeagent.ops.fleet.store_sqlite import Store

T0 = 1_800_000_000.0


def _fill(store: Store) -> FleetState:
    fs = FleetState("edge")
    rows = []
    for seq in range(1, 11):
        sample = {"seq": seq, "ts": T0 + seq, "metrics": {"cpu_percent": seq}}
        rows += fs.ingest("edge/d1/telemetry", protocol.dumps(protocol.telemetry("d1", [sample])),
                          T0 + seq).samples
    ev = fs.ingest("edge/d1/events", protocol.dumps(protocol.event("d1", 1, "rule", "info", "m", ts=T0)), T0)
    job = fs.ingest("edge/d1/updates/j/status", protocol.dumps(
        protocol.job_status("j", "model", "m", "2", "received", ts=T0)), T0)
    store.write(rows, ev.events, job.jobs, fs.take_dirty(), now=T0)
    return fs


def test_a_batch_round_trips_and_redelivered_rows_are_not_doubled(tmp_path: Path):
    with Store(tmp_path / "f.sqlite") as store:
        fs = _fill(store)
        again = [("d1", 3, T0 + 3, T0 + 20, 1.0, None, None, None, None, None)]
        store.write(again, now=T0 + 20)
        assert store.count("samples") == 10
        assert store.sample_seqs("d1") == list(range(1, 11))
        assert store.samples("d1", limit=3)[-1]["cpu_percent"] == 10
        assert store.events("d1")[0]["kind"] == "rule"
        assert store.jobs("d1")[0]["state"] == "received"
        assert store.device("d1") == fs.snapshot()[0]
        assert store.device("nobody") is None


def test_prune_deletes_old_history_but_keeps_devices(tmp_path: Path):
    with Store(tmp_path / "f.sqlite") as store:
        _fill(store)
        assert store.prune(T0 + 5.5) == 5 + 1 + 1
        assert store.sample_seqs("d1") == [6, 7, 8, 9, 10]
        assert store.count("devices") == 1


def test_readers_see_the_writer_s_committed_batches(tmp_path: Path):
    path = tmp_path / "f.sqlite"
    with Store(path) as writer:
        _fill(writer)
        with Store(path, readonly=True) as reader:
            assert len(reader.samples("d1")) == 10
            with pytest.raises(sqlite3.OperationalError):
                reader.db.execute("DELETE FROM samples")


def test_a_missing_or_foreign_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FleetStoreError, match="no such database"):
        Store(tmp_path / "absent.sqlite", readonly=True)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(FleetStoreError, match="not a fleet database"):
        Store(junk)
    assert junk.read_bytes().startswith(b"this is not sqlite")
    r = subprocess.run([sys.executable, "-m", "edgeagent.ops.fleet.cli", "fleet", "devices", "--db",
                        str(tmp_path / "absent.sqlite")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such database" in r.stderr


class AckRecorder:
    """Stands in for the paho client's `ack` (the only call the writer makes on it)."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def test_messages_are_acknowledged_only_once_their_rows_are_committed(tmp_path: Path):
    import paho.mqtt.client as mqtt

    from edgeagent.ops.fleet.collector import Collector, CollectorOptions
    from edgeagent.ops.fleet.connect import BrokerUrl

    c = Collector(CollectorOptions(broker=BrokerUrl.parse("mqtt://127.0.0.1:1"), store=tmp_path / "f.sqlite"))
    c.store = Store(tmp_path / "f.sqlite")          # no threads, no broker: the writer is "stuck"
    acks = AckRecorder()
    c._client = acks  # type: ignore[assignment]
    for seq in range(1, 9):
        msg = mqtt.MQTTMessage(mid=seq, topic=b"edge/d1/telemetry")
        msg.qos = 1
        msg.payload = protocol.dumps(protocol.telemetry("d1", [{"seq": seq, "ts": T0 + seq}]))
        c._on_message(None, None, msg)  # type: ignore[arg-type]
    status = mqtt.MQTTMessage(mid=9, topic=b"edge/d1/status")
    status.qos = 1
    status.payload = protocol.dumps({"v": 1, "state": "online"})
    c._on_message(None, None, status)  # type: ignore[arg-type]
    assert acks.acked == [9]                         # state only: nothing to keep, acknowledged at once
    assert c.history_dropped == 0 and len(c.queue) == 8
    assert c.state.snapshot()[0]["telemetry"]["received"] == 8
    batch = list(c.queue)
    broken = Store(tmp_path / "f.sqlite")
    broken.close()
    with pytest.raises(sqlite3.ProgrammingError):
        c.commit(broken, batch, T0, snapshots=True)  # the database went away: no ack, state kept dirty
    assert acks.acked == [9] and c.state.dirty == {"d1"}
    c.commit(c.store, batch, T0, snapshots=True)
    assert acks.acked == [9, 1, 2, 3, 4, 5, 6, 7, 8]
    assert c.store.sample_seqs("d1") == list(range(1, 9)) and c.store.device("d1") is not None
    c.store.close()


def test_a_file_from_before_migrations_is_migrated_in_place_and_a_newer_one_refused(tmp_path: Path):
    from edgeagent.ops.fleet.store import SchemaTooNew, pending_migrations
    from edgeagent.ops.fleet.store_sqlite import MIGRATIONS, SCHEMA_V1

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:          # what the previous collector wrote: no schema_version
        con.executescript(SCHEMA_V1)
        con.execute("INSERT INTO devices VALUES ('d1', 1.0, '{\"device\": \"d1\"}')")
    con.close()
    assert pending_migrations(path) == (1, len(MIGRATIONS))
    with Store(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.devices() == [{"device": "d1"}]
        assert store.stats()["collectors"] == []
    assert pending_migrations(f"sqlite:///{path}") == (len(MIGRATIONS), len(MIGRATIONS))
    with sqlite3.connect(path) as con:
        con.execute("INSERT INTO schema_version VALUES (99, 0)")
    con.close()
    with pytest.raises(SchemaTooNew, match="newer than this edgeagent knows"):
        Store(path)
    with pytest.raises(SchemaTooNew):
        Store(path, readonly=True)
