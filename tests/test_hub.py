"""Hub: live knob changes wake sleepers, even one that is just starting to sleep."""

from __future__ import annotations

import asyncio
import time

from edgeagent.core import config
from edgeagent.core.hub import Hub, MemoryOutbox


def test_change_during_sleep_entry_is_not_lost() -> None:
    async def main() -> float:
        hub = Hub(config.build({}, env={}))
        t0 = time.monotonic()
        sleeper = asyncio.create_task(hub.sleep_or_change(30))
        await asyncio.sleep(0)  # the sleeper has entered sleep_or_change, its wait() not yet started
        hub.notify_changed()
        await asyncio.wait_for(sleeper, 10)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5


def test_memory_outbox_hands_over_in_order() -> None:
    early = MemoryOutbox()
    early.emit_event("error", "warning", "first")
    early.put_state("edge/d/updates/j/status", {"state": "received"})
    early.emit_event("rule", "info", "second")
    late = MemoryOutbox()
    hub = Hub(config.build({}, env={}))
    hub.outbox = early
    hub.set_outbox(late)
    assert [e[2] for e in late.events] == ["first", "second"]
    assert late.states == {"edge/d/updates/j/status": {"state": "received"}}
    assert not early.events and not early.states
