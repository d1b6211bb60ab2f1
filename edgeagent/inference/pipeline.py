"""The inference component: sensor source -> windows -> runner (worker thread) -> scores -> anomaly events.

It also implements the hub's `ModelInstaller`: a model update is copied into the store, validated in
the background, hot-swapped between two windows, kept on probation for `inference.probation_windows`
real windows and only then recorded as active; a model that fails later is rolled back automatically.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeagent.core.config import Config
from edgeagent.core.errors import (
    ModelLoadError,
    ModelMetaError,
    ModelRejected,
    ModelRolledBack,
    RuntimeUnavailable,
)
from edgeagent.core.fsutil import atomic_write_bytes
from edgeagent.core.hub import Hub
from edgeagent.core.logs import Once
from edgeagent.inference.preprocess import ModelMeta, WindowSpec
from edgeagent.inference.runner import ModelSlot, Result, Runner, RunnerStats
from edgeagent.inference.runtime import LoadedModel
from edgeagent.inference.store import META_FILE, ActiveRecord, ModelStore, check_name
from edgeagent.inference.swap import FailureWatch, LoadSettings, Probation, load_served, validate
from edgeagent.sensors.sources import SensorSource, Windower, make_source

log = logging.getLogger(__name__)
once = Once(log)

RECENT_WINDOWS = 16  # real windows kept to validate a candidate on
ROLLBACK_STREAK = 3  # consecutive failing results of an active (post-probation) model -> roll back
READY_TIMEOUT_S = 30.0  # an install waits this long for the pipeline to be serving
RATE_BUCKETS_S = 60  # anomaly_rate_1m: per-second buckets over the last minute


@dataclass(frozen=True, slots=True)
class Scored:
    """One served window as listeners (rules, tests) see it."""

    seq: int
    ts: float
    model: str
    score: float | None  # None when the model failed on this window
    label: str | None
    anomaly: bool  # the hysteresis state after this window
    result: Result


class AnomalyState:
    """Threshold with hysteresis: raise at score >= threshold, clear after `clear_windows` windows in a
    row with score < clear_threshold."""

    def __init__(self) -> None:
        self.active = False
        self._quiet = 0
        self._buckets: deque[list[int]] = deque()  # [second, windows, above threshold]

    def update(self, score: float, threshold: float, clear: float, now: float,
               clear_windows: int = 1) -> str | None:
        """"raise", "clear" or None (no edge)."""
        sec = int(now)
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append([sec, 0, 0])
            while self._buckets and self._buckets[0][0] <= sec - RATE_BUCKETS_S:
                self._buckets.popleft()
        self._buckets[-1][1] += 1
        self._buckets[-1][2] += score >= threshold
        if not self.active:
            if score >= threshold:
                self.active, self._quiet = True, 0
                return "raise"
            return None
        self._quiet = self._quiet + 1 if score < clear else 0
        if self._quiet >= clear_windows:
            self.active = False
            return "clear"
        return None

    def rate_1m(self, now: float) -> float | None:
        recent = [b for b in self._buckets if b[0] > int(now) - RATE_BUCKETS_S]
        n = sum(b[1] for b in recent)
        return round(sum(b[2] for b in recent) / n, 4) if n else None


def thresholds(cfg: Config, meta: ModelMeta) -> tuple[float, float]:
    """(threshold, clear_threshold): config overrides the model's; clear never above threshold."""
    i = cfg.inference
    thr = i.threshold if i.threshold is not None else meta.threshold
    clear = i.clear_threshold if i.clear_threshold is not None else meta.clear_threshold
    return thr, min(clear, thr)


def _structure(cfg: Config) -> tuple[Any, ...]:
    """The settings that need the pipeline rebuilt (everything else applies live)."""
    i = cfg.inference
    return (i.enabled, i.runtime, i.model, i.model_variant, i.num_threads, i.delegate, i.queue_max,
            i.cache_size, cfg.sensors, cfg.device.state_dir)


