"""Carries out what `swap_fsm` decides: stores, validates, hot-swaps and commits or rolls back models.

This is the inference side of a model update (the updates component's `ModelInstaller`): a candidate
is copied into the store, validated on its own interpreter in the worker's stead, swapped in between
two windows, kept on probation and only then written to active.json. The decisions are the state
machine's; here is only the I/O (threads, files, the runner, events) and the cancellation care that
keeps memory and disk in step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgeagent.core.errors import ModelLoadError, ModelMetaError, ModelRejected, ModelRolledBack
from edgeagent.core.fsutil import atomic_write_bytes
from edgeagent.core.live import LiveConfig, Outbox
from edgeagent.core.pipelines import PipelineSpec
from edgeagent.core.shadow_spec import ShadowOutcome, ShadowSpec
from edgeagent.core.tasks import cancel_and_wait, wait_event
from edgeagent.inference.heads import head_problem, make_slot
from edgeagent.inference.preprocess import ModelMeta, WindowSpec
from edgeagent.inference.runner import ModelSlot, Runner
from edgeagent.inference.runtime import LoadedModel
from edgeagent.inference.shadow import Promote
from edgeagent.inference.shadow_lane import ShadowLane
from edgeagent.inference.store import META_FILE, ActiveRecord, ModelStore, check_name
from edgeagent.inference.swap import LoadSettings, load_served, validate
from edgeagent.inference.swap_fsm import (
    Candidate,
    Commit,
    Decision,
    Defer,
    Load,
    NoModel,
    Outcome,
    Phase,
    Reject,
    Rollback,
    RollbackActive,
    SwapMachine,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

RECENT_WINDOWS = 16  # real windows kept to validate a candidate on
ROLLBACK_STREAK = 3  # consecutive failing results of an active (post-probation) model -> roll back
READY_TIMEOUT_S = 30.0  # an install waits this long for the pipeline to be serving
SHADOW_REPORT_S = 1.0  # shadow figures reported this often
SHADOW_MIN_TIMEOUT_S = 60.0
SHADOW_TIMEOUT_FACTOR = 20.0  # a shadow run may take this many times its windows' nominal duration


class Serving:
    """What the pipeline serves now: built by the component, swapped by the installer."""

    def __init__(self) -> None:
        self.store: ModelStore | None = None
        self.runner: Runner | None = None
        self.active: ActiveRecord | None = None
        self.metas: dict[str, ModelMeta] = {}  # tag -> meta of the (at most two) live models
        self.window = WindowSpec()
        self.recent: deque[Any] = deque(maxlen=RECENT_WINDOWS)
        self.ready = asyncio.Event()  # a runner serves the active model

    def require_store(self) -> ModelStore:
        assert self.store is not None, "use the component as an async context manager"
        return self.store


class Installer:
    """Performs swap decisions; one install (or automatic rollback) at a time."""

    def __init__(self, live: LiveConfig, outbox: Outbox, serving: Serving,
                 spec: Callable[[], PipelineSpec]) -> None:
        """`spec`: the pipeline's current settings (its model, head and interpreter threads)."""
        self.live = live
        self.outbox = outbox
        self.s = serving
        self.spec = spec
        self.fsm = SwapMachine(ROLLBACK_STREAK)
        self._lock = asyncio.Lock()
        self._outcome: asyncio.Future[Commit | Rollback] | None = None
        self._rollback_wanted = asyncio.Event()
        self._rollback_reason = ""
        self.lane: ShadowLane | None = None  # the candidate being shadowed, if any

    def settings(self) -> LoadSettings:
        i = self.live.config.inference
        return LoadSettings(i.runtime, self.spec().num_threads, i.delegate)

    # ------------------------------------------------------------------ decisions from the loop
    def opened(self, rec: ActiveRecord) -> None:
        """A new runner serves `rec` (start or rebuild)."""
        self._perform(self.fsm.opened(Candidate(rec.name, rec.version)))

    def observe(self, r: Outcome) -> None:
        """Every served window's result, on the event loop."""
        self._perform(self.fsm.served(r))

    def _perform(self, decisions: tuple[Decision, ...]) -> None:
        for d in decisions:
            if isinstance(d, (Commit, Rollback)):
                if self._outcome is not None and not self._outcome.done():
                    self._outcome.set_result(d)  # the waiting install carries it out
            elif isinstance(d, RollbackActive):
                self._rollback_reason = d.reason
                self._rollback_wanted.set()

    # ------------------------------------------------------------------ start
    async def load_active(self, rec: ActiveRecord,
                          window: WindowSpec) -> tuple[ActiveRecord, LoadedModel, ModelMeta]:
        """The active version, or (with an event) the newest previous one that loads."""
        settings, store = self.settings(), self.s.require_store()
        failures: list[str] = []
        step: Load | NoModel = SwapMachine.start(rec.version)
        while isinstance(step, Load):
            try:
                model, meta = await asyncio.to_thread(load_served, store.version_dir(rec.name, step.version),
                                                      rec.name, step.version, settings, window)
            except (ModelLoadError, ModelMetaError) as exc:
                failures.append(f"{step.version}: {exc.reason}")
                step = SwapMachine.load_failed(rec.version, rec.previous, failures)
                continue
            serve = SwapMachine.loaded(rec.version, step.version, failures)
            if serve.rolled_back_from is not None:
                new = await asyncio.to_thread(store.rollback, rec.name, serve.rolled_back_from)
                rec = new or ActiveRecord(rec.name, serve.version, ())
                self.outbox.emit_event("update", "warning", f"model {rec.name}@{failures[0]}; rolled back to "
                                       f"{rec.tag}", {"model": rec.tag, "failures": failures})
            return rec, model, meta
        raise ModelLoadError(str(store.model_dir(rec.name)), step.reason)

    # ------------------------------------------------------------------ ModelInstaller
    async def install(self, staged: Path, name: str, version: str, job: str) -> None:
        async with self._lock:
            await self._install(staged, name, version, job)

    async def _install(self, staged: Path, name: str, version: str, job: str) -> None:
        await self._ready_for(name, version)
        cfg = self.live.config
        spec = self.spec()
        active, runner = self.s.active, self.s.runner
        assert active is not None and runner is not None
        begun = self.fsm.begin(Candidate(name, version))
        if isinstance(begun, (Reject, Defer)):  # Defer cannot happen under the install lock
            raise ModelRejected(begun.reason)
        store = self.s.require_store()
        try:
            vdir = await _in_thread(store.add, name, version, staged)
        except (OSError, ValueError) as exc:
            raise ModelRejected(self.fsm.validation_failed(f"cannot store the model: {exc}").reason) from exc
        except BaseException:
            self.fsm.cancel()  # the copy has finished (_in_thread): whatever it made goes
            await asyncio.to_thread(store.remove, name, version)
            raise
        try:
            current = self.s.metas.get(active.tag)
            checked = await _in_thread(
                validate, vdir, name, version, settings=self.settings(), window=self.s.window,
                current=current, recent=list(self.s.recent),
                latency_budget_ms=cfg.inference.latency_budget_ms)
            problem = head_problem(spec.head, checked.meta)
            if problem is not None:
                raise ModelRejected(f"{name}@{version}: {problem}")
            if not checked.declared:  # keep how it is read next to it, for restarts
                src = store.version_dir(name, active.version) / META_FILE
                if src.is_file():
                    await _in_thread(lambda: atomic_write_bytes(vdir / META_FILE, src.read_bytes()))
        except ModelRejected as exc:
            self.fsm.validation_failed(exc.reason)
            await asyncio.to_thread(store.remove, name, version)
            log.warning("model rejected: %s", exc.reason, extra={"kv": {"job": job}})
            raise
        except BaseException:
            self.fsm.cancel()  # decided first: a second cancellation during the cleanup changes nothing
            await asyncio.to_thread(store.remove, name, version)
            raise
        slot = make_slot(checked.model, f"{name}@{version}", checked.meta)
        await self._swap_with_probation(runner, slot, checked.meta, active, job, checked.report)

    async def _ready_for(self, name: str, version: str) -> None:
        """ModelRejected unless this pipeline serves model `name` and could take `version` now."""
        cfg = self.live.config
        if not cfg.inference.enabled:
            raise ModelRejected("inference is disabled on this device (inference.enabled = false)")
        spec = self.spec()
        if name != spec.model:
            where = "this device" if spec.legacy else f"pipeline {spec.name!r}"
            raise ModelRejected(f"{where} serves model {spec.model!r}, not {name!r}")
        try:
            check_name("version", version)
        except ValueError as exc:
            raise ModelRejected(str(exc)) from exc
        if not await _wait_set(self.s.ready, READY_TIMEOUT_S):
            raise ModelRejected(f"the inference pipeline is not serving (no model running for "
                                f"{READY_TIMEOUT_S:g} s); cannot validate a new model")

    # ------------------------------------------------------------------ shadow evaluation
    async def shadow(self, staged: Path, name: str, version: str, job: str, spec: ShadowSpec,
                     report: Callable[[dict[str, Any]], None]) -> ShadowOutcome:
        """Run the candidate beside the serving model on `spec.windows` live windows (the runner's
        lane: lower priority, shed first) and judge it; nothing is stored or swapped here. `report`
        gets the figures about once a second. ModelRejected if the candidate does not validate."""
        async with self._lock:
            await self._ready_for(name, version)
            active, runner = self.s.active, self.s.runner
            assert active is not None and runner is not None
            if active.version == version:
                raise ModelRejected(f"{active.tag} is already the active model")
            current = self.s.metas[active.tag]
            cfg = self.live.config.inference
            checked = await _in_thread(validate, staged, name, version, settings=self.settings(),
                                       window=self.s.window, current=current, recent=list(self.s.recent),
                                       latency_budget_ms=cfg.latency_budget_ms)
            if checked.meta.output != current.output:
                raise ModelRejected(f"{name}@{version}: head {checked.meta.output!r} cannot be compared "
                                    f"with the serving model's {current.output!r}")
            loop = asyncio.get_running_loop()
            done = asyncio.Event()

            def on_done() -> None:  # worker thread
                with contextlib.suppress(RuntimeError):  # loop closed at exit
                    loop.call_soon_threadsafe(done.set)

            lane = ShadowLane(make_slot(checked.model, f"{name}@{version}", checked.meta),
                              current, checked.meta, spec, on_done=on_done)
            window_hz = max(0.1, self.s.window.rate_hz / self.s.window.stride
                            / max(1.0, self.live.factor("inference")))
            timeout_s = max(SHADOW_MIN_TIMEOUT_S, SHADOW_TIMEOUT_FACTOR * spec.windows / window_hz)
            started = loop.time()
            self.lane = lane
            fed = runner
            fed.attach_lane(lane)
            log.info("shadowing %s beside %s", lane.tag, active.tag,
                     extra={"kv": {"job": job, **spec.as_dict()}})
            try:
                while True:
                    if self.s.runner is not None and self.s.runner is not fed:  # the pipeline was rebuilt
                        fed.attach_lane(None)
                        fed = self.s.runner
                        fed.attach_lane(lane)
                    lane.paused = self.live.factor("inference") > 1.0  # power save: shadow goes first
                    verdict = lane.verdict()
                    elapsed = loop.time() - started
                    if verdict is None and elapsed >= timeout_s:
                        verdict = lane.timed_out(elapsed)
                    if verdict is not None:
                        break
                    report(lane.figures())
                    await wait_event(done, min(SHADOW_REPORT_S, timeout_s - elapsed))
            finally:
                fed.attach_lane(None)
                self.lane = None
            figures = lane.figures()
            report(figures)
            if isinstance(verdict, Promote):
                reason = (f"shadow passed over {figures['compared']} windows: agreement "
                          f"{figures['agreement']}, p99 ratio {figures['p99_ratio']}")
                return ShadowOutcome(True, reason, figures)
            log.warning("shadow rejected %s: %s", lane.tag, verdict.reason, extra={"kv": {"job": job}})
            return ShadowOutcome(False, verdict.reason, figures)

    async def _swap_with_probation(self, runner: Runner, slot: ModelSlot, meta: ModelMeta,
                                   previous: ActiveRecord, job: str, report: dict[str, Any]) -> None:
        cfg = self.live.config.inference
        loop = asyncio.get_running_loop()
        name, version = meta.name, meta.version
        store = self.s.require_store()
        self.s.metas[slot.tag] = meta
        # probation counts before the swap: the new model's first results may reach the loop before
        # this coroutine resumes
        self.fsm.validated(cfg.probation_windows)
        outcome: asyncio.Future[Commit | Rollback] = loop.create_future()
        self._outcome = outcome
        swapped = runner.swap(slot)
        try:
            old = await asyncio.wrap_future(swapped)
        except asyncio.CancelledError:
            # the swap may already be running in the worker (then it cannot be cancelled): undo it
            # as soon as it lands, so a cancelled install never leaves an unproven model serving
            def undo(f: concurrent.futures.Future[ModelSlot]) -> None:
                if not f.cancelled() and f.exception() is None:
                    runner.swap(f.result())

            swapped.add_done_callback(undo)
            self._outcome = None
            self.fsm.cancel()
            await asyncio.to_thread(store.remove, name, version)  # a served interpreter keeps its mmap
            raise
        except RuntimeError as exc:  # the runner stopped: the pipeline was rebuilt meanwhile
            self._outcome = None
            rejected = self.fsm.swap_failed(f"{slot.tag}: the pipeline restarted during the install ({exc})")
            await asyncio.to_thread(store.remove, name, version)
            raise ModelRejected(rejected.reason) from exc
        step = max(1.0, self.live.factor("inference"))
        window_hz = max(0.1, self.s.window.rate_hz / self.s.window.stride / step)
        self._perform(self.fsm.swapped(loop.time(), max(30.0, 5.0 * cfg.probation_windows / window_hz)))
        try:
            decision = await self._probation_outcome(outcome)
            if isinstance(decision, Commit):
                await self._commit(store, decision, previous, job, report)
                return
        except BaseException:
            if self.fsm.active != Candidate(name, version):  # not committed: undo it all
                self._swap_back(runner, old)
                await asyncio.to_thread(store.remove, name, version)
            raise
        finally:
            self._outcome = None
        self._swap_back(runner, old)
        reason = decision.reason
        await asyncio.to_thread(store.remove, name, version)
        self.s.metas.pop(slot.tag, None)
        self.outbox.emit_event("update", "warning",
                               f"model {slot.tag} rolled back to {previous.tag}: {reason}",
                               {"model": slot.tag, "restored": previous.tag, "job": job, "reason": reason})
        raise ModelRolledBack(f"{slot.tag}: {reason}; {previous.tag} is active again")

    def _swap_back(self, runner: Runner, old: ModelSlot) -> None:
        """At once, also on cancellation: the old model never stopped being the active one."""
        runner.swap(old)
        if self.fsm.phase is Phase.COMMITTING:  # writing active.json failed
            self.fsm.commit_failed("active.json was not written")
        else:
            self.fsm.cancel()  # a no-op once decided

    async def _commit(self, store: ModelStore, commit: Commit, previous: ActiveRecord, job: str,
                      report: dict[str, Any]) -> None:
        c, tag = commit.candidate, commit.candidate.tag
        activation = asyncio.ensure_future(asyncio.to_thread(store.activate, c.name, c.version))
        try:
            rec = await asyncio.shield(activation)
        except asyncio.CancelledError:
            # active.json is being written anyway: keep memory in step with disk, then stop
            self.s.active = await activation
            self.fsm.committed()
            raise
        self.s.active = rec
        self.fsm.committed()
        self.s.metas.pop(previous.tag, None)
        self.outbox.emit_event("update", "info", f"model {tag} active (was {previous.tag})",
                               {"model": tag, "previous": previous.tag, "job": job,
                                "probation_windows": commit.served, **report})

    async def _probation_outcome(self, outcome: asyncio.Future[Commit | Rollback]) -> Commit | Rollback:
        """Wait for the machine's verdict; at the deadline tell it the time (it then rolls back)."""
        loop = asyncio.get_running_loop()
        while not outcome.done():
            deadline = self.fsm.deadline
            left = None if deadline is None else max(0.0, deadline - loop.time())
            # asyncio.wait, not wait_for: on 3.10/3.11 wait_for swallows our cancellation when the
            # outcome lands at the same moment, and the install would commit after being cancelled
            await asyncio.wait((outcome,), timeout=left)
            if not outcome.done():
                self._perform(self.fsm.tick(loop.time()))
        return outcome.result()

    # ------------------------------------------------------------------ after probation
    async def rollback_loop(self) -> None:
        """Roll back an active model that starts failing after its probation."""
        while True:
            await self._rollback_wanted.wait()
            self._rollback_wanted.clear()
            async with self._lock:
                await self._rollback_failed(self._rollback_reason)

    async def _rollback_failed(self, reason: str) -> None:
        active, runner = self.s.active, self.s.runner
        if active is None or runner is None:
            return
        store = self.s.require_store()
        target = next((v for v in active.previous if store.model_path(active.name, v).is_file()), None)
        if target is None:
            self.outbox.emit_event("error", "critical", f"model {active.tag} is failing and there is no "
                                   f"previous version to roll back to: {reason}",
                                   {"model": active.tag, "reason": reason})
            return
        try:
            model, meta = await asyncio.to_thread(load_served, store.version_dir(active.name, target),
                                                  active.name, target, self.settings(), self.s.window)
        except (ModelLoadError, ModelMetaError) as exc:
            self.outbox.emit_event("error", "critical", f"model {active.tag} is failing and "
                                   f"{active.name}@{target} does not load: {exc}",
                                   {"model": active.tag, "reason": reason})
            return
        tag = f"{active.name}@{target}"
        self.s.metas[tag] = meta
        await asyncio.wrap_future(runner.swap(make_slot(model, tag, meta)))
        rec = await asyncio.to_thread(store.rollback, active.name, active.version)
        self.s.active = rec or ActiveRecord(active.name, target, ())
        self.s.metas.pop(active.tag, None)
        self.fsm.restored(Candidate(self.s.active.name, self.s.active.version))
        self.outbox.emit_event("update", "warning", f"model {active.tag} failed after activation; rolled "
                               f"back to {tag}: {reason}", {"model": active.tag, "restored": tag,
                                                              "reason": reason})


async def _wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """`event` set within `timeout_s`. Unlike wait_for on 3.10/3.11, a cancellation of the caller is
    never swallowed when the event is set at the same moment."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout_s)
    finally:
        await cancel_and_wait(waiter)
    return event.is_set()


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """asyncio.to_thread whose cancellation first lets the thread finish: the cleanup that follows
    (deleting the candidate's directory) must not race a thread still writing into it."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait((job,))  # its outcome is moot now; a second cancellation stops this wait
        if not job.cancelled():
            job.exception()  # retrieved: the cancellation is what is reported
        raise
