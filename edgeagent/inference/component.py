"""The inference component: runs every pipeline of the config side by side and routes model updates.

It is the updates side's `ModelInstaller`: a manifest's optional `pipeline` names the pipeline whose
model it replaces; without one, the first pipeline serving a model of that name takes it (the only
one, on a single-pipeline device). With one pipeline a crash goes to the agent's supervisor as it
always did; with several, a crashing pipeline is restarted on its own (with backoff, and an `error`
event) while the others keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeagent.core.backoff import backoff_s
from edgeagent.core.errors import ModelRejected
from edgeagent.core.live import LiveConfig, Outbox
from edgeagent.core.pipelines import names, resolve
from edgeagent.core.shadow_spec import ShadowOutcome, ShadowSpec
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.inference.pipeline import Listener, Pipeline
from edgeagent.inference.preprocess import WindowSpec
from edgeagent.inference.runner import Runner
from edgeagent.inference.store import ModelStore
from edgeagent.sensors.sources import SensorSource

log = logging.getLogger(__name__)

RESTART_INITIAL_S, RESTART_MAX_S = 1.0, 60.0


class InferenceComponent:
    name = "inference"

    def __init__(self, live: LiveConfig, outbox: Outbox, source: SensorSource | None = None, *,
                 sources: Mapping[str, SensorSource] | None = None) -> None:
        """`sources` replace the sources pipelines configure, by pipeline name; `source` that of the
        first pipeline (tests, benches)."""
        self.live = live
        self.outbox = outbox
        self._sources = dict(sources or {})
        if source is not None:
            self._sources.setdefault(names(live.config)[0], source)
        self._listeners: list[Listener] = []
        self._pipelines: dict[str, Pipeline] = {
            n: Pipeline(live, outbox, n, self._sources.get(n), self._listeners) for n in names(live.config)}
        self._entered: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> InferenceComponent:
        for name, p in self._pipelines.items():
            await p.__aenter__()
            self._entered.add(name)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for name in reversed(list(self._pipelines)):
            if name in self._entered:
                self._entered.discard(name)
                await self._pipelines[name].__aexit__(exc_type, exc, tb)

    async def run(self) -> None:
        """Every pipeline until all their sources end. When the set of pipelines changes (a live
        config), the ones dropped are stopped and the ones added started; the others go on."""
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                await self._sync_pipelines(tasks)
                for name, p in self._pipelines.items():
                    if name not in tasks:
                        tasks[name] = asyncio.create_task(self._supervise(p), name=f"inference:{name}")
                running = {t for t in tasks.values() if not t.done()}
                if not running:
                    return  # every source ended
                watch = asyncio.create_task(self._wait_names_change(tuple(self._pipelines)),
                                            name="inference:pipelines")
                try:
                    done, _ = await asyncio.wait(running | {watch}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    await cancel_and_wait(watch)
                for t in done - {watch}:
                    t.result()  # a crash of the only pipeline goes to the agent's supervisor
                if watch in done:
                    log.info("the set of pipelines changed", extra={"kv": {
                        "pipelines": ",".join(names(self.live.config))}})
        finally:
            await cancel_and_wait(list(tasks.values()))

    async def _wait_names_change(self, current: tuple[str, ...]) -> None:
        while names(self.live.config) == current:
            await self.live.changed.wait()

    async def _sync_pipelines(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        """Stop and close pipelines the config dropped, open the ones it added."""
        wanted = names(self.live.config)
        for name in [n for n in self._pipelines if n not in wanted]:
            task = tasks.pop(name, None)
            if task is not None:
                await cancel_and_wait(task)
            p = self._pipelines.pop(name)
            if name in self._entered:
                self._entered.discard(name)
                await p.__aexit__(None, None, None)
        for name in wanted:
            if name not in self._pipelines:
                self._pipelines[name] = Pipeline(self.live, self.outbox, name, self._sources.get(name),
                                                 self._listeners)
            if name not in self._entered:
                await self._pipelines[name].__aenter__()
                self._entered.add(name)
        self._pipelines = {n: self._pipelines[n] for n in wanted}

    async def _supervise(self, p: Pipeline) -> None:
        attempt = 0
        while True:
            try:
                await p.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if len(self._pipelines) < 2:
                    raise  # one pipeline: the agent's supervisor restarts the component, as always
                attempt += 1
                delay = backoff_s(attempt, RESTART_INITIAL_S, RESTART_MAX_S, jitter=0.2)
                log.error("pipeline %s crashed; restarting in %.1fs", p.name, delay, exc_info=True,
                          extra={"kv": {"pipeline": p.name}})
                self.outbox.emit_event("error", "warning", f"pipeline {p.name} crashed and restarts",
                                       {"pipeline": p.name, "error": f"{type(exc).__name__}: {exc}",
                                        "restarts": attempt})
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ pipelines
    @property
    def pipelines(self) -> Mapping[str, Pipeline]:
        return self._pipelines

    def pipeline(self, name: str) -> Pipeline:
        return self._pipelines[name]

    @property
    def first(self) -> Pipeline:
        return next(iter(self._pipelines.values()))

    def add_listener(self, listener: Listener) -> None:
        """Called on the event loop for every window any pipeline served (must not block)."""
        self._listeners.append(listener)

    # the first (default) pipeline's figures: what a single-pipeline device always offered
    @property
    def store(self) -> ModelStore:
        return self.first.store

    @property
    def runner(self) -> Runner | None:
        return self.first.runner

    @property
    def windows(self) -> int:
        return self.first.windows

    @property
    def window_spec(self) -> WindowSpec:
        return self.first.window_spec

    def section(self) -> dict[str, Any]:
        """The `inference` section: the older single-pipeline form stays flat and unchanged; with
        `[[pipelines]]` the first pipeline's figures stay flat (what fleet tools and rules read) and
        `pipelines` holds every pipeline's, by name."""
        if not self.live.config.inference.enabled:
            return {"enabled": False}
        specs = resolve(self.live.config)
        if len(specs) == 1 and specs[0].legacy:
            return self.first.section()
        each = {name: p.section() for name, p in self._pipelines.items()}
        return {**next(iter(each.values()), {}), "pipelines": each}

    def sensors_section(self) -> dict[str, Any]:
        """The `sensors` section: the first pipeline's bus source flat (what rules read by channel
        name), and with `[[pipelines]]` every pipeline's that has one, by name."""
        each = {name: sec for name, p in self._pipelines.items() if (sec := p.sensors_section())}
        if len(self._pipelines) <= 1:
            return next(iter(each.values()), {})
        first = self.first.sensors_section() if self._pipelines else {}
        return {**first, "pipelines": each} if each else {}

    # ------------------------------------------------------------------ ModelInstaller
    def target(self, name: str, pipeline: str | None = None) -> Pipeline:
        """The pipeline a model update is for; ModelRejected naming the pipelines when none fits."""
        if pipeline is not None:
            p = self._pipelines.get(pipeline)
            if p is None:
                raise ModelRejected(f"no pipeline {pipeline!r} on this device (it has "
                                    f"{', '.join(self._pipelines)})")
            return p
        return next((p for p in self._pipelines.values() if p.spec.model == name), self.first)

    def installed_version(self, name: str, pipeline: str | None = None) -> str | None:
        try:
            return self.target(name, pipeline).installed_version(name)
        except ModelRejected:
            return None

    async def install(self, staged_dir: Path, name: str, version: str, job: str,
                      pipeline: str | None = None) -> None:
        """Store, validate, hot-swap and prove a model in the targeted pipeline only."""
        await self.target(name, pipeline).install(Path(staged_dir), name, version, job)

    async def shadow(self, staged_dir: Path, name: str, version: str, job: str, spec: ShadowSpec,
                     report: Callable[[dict[str, Any]], None], pipeline: str | None = None) -> ShadowOutcome:
        """Judge a candidate beside the serving model of the targeted pipeline (nothing swapped)."""
        return await self.target(name, pipeline).shadow(Path(staged_dir), name, version, job, spec, report)
