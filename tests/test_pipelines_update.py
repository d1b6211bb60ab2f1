"""A signed model update over real Mosquitto targets one pipeline: two pipelines serve the same model
name from their own stores at 100 windows/s each; the one the manifest names swaps to the new
version, the other keeps serving the old one, and neither loses or repeats a window."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgeagent.inference.component import InferenceComponent
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.push import Pusher
from edgeagent.updates import UpdatesComponent
from tests import rig
from tests.broker import Broker
from tests.inference_helpers import RUNTIMES, UNSEEN_SEED, ScriptedSource
from tests.test_updates_inference import bundle_bytes
from tests.updates_helpers import StatusWatcher, make_config, make_keys, running, signed
from tests.util import async_wait_until, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")]

MODEL = "vibration-anomaly"


def test_a_model_update_swaps_only_the_pipeline_it_names(tmp_path: Path, broker: Broker) -> None:
    key, pub = make_keys(tmp_path / "keys")
    cfg = make_config(
        tmp_path,
        pub,
        broker.port,
        inference={"enabled": True, "queue_max": 100_000, "probation_windows": 50},
        pipelines=[{"name": "left", "model": MODEL}, {"name": "right", "model": MODEL}],
    )
    art = tmp_path / "vibration-anomaly-2.0.0.tar.gz"
    art.write_bytes(bundle_bytes("2.0.0"))
    msg = signed(art, key, job="right-2", version="2.0.0", chunk_size=16 * 1024, pipeline="right")
    sources = {
        "left": ScriptedSource(windows_hz=100.0),
        "right": ScriptedSource(windows_hz=100.0, seed=UNSEEN_SEED + 5),
    }
    watcher = StatusWatcher(broker.port)

    def push() -> Any:
        url = BrokerUrl.parse(f"mqtt://127.0.0.1:{broker.port}")
        client = make_client(url, "push-right")
        connect_and_wait(client, url, 30)
        try:
            return Pusher(client, "edge", msg, art, device="dev1").run(60, 10.0)
        finally:
            client.disconnect()
            client.loop_stop()

    results: list[Any] = []

    async def main() -> tuple[InferenceComponent, Any]:
        w = rig.wiring(cfg)
        inference = InferenceComponent(w.live, w.outbox, sources=sources)
        inference.add_listener(results.append)
        updates = UpdatesComponent(w.live, w.metrics, w.outbox, w.router, inference, inference.section)

        def served(name: str) -> int:
            return sum(1 for r in results if r.pipeline == name)

        async with running(rig.transport(w), inference, updates):
            await async_wait_until(
                lambda: w.router.connected and min(served("left"), served("right")) >= 50, 30
            )
            result = await asyncio.to_thread(push)
            mark = {n: served(n) for n in sources}
            await async_wait_until(lambda: all(served(n) >= mark[n] + 100 for n in sources), 30)
            for s in sources.values():
                s.stop()
            await async_wait_until(
                lambda: all(served(n) == inference.pipeline(n).windows for n in sources),
                10,
                message="queues drained",
            )
            return inference, result

    try:
        inference, result = asyncio.run(main())
        assert result.states == {"dev1": "succeeded"}, result.reasons
        wait_until(lambda: watcher.events.get("right-2", [])[-1:] == ["succeeded"], 10)
    finally:
        watcher.close()
    for name in sources:
        seqs = [r.seq for r in results if r.pipeline == name]
        assert seqs == list(range(inference.pipeline(name).windows)), f"{name}: every window exactly once"
    left = {r.model for r in results if r.pipeline == "left"}
    right = [r.model for r in results if r.pipeline == "right"]
    assert left == {f"{MODEL}@1.0.0"}, "the other pipeline kept serving its model"
    switch = right.index(f"{MODEL}@2.0.0")
    assert set(right[:switch]) == {f"{MODEL}@1.0.0"} and set(right[switch:]) == {f"{MODEL}@2.0.0"}
    assert inference.installed_version(MODEL, "right") == "2.0.0"
    assert inference.installed_version(MODEL, "left") == "1.0.0"
    assert inference.installed_version(MODEL) == "1.0.0"  # no pipeline named: the first serving it
    models = tmp_path / "state" / "models"
    assert sorted(p.name for p in (models / "right" / MODEL).iterdir() if p.is_dir()) == ["1.0.0", "2.0.0"]
    assert sorted(p.name for p in (models / "left" / MODEL).iterdir() if p.is_dir()) == ["1.0.0"]
    section = inference.section()
    assert section["pipelines"]["right"]["model"] == f"{MODEL}@2.0.0"
    assert section["pipelines"]["left"]["dropped"] == section["pipelines"]["right"]["dropped"] == 0
