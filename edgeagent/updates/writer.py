"""The updates writer thread: chunks are validated, written and hashed off the event loop, in batches.

One thread of our own: chunks are written in the order they came, and it keeps one malloc arena
instead of one per default-executor thread (which would keep freed chunk buffers as RSS). The loop
hands work over without waiting; the thread takes everything queued at once and tells the loop once
per batch, not once per chunk. At a thousand chunks a second, a wake-up of the thread and one of the
loop for every chunk (a ThreadPoolExecutor future each) cost about a third of the transfer's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# what the loop learns of a finished item: its result, or the exception it raised
Done = Callable[[Any, BaseException | None], None]


@dataclass
class _Item:
    fn: Callable[[], Any]
    size: int  # bytes it holds (the chunk) until written
    done: Done | None
    result: Any = None
    error: BaseException | None = None


class ChunkWriter:
    """Runs `fn` items on its thread in order; `done(result, error)` runs on the loop afterwards.
    `backlog_bytes` counts the bytes handed over and not written yet (the caller's bound)."""

    def __init__(self, name: str = "updates-io") -> None:
        self.name = name
        self.backlog_bytes = 0
        self.backlog = 0
        self._todo: deque[_Item] = deque()
        self._finished: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # the thread is working through the queue (it needs no wake-up)
        self._told = False  # a drain is scheduled on the loop and has not started yet
        self._closed = False
        self._progress = asyncio.Event()  # set by each drain: room in the backlog

    def submit(self, fn: Callable[[], Any], size: int = 0, done: Done | None = None) -> None:
        """On the loop: queue `fn` (holding `size` bytes) without waiting for it."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if self._thread is None:  # started on first use: an agent that never updates has no thread
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=self.name)
            self._thread.start()
        self.backlog += 1
        self.backlog_bytes += size
        self._todo.append(_Item(fn, size, done))
        if not self._busy:  # the thread takes what comes while it works without being woken
            with self._cv:
                self._cv.notify()

    async def progress(self) -> None:
        """Wait until the thread finished something (the backlog shrank)."""
        self._progress.clear()
        await self._progress.wait()

    def close(self) -> None:
        """Stop taking work; the thread finishes what is queued, then ends."""
        self._closed = True
        with self._cv:
            self._cv.notify()

    # -- the thread
    def _run(self) -> None:
        while True:
            with self._cv:
                self._busy = False  # before looking at the queue: a submit after this look wakes us
                while not self._todo and not self._closed:
                    self._cv.wait()
                if not self._todo:
                    return
                self._busy = True
            while self._todo:
                item = self._todo.popleft()
                try:
                    item.result = item.fn()
                except BaseException as exc:  # handed to the loop, which logs or counts it
                    item.error = exc
                item.fn = _nothing  # drop references early (the chunk's bytes live in the partial)
                self._finished.append(item)
            if not self._told:
                self._told = True
                loop = self._loop
                if loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop closed at exit: nobody waits
                        loop.call_soon_threadsafe(self._drain)

    # -- the loop
    def _drain(self) -> None:
        self._told = False
        while self._finished:
            item = self._finished.popleft()
            self.backlog -= 1
            self.backlog_bytes -= item.size
            if item.done is not None:
                try:
                    item.done(item.result, item.error)
                except Exception:
                    log.exception("after a write")
        self._progress.set()


def _nothing() -> None:
    return None
