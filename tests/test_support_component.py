"""The support component in-process, with a fake session (our DirectPublisher seam) and a memory
outbox: what it publishes for a bundle, and that refusals do not amplify into retained statuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from edgeagent.core import protocol, signing
from edgeagent.core.live import LiveConfig, MemoryOutbox, RouterRelay
from edgeagent.ops.support import build_request
from edgeagent.support.component import SupportComponent
from tests.updates_helpers import KEY_ID, make_config, make_keys
from tests.util import async_wait_until


class FakeSession:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail_next = 0

    async def publish_now(self, topic: str, payload: bytes, timeout_s: float = 30.0) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("link down")
        self.sent.append((topic, payload))


def test_a_bundle_is_sent_as_manifest_then_chunks_and_forgeries_get_one_status(tmp_path: Path) -> None:
    key, pub = make_keys(tmp_path / "keys")
    cfg = make_config(tmp_path, pub, support={"rate_kbps": 4096, "chunk_kb": 4})
    (tmp_path / "state" / "updates" / "j").mkdir(parents=True)
    (tmp_path / "state" / "updates" / "j" / "log.txt").write_bytes(bytes(range(256)) * 100)
    outbox = MemoryOutbox()
    session = FakeSession()
    session.fail_next = 1  # the first publish meets a dropped link: retried

    async def main() -> None:
        comp = SupportComponent(LiveConfig(cfg), outbox, RouterRelay(), lambda: session,
                                lambda n: [f"line {i}" for i in range(n)])
        async with comp:
            run = asyncio.create_task(comp.run(), name="support-run")
            for i in range(5):
                await comp.on_message(f"edge/dev1/support/f{i}/request",
                                      protocol.dumps(build_request(f"f{i}", "bundle", device="dev1")))
            signed = signing.sign(build_request("j1", "bundle", device="dev1", lines=3), key, KEY_ID)
            await comp.on_message("edge/dev1/support/j1/request", protocol.dumps(signed))
            await async_wait_until(lambda: outbox.states.get("edge/dev1/support/j1/status", {})
                                   .get("state") in ("done", "failed"), 20)
            await comp.on_message("edge/dev1/support/j1/request", protocol.dumps(signed))  # replay
            assert comp.section()["refused"] == {"signature": 5, "replay": 1}
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

    asyncio.run(main())
    assert [t for t in outbox.states if "/support/f" in t] == ["edge/dev1/support/f0/status"]
    assert outbox.states["edge/dev1/support/f0/status"]["state"] == "refused"
    assert [e[3]["reason"] for e in outbox.events if e[0] == "support"] == ["signature", "replay"]
    status = outbox.states["edge/dev1/support/j1/status"]
    assert status["state"] == "done", status
    topics = [t for t, _ in session.sent]
    assert topics[0] == "edge/dev1/support/j1/manifest"
    manifest = json.loads(session.sent[0][1])
    assert topics[1:] == [f"edge/dev1/support/j1/chunk/{i}" for i in range(manifest["chunks"])]
    data = b"".join(p for _, p in session.sent[1:])
    assert (len(data), hashlib.sha256(data).hexdigest()) == (manifest["size"], manifest["sha256"])
    assert (status["size"], status["sha256"]) == (manifest["size"], manifest["sha256"])
    assert not list((tmp_path / "state" / "support").glob("*.tar.gz"))
