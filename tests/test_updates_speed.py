"""The fast receive path of an update: the running sha256, the sliding request window, the rate cap."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from edgeagent.core import protocol
from edgeagent.core.live import Handler, LiveConfig, MemoryOutbox, Metrics
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.updates import UpdatesComponent
from edgeagent.updates.transfer import Puller, Transfer
from tests.test_updates_transfer import CHUNK, chunks, make
from tests.updates_helpers import make_config, make_keys, signed
from tests.util import async_wait_until


def test_running_hash_covers_out_of_order_chunks_and_needs_no_second_pass(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 6 + 77)
    m, _ = make(tmp_path, data)
    t = Transfer(tmp_path / "job", m)
    t.open()
    parts = chunks(data)
    for i in (2, 0, 6, 1, 4, 3):
        t.write(i, parts[i])
    assert t._hashed == 5  # 0..4 contiguous; 6 waits for 5
    t.write(5, parts[5])
    assert t._hashed == 7
    # the bytes on disk are not read again: a change behind the writer's back goes unseen here,
    # which is why the running hash is only taken over chunks this process wrote itself
    assert t.finish() == hashlib.sha256(data).hexdigest() == m.sha256


def test_after_a_restart_the_file_is_hashed_from_disk(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 4)
    m, _ = make(tmp_path, data)
    parts = chunks(data)
    t = Transfer(tmp_path / "job", m)
    t.open()
    for i in range(2):
        t.write(i, parts[i])
    t.close()
    with open(tmp_path / "job" / "artifact.part", "r+b") as f:  # the disk lost a byte meanwhile
        f.write(b"\xff")
    t2 = Transfer(tmp_path / "job", m)
    t2.open()
    for i in range(2, 4):
        t2.write(i, parts[i])
    assert t2.finish() != m.sha256  # chunks 0-1 were read back from disk, flaw and all


def test_puller_tops_up_at_a_quarter_and_paces_to_the_rate(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 64)
    m, _ = make(tmp_path, data)
    t = Transfer(tmp_path / "job", m)
    t.open()
    parts = chunks(data)
    p = Puller(t, window=8)
    assert p.ask() == [(0, 7)] and not p.due()
    t.write(0, parts[0])
    assert not p.due()  # 7 of 8 outstanding
    t.write(1, parts[1])
    assert p.due() and p.ask() == [(8, 9)]  # a quarter arrived: top up, do not wait for half
    t.close()

    paced = Puller(Transfer(tmp_path / "job2", m), window=8, rate_bytes_s=CHUNK * 20, now=100.0)
    paced.t.open()
    assert paced.window == 2  # ~0.1 s worth of chunks per request at the cap
    assert paced.ask(now=100.0) == [(0, 1)]
    assert paced.wait_s(100.0) == pytest.approx(0.1) and paced.ask(now=100.05) == []
    for i in (0, 1):
        paced.t.write(i, parts[i])
    assert not paced.due(100.05) and paced.due(100.1 + 1e-9)
    assert paced.ask(now=100.1) == [(2, 3)] and paced.wait_s(100.1) == pytest.approx(0.1)
    paced.t.close()


class OnlineRouter:
    """A Router that says it is connected (a device online): the download asks as it goes."""

    connected = True

    def __init__(self) -> None:
        self.subscriptions: list[tuple[str, Handler]] = []

    def subscribe(self, topic_filter: str, handler: Handler, express: object = None) -> None:
        self.subscriptions.append((topic_filter, handler))  # the queued way only: chunks reach on_chunk

    async def wait_connected(self) -> None:
        return None


def test_the_download_keeps_to_max_rate_bytes_s(tmp_path: Path) -> None:
    """A sender that answers every request at once: the cap alone sets the pace (within 10 %)."""
    key, pub = make_keys(tmp_path / "keys")
    rate = 256 * 1024
    art = tmp_path / "model.bin"
    data = b"\x00\x00\x00\x00TFL3" + os.urandom(CHUNK * 256 - 8)  # 1 MiB
    art.write_bytes(data)
    cfg = make_config(tmp_path, pub, updates={"max_rate_bytes_s": rate})
    parts = chunks(data)

    async def main() -> float:
        live, outbox, router = LiveConfig(cfg), MemoryOutbox(), OnlineRouter()
        comp = UpdatesComponent(live, Metrics(), outbox, router, None)
        async with comp:
            handler = router.subscriptions[0][1]
            runner = asyncio.create_task(comp.run(), name="test:updates")
            try:
                msg = signed(art, key, job="capped", version="2.0.0", chunk_size=CHUNK)
                await handler("edge/dev1/updates/capped/manifest", protocol.dumps(msg))
                sent: set[int] = set()
                deadline = time.monotonic() + 60
                while "capped" not in comp.journal.jobs or comp.journal.jobs["capped"].state in (
                        "received", "downloading"):
                    assert time.monotonic() < deadline, "transfer did not finish"
                    while outbox.messages:  # the requests (no session: they go to the outbox)
                        _topic, req = outbox.messages.popleft()
                        for a, b in req["missing"]:
                            for i in range(a, b + 1):
                                if i not in sent:
                                    sent.add(i)
                                    await handler(f"edge/dev1/updates/capped/chunk/{i}", parts[i])
                    await asyncio.sleep(0.005)  # a sender polling for requests
                await async_wait_until(lambda: comp.journal.jobs["capped"].final, 20)
                hist = dict(comp.journal.jobs["capped"].history)
                return float(hist["verified"]) - float(hist["downloading"])
            finally:
                await cancel_and_wait(runner)

    seconds = asyncio.run(main())
    measured = len(data) / seconds
    assert 0.9 * rate <= measured <= 1.1 * rate, f"{measured / rate:.3f} of the cap"