class InferenceComponent:
    name = "inference"

    def __init__(self, hub: Hub, source: SensorSource | None = None) -> None:
        self.hub = hub
        self._source_override = source
        self._store: ModelStore | None = None
        self._runner: Runner | None = None
        self._active: ActiveRecord | None = None
        self._metas: dict[str, ModelMeta] = {}  # tag -> meta of the (at most two) live models
        self._window = WindowSpec()
        self._recent: deque[Any] = deque(maxlen=RECENT_WINDOWS)
        self._listeners: list[Callable[[Scored], None]] = []
        self._state = AnomalyState()
        self._watch = FailureWatch(ROLLBACK_STREAK)
        self._probation: Probation | None = None
        self._probation_done: asyncio.Future[None] | None = None
        self._install_lock = asyncio.Lock()
        self._rollback_wanted = asyncio.Event()
        self._serving = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_score: float | None = None
        self._skipped = 0
        self._windows = 0
        self._base: dict[str, int] = {"count": 0, "dropped": 0, "errors": 0}  # of closed runners
        self._closed: RunnerStats | None = None  # the last closed runner's figures (latencies)
        self._problem: str | None = None  # why nothing is served (no runtime), for health.json

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> InferenceComponent:
        self._loop = asyncio.get_running_loop()
        cfg = self.hub.config
        self._store = ModelStore(cfg.state_dir / "models", cfg.inference.keep_versions)
        self.hub.model_installer = self
        self.hub.providers["inference"] = self.section
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close_pipeline()
        self.hub.providers.pop("inference", None)
        if self.hub.model_installer is self:
            self.hub.model_installer = None

    def add_listener(self, listener: Callable[[Scored], None]) -> None:
        """Called on the event loop for every served window (must not block)."""
        self._listeners.append(listener)

    @property
    def store(self) -> ModelStore:
        assert self._store is not None, "use the component as an async context manager"
        return self._store

    @property
    def runner(self) -> Runner | None:
        return self._runner

    @property
    def windows(self) -> int:
        """Windows cut from the source so far (served, skipped for power save, or dropped)."""
        return self._windows

    @property
    def window_spec(self) -> WindowSpec:
        return self._window

    async def run(self) -> None:
        while True:
            cfg = self.hub.config
            if not cfg.inference.enabled:
                await self._wait_structure_change(_structure(cfg))
                continue
            source = self._source_override or make_source(cfg.sensors)
            try:
                await self._open_pipeline(cfg, source)
            except RuntimeUnavailable as exc:
                # not the model's fault and no restart will fix it: say so once, wait for new settings
                self._problem = str(exc)
                self.hub.emit_event("error", "critical", f"inference cannot run: {exc}",
                                    {"runtime": exc.runtime, "reason": exc.reason})
                await self._wait_structure_change(_structure(cfg))
                continue
            self._problem = None
            try:
                ended = await self._serve(cfg, source)
            finally:
                await self._close_pipeline()
            if ended:
                return

    async def _wait_structure_change(self, key: tuple[Any, ...]) -> None:
        while _structure(self.hub.config) == key:
            await self.hub.changed.wait()

    async def _serve(self, cfg: Config, source: SensorSource) -> bool:
        """Feed windows until the source ends (True) or a structural setting changes (False)."""
        feed = asyncio.create_task(self._feed(source), name="inference:feed")
        watch = asyncio.create_task(self._wait_structure_change(_structure(cfg)), name="inference:config")
        rollback = asyncio.create_task(self._rollback_loop(), name="inference:rollback")
        tasks = (feed, watch, rollback)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
        if feed in done:
            runner = self._runner
            if runner is not None:  # serve what is queued before reporting the end
                await asyncio.to_thread(runner.wait_idle, 10.0)
            log.info("sensor source ended", extra={"kv": {"windows": self._windows}})
            return True
        log.info("inference settings changed: rebuilding the pipeline")
        return False

    async def _feed(self, source: SensorSource) -> None:
        runner = self._runner
        assert runner is not None
        windower = Windower(self._window.size, self._window.stride, source.channels,
                            rate_hz=source.rate_hz)
        async for ts, samples in source.stream():
            step = max(1, round(self.hub.factor("inference")))
            for w in windower.push(ts, samples):
                seq = self._windows  # counts on across pipeline rebuilds (config changes)
                self._windows += 1
                self._recent.append(w.data)
                if step > 1 and seq % step:
                    self._skipped += 1  # power save: deliberately fewer windows, seq keeps counting
                    continue
                runner.submit(seq, w.ts, w.data)

    async def _open_pipeline(self, cfg: Config, source: SensorSource) -> None:
        name = cfg.inference.model
        self._store = store = ModelStore(cfg.state_dir / "models", cfg.inference.keep_versions)
        rec = await asyncio.to_thread(store.seed, name, cfg.inference.model_variant)
        if rec is None:
            raise ModelLoadError(str(store.model_dir(name)), f"no model {name!r} in the store and none "
                                 "shipped under that name (install one with a model update)")
        await asyncio.to_thread(store.prune, name)  # candidates and staging dirs left by a crash
        window = WindowSpec(cfg.sensors.window.size, cfg.sensors.window.stride, source.channels,
                            source.rate_hz)
        rec, model, meta = await self._load_active(rec, window)
        if meta.window.size != window.size:
            once.warning("window-size", "model %s wants windows of %d samples; using that instead of "
                         "sensors.window.size = %d", rec.tag, meta.window.size, window.size)
        if meta.window.channels != source.channels:
            raise ModelLoadError(str(model.path), f"model wants {meta.window.channels} channels, the "
                                 f"sensor source gives {source.channels}")
        if abs(meta.window.rate_hz - source.rate_hz) > 0.01 * meta.window.rate_hz:
            once.warning("rate", "model %s was trained at %g Hz; the source runs at %g Hz", rec.tag,
                         meta.window.rate_hz, source.rate_hz)
        self._window = dataclasses.replace(window, size=meta.window.size)
        self._active = rec
        self._metas = {rec.tag: meta}
        self._watch = FailureWatch(ROLLBACK_STREAK)
        runner = Runner(ModelSlot(model, rec.tag, meta.preprocessor()), self._deliver,
                        queue_max=cfg.inference.queue_max, cache_size=cfg.inference.cache_size)
        runner.start()
        self._runner = runner
        self._serving.set()
        log.info("inference serving", extra={"kv": {"model": rec.tag, "runtime": model.runtime,
                                                    "io": model.describe()}})

    async def _load_active(self, rec: ActiveRecord,
                           window: WindowSpec) -> tuple[ActiveRecord, LoadedModel, ModelMeta]:
        """The active version, or (with an event) the newest previous one that loads."""
        settings = self._settings()
        store = self.store
        failures: list[str] = []
        for version in (rec.version, *rec.previous):
            try:
                model, meta = await asyncio.to_thread(load_served, store.version_dir(rec.name, version),
                                                      rec.name, version, settings, window)
            except (ModelLoadError, ModelMetaError) as exc:
                failures.append(f"{version}: {exc.reason}")
                continue
            if version != rec.version:
                new = await asyncio.to_thread(store.rollback, rec.name, rec.version)
                rec = new or ActiveRecord(rec.name, version, ())
                self.hub.emit_event("update", "warning", f"model {rec.name}@{failures[0]}; rolled back to "
                                    f"{rec.tag}", {"model": rec.tag, "failures": failures})
            return rec, model, meta
        raise ModelLoadError(str(store.model_dir(rec.name)),
                             "no stored version loads: " + "; ".join(failures))

    async def _close_pipeline(self) -> None:
        self._serving.clear()
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await asyncio.to_thread(runner.stop, True, 2.0)
        st = runner.stats()
        self._base["count"] += st.count
        self._base["dropped"] += st.dropped
        self._base["errors"] += st.errors
        self._closed = st

    def _settings(self) -> LoadSettings:
        i = self.hub.config.inference
        return LoadSettings(i.runtime, i.num_threads, i.delegate)

    # ------------------------------------------------------------------ results
    def _deliver(self, r: Result) -> None:
        """Worker thread -> event loop."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed at exit: nobody is listening any more
            loop.call_soon_threadsafe(self._on_result, r)

    def _on_result(self, r: Result) -> None:
        p = self._probation
        if p is not None and p.observe(r):
            if self._probation_done is not None and not self._probation_done.done():
                self._probation_done.set_result(None)
        elif p is None and self._active is not None and r.tag == self._active.tag \
                and self._watch.observe(r):
            self._rollback_wanted.set()
        meta = self._metas.get(r.tag)
        score = label = None
        if r.ok and meta is not None and r.output is not None:
            score = meta.score(r.output)
            label = meta.label_of(r.output)
        if score is not None and math.isfinite(score) and meta is not None:
            self._last_score = score
            thr, clear = thresholds(self.hub.config, meta)
            edge = self._state.update(score, thr, clear, time.time(), self.hub.config.inference.clear_windows)
            if edge == "raise":
                self.hub.emit_event("anomaly", "warning", f"anomaly: {label} (score {score:.2f})",
                                    {"model": r.tag, "score": round(score, 4), "label": label, "seq": r.seq,
                                     "ts": r.ts, "threshold": thr})
            elif edge == "clear":
                self.hub.emit_event("anomaly", "info", f"anomaly cleared (score {score:.2f})",
                                    {"model": r.tag, "score": round(score, 4), "label": label, "seq": r.seq,
                                     "ts": r.ts, "clear_threshold": clear})
        elif r.error is not None:
            once.warning(f"invoke:{r.tag}", "model %s failed on window %d: %s", r.tag, r.seq, r.error)
        scored = Scored(r.seq, r.ts, r.tag, score, label, self._state.active, r)
        for listener in list(self._listeners):
            try:
                listener(scored)
            except Exception:
                log.exception("inference listener failed")

    def section(self) -> dict[str, Any]:
        """The `inference` section of telemetry and health.json."""
        if not self.hub.config.inference.enabled:
            return {"enabled": False}
        runner = self._runner
        out: dict[str, Any] = {"model": self._active.tag if self._active else None}
        st = runner.stats() if runner is not None else None
        lat = st or self._closed
        out.update(count=self._base["count"] + (st.count if st else 0),
                   rate_hz=st.rate_hz if st else 0.0,
                   p50_ms=lat.p50_ms if lat else None, p95_ms=lat.p95_ms if lat else None,
                   p99_ms=lat.p99_ms if lat else None,
                   dropped=self._base["dropped"] + (st.dropped if st else 0),
                   last_score=None if self._last_score is None else round(self._last_score, 4),
                   anomaly=self._state.active, anomaly_rate_1m=self._state.rate_1m(time.time()),
                   errors=self._base["errors"] + (st.errors if st else 0), skipped=self._skipped)
        if self._problem:
            out["problem"] = self._problem
        if lat is not None and self.hub.config.inference.cache_size:
            rate = lat.cache_hit_rate
            out["cache_hit_rate"] = None if rate is None else round(rate, 4)
        return out

    # ------------------------------------------------------------------ ModelInstaller
    def installed_version(self, name: str) -> str | None:
        if self._active is not None and self._active.name == name:
            return self._active.version
        rec = self.store.active(name) if self._store is not None else None
        return rec.version if rec is not None else None

    async def install(self, staged_dir: Path, name: str, version: str, job: str) -> None:
        async with self._install_lock:
            await self._install(Path(staged_dir), name, version, job)

    async def _install(self, staged: Path, name: str, version: str, job: str) -> None:
        cfg = self.hub.config
        if not cfg.inference.enabled:
            raise ModelRejected("inference is disabled on this device (inference.enabled = false)")
        if name != cfg.inference.model:
            raise ModelRejected(f"this device serves model {cfg.inference.model!r}, not {name!r}")
        try:
            check_name("version", version)
        except ValueError as exc:
            raise ModelRejected(str(exc)) from exc
        try:
            await asyncio.wait_for(self._serving.wait(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ModelRejected(f"the inference pipeline is not serving (no model running for "
                                f"{READY_TIMEOUT_S:g} s); cannot validate a new model") from None
        active, runner = self._active, self._runner
        assert active is not None and runner is not None
        if version == active.version:
            raise ModelRejected(f"{name}@{version} is already the active model")
        store = self.store
        try:
            vdir = await asyncio.to_thread(store.add, name, version, staged)
        except (OSError, ValueError) as exc:
            raise ModelRejected(f"cannot store the model: {exc}") from exc
        current = self._metas.get(active.tag)
        try:
            checked = await asyncio.to_thread(
                validate, vdir, name, version, settings=self._settings(), window=self._window,
                current=current, recent=list(self._recent), latency_budget_ms=cfg.inference.latency_budget_ms)
        except ModelRejected as exc:
            await asyncio.to_thread(store.remove, name, version)
            log.warning("model rejected: %s", exc.reason, extra={"kv": {"job": job}})
            raise
        except BaseException:
            await asyncio.to_thread(store.remove, name, version)
            raise
        if not checked.declared:  # keep how it is read next to it, for restarts
            src = store.version_dir(name, active.version) / META_FILE
            if src.is_file():
                await asyncio.to_thread(lambda: atomic_write_bytes(vdir / META_FILE, src.read_bytes()))
        tag = f"{name}@{version}"
        await self._swap_with_probation(runner, ModelSlot(checked.model, tag, checked.meta.preprocessor()),
                                        checked.meta, active, job, checked.report)

    async def _swap_with_probation(self, runner: Runner, slot: ModelSlot, meta: ModelMeta,
                                   previous: ActiveRecord, job: str, report: dict[str, Any]) -> None:
        cfg = self.hub.config.inference
        loop = asyncio.get_running_loop()
        name, version = meta.name, meta.version
        self._metas[slot.tag] = meta
        probation = Probation(slot.tag, cfg.probation_windows)
        # probation watches before the swap: the new model's first results may reach the loop before
        # this coroutine resumes
        self._probation_done = loop.create_future()
        self._probation = probation
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
            raise
        except RuntimeError as exc:  # the runner stopped: the pipeline was rebuilt meanwhile
            self._probation = self._probation_done = None
            await asyncio.to_thread(self.store.remove, name, version)
            raise ModelRejected(f"{slot.tag}: the pipeline restarted during the install ({exc})") from exc
        committed = False
        step = max(1.0, self.hub.factor("inference"))
        window_hz = max(0.1, self._window.rate_hz / self._window.stride / step)
        timeout_s = max(30.0, 5.0 * cfg.probation_windows / window_hz)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(self._probation_done), timeout_s)
            except asyncio.TimeoutError:
                probation.failure = (f"probation timed out: {probation.served} of {probation.needed} windows "
                                     f"served in {timeout_s:.0f} s")
            if probation.failure is None:
                activation = asyncio.ensure_future(asyncio.to_thread(self.store.activate, name, version))
                try:
                    rec = await asyncio.shield(activation)
                except asyncio.CancelledError:
                    # active.json is being written anyway: keep memory in step with disk, then stop
                    self._active = await activation
                    committed = True
                    raise
                committed = True
                self._active = rec
                self._watch = FailureWatch(ROLLBACK_STREAK)
                self._metas.pop(previous.tag, None)
                self.hub.emit_event("update", "info", f"model {slot.tag} active (was {previous.tag})",
                                    {"model": slot.tag, "previous": previous.tag, "job": job,
                                     "probation_windows": probation.served, **report})
                return
        finally:
            self._probation = None
            self._probation_done = None
            if not committed:
                # swap back at once, also on cancellation: the old model never stopped being active
                runner.swap(old)
        reason = probation.failure or "probation failed"
        await asyncio.to_thread(self.store.remove, name, version)
        self._metas.pop(slot.tag, None)
        self.hub.emit_event("update", "warning", f"model {slot.tag} rolled back to {previous.tag}: {reason}",
                            {"model": slot.tag, "restored": previous.tag, "job": job, "reason": reason})
        raise ModelRolledBack(f"{slot.tag}: {reason}; {previous.tag} is active again")

    async def _rollback_loop(self) -> None:
        """Roll back an active model that starts failing after its probation."""
        while True:
            await self._rollback_wanted.wait()
            self._rollback_wanted.clear()
            async with self._install_lock:
                await self._rollback_failed()

    async def _rollback_failed(self) -> None:
        active, runner = self._active, self._runner
        if active is None or runner is None:
            return
        reason = f"{ROLLBACK_STREAK} failing windows in a row (last: {self._watch.last_error})"
        store = self.store
        target = next((v for v in active.previous if store.model_path(active.name, v).is_file()), None)
        if target is None:
            self.hub.emit_event("error", "critical", f"model {active.tag} is failing and there is no "
                                f"previous version to roll back to: {reason}",
                                {"model": active.tag, "reason": reason})
            return
        try:
            model, meta = await asyncio.to_thread(load_served, store.version_dir(active.name, target),
                                                  active.name, target, self._settings(), self._window)
        except (ModelLoadError, ModelMetaError) as exc:
            self.hub.emit_event("error", "critical", f"model {active.tag} is failing and "
                                f"{active.name}@{target} does not load: {exc}",
                                {"model": active.tag, "reason": reason})
            return
        tag = f"{active.name}@{target}"
        self._metas[tag] = meta
        await asyncio.wrap_future(runner.swap(ModelSlot(model, tag, meta.preprocessor())))
        rec = await asyncio.to_thread(store.rollback, active.name, active.version)
        self._active = rec or ActiveRecord(active.name, target, ())
        self._metas.pop(active.tag, None)
        self._watch = FailureWatch(ROLLBACK_STREAK)
        self.hub.emit_event("update", "warning", f"model {active.tag} failed after activation; rolled back "
                            f"to {tag}: {reason}", {"model": active.tag, "restored": tag, "reason": reason})

