"""Carries out decide.py's decisions for one job: disk checks, the chunk transfer, gates, installs."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.core.config import GateConfig
from edgeagent.core.errors import BundleRejected, ModelRejected, ModelRolledBack
from edgeagent.core.protocol import job_request
from edgeagent.core.tasks import cancel_and_wait, wait_event
from edgeagent.monitor.context import DeviceContext, build_context
from edgeagent.updates import bundle, manifest
from edgeagent.updates import decide as d
from edgeagent.updates.jobs import Job, JobFacts
from edgeagent.updates.transfer import Puller, Transfer, disk_free_bytes

if TYPE_CHECKING:
    from edgeagent.updates.component import UpdatesComponent

log = logging.getLogger("edgeagent.updates.component")

PROGRESS_EVERY_S = 1.0
MB = d.MB


class Performer:
    """The job driver: asks decide.py what a job's state calls for, does it, reports the outcome."""

    def __init__(self, comp: UpdatesComponent) -> None:
        self.comp = comp
        self._kind_locks = {"model": asyncio.Lock(), "firmware": asyncio.Lock()}
        self._deferred_gates: dict[str, tuple[str, ...]] = {}
        self._last_progress: dict[str, float] = {}

    def facts(self, job: Job) -> JobFacts:
        return JobFacts.of(job, self._deferred_gates.get(job.job, ()))

    async def drive(self, job: Job) -> None:
        while not job.final:
            for step in d.decide(self.facts(job), d.Resume()):
                if isinstance(step, d.CheckDisk):
                    await self._check_disk(job)
                elif isinstance(step, d.Download):
                    await self._download(job)
                elif isinstance(step, d.EvaluateGates):
                    async with self._kind_locks[job.kind]:
                        if await self._wait_for_gates(job):
                            await self._install(job)
                elif isinstance(step, d.CheckInstall):
                    async with self._kind_locks[job.kind]:
                        await self._install(job)
                elif isinstance(step, d.AwaitReboot):
                    async with self._kind_locks[job.kind]:
                        await self.comp.firmware.after_reboot(job)
                else:  # pragma: no cover - decide.next_step covers every non-final state
                    raise RuntimeError(f"job {job.job}: no step for state {job.state}: {step}")
        self._deferred_gates.pop(job.job, None)
        self._last_progress.pop(job.job, None)
        await self.comp.book.cleanup(job)

    async def _apply(self, job: Job, decisions: tuple[d.Decision, ...]) -> bool:
        """Journal the transitions among `decisions`; True when the job reached a final state."""
        book = self.comp.book
        for decision in decisions:
            if isinstance(decision, d.Finish):
                await book.transition(job, decision.state, decision.reason)
            elif isinstance(decision, d.Reject):
                await book.transition(job, "rejected", decision.reason)
            elif isinstance(decision, d.StartDownload):
                await book.transition(job, "downloading", decision.reason)
            elif isinstance(decision, d.Promote):
                await book.transition(job, "installing", decision.reason, next_try=None)
            elif isinstance(decision, d.MarkVerified):
                await book.transition(job, "verified", decision.reason, progress=1.0)
            elif isinstance(decision, d.Defer):
                self._deferred_gates[job.job] = decision.gates
                await book.transition(job, "deferred", decision.reasons, attempts=decision.attempts,
                                      next_try=decision.next_try)
        return job.final

    def _manifest(self, job: Job) -> manifest.Manifest:
        return manifest.parse(job.manifest)

    def _staged(self, job: Job) -> Path:
        return self.comp.updates_dir / job.job / "staged"

    def _gate_cfg(self, kind: str) -> GateConfig:
        gates = self.comp.live.config.updates.gates
        return gates.model if kind == "model" else gates.firmware

    # ------------------------------------------------------------------ download
    async def _check_disk(self, job: Job) -> None:
        m = self._manifest(job)
        free = await asyncio.to_thread(disk_free_bytes, self.comp.updates_dir)
        event = d.DiskMeasured(free, m.size, self._gate_cfg(job.kind).disk_margin)
        await self._apply(job, d.decide(self.facts(job), event))

    async def _download(self, job: Job) -> None:
        comp = self.comp
        m = self._manifest(job)
        cfg = comp.live.config.updates
        transfer = Transfer(comp.updates_dir / job.job, m)
        await asyncio.to_thread(transfer.open)
        event = asyncio.Event()
        comp.chunk_events[job.job] = event
        comp.transfers[job.job] = transfer
        puller = Puller(transfer, max(2, int(cfg.request_window_kb * 1024) // m.chunk_size),
                        cfg.max_rate_bytes_s, time.monotonic())
        interval = cfg.request_interval_s
        unanswered = 0
        was_connected = False
        last_chunk = time.monotonic()
        try:
            while not transfer.complete:
                now = time.time()
                mono = time.monotonic()
                connected = comp.router.connected
                tick = d.DownloadTick(now, m.expires, connected, was_connected, puller.due(mono),
                                      transfer.received, m.chunks)
                was_connected = connected
                decisions = d.decide(self.facts(job), tick)
                if await self._apply(job, decisions):
                    return
                for decision in decisions:
                    if isinstance(decision, d.RequestChunks):
                        await self._request(job, puller, decision.restart, transfer.received)
                event.clear()
                # the rate cap may hold the next request back: wake up for it, not only for chunks
                pace = puller.wait_s(time.monotonic())
                quiet_in = interval - (time.monotonic() - last_chunk)
                timeout = min(quiet_in, pace) if pace > 0 else quiet_in
                if await wait_event(event, min(max(0.01, timeout), max(0.01, m.expires - now))):
                    interval, unanswered = cfg.request_interval_s, 0
                    last_chunk = time.monotonic()
                    self._progress(job, transfer)
                    continue
                if transfer.complete:
                    break
                if time.monotonic() - last_chunk < interval and time.time() < m.expires:
                    continue  # woken by the pacer, not by silence
                last_chunk = time.monotonic()
                quiet = d.ChunksQuiet(comp.router.connected, unanswered, cfg.max_requests,
                                      cfg.request_interval_s)
                decisions = d.decide(self.facts(job), quiet)
                if await self._apply(job, decisions):
                    return
                for decision in decisions:
                    if isinstance(decision, d.RequestChunks):
                        unanswered += 1
                        await self._request(job, puller, decision.restart, transfer.received)
                        interval = decision.wait_s or interval
        finally:
            comp.transfers.pop(job.job, None)
            comp.chunk_events.pop(job.job, None)
            await asyncio.to_thread(transfer.close)
        digest = await asyncio.to_thread(transfer.finish)
        decisions = d.decide(self.facts(job), d.DownloadComplete(digest, m.sha256))
        if await self._apply(job, decisions):
            return
        if any(isinstance(x, d.Stage) for x in decisions):
            problem = ""
            try:
                await asyncio.to_thread(bundle.stage, transfer.artifact_path, self._staged(job),
                                        int(m.size * cfg.max_unpacked_ratio) + 64 * 1024)
            except BundleRejected as exc:
                problem = exc.reason
            await self._apply(job, d.decide(self.facts(job), d.Staged(problem)))

    async def _request(self, job: Job, puller: Puller, restart: bool, received: int) -> None:
        """Ask for the next chunks: straight through the session when connected (a request is
        worth nothing once stale, and the spool's round trip would stall the window), else spooled."""
        missing = puller.ask(restart=restart, now=time.monotonic())
        if not missing:
            return
        if restart:
            log.info("asking for chunks", extra={"kv": {"job": job.job, "received": received,
                                                        "first": missing[0][0]}})
        topic = self.comp.live.topics.job_request(job.job)
        payload = job_request(job.job, missing)
        if not await self.comp.send_now(topic, payload):
            self.comp.outbox.put_message(topic, payload)
        log.debug("requested chunks", extra={"kv": {"job": job.job, "ranges": len(missing)}})

    def _progress(self, job: Job, transfer: Transfer) -> None:
        job.progress = transfer.progress
        now = time.monotonic()
        event = d.ChunkProgress(now, self._last_progress.get(job.job, 0.0), PROGRESS_EVERY_S)
        if d.decide(self.facts(job), event):
            self._last_progress[job.job] = now
            self.comp.book.publish(job)

    # ------------------------------------------------------------------ gates
    def context(self) -> DeviceContext:
        comp = self.comp
        try:
            disk_mb: float | None = disk_free_bytes(comp.updates_dir) / MB
        except OSError:
            disk_mb = None
        return build_context(comp.metrics.latest, comp.averager, comp.live.busy, comp.rtt_ms(), disk_mb,
                             os.cpu_count() or 1, now=comp.local_now())

    async def _wait_for_gates(self, job: Job) -> bool:
        """Until the gates open (True) or the job ends (False); deferrals are journaled."""
        m = self._manifest(job)
        while True:
            gates = self._gate_cfg(job.kind)
            event = d.GatesEvaluated(self.context(), gates, m.size, m.critical, time.time())
            decisions = d.decide(self.facts(job), event)
            if any(isinstance(x, d.CheckInstall) for x in decisions):
                return True
            if await self._apply(job, decisions):
                return False
            assert job.next_try is not None
            await self._wait_context_change(max(0.05, job.next_try - time.time()))

    async def _wait_context_change(self, timeout_s: float) -> None:
        waits = [asyncio.create_task(self.comp.live.changed.wait(), name="updates:wait-changed"),
                 asyncio.create_task(self.comp.ctx_pulse.wait(), name="updates:wait-metrics")]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waits)

    # ------------------------------------------------------------------ install
    async def _install(self, job: Job) -> None:
        installed = self.comp.installed_version(job.kind, job.name, self._manifest(job).pipeline)
        decisions = d.decide(self.facts(job), d.InstallReady(installed))
        if await self._apply(job, decisions):
            return
        for decision in decisions:
            if isinstance(decision, d.Shadow):
                verdict = await self._shadow_model(job, decision.enter)
                if await self._apply(job, d.decide(self.facts(job), verdict)):
                    return
                outcome = await self._install_model(job)  # promoted: 'installing' is journaled
                await self._apply(job, d.decide(self.facts(job), outcome))
            elif isinstance(decision, d.Install):
                if decision.enter:
                    await self.comp.book.transition(job, "installing", "", next_try=None)
                if job.kind == "model":
                    outcome = await self._install_model(job)
                    await self._apply(job, d.decide(self.facts(job), outcome))
                else:
                    await self.comp.firmware.install(job)

    async def _restage(self, job: Job) -> str:
        """Stage the bundle again if the staged dir was lost (a restart); the problem, or ''."""
        m = self._manifest(job)
        cfg = self.comp.live.config.updates
        staged = self._staged(job)
        if not (staged / bundle.MODEL_FILE).is_file():
            try:
                await asyncio.to_thread(bundle.stage, self.comp.updates_dir / job.job / "artifact", staged,
                                        int(m.size * cfg.max_unpacked_ratio) + 64 * 1024)
            except (BundleRejected, OSError) as exc:
                return f"cannot stage the model: {exc}"
        return ""

    async def _shadow_model(self, job: Job, enter: bool) -> d.Event:
        """Journal 'shadowing' (a restarted run says so) and let the inference side judge the
        candidate; its figures go into the job status as they come."""
        comp = self.comp
        if enter:
            await comp.book.transition(job, "shadowing", "comparing with the serving model on live "
                                       "windows", next_try=None, progress=0.0, shadow=None)
        else:
            await comp.book.transition(job, "shadowing", f"shadow evaluation restarted from 0 after an "
                                       f"agent restart (restart {job.resumes})", progress=0.0, shadow=None)
        inst = comp.model_installer
        if inst is None:
            return d.ShadowDone(False, "no model installer (inference is disabled)", failed=True)
        spec = self._manifest(job).shadow
        assert spec is not None  # decide.py asks for a shadow only when the manifest has one
        problem = await self._restage(job)
        if problem:
            return d.ShadowDone(False, problem, failed=True)

        def report(figures: dict[str, Any]) -> None:
            job.shadow, job.progress = figures, float(figures.get("progress", 0.0))
            comp.book.publish(job)

        try:
            outcome = await inst.shadow(self._staged(job), job.name, job.version, job.job, spec, report,
                                        self._manifest(job).pipeline)
        except ModelRejected as exc:
            return d.ShadowDone(False, f"model rejected: {exc.reason}", failed=True)
        job.shadow = outcome.figures
        return d.ShadowDone(outcome.promote, outcome.reason)

    async def _install_model(self, job: Job) -> d.Event:
        """Stage if needed and hand the model over; the outcome as an event for decide.py."""
        comp = self.comp
        inst = comp.model_installer
        if inst is None:
            return d.InstallFailed("no model installer (inference is disabled)")
        cfg = comp.live.config.updates
        staged = self._staged(job)
        problem = await self._restage(job)  # e.g. resumed after the staged dir was lost
        if problem:
            return d.InstallFailed(problem)
        try:
            await asyncio.wait_for(inst.install(staged, job.name, job.version, job.job,
                                                self._manifest(job).pipeline),
                                   cfg.model_install_timeout_s)
        except ModelRejected as exc:
            return d.InstallFailed(f"model rejected: {exc.reason}")
        except ModelRolledBack as exc:
            return d.SwapRolledBack(f"model rolled back: {exc.reason}")
        except asyncio.TimeoutError:
            return d.InstallFailed("model install timed out")
        return d.SwapCommitted("serving")
