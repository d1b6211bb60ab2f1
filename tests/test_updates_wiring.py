"""The updates component on its explicit dependencies alone (LiveConfig, Metrics, an outbox, a router):
no broker; messages go straight to the handler it subscribed, real files and ed25519."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeagent.core import protocol
from edgeagent.core.live import LiveConfig, MemoryOutbox, Metrics, RouterRelay
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.updates import UpdatesComponent
from tests.updates_helpers import MODEL, make_config, make_keys, signed
from tests.util import async_wait_until


def test_subscriptions_sections_and_a_model_job_without_installer(tmp_path: Path) -> None:
    key, pub = make_keys(tmp_path / "keys")
    cfg = make_config(tmp_path, pub)

    async def main() -> None:
        live, metrics, outbox, router = LiveConfig(cfg), Metrics(), MemoryOutbox(), RouterRelay()
        comp = UpdatesComponent(live, metrics, outbox, router, None)
        async with comp:
            assert [f for f, _, _ in router.subscriptions] == [live.topics.updates_filter,
                                                            live.topics.group_updates_filter("line1")]
            handler = router.subscriptions[0][1]
            assert comp.section() == {"jobs": [], "dropped_chunks": 0, "rejected_chunks": 0, "refused": {}}
            assert comp.firmware_section() == {"version": "", "slot": ""}

            await handler("edge/dev1/updates/junk/manifest", b"{not json")
            refused = outbox.states[live.topics.job_status("junk")]
            assert refused["state"] == "rejected" and "malformed JSON" in refused["reason"]
            assert "junk" not in comp.journal.jobs

            runner = asyncio.create_task(comp.run(), name="test:updates")
            try:
                data = MODEL.read_bytes()
                msg = signed(MODEL, key, job="noinst", version="2.0.0", chunk_size=8192)
                await handler("edge/dev1/updates/noinst/manifest", protocol.dumps(msg))
                await async_wait_until(lambda: "noinst" in comp.transfers, 10, message="downloading")
                assert [j["job"] for j in comp.section()["jobs"]] == ["noinst"]
                for i in range(0, len(data), 8192):
                    await handler(f"edge/dev1/updates/noinst/chunk/{i // 8192}", data[i:i + 8192])
                await async_wait_until(lambda: comp.journal.jobs["noinst"].final, 30, message="final")
                job = comp.journal.jobs["noinst"]
                assert (job.state, job.reason) == ("failed", "no model installer (inference is disabled)")
                assert [s for s, _ in job.history] == ["received", "downloading", "verified", "installing",
                                                      "failed"]
                # the journal says final before the retained status is put: wait for that too
                status = live.topics.job_status("noinst")
                await async_wait_until(lambda: outbox.states[status]["state"] == "failed", 30,
                                       message="retained status failed")
                assert comp.section()["jobs"] == []
            finally:
                await cancel_and_wait(runner)

    asyncio.run(main())
