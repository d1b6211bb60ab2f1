"""The spool's writer thread: batches in one transaction, order kept, the hand-off bounded."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from edgeagent.transport import outbox as outbox_mod
from edgeagent.transport.outbox import SpoolOutbox
from edgeagent.transport.spool import KIND_SAMPLE
from tests.test_spool import TOPICS, open_spool


def test_a_transaction_is_all_or_none_and_counts_stay_true(tmp_path: Path) -> None:
    s = open_spool(tmp_path / "spool.sqlite")
    s.add_sample({"ts": 0.0})
    with pytest.raises(sqlite3.IntegrityError), s.transaction():
        s.add_sample({"ts": 1.0})
        s.put_state("edge/dev1/status", b"{}")
        s.db.execute("INSERT INTO meta (key, value) VALUES ('x', NULL)")  # fails: value NOT NULL
    assert s.count == 1 and s.states_pending == 0
    assert [json.loads(r.payload)["ts"] for r in s.fetch(0, None, 10)] == [0.0]
    with s.transaction():
        seq = s.add_sample({"ts": 2.0})
    assert s.count == 2 and seq == 3  # seq 2 was handed out to the rolled-back row: a gap, never reuse
    s.close()


def test_writes_from_many_threads_land_in_order_of_their_seq(tmp_path: Path) -> None:
    async def main() -> None:
        s = open_spool(tmp_path / "spool.sqlite")
        box = SpoolOutbox(s, TOPICS)

        def produce() -> None:
            for i in range(300):
                box.add_sample({"ts": float(i)})

        threads = [threading.Thread(target=produce) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(300):
            box.emit_event("rule", "info", f"event {i}")
        for t in threads:
            t.join()
        assert await asyncio.to_thread(box.flush)
        rows = s.fetch(0, None, 10_000)
        samples = [json.loads(r.payload)["seq"] for r in rows if r.kind == KIND_SAMPLE]
        events = [json.loads(r.payload)["seq"] for r in rows if r.kind == "E"]
        assert samples == list(range(1, 901)) and events == list(range(1, 301))  # stored in seq order
        assert box.batches < 1200  # many rows per transaction
        assert box.wakeup.is_set()
        box.close()
        s.close()

    asyncio.run(main())


def test_the_hand_off_is_bounded_while_the_disk_refuses_writes(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_mod, "HANDOFF_MAX", 50)

    async def main() -> None:
        s = open_spool(tmp_path / "spool.sqlite")
        box = SpoolOutbox(s, TOPICS)
        s.db.execute("PRAGMA query_only=1")  # as a full disk: every write fails
        seqs = [box.add_sample({"ts": float(i)}) for i in range(80)]
        assert not await asyncio.to_thread(box.flush)
        assert box.deferred <= 50 and box.lost == 80 - box.deferred and box.lost >= 30
        s.db.execute("PRAGMA query_only=0")
        box.retry_deferred()
        deadline = asyncio.get_running_loop().time() + 20
        while box.deferred and asyncio.get_running_loop().time() < deadline:
            await asyncio.to_thread(box.flush, 1.0)
        stored = [json.loads(r.payload)["seq"] for r in s.fetch(0, None, 1000)]
        assert stored == sorted(stored) and stored[-1] == seqs[-1]  # the newest kept, in order
        box.close()
        s.close()

    asyncio.run(main())
