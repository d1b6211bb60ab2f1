"""The transport in-process against a real Mosquitto: store-and-forward, router, states, presence."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from pathlib import Path

import pytest

from edgeagent.core.protocol import dumps
from edgeagent.transport import Spool
from edgeagent.transport.router import SessionRouter
from tests import rig
from tests.broker import Broker
from tests.rig import wiring
from tests.transport_util import Observer, assert_retained_shutdown, contiguous, make_config
from tests.util import async_wait_until

pytestmark = pytest.mark.integration


def test_backlog_is_drained_without_starving_live_samples(tmp_path: Path) -> None:
    broker = Broker(workdir=tmp_path / "broker").start()
    obs = Observer(broker.port)
    broker.stop()  # the device starts during an outage

    async def main() -> None:
        cfg = make_config(tmp_path / "state", broker.port, telemetry={"batch_max": 1})
        w = wiring(cfg)
        async with rig.transport(w) as transport:
            tel = rig.telemetry(w, transport)
            for _ in range(3000):
                tel.sample_now()
            assert transport.outbox is not None and await asyncio.to_thread(transport.outbox.flush)
            assert transport.spool is not None and transport.spool.count == 3000
            await asyncio.to_thread(broker.start)
            await async_wait_until(lambda: obs.seqs(), 20, message="draining started")
            live = tel.sample_now()
            assert live == 3001
            await async_wait_until(lambda: contiguous(obs.seqs(), 1, 3001), 30, message="all samples")
            order = obs.seqs()
            # the live sample overtook the backlog: it arrived before the backlog's last sample
            assert order.index(3001) < order.index(3000)
            await async_wait_until(lambda: transport.spool is not None and transport.spool.count == 0, 10)

    try:
        asyncio.run(main())
    finally:
        obs.close()
        broker.stop()


def test_samples_are_batched_and_every_seq_arrives(tmp_path: Path, broker: Broker) -> None:
    obs = Observer(broker.port)

    async def main() -> None:
        cfg = make_config(tmp_path / "state", broker.port,
                          telemetry={"batch_max": 5, "batch_wait_s": 0.3, "interval_s": 0.02})
        w = wiring(cfg)
        async with rig.transport(w) as transport:
            async with rig.telemetry(w, transport) as tel:
                task = asyncio.create_task(tel.run())
                await async_wait_until(lambda: len(obs.seqs()) >= 40, 20)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            last = tel.last_seq  # the exit sample included
        await async_wait_until(lambda: contiguous(obs.seqs(), 1, last), 10)
        sizes = [len(m["samples"]) for m in obs.on("edge/dev1/telemetry")]
        assert max(sizes) == 5 and all(1 <= s <= 5 for s in sizes)
        assert sum(sizes) >= last

    try:
        asyncio.run(main())
    finally:
        obs.close()


def test_presence_online_then_shutdown_and_events(tmp_path: Path, broker: Broker) -> None:
    obs = Observer(broker.port)

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        w.sections.bind({"inference": lambda: {"model": "vibration-anomaly@1.2.0"},
                         "firmware": lambda: {"version": "2026.11.1", "slot": "A"}})
        w.outbox.emit_event("update", "info", "emitted before the transport existed")
        async with rig.transport(w) as transport:
            await async_wait_until(lambda: obs.on("edge/dev1/status"), 10)
            status = obs.on("edge/dev1/status")[0]
            assert status["state"] == "online" and status["v"] == 1
            assert status["model"] == {"name": "vibration-anomaly", "version": "1.2.0"}
            assert status["firmware"] == {"version": "2026.11.1", "slot": "A"}
            w.outbox.emit_event("rule", "warning", "hot", {"temp_c": 80})
            await async_wait_until(lambda: len(obs.on("edge/dev1/events")) == 2, 10)
            events = obs.on("edge/dev1/events")
            assert [e["seq"] for e in events] == [1, 2]
            assert events[1]["data"] == {"temp_c": 80} and events[1]["device"] == "dev1"
            await async_wait_until(lambda: transport.mqtt_section()["rtt_ms"] is not None, 10)
        await async_wait_until(lambda: obs.on("edge/dev1/status")[-1].get("reason") == "shutdown", 10)
        assert obs.on("edge/dev1/status")[-1]["state"] == "offline"

    try:
        asyncio.run(main())
    finally:
        obs.close()
    assert_retained_shutdown(broker.port)


def test_router_runs_handlers_apart_and_survives_errors(tmp_path: Path, broker: Broker,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    obs = Observer(broker.port, ("nothing/#",))

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        fast: list[bytes] = []
        release = asyncio.Event()
        slow: list[bytes] = []

        async def slow_handler(topic: str, payload: bytes) -> None:
            await release.wait()
            slow.append(payload)

        async def fast_handler(topic: str, payload: bytes) -> None:
            if payload == b"boom":
                raise ValueError("bad payload")
            fast.append(payload)

        async with rig.transport(w):
            w.router.subscribe("edge/dev1/config/desired", slow_handler)
            await asyncio.wait_for(w.router.wait_connected(), 10)
            # subscribed after connect: the session subscribes it at once
            w.router.subscribe("edge/dev1/updates/+/#", fast_handler)
            router = w.router.target
            assert isinstance(router, SessionRouter)
            await async_wait_until(lambda: "edge/dev1/updates/+/#" in router.active, 5)
            obs.publish("edge/dev1/config/desired", b"c1")
            for i, p in enumerate([b"m0", b"boom", b"m2"]):
                await asyncio.to_thread(obs.publish, f"edge/dev1/updates/j{i}/manifest", p)
            await async_wait_until(lambda: fast == [b"m0", b"m2"], 10)
            assert slow == []  # still blocked, and it did not hold up the other handler
            release.set()
            await async_wait_until(lambda: slow == [b"c1"], 10)
        assert any("message handler failed" in r.getMessage() for r in caplog.records)

    try:
        with caplog.at_level(logging.ERROR):
            asyncio.run(main())
    finally:
        obs.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_commands_sent_while_offline_arrive_after_reconnect(protocol: str, tmp_path: Path,
                                                            broker: Broker) -> None:
    obs = Observer(broker.port, ("nothing/#",))
    got: list[tuple[str, bytes]] = []

    async def handler(topic: str, payload: bytes) -> None:
        got.append((topic, payload))

    async def run_once(until_connected: bool) -> None:
        w = wiring(make_config(tmp_path / "state", broker.port, mqtt={"protocol": protocol}))
        w.router.subscribe("edge/dev1/updates/+/#", handler)
        async with rig.transport(w):
            await asyncio.wait_for(w.router.wait_connected(), 10)
            if not until_connected:
                await async_wait_until(lambda: got, 10)

    try:
        asyncio.run(run_once(True))  # creates the persistent session, then stops cleanly
        obs.publish("edge/dev1/updates/j7/manifest", b'{"v":1,"job":"j7"}')  # device is offline
        asyncio.run(run_once(False))
        assert got == [("edge/dev1/updates/j7/manifest", b'{"v":1,"job":"j7"}')]
    finally:
        obs.close()


def test_states_last_value_wins_and_are_retained(tmp_path: Path, broker: Broker) -> None:
    obs = Observer(broker.port)
    broker.stop()

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        async with rig.transport(w) as transport:
            topic = w.live.topics.config_reported
            w.outbox.put_state(topic, {"v": 1, "version": 1})
            w.outbox.put_state(topic, {"v": 1, "version": 2})
            w.outbox.put_message(w.live.topics.job_request("j1"), {"v": 1, "job": "j1", "missing": [[0, 3]]})
            await asyncio.to_thread(broker.start)
            await async_wait_until(lambda: obs.on(topic), 20)
            await async_wait_until(lambda: transport.spool is not None and transport.spool.states_pending == 0
                                   and transport.spool.count == 0, 10)
            # only the last value went out (the observer may see it twice: live and as retained)
            assert {m["version"] for m in obs.on(topic)} == {2}
            assert obs.on("edge/dev1/updates/j1/request") == [{"v": 1, "job": "j1", "missing": [[0, 3]]}]
            w.outbox.put_state(topic, {"v": 1, "version": 3})  # while connected: sent at once
            await async_wait_until(lambda: obs.on(topic)[-1]["version"] == 3, 10)

    try:
        asyncio.run(main())
    finally:
        obs.close()
    late = Observer(broker.port, ("edge/dev1/config/reported",), client_id="late")
    try:
        from tests.util import wait_until

        wait_until(lambda: late.on("edge/dev1/config/reported"), 10)
        assert late.on("edge/dev1/config/reported")[-1]["version"] == 3
    finally:
        late.close()


def test_offline_mode_spools_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", None, spool={"max_mb": 0.01}))
        async with rig.transport(w) as transport:
            tel = rig.telemetry(w, transport)
            w.metrics.publish({"cpu_percent": 5.0, "pad": "x" * 300})
            spool = transport.spool
            assert spool is not None
            for i in range(1000):
                tel.sample_now()
                if spool.dropped_total:
                    break
                if i % 20 == 19:  # the writer thread stores them; let it catch up now and then
                    assert transport.outbox is not None and await asyncio.to_thread(transport.outbox.flush)
            assert transport.outbox is not None and await asyncio.to_thread(transport.outbox.flush)
            assert transport.mqtt_section()["connected"] is False
            assert spool.bytes <= spool.max_bytes
            assert spool.dropped["samples"] > 0
            assert transport.spool_section()["dropped"] == spool.dropped_total
            rows = await asyncio.to_thread(spool.fetch, 0, None, 1000)
            events = [json.loads(r.payload) for r in rows if r.kind == "E"]
            assert any("spool full" in e["message"] and e["kind"] == "error" for e in events)

    with caplog.at_level(logging.WARNING, logger="edgeagent.transport.session"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.name.startswith("edgeagent.transport.session")]


def test_corrupt_spool_is_moved_aside_and_reported(tmp_path: Path, broker: Broker) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool.sqlite").write_bytes(b"\x00garbage" * 512)
    obs = Observer(broker.port)

    async def main() -> Path:
        w = wiring(make_config(state, broker.port))
        async with rig.transport(w) as transport:
            rig.telemetry(w, transport).sample_now()
            await async_wait_until(lambda: obs.on("edge/dev1/events") and obs.seqs(), 10)
        event = obs.on("edge/dev1/events")[0]
        assert event["kind"] == "error" and event["severity"] == "critical"
        assert "corrupt" in event["message"]
        return Path(event["data"]["moved_to"])

    try:
        moved = asyncio.run(main())
    finally:
        obs.close()
    assert moved.exists() and moved.read_bytes().startswith(b"\x00garbage")
    s = Spool(state / "spool.sqlite", 1_000_000, "dev1")
    assert s.open() is None  # the new spool is healthy
    s.close()


def test_payloads_are_valid_protocol(tmp_path: Path, broker: Broker) -> None:
    """Every telemetry message parses as the wire protocol says (v, device, samples with seq/ts)."""
    obs = Observer(broker.port)

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        w.metrics.publish({"cpu_percent": 1.5, "temp_c": 40.0})
        async with rig.transport(w) as transport:
            w.sections.bind({"inference": lambda: {"model": "m@1", "count": 3},
                             "spool": transport.spool_section})
            rig.telemetry(w, transport).sample_now()
            await async_wait_until(lambda: obs.seqs(), 10)
        msg = obs.on("edge/dev1/telemetry")[0]
        assert msg["v"] == 1 and msg["device"] == "dev1"
        (sample,) = msg["samples"]
        assert sample["seq"] == 1 and isinstance(sample["ts"], float)
        assert sample["metrics"] == {"cpu_percent": 1.5, "temp_c": 40.0}
        assert sample["inference"] == {"model": "m@1", "count": 3}
        assert set(sample["spool"]) >= {"backlog", "dropped", "bytes"}
        assert dumps(msg)  # round-trips

    try:
        asyncio.run(main())
    finally:
        obs.close()


def test_username_password_and_a_clear_refusal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev1", "s3cret"], check=True,
                   capture_output=True)
    broker = Broker(workdir=tmp_path / "broker", password_file=pw).start()

    async def run(password: str) -> tuple[int, str | None]:
        w = wiring(make_config(tmp_path / f"state-{password}", broker.port,
                              mqtt={"username": "dev1", "password": password}))
        async with rig.transport(w) as t:
            session = t.session
            assert session is not None
            await async_wait_until(lambda: session.connects or session.failed_connects >= 2, 10)
            return session.connects, session.last_error

    try:
        assert asyncio.run(run("s3cret"))[0] == 1
        with caplog.at_level(logging.WARNING, logger="edgeagent.transport.session"):
            connects, error = asyncio.run(run("wrong"))
        assert connects == 0
        assert error and "refused by broker" in error and "not authorized" in error.lower()
    finally:
        broker.stop()


def test_connection_state_follows_the_broker(tmp_path: Path, broker: Broker) -> None:
    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        async with rig.transport(w) as transport:
            await asyncio.wait_for(w.router.wait_connected(), 10)
            assert transport.mqtt_section()["connected"] is True
            await asyncio.to_thread(broker.stop)
            await async_wait_until(lambda: not w.router.connected, 10, message="disconnected")
            mqtt = transport.mqtt_section()
            assert mqtt["connected"] is False and mqtt["since"] is None
            assert "lost" in (mqtt["last_error"] or "")
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(w.router.wait_connected(), 20)
            assert transport.mqtt_section()["reconnects"] == 1

    asyncio.run(main())


def test_status_follows_the_model_once_it_is_known(tmp_path: Path, broker: Broker) -> None:
    """At connect the model may still be loading (or a swap comes later): status catches up."""
    obs = Observer(broker.port)
    model: dict[str, str] = {}

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        w.sections.bind({"inference": lambda: dict(model)})
        async with rig.transport(w):
            await async_wait_until(lambda: obs.on("edge/dev1/status"), 10)
            assert "model" not in obs.on("edge/dev1/status")[0]
            model["model"] = "vibration-anomaly@1.1.0"
            await async_wait_until(lambda: obs.on("edge/dev1/status")[-1].get("model"), 15)
            assert obs.on("edge/dev1/status")[-1]["model"] == {"name": "vibration-anomaly",
                                                               "version": "1.1.0"}
            assert obs.on("edge/dev1/status")[-1]["state"] == "online"

    try:
        asyncio.run(main())
    finally:
        obs.close()


def test_hostile_retained_ping_does_not_break_the_session(tmp_path: Path, broker: Broker) -> None:
    """A retained junk message on the device's own ping topic would come back on every connect."""
    for junk in ('{"n": 1e999}', '{"n": [1]}', "[" * 50_000):
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-t", "edge/dev1/ping", "-r", "-m", junk],
                       check=True, timeout=10)
        # only the last one stays retained; each is delivered at least to the next connect

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        async with rig.transport(w) as t:
            await async_wait_until(lambda: t.mqtt_section()["rtt_ms"] is not None, 15)
            assert t.session is not None and t.session.connects == 1
            assert w.router.connected

    asyncio.run(main())


def test_handler_queue_is_bounded_in_bytes_dropping_the_oldest() -> None:
    """A busy updates handler must not hold a whole group's chunks in RAM."""
    from edgeagent.transport.router import HANDLER_QUEUE_MAX_BYTES

    async def main() -> None:
        router = SessionRouter()

        async def handler(topic: str, payload: bytes) -> None:
            raise AssertionError("not started: nothing is handled in this test")

        router.subscribe("edge/dev1/updates/+/#", handler)
        chunk = b"x" * (HANDLER_QUEUE_MAX_BYTES * 3 // 8)  # two fit, a third does not
        for i in range(5):
            assert router.dispatch(f"edge/dev1/updates/j/chunk/{i}", chunk) == 1
        sub = router.subscriptions[0]
        assert sub.queued_bytes <= HANDLER_QUEUE_MAX_BYTES
        assert sub.dropped == 3
        kept = [sub.queue.get_nowait()[0] for _ in range(sub.queue.qsize())]
        assert kept == ["edge/dev1/updates/j/chunk/3", "edge/dev1/updates/j/chunk/4"]  # the newest

    asyncio.run(main())
