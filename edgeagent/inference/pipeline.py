"""The inference component: sensor source -> windows -> runner (worker thread) -> scores -> anomaly events.

It is also the updates side's `ModelInstaller` (`install`, `installed_version`); the swap itself is
decided in `swap_fsm` and carried out by `installer`.
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
from edgeagent.core.shadow_spec import ShadowOutcome, ShadowSpec
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.inference.installer import Installer, Serving
from edgeagent.inference.preprocess import WindowSpec
from edgeagent.inference.runner import ModelSlot, Result, Runner, RunnerStats
from edgeagent.inference.scoring import AnomalyState as AnomalyState  # re-exported: tests, callers
from edgeagent.inference.scoring import Scored as Scored
from edgeagent.inference.scoring import thresholds as thresholds
from edgeagent.inference.store import ModelStore
from edgeagent.sensors.sources import SensorSource, Windower, make_source

log = logging.getLogger(__name__)
once = Once(log)

def _structure(cfg: Config) -> tuple[Any, ...]:
    """The settings that need the pipeline rebuilt (everything else applies live)."""
    i = cfg.inference
    return (i.enabled, i.runtime, i.model, i.model_variant, i.num_threads, i.delegate, i.queue_max,
            i.cache_size, cfg.sensors, cfg.device.state_dir)


class InferenceComponent:
    name = "inference"

    def __init__(self, live: LiveConfig, outbox: Outbox, source: SensorSource | None = None) -> None:
        """`source` replaces the one `sensors` configures (tests, benches)."""
        self.live = live
        self.outbox = outbox
        self._source_override = source
        self._s = Serving()
        self._installer = Installer(live, outbox, self._s)
        self._listeners: list[Callable[[Scored], None]] = []
        self._state = AnomalyState()
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
        cfg = self.live.config
        self._s.store = ModelStore(cfg.state_dir / "models", cfg.inference.keep_versions)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close_pipeline()

    def add_listener(self, listener: Callable[[Scored], None]) -> None:
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
                await self._wait_structure_change(_structure(cfg))
                continue
            source = self._source_override or make_source(cfg.sensors)
            try:
                await self._open_pipeline(cfg, source)
            except RuntimeUnavailable as exc:
                # not the model's fault and no restart will fix it: say so once, wait for new settings
                self._problem = str(exc)
                self.outbox.emit_event("error", "critical", f"inference cannot run: {exc}",
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
        while _structure(self.live.config) == key:
            await self.live.changed.wait()

    async def _serve(self, cfg: Config, source: SensorSource) -> bool:
        """Feed windows until the source ends (True) or a structural setting changes (False)."""
        feed = asyncio.create_task(self._feed(source), name="inference:feed")
        watch = asyncio.create_task(self._wait_structure_change(_structure(cfg)), name="inference:config")
        rollback = asyncio.create_task(self._installer.rollback_loop(), name="inference:rollback")
        tasks = (feed, watch, rollback)
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
            log.info("sensor source ended", extra={"kv": {"windows": self._windows}})
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
        name = cfg.inference.model
        self._s.store = store = ModelStore(cfg.state_dir / "models", cfg.inference.keep_versions)
        rec = await asyncio.to_thread(store.seed, name, cfg.inference.model_variant)
        if rec is None:
            raise ModelLoadError(str(store.model_dir(name)), f"no model {name!r} in the store and none "
                                 "shipped under that name (install one with a model update)")
        await asyncio.to_thread(store.prune, name)  # candidates and staging dirs left by a crash
        window = WindowSpec(cfg.sensors.window.size, cfg.sensors.window.stride, source.channels,
                            source.rate_hz)
        rec, model, meta = await self._installer.load_active(rec, window)
        if meta.window.size != window.size:
            once.warning("window-size", "model %s wants windows of %d samples; using that instead of "
                         "sensors.window.size = %d", rec.tag, meta.window.size, window.size)
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
        runner = Runner(ModelSlot(model, rec.tag, meta.preprocessor()), self._deliver,
                        queue_max=cfg.inference.queue_max, cache_size=cfg.inference.cache_size)
        runner.start()
        self._s.runner = runner
        self._s.ready.set()
        log.info("inference serving", extra={"kv": {"model": rec.tag, "runtime": model.runtime,
                                                    "io": model.describe()}})

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
        score = label = None
        if r.ok and meta is not None and r.output is not None:
            score = meta.score(r.output)
            label = meta.label_of(r.output)
        cfg = self.live.config
        if score is not None and math.isfinite(score) and meta is not None:
            self._last_score = score
            thr, clear = thresholds(cfg, meta)
            edge = self._state.update(score, thr, clear, time.time(), cfg.inference.clear_windows)
            if edge == "raise":
                self.outbox.emit_event("anomaly", "warning", f"anomaly: {label} (score {score:.2f})",
                                       {"model": r.tag, "score": round(score, 4), "label": label,
                                        "seq": r.seq, "ts": r.ts, "threshold": thr})
            elif edge == "clear":
                self.outbox.emit_event("anomaly", "info", f"anomaly cleared (score {score:.2f})",
                                       {"model": r.tag, "score": round(score, 4), "label": label,
                                        "seq": r.seq, "ts": r.ts, "clear_threshold": clear})
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
        lane = self._installer.lane
        if lane is not None:  # a candidate in shadow beside the serving model
            out["shadow"] = lane.figures()
        if lat is not None and cfg.inference.cache_size:
            rate = lat.cache_hit_rate
            out["cache_hit_rate"] = None if rate is None else round(rate, 4)
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
