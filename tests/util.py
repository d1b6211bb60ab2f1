"""Test helpers: polling with a deadline instead of sleeping, free ports."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02,
               message: str = "") -> object:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message or predicate}")
        time.sleep(interval_s)


async def async_wait_until(predicate: Callable[[], object], timeout_s: float = 10.0,
                           interval_s: float = 0.02, message: str = "") -> object:
    """`wait_until` for code running inside an event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message or predicate}")
        await asyncio.sleep(interval_s)


async def await_with_deadline(aw: Awaitable[object], timeout_s: float = 10.0) -> object:
    return await asyncio.wait_for(aw, timeout_s)
