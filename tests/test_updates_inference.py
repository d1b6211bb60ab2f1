"""End to end with the real inference component: a signed model bundle pushed over real Mosquitto
while inference serves a 100 Hz window stream is hot-swapped with no window lost or duplicated."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from pathlib import Path

import pytest

from edgeagent.inference.component import InferenceComponent
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.push import Pusher
from edgeagent.updates import UpdatesComponent
from tests import rig
from tests.broker import Broker
from tests.inference_helpers import RUNTIMES, SHIPPED, ScriptedSource
from tests.updates_helpers import StatusWatcher, make_config, make_keys, running, signed
from tests.util import async_wait_until, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")]


def bundle_bytes(version: str) -> bytes:
    meta = "\n".join(f'version = "{version}"' if line.startswith("version =") else line
                     for line in (SHIPPED / "model.toml").read_text().splitlines()) + "\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("model.tflite", (SHIPPED / "model_float.tflite").read_bytes()),
                           ("model.toml", meta.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_model_update_under_100hz_inference_loses_no_window(tmp_path: Path, broker: Broker) -> None:
    key, pub = make_keys(tmp_path / "keys")
    cfg = make_config(tmp_path, pub, broker.port, inference={"enabled": True, "queue_max": 100_000,
                                                             "probation_windows": 50})
    art = tmp_path / "vibration-anomaly-2.0.0.tar.gz"
    art.write_bytes(bundle_bytes("2.0.0"))
    msg = signed(art, key, job="live", version="2.0.0", chunk_size=16 * 1024)
    src = ScriptedSource(windows_hz=100.0)
    watcher = StatusWatcher(broker.port)

    def push() -> object:
        url = BrokerUrl.parse(f"mqtt://127.0.0.1:{broker.port}")
        client = make_client(url, "push-live")
        connect_and_wait(client, url, 30)
        try:
            return Pusher(client, "edge", msg, art, device="dev1").run(60, 10.0)
        finally:
            client.disconnect()
            client.loop_stop()

    async def main() -> tuple[InferenceComponent, list[object], object]:
        w = rig.wiring(cfg)
        inference = InferenceComponent(w.live, w.outbox, source=src)
        results: list[object] = []
        inference.add_listener(results.append)
        # the inference component is the ModelInstaller (structurally) and gives its own section
        updates = UpdatesComponent(w.live, w.metrics, w.outbox, w.router, inference, inference.section)
        async with running(rig.transport(w), inference, updates):
            await async_wait_until(lambda: w.router.connected and len(results) >= 50, 30)
            t0 = time.monotonic()
            result = await asyncio.to_thread(push)
            assert time.monotonic() - t0 < 60
            await async_wait_until(lambda: len(results) >= 50 + inference.windows // 2, 10)
            src.stop()
            await async_wait_until(lambda: len(results) == inference.windows, 10, message="queue drained")
            return inference, results, result

    try:
        inference, results, result = asyncio.run(main())
        assert result.states == {"dev1": "succeeded"}, result.reasons  # type: ignore[attr-defined]
        wait_until(lambda: watcher.events.get("live", [])[-1:] == ["succeeded"], 10)
        assert watcher.events["live"] == ["received", "downloading", "verified", "installing", "succeeded"]
    finally:
        watcher.close()
    seqs = [r.seq for r in results]  # type: ignore[attr-defined]
    assert seqs == list(range(inference.windows)), "every window served exactly once, in order"
    tags = [results[0].model]  # type: ignore[attr-defined]
    for r in results:
        if r.model != tags[-1]:  # type: ignore[attr-defined]
            tags.append(r.model)  # type: ignore[attr-defined]
    assert tags == ["vibration-anomaly@1.0.0", "vibration-anomaly@2.0.0"]
    assert inference.section()["dropped"] == 0
    assert inference.installed_version("vibration-anomaly") == "2.0.0"
