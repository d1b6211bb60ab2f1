"""The update transfer's fast path (#18): the router's express lane, buffered reads under paho, and
the batching writer thread; and a real transfer through all three over Mosquitto."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import threading
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from edgeagent.core.paho_io import READ_BYTES, BufferedSocket
from edgeagent.transport.router import SessionRouter, Subscription
from edgeagent.updates.writer import ChunkWriter
from tests.broker import Broker
from tests.test_updates_process import AgentProc, push_in_thread
from tests.updates_helpers import MODEL, make_keys, make_raw, signed
from tests.util import wait_until

FILTERS = ["edge/dev1/updates/#", "edge/dev1/updates/+/#", "edge/+/updates/#", "edge/dev1/updates",
           "#", "edge/#", "+/+"]
TOPICS = ["edge/dev1/updates", "edge/dev1/updates/", "edge/dev1/updates/j/chunk/3", "edge/dev1/updatesx/j",
          "edge/dev1/updates/j", "edge/dev2/updates/j", "edge", "edge/", "$SYS/x", "a/b"]


@pytest.mark.parametrize("topic_filter", FILTERS)
def test_subscription_match_is_paho_match(topic_filter: str) -> None:
    """The prefix test for "a/#" and "a/+/#" answers exactly what paho's matcher answers."""
    sub = Subscription(topic_filter, _never)
    for topic in TOPICS:
        assert sub.matches(topic) == topic_matches_sub(topic_filter, topic), (topic_filter, topic)


def test_express_taker_takes_declines_and_survives_its_own_errors() -> None:
    router = SessionRouter()
    taken: list[str] = []

    def take(topic: str, payload: bytes) -> bool:
        if payload == b"boom":
            raise ValueError("boom")
        if payload == b"queue me":
            return False
        taken.append(topic)
        return True

    router.subscribe("edge/dev1/updates/+/#", _never, take)
    router.subscribe("edge/dev1/config/desired", _never)  # no taker: always the queued way
    assert router.take("edge/dev1/updates/j/chunk/0", b"data")
    assert not router.take("edge/dev1/updates/j/manifest", b"queue me")  # declined: queued
    assert not router.take("edge/dev1/config/desired", b"{}")
    assert not router.take("edge/dev2/updates/j/chunk/0", b"data")  # not ours
    assert not router.take("edge/dev1/updates/j/chunk/1", b"boom")  # counted, then queued
    assert taken == ["edge/dev1/updates/j/chunk/0"]
    assert router.subscriptions[0].errors == 1


def test_buffered_socket_hands_out_what_one_recv_read() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        reads = 0
        real_recv_into = b.recv_into

        class Counting:  # the socket under the buffer, counting its system calls
            def recv_into(self, buf: bytearray) -> int:
                nonlocal reads
                reads += 1
                return real_recv_into(buf)

            def close(self) -> None:
                b.close()

        buffered = BufferedSocket(Counting())
        packets = [bytes([0x30]) + bytes([len(p)]) + p for p in (b"one", b"two!", os.urandom(100))]
        a.sendall(b"".join(packets))
        got = []
        for _ in packets:  # as paho reads: the first byte, the length byte, then the rest
            head = buffered.recv(1) + buffered.recv(1)
            body = buffered.recv(head[1])
            got.append(head + body)
            assert buffered.pending() == sum(len(q) for q in packets[len(got):])
        assert got == packets
        assert reads == 1  # one system call for three packets
        with pytest.raises(BlockingIOError):  # nothing buffered, nothing on the socket
            buffered.recv(1)
        big = os.urandom(READ_BYTES + 1000)  # larger than the buffer: comes in pieces, in order
        a.sendall(big)
        out = b""
        while len(out) < len(big):
            try:
                out += buffered.recv(len(big) - len(out))
            except BlockingIOError:
                continue
        assert out == big
        a.close()
        assert buffered.recv(1) == b""  # the peer closed
    finally:
        a.close()
        b.close()


def test_writer_keeps_order_reports_on_the_loop_and_bounds_its_backlog() -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        writer = ChunkWriter(name="test-writer")
        written: list[int] = []
        done: list[tuple[int, object, object]] = []
        threads: set[int] = set()

        def work(i: int) -> int:
            if i == 7:
                raise ValueError("chunk 7 is bad")
            written.append(i)
            return i * 2

        def finished(i: int, result: object, error: BaseException | None) -> None:
            threads.add(threading.get_ident())
            done.append((i, result, repr(error) if error else None))

        for i in range(50):
            writer.submit(functools.partial(work, i), 1000, functools.partial(finished, i))
        assert writer.backlog_bytes <= 50 * 1000
        while writer.backlog:
            await asyncio.wait_for(writer.progress(), 10)
        assert written == [i for i in range(50) if i != 7]  # in the order handed over
        assert [d[0] for d in done] == list(range(50))
        assert done[7] == (7, None, "ValueError('chunk 7 is bad')")
        assert done[8] == (8, 16, None)
        assert threads == {loop_thread} and writer.backlog_bytes == 0
        thread = writer._thread
        writer.close()
        assert thread is not None
        thread.join(5)
        assert not thread.is_alive()
        with pytest.raises(RuntimeError):
            writer.submit(lambda: None)

    asyncio.run(main())


@pytest.mark.integration
def test_a_transfer_over_mosquitto_takes_the_express_lane(tmp_path: Path, broker: Broker) -> None:
    """`edgeagent run` receives the shipped model in three 4 KiB chunks from the real pusher: every
    chunk came through the express lane (counted in health.json's mqtt section), and the job
    succeeded (the new model verified, swapped in and serving)."""
    key, pub = make_keys(tmp_path / "keys")
    raw = make_raw(tmp_path, pub, broker.port, inference={"enabled": True, "probation_windows": 5},
                   sensors={"rate_hz": 400.0})
    agent = AgentProc(tmp_path, raw, cli=True).start()
    try:
        agent.wait_subscribed(broker)
        msg = signed(MODEL, key, job="fast", version="2.0.0", chunk_size=4096)
        assert msg["chunks"] == 3
        result = push_in_thread(broker.port, msg, MODEL)
        assert result.states.get("dev1") == "succeeded", agent.logs()[-3000:]
        health = tmp_path / "state" / "health.json"

        def express() -> int:
            try:
                return int(json.loads(health.read_text())["sections"]["mqtt"]["express_incoming"])
            except (OSError, ValueError, KeyError):
                return -1

        wait_until(lambda: express() >= msg["chunks"], 30,
                   message=f"{msg['chunks']} chunks counted in the mqtt section's express_incoming")
    finally:
        agent.stop()


async def _never(topic: str, payload: bytes) -> None:
    raise AssertionError("the queued handler must not see this")
