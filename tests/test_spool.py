"""The store-and-forward spool on real SQLite files: seq, bounds, corruption, states, batching."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from edgeagent.core.backoff import backoff_s
from edgeagent.core.errors import SpoolError
from edgeagent.core.protocol import Topics
from edgeagent.transport.publisher import group, live_ready
from edgeagent.transport.spool import KIND_SAMPLE, ROW_OVERHEAD_BYTES, Row, Spool
from tests.util import async_wait_until

TOPICS = Topics("edge", "dev1")


def open_spool(path: Path, max_bytes: int = 10_000_000) -> Spool:
    s = Spool(path, max_bytes, "dev1")
    s.open()
    return s


def test_seq_is_contiguous_and_survives_reopen(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.sqlite")
    seqs = [s.add_sample({"ts": 1.0, "metrics": {}}) for _ in range(5)]
    ev = [s.add_event(TOPICS.events, "error", "info", f"e{i}") for i in range(3)]
    assert seqs == [1, 2, 3, 4, 5]
    assert ev == [1, 2, 3]  # the event seq is its own counter
    s.close()
    s = open_spool(tmp_path / "spool.sqlite")
    assert s.add_sample({"ts": 2.0, "metrics": {}}) == 6
    assert s.add_event(TOPICS.events, "error", "info", "again") == 4
    assert s.count == 10
    rows = s.fetch(0, None, 100)
    samples = [json.loads(r.payload) for r in rows if r.kind == KIND_SAMPLE]
    assert [x["seq"] for x in samples] == [1, 2, 3, 4, 5, 6]
    s.close()


def test_seq_stays_increasing_after_acked_rows_are_deleted(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.sqlite")
    for _ in range(3):
        s.add_sample({"ts": 1.0})
    s.delete(r.id for r in s.fetch(0, None, 10))
    assert s.count == 0 and s.bytes == 0
    s.close()
    s = open_spool(tmp_path / "spool.sqlite")
    assert s.add_sample({"ts": 1.0}) == 4
    s.close()


def test_full_spool_drops_oldest_and_counts(tmp_path: Path) -> None:
    sample = {"ts": 1.0, "metrics": {"cpu_percent": 12.5, "pad": "x" * 200}}
    row_bytes = len(json.dumps({"seq": 1, **sample}, separators=(",", ":"))) + ROW_OVERHEAD_BYTES
    s = open_spool(tmp_path / "spool.sqlite", max_bytes=row_bytes * 50)
    n = 200
    for _ in range(n):
        s.add_sample(sample)
    assert s.bytes <= s.max_bytes
    rows = s.fetch(0, None, 1000)
    seqs = [json.loads(r.payload)["seq"] for r in rows]
    # the newest are kept, contiguous up to the last one
    assert seqs == list(range(n - len(seqs) + 1, n + 1))
    assert s.dropped["samples"] == n - len(seqs) == s.dropped_total
    assert s.stats()["dropped"] == n - len(seqs)
    assert 40 <= len(seqs) <= 50
    s.close()
    s = open_spool(tmp_path / "spool.sqlite", max_bytes=row_bytes * 50)
    assert s.dropped_total == n - len(seqs)  # the counter is persisted
    s.close()


def test_corrupt_file_is_moved_aside_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    s = open_spool(path)
    for _ in range(7):
        s.add_sample({"ts": 1.0})
    s.close()
    (tmp_path / "spool.sqlite-wal").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 100)
    s = Spool(path, 1_000_000, "dev1")
    recovered = s.open()
    assert recovered is not None
    assert recovered.moved_to.exists() and recovered.moved_to.read_bytes().startswith(b"this is not")
    assert "not a database" in recovered.reason
    # the new spool numbers above every seq the old one could have handed out
    assert s.add_sample({"ts": 2.0}) > 7
    assert s.count == 1
    s.close()


def test_runtime_recover_moves_the_file_aside(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.sqlite")
    s.add_sample({"ts": 1.0})
    s.add_sample({"ts": 2.0})
    last_id = s.max_id()
    rec = s.recover("DatabaseError: database disk image is malformed")
    assert rec.moved_to.exists()
    assert s.count == 0
    assert s.add_sample({"ts": 1.0}) > 1  # above the reserved block, never reused
    # row ids go on: a publisher that already sent up to last_id finds the new rows
    assert [r.id for r in s.fetch(last_id, None, 10)] == [last_id + 1]
    s.close()


def test_state_last_value_wins_and_ack_needs_the_same_version(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.sqlite")
    v1 = s.put_state("edge/dev1/config/reported", b'{"v":1,"version":1}')
    v2 = s.put_state("edge/dev1/config/reported", b'{"v":1,"version":2}')
    s.put_state("edge/dev1/updates/j1/status", b'{"v":1}')
    pending = {st.topic: st for st in s.pending_states()}
    assert pending["edge/dev1/config/reported"].payload == b'{"v":1,"version":2}'
    assert s.states_pending == 2
    s.ack_state("edge/dev1/config/reported", v1)  # an older version was acked: keep the new one
    assert s.states_pending == 2
    s.ack_state("edge/dev1/config/reported", v2)
    assert [st.topic for st in s.pending_states()] == ["edge/dev1/updates/j1/status"]
    assert s.states_pending == 1
    s.close()


def test_fetch_ranges_and_delete_ignores_missing_ids(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.sqlite")
    for _ in range(10):
        s.add_sample({"ts": 1.0})
    ids = [r.id for r in s.fetch(0, None, 100)]
    assert [r.id for r in s.fetch(ids[2], ids[6], 100)] == ids[3:6]
    assert s.delete([ids[0], ids[1], 999_999]) == 2
    assert s.count == 8
    s.close()


def test_a_database_of_another_schema_is_moved_aside_too(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE outbox (x)")
    db.execute("INSERT INTO outbox VALUES (1)")
    db.commit()
    db.close()
    s = Spool(path, 1_000_000, "dev1")
    recovered = s.open()
    assert recovered is not None and recovered.moved_to.exists()
    assert s.add_sample({"ts": 1.0}) >= 1 and s.count == 1
    s.close()


def row(i: int, kind: str = KIND_SAMPLE, ts: float = 100.0) -> Row:
    payload = json.dumps({"seq": i}).encode() if kind == KIND_SAMPLE else b'{"v":1,"kind":"x"}'
    return Row(i, kind, None if kind == KIND_SAMPLE else "edge/dev1/events", payload, ts)


def test_group_packs_runs_of_samples_and_keeps_events_apart() -> None:
    rows = [row(1), row(2), row(3), row(4, "E"), row(5), row(6), row(7), row(8)]
    out = group(rows, TOPICS, batch_max=2)
    assert [m.ids for m in out] == [(1, 2), (3,), (4,), (5, 6), (7, 8)]
    assert out[2].topic == "edge/dev1/events"
    body = json.loads(out[0].payload)
    assert body == {"v": 1, "device": "dev1", "samples": [{"seq": 1}, {"seq": 2}]}
    assert out[0].topic == "edge/dev1/telemetry" and out[0].samples == 2


def test_live_ready_waits_only_for_a_young_partial_batch_of_samples() -> None:
    one = [row(1)]
    assert live_ready(one, 10, 1.0, waited_s=0.2, flushing=False) == pytest.approx(0.8)
    assert live_ready(one, 10, 1.0, waited_s=1.5, flushing=False) is None
    assert live_ready(one, 10, 1.0, waited_s=0.2, flushing=True) is None
    assert live_ready([row(1), row(2, "E")], 10, 1.0, waited_s=0.2, flushing=False) is None
    assert live_ready([row(i) for i in range(10)], 10, 1.0, waited_s=0.2, flushing=False) is None
    assert live_ready(one, 10, 0.0, waited_s=0.0, flushing=False) is None
    # the row's wall-clock ts plays no part: a clock jump cannot hold samples back
    assert live_ready([row(1, ts=1e12)], 10, 1.0, waited_s=1.0, flushing=False) is None


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_s(a, 1.0, 30.0, rng) for a in range(1, 12)]
    for attempt, d in enumerate(delays, start=1):
        base = min(30.0, 2 ** (attempt - 1))
        assert base * 0.5 <= d <= base
    assert max(delays) <= 30.0
    assert backoff_s(10_000, 1.0, 30.0, rng) <= 30.0


def test_an_unopenable_spool_is_an_error_not_a_corruption(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    path.mkdir()  # e.g. a wrong path or permissions: nothing is moved aside
    with pytest.raises(SpoolError):
        Spool(path, 1_000_000, "dev1").open()
    assert path.is_dir() and list(tmp_path.iterdir()) == [path]


def test_spool_cli_reads_without_changing_anything(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edgeagent.cli import main

    path = tmp_path / "spool.sqlite"
    s = open_spool(path)
    for _ in range(3):
        s.add_sample({"ts": 1.0, "metrics": {"cpu_percent": 1.0}})
    s.add_event(TOPICS.events, "update", "info", "hi")
    s.put_state("edge/dev1/config/reported", b"{}")
    assert main(["spool", "stats", "-f", str(path)]) == 0  # while the spool is open, as in a running agent
    out = json.loads(capsys.readouterr().out)
    assert out["backlog"] == {"samples": 3, "events": 1}
    assert out["last_seq"] == {"telemetry": 3, "event": 1}
    assert out["states_pending"] == ["edge/dev1/config/reported"]
    assert main(["spool", "peek", "-f", str(path), "-n", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["payload"]["seq"] for r in rows] == [1, 2]
    assert s.count == 4 and s.add_sample({"ts": 2.0}) == 4
    s.close()
    assert main(["spool", "stats", "-f", str(tmp_path / "missing.sqlite")]) == 1


def test_odd_values_are_encoded_as_strict_json(tmp_path: Path) -> None:
    import numpy as np

    s = open_spool(tmp_path / "spool.sqlite")
    s.add_sample({"ts": 1.0, "metrics": {"temp_c": float("nan"), "load1": np.float32(0.5)},
                  "inference": {"count": np.int64(3), "last_score": float("inf")}})
    (r,) = s.fetch(0, None, 10)
    body = json.loads(r.payload, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert body["metrics"] == {"temp_c": None, "load1": 0.5}
    assert body["inference"] == {"count": 3, "last_score": None}
    s.close()


def test_writes_that_fail_wait_in_memory_in_order(tmp_path: Path) -> None:
    """A full disk (SQLite's max_page_count gives the same SQLITE_FULL): nothing is lost or reordered."""
    import asyncio

    from edgeagent.transport.outbox import SpoolOutbox

    async def main() -> None:
        s = open_spool(tmp_path / "spool.sqlite")
        outbox = SpoolOutbox(s, TOPICS)
        s.db.execute(f"PRAGMA max_page_count={s.db.execute('PRAGMA page_count').fetchone()[0] + 2}")
        seqs = [outbox.add_sample({"ts": float(i), "pad": "x" * 2000}) for i in range(20)]
        outbox.emit_event("error", "warning", "disk trouble")
        assert seqs == list(range(1, 21))  # numbered at once, whatever the disk does
        assert not outbox.flush() and outbox.failing and outbox.deferred > 0  # a batch waits
        outbox.retry_deferred()  # still full: they keep waiting
        assert not outbox.flush() and outbox.deferred > 0
        s.db.execute("PRAGMA max_page_count=1000000")
        outbox.retry_deferred()
        await async_wait_until(lambda: outbox.deferred == 0, 10, message="the waiting rows written")
        assert outbox.lost == 0
        outbox.close()
        rows = s.fetch(0, None, 100)
        samples = [json.loads(r.payload) for r in rows if r.kind == KIND_SAMPLE]
        assert [x["ts"] for x in samples] == [float(i) for i in range(20)]  # original order
        assert [x["seq"] for x in samples] == list(range(1, 21))  # contiguous
        assert rows[-1].kind == "E"  # the event came after every sample, as emitted
        s.close()

    asyncio.run(main())


def test_a_write_on_a_full_file_says_so_and_counts_stay_true(tmp_path: Path) -> None:
    """SQLite rolls a COMMIT that finds the file full back by itself: the error must stay
    "database or disk is full" (not "cannot rollback"), and nothing is counted for the write."""
    s = open_spool(tmp_path / "spool.sqlite")
    s.add_event("t", "update", "info", "fits")
    s.db.execute(f"PRAGMA max_page_count={s.db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for _ in range(20):
            s.add_event("t", "update", "info", "x" * 3000)
    assert not s.db.in_transaction
    assert s.count == s.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    pending = s.count
    assert s.delete(r.id for r in s.fetch(0, None, 100)) == pending and s.count == 0
    s.close()
