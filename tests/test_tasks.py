"""The shared task helpers keep the caller's cancellation: a shutdown always arrives."""

from __future__ import annotations

import asyncio
import contextlib

from edgeagent.core.tasks import cancel_and_wait, wait_event


def test_wait_event_does_not_lose_a_cancellation_that_comes_with_the_event() -> None:
    """asyncio.wait_for on 3.11 returns normally when the event and the cancel land in one turn;
    a loop around it then never ends. wait_event raises the cancellation."""
    async def main() -> bool:
        ev = asyncio.Event()
        turns = 0

        async def loop() -> None:
            nonlocal turns
            while True:
                turns += 1
                await wait_event(ev, 10)
                ev.clear()

        task = asyncio.create_task(loop())
        await asyncio.sleep(0)  # the loop now waits
        ev.set()
        task.cancel()
        await asyncio.wait((task,), timeout=5)
        return task.cancelled()

    assert asyncio.run(main())


def test_wait_event_reports_set_and_timeout() -> None:
    async def main() -> tuple[bool, bool]:
        ev = asyncio.Event()
        late = await wait_event(ev, 0.01)
        asyncio.get_running_loop().call_soon(ev.set)
        return late, await wait_event(ev, 5)

    assert asyncio.run(main()) == (False, True)


def test_cancel_and_wait_hands_on_the_callers_cancellation() -> None:
    """The task being stopped takes a while; the caller is cancelled meanwhile: the task still
    finishes, and the caller ends cancelled instead of carrying on."""
    async def main() -> tuple[bool, bool]:
        stopped = asyncio.Event()

        async def slow_to_stop() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # flushing something
                stopped.set()
                raise

        inner = asyncio.create_task(slow_to_stop())
        await asyncio.sleep(0)
        caller = asyncio.create_task(cancel_and_wait([inner]))
        await asyncio.sleep(0)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        return stopped.is_set(), caller.cancelled()

    assert asyncio.run(main()) == (True, True)
