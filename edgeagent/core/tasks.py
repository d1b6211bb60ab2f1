"""Cancel-and-wait for tasks, written once: it never swallows the caller's own cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]] | asyncio.Future[Any],
                          timeout_s: float | None = None) -> None:
    """Cancel `tasks` and wait until each has finished (or `timeout_s` has passed).

    The tasks' own outcome (their CancelledError, or an exception they raised while stopping) is
    consumed here: the caller asked them to stop. A cancellation of the *caller* while it waits is
    not: once the tasks are done, it is raised again, so a shutdown's cancellation always arrives.
    """
    todo = [tasks] if isinstance(tasks, asyncio.Future) else list(tasks)
    for t in todo:
        t.cancel()
    pending = [t for t in todo if not t.done()]
    cancelled_here = False
    while pending:
        try:
            _done, still = await asyncio.wait(pending, timeout=timeout_s)
        except asyncio.CancelledError:
            # we were cancelled while waiting: finish the wait (the tasks were already told to
            # stop), then hand the cancellation on
            cancelled_here = True
            continue
        if still:
            log.warning("%d task(s) did not stop within %.1fs: %s", len(still), timeout_s or 0.0,
                        ", ".join(t.get_name() if isinstance(t, asyncio.Task) else repr(t) for t in still))
        break
    for t in todo:
        if t.done() and not t.cancelled():
            exc = t.exception()
            if exc is not None:
                log.debug("task ended with %r while being cancelled", exc)
    if cancelled_here:
        raise asyncio.CancelledError


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until `event` is set (True) or `timeout_s` passes (False).

    Use this instead of `asyncio.wait_for(event.wait(), t)` in loops: on Python 3.11, wait_for
    returns normally when the event is set in the same turn as a cancellation of the caller, and
    the cancellation is lost (the loop goes on, and whoever cancelled it waits for ever).
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout_s)
    finally:
        if not waiter.done():
            waiter.cancel()
    return event.is_set()
