"""A fault-injecting TCP proxy between agents and the broker: latency, resets, stalls, outages.

Used by the field trial where network namespaces with `tc netem` are not available. Faults are
switched at run time from another thread through `set_faults`; every switch is logged with its
time by the caller so figures can be lined up with causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Faults:
    latency_ms: float = 0.0  # added to every chunk, each direction
    jitter_ms: float = 0.0
    reset_prob: float = 0.0  # per forwarded chunk: close both sides abruptly
    stall: bool = False  # stop forwarding (a black hole: TCP stays open, nothing moves)
    down: bool = False  # refuse new connections and close existing ones


class FaultProxy:
    """Listens on 127.0.0.1:`port` and forwards to `target`; runs its own loop in a thread."""

    def __init__(self, target_host: str, target_port: int, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.faults = Faults()
        self.port = 0
        self.connections = 0
        self.resets = 0
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._unstalled: asyncio.Event | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.serve_forever()

    def set_faults(self, **changes: object) -> Faults:
        """Change faults from any thread; `down=True` also cuts every open connection."""
        new = replace(self.faults, **changes)  # type: ignore[arg-type]
        self.faults = new
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply, new)
        return new

    def _apply(self, faults: Faults) -> None:
        assert self._unstalled is not None
        if faults.stall:
            self._unstalled.clear()
        else:
            self._unstalled.set()
        if faults.down:
            self._abort_all()

    def reset_all(self) -> None:
        """Cut every open connection once (a link reset), from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.faults.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        done = asyncio.Event()
        tasks = [asyncio.create_task(self._pipe(reader, up_writer, done)),
                 asyncio.create_task(self._pipe(up_reader, writer, done))]
        await done.wait()
        for t in tasks:
            t.cancel()
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, done: asyncio.Event) -> None:
        assert self._unstalled is not None
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                f = self.faults
                if f.down:
                    break
                await self._unstalled.wait()
                if f.latency_ms or f.jitter_ms:
                    delay = max(0.0, f.latency_ms + self._rng.uniform(-f.jitter_ms, f.jitter_ms)) / 1000
                    await asyncio.sleep(delay)
                if f.reset_prob and self._rng.random() < f.reset_prob:
                    self.resets += 1
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            done.set()

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        def shutdown() -> None:
            self._abort_all()
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(shutdown)
        self._thread.join(5)
