"""Cancellation safety of the inference component with real interpreters and a real model store.

An install is cancelled at each of its await points in turn (k-th suspension of the installing task,
counted exactly, no timing involved). Wherever it lands, the model serving, the one in memory and the
one active.json names agree; before the commit that is the old model; and no window is lost or
served twice. Cancelling the component's run() while its pipeline tasks stop must end run().
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.core.errors import ModelRolledBack
from edgeagent.inference.store import ModelStore
from edgeagent.inference.swap_fsm import Phase
from tests.inference_helpers import FIXTURES, RUNTIMES, SHIPPED, Harness, ScriptedSource, bundle, make_config

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")

NAME = "vibration-anomaly"
OLD, NEW = f"{NAME}@1.0.0", f"{NAME}@2.0.0"


class CancelAtSuspension:
    """Awaits `coro` and cancels the awaiting task at its k-th suspension (the k-th time the coroutine
    has to wait for something), so the cancellation lands exactly at that await point."""

    def __init__(self, coro: Coroutine[Any, Any, None], k: int, on_cancel: Callable[[], None]) -> None:
        self.coro, self.k, self.on_cancel = coro, k, on_cancel
        self.suspensions = 0

    def __await__(self) -> Generator[Any, Any, None]:
        it = self.coro.__await__()
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                yielded = it.throw(throw) if throw is not None else it.send(send)
            except StopIteration:
                return
            self.suspensions += 1
            if self.suspensions == self.k:
                self.on_cancel()
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # cancels the future it is about to wait for: the await point k
            try:
                send, throw = (yield yielded), None
            except BaseException as exc:  # handed on to the coroutine, as a Task does
                send, throw = None, exc


async def agree(h: Harness, state: Path) -> str:
    """The active model as memory, active.json and the serving runner see it (all three must agree;
    a swap back queued by the cancellation lands before the worker's next window)."""
    memory = h.comp.installed_version(NAME)
    rec = ModelStore(state / "models").active(NAME)
    assert rec is not None and memory == rec.version, (memory, rec)
    tag = f"{NAME}@{memory}"
    await h.until(lambda: h.comp.runner is not None and h.comp.runner.slot.tag == tag, timeout_s=5.0,
                  what=f"the runner serving {tag}")
    return tag


async def cancel_install_at(h: Harness, staged: Path, version: str, k: int) -> tuple[bool, Phase | None]:
    """Install, cancelled at suspension k: (was it cancelled?, the swap phase at that moment)."""
    phase: list[Phase] = []
    fsm = h.comp.first._installer.fsm  # the phase says what a cancel must undo
    step = CancelAtSuspension(h.comp.install(staged, NAME, version, f"job-{k}"), k,
                              lambda: phase.append(fsm.phase))
    task = asyncio.create_task(_run(step), name=f"test:install-{k}")
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return True, phase[0]
    except ModelRolledBack:
        pass
    return False, phase[0] if phase else None


async def _run(step: CancelAtSuspension) -> None:
    await step


async def served_on(h: Harness, n: int = 10) -> None:
    have = len(h.results)
    await h.until(lambda: len(h.results) >= have + n, what=f"{n} more windows served")


def finish(h: Harness) -> None:
    seqs = [r.seq for r in h.results]
    assert seqs == list(range(h.comp.windows)), "every window served exactly once, in order"
    assert h.comp.section()["dropped"] == 0


@pytest.mark.parametrize("meta", [True, False], ids=["with-model.toml", "bare-tflite"])
def test_an_install_cancelled_at_each_await_point_leaves_disk_memory_and_runner_agreeing(
        tmp_path: Path, meta: bool) -> None:
    state = tmp_path / "state"
    src = ScriptedSource(windows_hz=200.0)

    async def main() -> tuple[Harness, list[Phase | None]]:
        phases: list[Phase | None] = []
        async with Harness(make_config(state, probation_windows=5, keep_versions=2), src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            for k in range(1, 30):
                before = await agree(h, state)
                version = f"2.0.{k}"
                staged = bundle(tmp_path, "new", SHIPPED / "model_float.tflite",
                                SHIPPED / "model.toml" if meta else None, version)
                cancelled, phase = await cancel_install_at(h, staged, version, k)
                serving = await agree(h, state)
                await served_on(h)
                assert h.results[-1].model == serving
                if not cancelled:  # k is past the last await point: it ran to the end
                    assert serving == f"{NAME}@{version}"
                    break
                phases.append(phase)
                # the commit is the one point of no return; before it the old model keeps serving
                assert serving == (f"{NAME}@{version}" if phase is Phase.COMMITTING else before), phase
                kept = set(ModelStore(state / "models").versions(NAME))
                assert f"{NAME}@{version}" == serving or version not in kept  # no candidate left behind
            else:
                raise AssertionError("the install never completed")
            src.stop()
            await h.finished()
            return h, phases

    h, phases = asyncio.run(main())
    finish(h)
    # store.add, validate, (copy model.toml,) the swap, probation, writing active.json
    assert phases == [Phase.VALIDATING] * (2 if meta else 3) + [Phase.PROBATION] * 2 + [Phase.COMMITTING]


def test_an_install_cancelled_at_each_await_point_of_a_failing_probation_keeps_the_old_model(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    src = ScriptedSource(windows_hz=200.0)
    staged = bundle(tmp_path, "bad", FIXTURES / "nan_when_large.tflite")

    async def main() -> tuple[Harness, int]:
        async with Harness(make_config(state, probation_windows=200), src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            # passes validation on healthy windows, fails probation once the signal gets huge
            armed = [False]  # results of a cancelled candidate may still arrive after the cancel
            h.comp.add_listener(lambda s: src.apply("gain", 1000.0) if s.model == NEW and armed[0] else None)
            for k in range(1, 30):
                armed[0] = True
                cancelled, _phase = await cancel_install_at(h, staged, "2.0.0", k)
                armed[0] = False
                src.apply("gain", 1.0)
                assert await agree(h, state) == OLD
                # the next validation runs on the last 16 windows, each 16 chunks long: make them healthy
                await served_on(h, 40)
                assert h.results[-1].model == OLD and h.results[-1].result.ok
                if not cancelled:
                    break
            src.stop()
            await h.finished()
            return h, k

    h, k = asyncio.run(main())
    finish(h)
    assert k >= 6  # store.add, validate, copy model.toml, the swap, probation, removing the candidate
    assert ModelStore(state / "models").versions(NAME) == ["1.0.0"]  # no candidate left behind


def test_an_install_cancelled_while_waiting_for_the_pipeline_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    staged = bundle(tmp_path, "new", SHIPPED / "model_float.tflite", SHIPPED / "model.toml", "2.0.0")

    async def main() -> tuple[Harness, Phase | None]:
        async with Harness(make_config(state), ScriptedSource(max_chunks=100)) as h:
            assert h.comp.runner is None  # run() is still opening the pipeline
            cancelled, phase = await cancel_install_at(h, staged, "2.0.0", 1)
            assert cancelled
            await h.finished()
            assert await agree(h, state) == OLD if h.comp.runner else True
            return h, phase

    h, phase = asyncio.run(main())
    assert phase is Phase.IDLE
    finish(h)
    assert {r.model for r in h.results} == {OLD}
    assert ModelStore(state / "models").versions(NAME) == ["1.0.0"]


class StubbornSource(ScriptedSource):
    """Takes its time to stop when cancelled (until `release`), like a driver closing a device."""

    def __init__(self) -> None:
        super().__init__(windows_hz=200.0)
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()

    async def stream(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        try:
            async for item in super().stream():
                yield item
        except asyncio.CancelledError:
            self.stopping.set()
            await self.release.wait()
            raise


def test_cancelling_run_while_the_pipeline_tasks_stop_ends_run(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async def main() -> None:
        src = StubbornSource()
        async with Harness(cfg, src) as h:
            assert h.task is not None
            await h.until(lambda: len(h.results) >= 10, what="the pipeline serving")
            # a structural change ends _serve's wait; it then cancels and awaits the feed task...
            h.live.replace(dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference,
                                                                                  num_threads=2)))
            await asyncio.wait_for(src.stopping.wait(), 10)
            h.task.cancel()  # ...when the shutdown's cancellation arrives
            src.release.set()
            done, _ = await asyncio.wait({h.task}, timeout=10)
            assert h.task in done and h.task.cancelled(), "run() swallowed the cancellation"

    asyncio.run(main())
