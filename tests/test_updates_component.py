"""The updates component in-process with the real transport, spool and Mosquitto; the operator side
is the real `push` code (Pusher) or raw MQTT publishes for hostile input."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgeagent.core import protocol, signing
from edgeagent.core.live import LiveConfig, Metrics
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.push import Pusher, build_manifest
from edgeagent.updates import UpdatesComponent
from tests import rig
from tests.broker import Broker
from tests.rig import wiring
from tests.updates_helpers import (
    KEY_ID,
    MODEL,
    FakeModelInstaller,
    StatusWatcher,
    make_config,
    make_keys,
    running,
    signed,
)
from tests.util import async_wait_until

Body = Callable[["Ctx"], Awaitable[None]]


class Ctx:
    def __init__(self, tmp: Path, broker: Broker, live: LiveConfig, metrics: Metrics,
                 comp: UpdatesComponent, key: Any, watcher: StatusWatcher,
                 installer: FakeModelInstaller) -> None:
        self.tmp, self.broker, self.comp = tmp, broker, comp
        self.live, self.metrics = live, metrics
        self.key, self.watcher, self.installer = key, watcher, installer

    async def push(self, msg: dict[str, Any], artifact: Path, timeout_s: float = 30.0,
                   device: str | None = "dev1", group: str | None = None) -> Any:
        def go() -> Any:
            url = BrokerUrl.parse(f"mqtt://127.0.0.1:{self.broker.port}")
            client = make_client(url, f"push-{time.monotonic_ns()}")
            connect_and_wait(client, url, 30)
            try:
                return Pusher(client, "edge", msg, artifact, device=device, group=group).run(timeout_s, 5.0)
            finally:
                client.disconnect()
                client.loop_stop()

        return await asyncio.to_thread(go)

    async def final(self, job: str, timeout_s: float = 30.0) -> dict[str, Any]:
        doc = await async_wait_until(lambda: self.watcher.final(job), timeout_s, message=f"{job} final")
        assert isinstance(doc, dict)
        return doc

    def store_files(self) -> list[Path]:
        return [p for p in (self.tmp / "store").rglob("*") if p.is_file() and p.name != "versions.json"]


def run(tmp_path: Path, broker: Broker, body: Body, installer_fail: str = "",
        local_now: Callable[[], datetime] = datetime.now, **sections: Any) -> None:
    key, pub = make_keys(tmp_path / "keys")
    cfg = make_config(tmp_path, pub, broker.port, **sections)

    async def main() -> None:
        w = wiring(cfg)
        installer = FakeModelInstaller(tmp_path / "store", fail=installer_fail)
        (tmp_path / "store").mkdir()
        watcher = StatusWatcher(broker.port)
        comp = UpdatesComponent(w.live, w.metrics, w.outbox, w.router, installer, local_now=local_now)
        try:
            async with running(rig.transport(w), comp):
                await async_wait_until(lambda: w.router.connected, 10, message="connected")
                await body(Ctx(tmp_path, broker, w.live, w.metrics, comp, key, watcher, installer))
        finally:
            watcher.close()

    asyncio.run(main())


def test_model_update_end_to_end_and_replays(tmp_path: Path, broker: Broker) -> None:
    async def body(c: Ctx) -> None:
        msg = signed(MODEL, c.key, job="m-200", version="2.0.0", chunk_size=4096)
        result = await c.push(msg, MODEL)
        assert result.states == {"dev1": "succeeded"}, result.reasons
        await async_wait_until(lambda: c.watcher.events.get("m-200", [])[-1:] == ["succeeded"], 10)
        assert c.watcher.events["m-200"] == ["received", "downloading", "verified", "installing", "succeeded"]
        history = [s for s, _ in c.comp.journal.jobs["m-200"].history]
        assert history == ["received", "downloading", "verified", "installing", "succeeded"]
        assert c.installer.installed == [("vibration-anomaly", "2.0.0", "m-200")]
        stored = c.tmp / "store" / "vibration-anomaly" / "2.0.0" / "model.tflite"
        assert stored.read_bytes() == MODEL.read_bytes()
        job_dir = c.tmp / "state" / "updates" / "m-200"
        assert sorted(p.name for p in job_dir.iterdir()) == ["log.txt"]  # artifacts cleaned up
        # the same manifest again: a no-op; an old signed manifest of a lower version: rejected
        c.watcher.publish("edge/dev1/updates/m-200/manifest", msg)
        old = signed(MODEL, c.key, job="m-150", version="1.5.0")
        c.watcher.publish("edge/dev1/updates/m-150/manifest", old)
        doc = await c.final("m-150")
        assert doc["state"] == "rejected" and "rollback refused" in doc["reason"]
        assert len(c.installer.installed) == 1 and c.comp.journal.jobs["m-200"].state == "succeeded"
        # the same job id with a different manifest: refused (counted), the job and its retained
        # status are untouched
        other = signed(MODEL, c.key, job="m-200", version="3.0.0")
        c.watcher.publish("edge/dev1/updates/m-200/manifest", other)
        await async_wait_until(lambda: c.comp.book.rejections.totals.get("manifest-reused") == 1, 10)
        assert c.watcher.last["m-200"]["state"] == "succeeded"

    run(tmp_path, broker, body)


def test_hostile_inputs_over_mqtt(tmp_path: Path, broker: Broker) -> None:
    async def body(c: Ctx) -> None:
        w = c.watcher
        w.publish("edge/dev1/updates/bad-json/manifest", b"{not json")
        assert "malformed JSON" in (await c.final("bad-json"))["reason"]
        msg = signed(MODEL, c.key, job="bad-sig", version="2.0.0")
        w.publish("edge/dev1/updates/bad-sig/manifest", {**msg, "version": "2.0.1"})
        assert "bad signature" in (await c.final("bad-sig"))["reason"]
        unsigned = {k: v for k, v in signed(MODEL, c.key, job="nosig").items() if k != "sig"}
        w.publish("edge/dev1/updates/nosig/manifest", unsigned)
        # the first refusal of each kind in a window gets a retained status; repeats are counted
        w.publish("edge/dev1/updates/mismatch/manifest", signed(MODEL, c.key, job="other-job"))
        totals = c.comp.book.rejections.totals
        await async_wait_until(lambda: totals.get("manifest-malformed") == 2, 10)
        assert totals["manifest-signature"] == 2 and w.state("mismatch") is None
        # refusals are reported, never journaled: no job exists for any of them
        refused = {"bad-json", "bad-sig", "nosig", "mismatch", "other-job"}
        assert not refused & c.comp.journal.jobs.keys() and not (c.tmp / "state/updates/other-job").exists()
        # a manifest on another device's topic (or a group we are not in) never reaches us: after a
        # sentinel published later by the same client has been refused, nothing of it is anywhere
        jobs_before = dict(c.comp.journal.jobs)
        w.publish("edge/dev2/updates/foreign/manifest", signed(MODEL, c.key, job="foreign"))
        w.publish("edge/group/line2/updates/foreign2/manifest", signed(MODEL, c.key, job="foreign2"))
        w.publish("edge/dev1/updates/sentinel/manifest", b"{not json")
        await async_wait_until(lambda: totals.get("manifest-malformed") == 3, 10)
        assert c.comp.journal.jobs == jobs_before
        assert w.state("foreign") is None and w.state("foreign2") is None
        assert not (c.tmp / "state/updates/foreign").exists() and c.comp.dropped_chunks == 0
        # a bundle escaping its directory: rejected after download, before anything is installed
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("../model.tflite")
            data = MODEL.read_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        evil = c.tmp / "evil.tar.gz"
        evil.write_bytes(buf.getvalue())
        result = await c.push(signed(evil, c.key, job="evil", version="2.0.0"), evil)
        assert result.states == {"dev1": "rejected"} and "'..'" in result.reasons["dev1"]
        assert c.installer.installed == [] and c.store_files() == []
        assert not (c.tmp / "state" / "updates" / "model.tflite").exists()
        assert "foreign" not in c.comp.journal.jobs and w.state("foreign") is None
        assert c.comp.journal.jobs["evil"].state == "rejected"
        # whole-file sha256 that does not match the bytes (every chunk passes its own sha256)
        body = build_manifest(MODEL, job="badsum", kind="model", name="vibration-anomaly", version="2.0.0")
        body["sha256"] = "0" * 64
        result = await c.push(signing.sign(body, c.key, KEY_ID), MODEL)
        assert result.states == {"dev1": "rejected"} and "sha256 mismatch" in result.reasons["dev1"]
        assert c.installer.installed == [] and c.store_files() == []

    run(tmp_path, broker, body)


def test_bad_chunks_dropped_and_rerequested(tmp_path: Path, broker: Broker) -> None:
    """Corrupt, oversized, out-of-range and surplus chunks are dropped; the good ones are pulled later."""

    async def body(c: Ctx) -> None:
        w = c.watcher
        data = MODEL.read_bytes()
        msg = signed(MODEL, c.key, job="chunky", version="2.0.0", chunk_size=8192)
        base = "edge/dev1/updates/chunky"
        w.publish(f"{base}/manifest", msg)
        await async_wait_until(lambda: "chunky" in c.comp.transfers, 10)
        parts = [data[i:i + 8192] for i in range(0, len(data), 8192)]
        w.publish(f"{base}/chunk/0", b"\x00" * len(parts[0]))  # chunk_sha256 mismatch
        w.publish(f"{base}/chunk/1", parts[1] + b"x" * 10)  # oversized
        w.publish(f"{base}/chunk/{len(parts)}", parts[0])  # index out of range / more than declared
        w.publish(f"{base}/chunk/abc", parts[0])
        for i in range(1, len(parts)):
            w.publish(f"{base}/chunk/{i}", parts[i])
        # chunk 0 is missing: the device asks for exactly that one when the sender goes quiet
        await async_wait_until(lambda: [r for r in w.requests if r["missing"] == [[0, 0]]], 15)
        assert not (c.tmp / "state/updates/chunky/artifact").exists()
        assert c.comp.rejected_chunks == 4
        w.publish(f"{base}/chunk/0", parts[0])
        assert (await c.final("chunky"))["state"] == "succeeded"
        assert c.installer.installed == [("vibration-anomaly", "2.0.0", "chunky")]

    run(tmp_path, broker, body)


def test_truncated_transfer_expires(tmp_path: Path, broker: Broker) -> None:
    async def body(c: Ctx) -> None:
        msg = signed(MODEL, c.key, job="trunc", version="2.0.0", chunk_size=4096, ttl_s=3.0)
        c.watcher.publish("edge/dev1/updates/trunc/manifest", msg)
        await async_wait_until(lambda: "trunc" in c.comp.transfers, 10)
        c.watcher.publish("edge/dev1/updates/trunc/chunk/0", MODEL.read_bytes()[:4096])
        doc = await c.final("trunc", 20)
        assert doc["state"] == "failed" and "missing when the job expired" in doc["reason"]
        assert len([r for r in c.watcher.requests if r["job"] == "trunc"]) >= 1
        assert c.installer.installed == [] and not (c.tmp / "state/updates/trunc/artifact.part").exists()

    run(tmp_path, broker, body)


def test_gates_defer_then_apply_by_themselves(tmp_path: Path, broker: Broker) -> None:
    """Battery low on battery power defers with the measured value; power coming back applies it.
    Then the busy flag defers a second job until it is cleared. Downloads run while gated."""

    async def body(c: Ctx) -> None:
        c.metrics.publish({"battery_percent": 8.0, "on_external_power": False})
        msg = signed(MODEL, c.key, job="gated", version="2.0.0", chunk_size=4096)
        c.watcher.publish("edge/dev1/updates/gated/manifest", msg)
        task = asyncio.create_task(c.push(msg, MODEL))
        await async_wait_until(lambda: c.watcher.state("gated") == "deferred", 20)
        doc = c.watcher.last["gated"]
        assert "battery 8% < 30%" in doc["reason"] and doc["next_try"] > time.time()
        assert c.comp.journal.jobs["gated"].progress == 1.0  # downloaded while gated
        c.metrics.publish({"battery_percent": 9.0, "on_external_power": True})
        result = await task
        assert result.states == {"dev1": "succeeded"}
        await async_wait_until(lambda: c.watcher.events["gated"][-1:] == ["succeeded"], 10)
        assert c.watcher.events["gated"][-3:] == ["deferred", "installing", "succeeded"]

        c.live.set_busy("rules", "press cycle running")
        msg2 = signed(MODEL, c.key, job="busy", version="2.1.0", chunk_size=4096)
        task = asyncio.create_task(c.push(msg2, MODEL))
        await async_wait_until(lambda: c.watcher.state("busy") == "deferred", 20)
        assert "busy (rules: press cycle running)" in c.watcher.last["busy"]["reason"]
        c.live.set_busy("rules", None)
        assert (await task).states == {"dev1": "succeeded"}

    run(tmp_path, broker, body, updates={"gates": {"model": {"battery_min_percent": 30.0,
                                                             "backoff_initial_s": 30.0}}})


def test_window_gate_and_cancel(tmp_path: Path, broker: Broker) -> None:
    async def body(c: Ctx) -> None:
        msg = signed(MODEL, c.key, job="win", version="2.0.0", chunk_size=4096)
        task = asyncio.create_task(c.push(msg, MODEL, timeout_s=20))
        await async_wait_until(lambda: c.watcher.state("win") == "deferred", 20)
        assert "outside maintenance windows" in c.watcher.last["win"]["reason"]
        cancel = signing.sign({"v": 1, "type": "cancel", "job": "win", "issued_at": time.time()},
                              c.key, KEY_ID)
        forged = {**cancel, "job": "win", "sig": {**cancel["sig"], "key_id": "nobody"}}
        c.watcher.publish("edge/dev1/updates/win/cancel", forged)  # ignored: not trusted
        c.watcher.publish("edge/dev1/updates/win/cancel", cancel)
        assert (await task).states == {"dev1": "cancelled"}
        assert c.installer.installed == []
        # the retained "cancelled" goes out before the job's files are removed: wait for those too
        await async_wait_until(lambda: sorted(p.name for p in (c.tmp / "state/updates/win").iterdir())
                               == ["log.txt"], 10, message="the cancelled job's files removed")

    # a window that is never open now: one minute, 12 hours away from the current local time
    hour = (time.localtime().tm_hour + 12) % 24
    run(tmp_path, broker, body, updates={"gates": {"model": {
        "maintenance_windows": [f"Mon-Sun {hour:02d}:00-{hour:02d}:01"]}}})


def test_job_applies_by_itself_when_the_window_opens(tmp_path: Path, broker: Broker) -> None:
    clock = [datetime(2026, 11, 25, 1, 59, 30)]  # a Wednesday, 30 s before the window

    async def body(c: Ctx) -> None:
        msg = signed(MODEL, c.key, job="night", version="2.0.0", chunk_size=4096)
        task = asyncio.create_task(c.push(msg, MODEL))
        await async_wait_until(lambda: c.watcher.state("night") == "deferred", 20)
        doc = c.watcher.last["night"]
        assert "next opens Wed 02:00" in doc["reason"]
        assert 1 <= doc["next_try"] - time.time() <= 31  # exactly when the window opens, not a backoff
        clock[0] += timedelta(minutes=1)  # 02:00:30: inside the window
        c.live.notify_changed()  # any context change re-evaluates at once
        assert (await task).states == {"dev1": "succeeded"}

    run(tmp_path, broker, body, local_now=lambda: clock[0],
        updates={"gates": {"model": {"maintenance_windows": ["Mon-Fri 02:00-04:30"]}}})


def test_group_topic_and_failed_model(tmp_path: Path, broker: Broker) -> None:
    async def body(c: Ctx) -> None:
        msg = signed(MODEL, c.key, job="grp", version="2.0.0", chunk_size=4096)
        result = await c.push(msg, MODEL, device=None, group="line1")
        assert result.states == {"dev1": "rolled_back"}
        assert "NaN outputs during probation" in result.reasons["dev1"]
        log = (c.tmp / "state/updates/grp/log.txt").read_text()
        assert "rolled_back" in log and "NaN" in log
        status = await c.final("grp")
        assert status["kind"] == "model" and status["version"] == "2.0.0"
        assert {status["state"]} <= protocol.FINAL_JOB_STATES

    run(tmp_path, broker, body, installer_fail="rollback")


def test_forged_chunks_first_do_not_kill_the_job(tmp_path: Path, broker: Broker) -> None:
    """A hostile publisher races the sender: every chunk is first sent forged (right size, wrong
    bytes). Each fails its chunk_sha256, is dropped and asked for again; the genuine ones win."""
    async def body(c: Ctx) -> None:
        data = MODEL.read_bytes()
        msg = signed(MODEL, c.key, job="race", version="2.0.0", chunk_size=4096)
        n = msg["chunks"]
        c.watcher.publish("edge/dev1/updates/race/manifest", msg)
        await async_wait_until(lambda: c.comp.transfers.get("race") is not None, 10, message="downloading")
        for i in range(n):
            size = len(data[i * 4096:(i + 1) * 4096])
            c.watcher.publish(f"edge/dev1/updates/race/chunk/{i}", bytes(size))
        c.watcher.publish("edge/dev1/updates/race/chunk/²", b"x")  # a Unicode digit: refused
        totals = c.comp.book.rejections.totals
        await async_wait_until(lambda: totals.get("bad-chunk") == n and totals.get("chunk-topic") == 1, 10)
        assert c.comp.journal.jobs["race"].state == "downloading"
        result = await c.push(msg, MODEL)  # the same manifest (a no-op), then the genuine chunks
        assert result.states == {"dev1": "succeeded"}, result.reasons
        log = (c.tmp / "state" / "updates" / "race" / "log.txt").read_text()
        assert "chunk_sha256 mismatch" in log and log.count("chunk dropped") == 1  # first of a window

    run(tmp_path, broker, body, updates={"request_interval_s": 0.2})
