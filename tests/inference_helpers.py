"""Helpers of the inference tests: a scripted sensor source, model bundles, a component harness."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

import edgeagent
from edgeagent.core import config
from edgeagent.core.live import LiveConfig, MemoryOutbox
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.inference.component import InferenceComponent
from edgeagent.inference.pipeline import Scored
from edgeagent.inference.runtime import available_runtimes
from edgeagent.sensors.sources import VibrationSimulator

ROOT = Path(__file__).resolve().parent.parent
# the installed package's model (the same files in a checkout; the wheel's in the arm64 job)
SHIPPED = Path(edgeagent.__file__).resolve().parent / "models" / "vibration-anomaly"
MODELS = ROOT / "tests" / "models"
FIXTURES = MODELS / "inference"
RUNTIMES = available_runtimes()
UNSEEN_SEED = 200_001  # the shipped model never saw this machine in training
CHUNK = 16  # one chunk per window at the default stride


class ScriptedSource:
    """A SensorSource the test drives: simulator samples in 16-sample chunks (one window each once the
    first 256 samples are in), paced at `windows_hz` (0: as fast as the loop allows), ending after
    `max_chunks` chunks or `stop()`. `schedule[chunk] = (fault, severity)` or `("gain", g)` switches the
    signal when that chunk is made; `gain` multiplies the samples (a huge gain makes huge features)."""

    channels = 3

    def __init__(self, *, windows_hz: float = 0.0, max_chunks: int | None = None, seed: int = UNSEEN_SEED,
                 schedule: dict[int, tuple[str, float]] | None = None, rate_hz: float = 1600.0,
                 repeat: bool = False) -> None:
        self.rate_hz = rate_hz
        self.sim = VibrationSimulator(rate_hz, seed)
        self.windows_hz = windows_hz
        self.max_chunks = max_chunks
        self.schedule = dict(schedule or {})
        self.gain = 1.0
        self.chunks = 0
        self.repeat = repeat  # the same chunk again and again (inputs that repeat exactly: the cache)
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def apply(self, what: str, value: float) -> None:
        if what == "gain":
            self.gain = value
        elif what == "clear":
            self.sim.clear_faults()
        else:
            self.sim.set_fault(what, value)

    async def stream(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fixed = self.sim.generate(CHUNK) if self.repeat else None
        while not self._stop and (self.max_chunks is None or self.chunks < self.max_chunks):
            if self.chunks in self.schedule:
                self.apply(*self.schedule[self.chunks])
            samples = fixed if fixed is not None else self.sim.generate(CHUNK) * np.float32(self.gain)
            self.chunks += 1
            if self.windows_hz:
                await asyncio.sleep(max(0.0, t0 + self.chunks / self.windows_hz - loop.time()))
            else:
                await asyncio.sleep(0)
            yield time.time(), samples


def make_config(state_dir: Path, **inference: Any) -> config.Config:
    raw: dict[str, Any] = {"device": {"id": "test-dev", "state_dir": str(state_dir)},
                           "inference": {"queue_max": 100_000, **inference}}
    return config.build(raw)


def bundle(tmp: Path, name: str, model: Path, meta: Path | None = None, version: str | None = None) -> Path:
    """A staged update directory: model.tflite (+ model.toml, its version line rewritten)."""
    d = tmp / f"bundle-{name}-{version or 'x'}"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, d / "model.tflite")
    if meta is not None:
        text = meta.read_text()
        if version is not None:
            text = "\n".join(f'version = "{version}"' if line.startswith("version =") else line
                             for line in text.splitlines()) + "\n"
        (d / "model.toml").write_text(text)
    return d


def events(outbox: MemoryOutbox, kind: str | None = None) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [(k, s, m, d) for k, s, m, d, _ts in outbox.events if kind is None or k == kind]


class Harness:
    """Runs an InferenceComponent (entered, run() as a task) and records every served window."""

    def __init__(self, cfg: config.Config, source: Any, *, sources: dict[str, Any] | None = None) -> None:
        """`sources`: one per pipeline name ([[pipelines]]); `source` is the first pipeline's."""
        self.live = LiveConfig(cfg)
        self.outbox = MemoryOutbox()
        self.source = source
        self.comp = InferenceComponent(self.live, self.outbox, source=source, sources=sources)
        self.results: list[Scored] = []
        self.comp.add_listener(self.results.append)
        self.task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Harness:
        await self._stack.enter_async_context(self.comp)
        self.task = asyncio.create_task(self.comp.run(), name="test:inference")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            await cancel_and_wait(self.task)  # a cancellation of the test itself still arrives
        await self._stack.aclose()

    async def finished(self, timeout_s: float = 60.0) -> None:
        """Wait for run() to return (the source ended and everything queued was served)."""
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), timeout_s)

    async def until(self, predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.task is not None and self.task.done():
                self.task.result()  # surface the component's exception
                raise AssertionError(f"run() ended while waiting for {what or predicate}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
            await asyncio.sleep(0.01)
