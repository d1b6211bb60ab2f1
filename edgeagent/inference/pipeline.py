"""One pipeline: its sensor source -> windows -> runner (worker thread) -> head -> scores -> events.

Each pipeline owns its model store directory, its runner and its installer, so its model is updated,
hot-swapped and rolled back on its own (`component.InferenceComponent` runs them all and routes model
updates to the pipeline a manifest names); the swap itself is decided in `swap_fsm` and carried out
by `installer`. "The serving model of pipeline P" is `component.pipeline(P).runner.slot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeagent.core.config import Config
from edgeagent.core.errors import ModelLoadError, RuntimeUnavailable
from edgeagent.core.live import LiveConfig, Outbox
from edgeagent.core.logs import Once
from edgeagent.core.pipelines import PipelineSpec, resolve
from edgeagent.core.shadow_spec import ShadowOutcome, ShadowSpec
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.inference.heads import (
    Calibrated,
    Calibration,
    calibration_path,
    head_problem,
    load_calibration,
    make_slot,
    save_calibration,
)
from edgeagent.inference.installer import Installer, Serving
from edgeagent.inference.preprocess import ModelMeta, WindowSpec
from edgeagent.inference.runner import Result, Runner, RunnerStats
from edgeagent.inference.scoring import AnomalyState as AnomalyState  # re-exported: tests, callers
from edgeagent.inference.scoring import Scored as Scored
from edgeagent.inference.scoring import pick_thresholds
from edgeagent.inference.scoring import thresholds as thresholds
from edgeagent.inference.store import ModelStore
from edgeagent.sensors.sources import SensorSource, Windower, make_source, source_status

log = logging.getLogger(__name__)
once = Once(log)

Listener = Callable[[Scored], None]


def spec_of(cfg: Config, name: str) -> PipelineSpec | None:
    return next((p for p in resolve(cfg) if p.name == name), None)


def _structure(cfg: Config, spec: PipelineSpec) -> tuple[Any, ...]:
    """The settings that need the pipeline rebuilt (thresholds and units apply live)."""
    i = cfg.inference
    live_keys = dataclasses.replace(spec, threshold=None, clear_threshold=None, unit="")
    return (i.enabled, i.runtime, i.delegate, i.queue_max, i.cache_size, cfg.device.state_dir, live_keys)


class Pipeline:
    """One pipeline, entered (its store opened) and run by `InferenceComponent`."""

    def __init__(self, live: LiveConfig, outbox: Outbox, name: str, source: SensorSource | None = None,
                 listeners: list[Listener] | None = None) -> None:
        """`source` replaces the one its config names (tests, benches); `listeners` is shared with the
        component (every pipeline's served windows reach the same listeners)."""
        self.live = live
        self.outbox = outbox
        self.name = name
        self._source_override = source
        self._spec_cache: tuple[Config, PipelineSpec] | None = None
        self._s = Serving()
        self._installer = Installer(live, outbox, self._s, lambda: self.spec)
        self._listeners: list[Listener] = listeners if listeners is not None else []
        self._state = AnomalyState()
        self._calibration: Calibration | None = None  # collecting a baseline
        self._calibrated: Calibrated | None = None  # the threshold it gave (for `.model`)
        self._to_save: asyncio.Queue[Calibrated] = asyncio.Queue(maxsize=4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_score: float | None = None
        self._skipped = 0
        self._windows = 0
        self._base: dict[str, int] = {"count": 0, "dropped": 0, "errors": 0}  # of closed runners
        self._closed: RunnerStats | None = None  # the last closed runner's figures (latencies)
        self._problem: str | None = None  # why nothing is served (no runtime), for health.json
        self._source: SensorSource | None = None

    @property
    def spec(self) -> PipelineSpec:
        """This pipeline's settings in the live config (the last known ones if it was just removed)."""
        cfg = self.live.config
        cached = self._spec_cache
        if cached is None or cached[0] is not cfg:
            spec = spec_of(cfg, self.name) or (cached[1] if cached is not None else None)
            if spec is None:
                raise KeyError(f"no pipeline {self.name!r} in the config")
            self._spec_cache = cached = (cfg, spec)
        return cached[1]

    def _store(self, cfg: Config) -> ModelStore:
        sub = self.spec.store_subdir
        root = cfg.state_dir / "models"
        return ModelStore(root / sub if sub else root, cfg.inference.keep_versions)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Pipeline:
        self._loop = asyncio.get_running_loop()
        self._s.store = self._store(self.live.config)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close_pipeline()

    def add_listener(self, listener: Listener) -> None:
        """Called on the event loop for every served window (must not block)."""
        self._listeners.append(listener)

    @property
    def store(self) -> ModelStore:
        return self._s.require_store()

    @property
    def runner(self) -> Runner | None:
        return self._s.runner

    @property
    def windows(self) -> int:
        """Windows cut from the source so far (served, skipped for power save, or dropped)."""
        return self._windows

    @property
    def window_spec(self) -> WindowSpec:
        return self._s.window

    async def run(self) -> None:
        while True:
            cfg = self.live.config
            if not cfg.inference.enabled:
                await self._wait_structure_change(_structure(cfg, self.spec))
                continue
            source = self._source_override or make_source(self.spec.sensors)
            self._source = source
            status = source_status(source)
            if status is not None:  # a bus source reports its device coming and going
                status.events = self.outbox.emit_event
            try:
                await self._open_pipeline(cfg, source)
            except RuntimeUnavailable as exc:
                # not the model's fault and no restart will fix it: say so once, wait for new settings
                self._problem = str(exc)
                self.outbox.emit_event("error", "critical", f"inference cannot run: {exc}",
                                       {"runtime": exc.runtime, "reason": exc.reason, "pipeline": self.name})
                await self._wait_structure_change(_structure(cfg, self.spec))
                continue
            self._problem = None
            try:
                ended = await self._serve(cfg, source)
            finally:
                await self._close_pipeline()
            if ended:
                return

    async def _wait_structure_change(self, key: tuple[Any, ...]) -> None:
        while _structure(self.live.config, self.spec) == key:
            await self.live.changed.wait()

    async def _serve(self, cfg: Config, source: SensorSource) -> bool:
        """Feed windows until the source ends (True) or a structural setting changes (False)."""
        feed = asyncio.create_task(self._feed(source), name=f"inference:{self.name}:feed")
        watch = asyncio.create_task(self._wait_structure_change(_structure(cfg, self.spec)),
                                    name=f"inference:{self.name}:config")
        rollback = asyncio.create_task(self._installer.rollback_loop(),
                                       name=f"inference:{self.name}:rollback")
        saver = asyncio.create_task(self._save_calibrations(), name=f"inference:{self.name}:calibration")
        tasks = (feed, watch, rollback, saver)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # never swallows our own cancellation (a shutdown arriving while the tasks stop)
            await cancel_and_wait(tasks)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
        if feed in done:
            runner = self._s.runner
            if runner is not None:  # serve what is queued before reporting the end
                await asyncio.to_thread(runner.wait_idle, 10.0)
            await self._flush_calibrations()  # one learnt while the queue drained is kept too
            log.info("sensor source ended", extra={"kv": {"pipeline": self.name, "windows": self._windows}})
            return True
        log.info("inference settings changed: rebuilding the pipeline")
        return False

    async def _feed(self, source: SensorSource) -> None:
        runner = self._s.runner
        assert runner is not None
        window = self._s.window
        windower = Windower(window.size, window.stride, source.channels, rate_hz=source.rate_hz)
        async for ts, samples in source.stream():
            step = max(1, round(self.live.factor("inference")))
            for w in windower.push(ts, samples):
                seq = self._windows  # counts on across pipeline rebuilds (config changes)
                self._windows += 1
                self._s.recent.append(w.data)
                if step > 1 and seq % step:
                    self._skipped += 1  # power save: deliberately fewer windows, seq keeps counting
                    continue
                runner.submit(seq, w.ts, w.data)

    async def _open_pipeline(self, cfg: Config, source: SensorSource) -> None:
        spec = self.spec
        name = spec.model
        self._s.store = store = self._store(cfg)
        rec = await asyncio.to_thread(store.seed, name, spec.model_variant)
        if rec is None:
            raise ModelLoadError(str(store.model_dir(name)), f"no model {name!r} in the store and none "
                                 "shipped under that name (install one with a model update)")
        await asyncio.to_thread(store.prune, name)  # candidates and staging dirs left by a crash
        window = WindowSpec(spec.sensors.window.size, spec.sensors.window.stride, source.channels,
                            source.rate_hz)
        rec, model, meta = await self._installer.load_active(rec, window)
        problem = head_problem(spec.head, meta)
        if problem is not None:
            raise ModelLoadError(str(model.path), f"pipeline {self.name}: {problem}")
        if meta.window.size != window.size:
            once.warning("window-size", "model %s wants windows of %d samples; using that instead of "
                         "the pipeline's window size %d", rec.tag, meta.window.size, window.size)
        if meta.window.channels != source.channels:
            raise ModelLoadError(str(model.path), f"model wants {meta.window.channels} channels, the "
                                 f"sensor source gives {source.channels}")
        if abs(meta.window.rate_hz - source.rate_hz) > 0.01 * meta.window.rate_hz:
            once.warning("rate", "model %s was trained at %g Hz; the source runs at %g Hz", rec.tag,
                         meta.window.rate_hz, source.rate_hz)
        self._s.window = dataclasses.replace(window, size=meta.window.size)
        self._s.active = rec
        self._s.metas = {rec.tag: meta}
        self._installer.opened(rec)
        if spec.calibrate_windows:
            path = calibration_path(cfg.state_dir, self.name)
            self._calibrated = await asyncio.to_thread(load_calibration, path, rec.tag)
        runner = Runner(make_slot(model, rec.tag, meta), self._deliver,
                        queue_max=cfg.inference.queue_max, cache_size=cfg.inference.cache_size)
        runner.start()
        self._s.runner = runner
        self._s.ready.set()
        log.info("inference serving", extra={"kv": {"pipeline": self.name, "model": rec.tag,
                                                    "runtime": model.runtime, "io": model.describe()}})

    async def _close_pipeline(self) -> None:
        self._s.ready.clear()
        runner, self._s.runner = self._s.runner, None
        if runner is None:
            return
        await asyncio.to_thread(runner.stop, True, 2.0)
        st = runner.stats()
        self._base["count"] += st.count
        self._base["dropped"] += st.dropped
        self._base["errors"] += st.errors
        self._closed = st

    # ------------------------------------------------------------------ results
    def _deliver(self, r: Result) -> None:
        """Worker thread -> event loop."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed at exit: nobody is listening any more
            loop.call_soon_threadsafe(self._on_result, r)

    def _on_result(self, r: Result) -> None:
        self._installer.observe(r)
        meta = self._s.metas.get(r.tag)
        spec = self.spec
        score = label = None
        if r.ok and meta is not None and r.output is not None:
            score = meta.score(r.output)
            label = meta.label_of(r.output) if meta.output == "softmax" else None
        cfg = self.live.config
        if score is not None and math.isfinite(score) and meta is not None:
            self._last_score = score
            picked = self._thresholds(spec, meta, r.tag, score)
            if picked is not None:
                thr, clear = picked
                if label is None:
                    label = meta.labels[min(1, len(meta.labels) - 1)] if score >= thr else meta.labels[0]
                edge = self._state.update(score, thr, clear, time.time(), cfg.inference.clear_windows)
                self._emit_edge(edge, r, score, label, thr, clear)
        elif r.error is not None:
            once.warning(f"invoke:{r.tag}", "model %s failed on window %d: %s", r.tag, r.seq, r.error)
        unit = ""
        if meta is not None and meta.head == "regression":
            unit = spec.unit or meta.unit
        scored = Scored(r.seq, r.ts, r.tag, score, label, self._state.active, r, self.name, unit)
        for listener in list(self._listeners):
            try:
                listener(scored)
            except Exception:
                log.exception("inference listener failed")

    def sensors_section(self) -> dict[str, Any]:
        """The `sensors` section: a bus source's state and latest values ({} for the others)."""
        status = source_status(self._source)
        return status.section() if status is not None else {}

    def _thresholds(self, spec: PipelineSpec, meta: ModelMeta, tag: str,
                    score: float) -> tuple[float, float] | None:
        """(threshold, clear) for this window, or None while an autoencoder learns its baseline."""
        if spec.calibrate_windows and spec.threshold is None and meta.head == "autoencoder":
            cal = self._calibrated
            if cal is None or cal.model != tag:
                if self._calibration is None or self._calibration.model != tag:
                    self._calibration = Calibration(tag, spec.calibrate_windows, spec.calibrate_sigma)
                    log.info("calibrating the threshold", extra={"kv": {
                        "pipeline": self.name, "model": tag, "windows": spec.calibrate_windows}})
                done = self._calibration.add(score)
                if done is None:
                    return None
                self._calibration, self._calibrated = None, done
                with contextlib.suppress(asyncio.QueueFull):  # a newer one follows: this one is moot
                    self._to_save.put_nowait(done)
                self.outbox.emit_event("config", "info", f"pipeline {self.name}: threshold "
                                       f"{done.threshold:.6g} calibrated on {done.windows} windows of {tag}",
                                       {"pipeline": self.name, **done.as_json()})
                return None
            return pick_thresholds(spec.threshold, spec.clear_threshold, meta, cal)
        return pick_thresholds(spec.threshold, spec.clear_threshold, meta, None)

    def _emit_edge(self, edge: str | None, r: Result, score: float, label: str | None, thr: float,
                   clear: float) -> None:
        if edge == "raise":
            self.outbox.emit_event("anomaly", "warning", f"anomaly: {label} (score {score:.2f})",
                                   {"model": r.tag, "score": round(score, 4), "label": label,
                                    "seq": r.seq, "ts": r.ts, "threshold": thr, "pipeline": self.name})
        elif edge == "clear":
            self.outbox.emit_event("anomaly", "info", f"anomaly cleared (score {score:.2f})",
                                   {"model": r.tag, "score": round(score, 4), "label": label,
                                    "seq": r.seq, "ts": r.ts, "clear_threshold": clear,
                                    "pipeline": self.name})

    async def _save_calibrations(self) -> None:
        """Persist each calibration off the loop, atomically, so a restart reuses it."""
        while True:
            await self._save(await self._to_save.get())

    async def _flush_calibrations(self) -> None:
        while not self._to_save.empty():
            await self._save(self._to_save.get_nowait())

    async def _save(self, rec: Calibrated) -> None:
        path = calibration_path(self.live.config.state_dir, self.name)
        try:
            await asyncio.to_thread(save_calibration, path, rec)
        except OSError as exc:
            once.warning(f"calibration:{self.name}", "cannot save the calibration to %s: %s", path, exc)

    def section(self) -> dict[str, Any]:
        """The `inference` section of telemetry and health.json."""
        cfg = self.live.config
        if not cfg.inference.enabled:
            return {"enabled": False}
        runner, active = self._s.runner, self._s.active
        out: dict[str, Any] = {"model": active.tag if active else None}
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
        out.update(self._head_figures())
        lane = self._installer.lane
        if lane is not None:  # a candidate in shadow beside the serving model
            out["shadow"] = lane.figures()
        if lat is not None and cfg.inference.cache_size:
            rate = lat.cache_hit_rate
            out["cache_hit_rate"] = None if rate is None else round(rate, 4)
        return out

    def _head_figures(self) -> dict[str, Any]:
        """What the head adds to the section (nothing for the older form's classes: byte-compatible)."""
        spec = self.spec
        meta = self._s.metas.get(self._s.active.tag) if self._s.active is not None else None
        out: dict[str, Any] = {}
        if meta is not None and meta.head == "regression":
            out.update(value=None if self._last_score is None else round(self._last_score, 6),
                       unit=spec.unit or meta.unit)
        if spec.calibrate_windows:
            cal = self._calibration
            out["calibrating"] = cal.progress if cal is not None else None
            if self._calibrated is not None:
                out["threshold"] = self._calibrated.threshold
        return out

    # ------------------------------------------------------------------ ModelInstaller
    def installed_version(self, name: str) -> str | None:
        active = self._s.active
        if active is not None and active.name == name:
            return active.version
        rec = self._s.store.active(name) if self._s.store is not None else None
        return rec.version if rec is not None else None

    async def install(self, staged_dir: Path, name: str, version: str, job: str) -> None:
        """Store, validate, hot-swap and prove a model; ModelRejected / ModelRolledBack with `.reason`."""
        await self._installer.install(Path(staged_dir), name, version, job)

    async def shadow(self, staged_dir: Path, name: str, version: str, job: str, spec: ShadowSpec,
                     report: Callable[[dict[str, Any]], None]) -> ShadowOutcome:
        """Judge a candidate on live windows beside the serving model (installer.Installer.shadow)."""
        return await self._installer.shadow(Path(staged_dir), name, version, job, spec, report)
