"""The shared live objects: knob changes wake sleepers, the outbox and router relays hand over."""

from __future__ import annotations

import asyncio
import time

from edgeagent.core import config
from edgeagent.core.live import LiveConfig, MemoryOutbox, OutboxRelay, RouterRelay, Sections


def test_change_during_sleep_entry_is_not_lost() -> None:
    async def main() -> float:
        live = LiveConfig(config.build({}, env={}))
        t0 = time.monotonic()
        sleeper = asyncio.create_task(live.sleep_or_change(30))
        await asyncio.sleep(0)  # the sleeper has entered sleep_or_change, its wait() not yet started
        live.notify_changed()
        await asyncio.wait_for(sleeper, 10)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5


def test_memory_outbox_hands_over_in_order() -> None:
    relay = OutboxRelay()
    relay.emit_event("error", "warning", "first")
    relay.put_state("edge/d/updates/j/status", {"state": "received"})
    relay.emit_event("rule", "info", "second")
    early = relay.target
    assert isinstance(early, MemoryOutbox)
    late = MemoryOutbox()
    relay.attach(late)
    relay.emit_event("rule", "info", "third")
    assert [e[2] for e in late.events] == ["first", "second", "third"]
    assert late.states == {"edge/d/updates/j/status": {"state": "received"}}
    assert not early.events and not early.states


class _Recorder:
    def __init__(self) -> None:
        self.filters: list[str] = []

    def subscribe(self, topic_filter: str, handler: object, express: object = None) -> None:
        self.filters.append(topic_filter)

    @property
    def connected(self) -> bool:
        return True

    async def wait_connected(self) -> None:
        return None


def test_router_relay_keeps_subscriptions_made_before_the_transport() -> None:
    async def handler(topic: str, payload: bytes) -> None:
        return None

    relay = RouterRelay()
    relay.subscribe("a/#", handler)
    assert not relay.connected
    real = _Recorder()
    relay.attach(real)
    relay.subscribe("b/#", handler)
    assert real.filters == ["a/#", "b/#"]
    assert relay.connected


def test_a_failing_section_is_reported_in_place() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    sections = Sections({"ok": lambda: {"n": 1}, "bad": broken})
    assert sections.snapshot() == {"ok": {"n": 1}, "bad": {"error": "RuntimeError: boom"}}
    assert sections.snapshot(("ok", "absent")) == {"ok": {"n": 1}}
