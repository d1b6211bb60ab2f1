"""The intake's bounds as numbers, the router's waiting `put`, strict chunk indexes, capped job logs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgeagent.transport import intake
from edgeagent.transport.router import HANDLER_QUEUE_MAX_BYTES, SessionRouter
from edgeagent.updates.book import append_capped
from edgeagent.updates.inputs import CHUNK_INDEX_RE
from tests.util import async_wait_until


def test_packet_limit_follows_the_chunk_cap_and_never_cuts_a_manifest() -> None:
    assert intake.max_packet_bytes(1024) == 1024 * 1024 + intake.HEADROOM_BYTES  # default: 1 MiB chunks
    assert intake.max_packet_bytes(4) == 1024 * 1024 + intake.HEADROOM_BYTES  # manifests, desired config
    assert intake.receive_maximum(intake.max_packet_bytes(1024)) == 3  # 3 x 1 MiB in flight at most
    assert intake.receive_maximum(intake.max_packet_bytes(64)) == 3  # 4 MiB in flight, 1 MiB packets
    assert intake.receive_maximum(intake.max_packet_bytes(262_144)) == intake.RECEIVE_MAXIMUM_MIN


@pytest.mark.parametrize("text", ["0", "7", "123456789"])
def test_chunk_index_accepts_ascii_digits(text: str) -> None:
    assert CHUNK_INDEX_RE.fullmatch(text)


@pytest.mark.parametrize("text", ["", "²", "٣", "-1", "+1", " 1", "1 ", "1\n", "1234567890", "0x1", "1_0"])
def test_chunk_index_refuses_everything_else(text: str) -> None:
    assert not CHUNK_INDEX_RE.fullmatch(text)


def test_router_put_waits_for_room_instead_of_dropping() -> None:
    async def main() -> None:
        router = SessionRouter()
        release = asyncio.Event()
        seen: list[str] = []

        async def slow(topic: str, payload: bytes) -> None:
            await release.wait()
            seen.append(topic)

        router.subscribe("edge/dev1/updates/#", slow)
        router.start()
        chunk = bytes(HANDLER_QUEUE_MAX_BYTES // 4)
        for i in range(5):  # one taken by the worker, four fill the byte bound
            assert await asyncio.wait_for(router.put(f"edge/dev1/updates/j/chunk/{i}", chunk), 5) == 1
        sub = router.subscriptions[0]
        blocked = asyncio.ensure_future(router.put("edge/dev1/updates/j/chunk/5", chunk))
        await asyncio.sleep(0)  # let it run up to its wait (no timing: it cannot fit until release)
        assert not blocked.done() and sub.queued_bytes <= HANDLER_QUEUE_MAX_BYTES
        release.set()
        assert await asyncio.wait_for(blocked, 5) == 1
        await async_wait_until(lambda: len(seen) == 6, 5, message="all handled")
        assert sub.dropped == 0 and seen[-1].endswith("/5")
        assert await router.put("edge/dev2/updates/j/chunk/0", b"x") == 0  # nobody's
        await router.stop()

    asyncio.run(main())


def test_job_log_is_capped_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    log = tmp_path / "j" / "log.txt"
    for i in range(5000):
        append_capped(log, f"line {i:05d} " + "x" * 40, max_bytes=4096)
        assert log.stat().st_size <= 4096
    text = log.read_text()
    assert text.startswith("[... ") and "bytes of older lines dropped]" in text
    assert text.rstrip().endswith("line 04999 " + "x" * 40)
    assert all(line.startswith(("line ", "[... ")) for line in text.splitlines())  # whole lines
    append_capped(log, "y" * 100_000, max_bytes=4096)  # one huge line cannot defeat the cap
    assert log.stat().st_size <= 4096
