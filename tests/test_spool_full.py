"""A spool that cannot be written for a while (disk full) drains to 0 once it can, with a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from edgeagent.transport import TransportComponent
from tests import rig
from tests.broker import Broker
from tests.rig import wiring
from tests.transport_util import Observer, contiguous, make_config
from tests.util import async_wait_until

pytestmark = pytest.mark.integration

DRAIN_DEADLINE_S = 10.0  # the transport retries deferred writes and failed deletes every second


def refuse_writes(transport: TransportComponent, refuse: bool) -> None:
    """As a full disk does: every write transaction of the spool fails, reads still work.
    (`query_only` refuses inserts and deletes alike; a tmpfs would need a mount.)"""
    assert transport.spool is not None
    transport.spool.db.execute(f"PRAGMA query_only={int(refuse)}")


def published_samples(transport: TransportComponent) -> int:
    return int(transport.mqtt_section().get("published_samples", 0))


def test_backlog_drains_after_writes_and_deletes_failed(tmp_path: Path, broker: Broker) -> None:
    obs = Observer(broker.port)

    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", broker.port))
        async with rig.transport(w) as transport:
            housekeeping = asyncio.create_task(transport.run(), name="transport-housekeeping")
            try:
                tel = rig.telemetry(w, transport)
                spool, outbox = transport.spool, transport.outbox
                assert spool is not None and outbox is not None
                await async_wait_until(lambda: transport.mqtt_section()["connected"], 10)
                # rows in the spool, the broker away
                await asyncio.to_thread(broker.stop)
                stored = [tel.sample_now() for _ in range(10)]
                assert await asyncio.to_thread(outbox.flush)  # the writer thread has them
                assert stored == list(range(1, 11)) and spool.count == 10
                # the disk fills: new samples wait in memory, and once the broker is back the
                # spooled ones are published but cannot be deleted
                refuse_writes(transport, True)
                assert [tel.sample_now() for _ in range(5)] == list(range(11, 16))  # numbered at once
                assert not await asyncio.to_thread(outbox.flush)  # but they wait in memory
                assert outbox.deferred == 5
                await asyncio.to_thread(broker.start)
                await async_wait_until(lambda: published_samples(transport) >= 10, 15,
                                       message="the spooled samples published")
                session = transport.session
                assert session is not None
                await async_wait_until(lambda: session.stats.delete_failures >= 1, 10,
                                       message="the deletes of the acknowledged rows tried and failed")
                assert spool.count == 10 and outbox.deferred == 5
                # space again: everything goes, the backlog gets to 0 while the agent runs on
                refuse_writes(transport, False)
                await async_wait_until(lambda: outbox.deferred == 0 and spool.count == 0, DRAIN_DEADLINE_S,
                                       message="an empty spool and nothing deferred")
                assert spool.stats()["backlog"] == 0 and spool.bytes == 0
                assert spool.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
                await async_wait_until(lambda: contiguous(obs.seqs(), 1, 15), 10, message="every seq")
            finally:
                housekeeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await housekeeping

    try:
        asyncio.run(main())
    finally:
        obs.close()
