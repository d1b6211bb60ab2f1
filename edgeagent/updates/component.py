"""The updates component: receives signed manifests and chunks over MQTT and performs what decide.py
decides for each job.

One named task per unfinished job asks decide.py what its state calls for, measures or does it,
and feeds the result back as an event; every state is journaled before its side effect (book.py),
so a restart (kill -9, power loss, the firmware reboot) resumes each job where it stood. Downloads
run while gates are closed (balena-style); only the apply is gated, one job per kind at a time.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from edgeagent import __version__
from edgeagent.core import protocol, signing
from edgeagent.core.backoff import backoff_s
from edgeagent.core.errors import ConfigError
from edgeagent.core.live import LiveConfig, Metrics, Outbox, Router
from edgeagent.core.logs import Once
from edgeagent.core.tasks import cancel_and_wait, wait_event
from edgeagent.monitor.context import MetricsAverager
from edgeagent.updates import decide as d
from edgeagent.updates import manifest
from edgeagent.updates.book import JobBook
from edgeagent.updates.firmware import FirmwareFlow
from edgeagent.updates.inputs import Inputs
from edgeagent.updates.installers import FirmwareRunner, installed_firmware_version
from edgeagent.updates.jobs import Job, JobFacts, Journal
from edgeagent.updates.perform import Performer
from edgeagent.updates.seams import ModelInstaller
from edgeagent.updates.transfer import Transfer

if TYPE_CHECKING:  # cryptography is imported on first use (core/signing.py)
    from edgeagent.core.signing import PublicKey

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0  # a chunk request sent straight through the session waits this long for its PUBACK
MAX_CRASHES = 3  # a job whose task crashes more often than this (a bug, an OS error) fails
CRASH_RETRY_INITIAL_S = 1.0
CRASH_RETRY_MAX_S = 8.0
REJECTIONS_FLUSH_S = 5.0  # how often the loop sends the counts of refusals whose window has passed


class DirectPublisher(Protocol):
    """The session's straight publish (transport/session.py `Session.publish_now`)."""

    async def publish_now(self, topic: str, payload: bytes, timeout_s: float = ...) -> None: ...


class UpdatesComponent:
    """Owns the job tasks; `section()` and `firmware_section()` are its telemetry/health.json parts.

    `model_installer` is None when inference is disabled (model jobs then fail with that reason);
    `inference_section` lets the firmware health check see inference serving after a reboot.
    """

    name = "updates"

    def __init__(self, live: LiveConfig, metrics: Metrics, outbox: Outbox, router: Router,
                 model_installer: ModelInstaller | None,
                 inference_section: Callable[[], dict[str, Any]] | None = None,
                 rtt_ms: Callable[[], float | None] = lambda: None, *,
                 runner: FirmwareRunner | None = None, arch: str | None = None,
                 local_now: Callable[[], datetime] = datetime.now,
                 session: Callable[[], DirectPublisher | None] = lambda: None) -> None:
        # rtt_ms: the broker round trip for the network gate (the transport measures it).
        # runner, arch and local_now are test seams (firmware commands, platform, the local clock
        # of maintenance windows); production passes none of them
        self.live = live
        self.rtt_ms = rtt_ms
        self.metrics = metrics
        self.outbox = outbox
        self.router = router
        self.model_installer = model_installer
        self.arch = arch or platform.machine()
        self.local_now = local_now
        self.session = session  # chunk requests go straight through it while connected
        self.state_dir = Path(live.config.device.state_dir)
        self.updates_dir = self.state_dir / "updates"
        self.journal = Journal(self.state_dir)
        self.book = JobBook(live, outbox, self.journal, self.updates_dir)
        self.trusted: dict[str, PublicKey] = {}
        self.keys_error = ""
        self.averager = MetricsAverager()
        self.transfers: dict[str, Transfer] = {}
        self.chunk_events: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self._wake = asyncio.Event()
        self.ctx_pulse = asyncio.Event()
        self._crashes: dict[str, int] = {}
        self.once = Once(log)
        self.firmware = FirmwareFlow(live, router, self.journal, self.updates_dir, self.book.transition,
                                     runner, inference_section)
        self.performer = Performer(self)
        self.inputs = Inputs(self)

    async def send_now(self, topic: str, payload: dict[str, Any]) -> bool:
        """Publish straight through the session (not the spool); False when that is not possible
        now (offline, the connection dropped): the caller spools it instead."""
        session = self.session()
        if session is None:
            return False
        try:
            await session.publish_now(topic, protocol.dumps(payload), REQUEST_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            return False
        return True

    @property
    def dropped_chunks(self) -> int:
        return self.inputs.dropped_chunks

    @property
    def rejected_chunks(self) -> int:
        return self.inputs.rejected_chunks

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> UpdatesComponent:
        cfg = self.live.config.updates
        if not cfg.enabled:
            log.info("updates disabled (updates.enabled = false): not subscribing")
            return self
        await asyncio.to_thread(self.journal.load)
        resumed = False
        for job in self.journal.unfinished():
            for decision in d.decide(JobFacts.of(job), d.Restarted()):
                if isinstance(decision, d.CountResume):
                    # persisted before anything runs again: the loop breaker survives crashes
                    job.resumes += 1
                    resumed = True
        if resumed:
            await asyncio.to_thread(self.journal.save)
        try:
            self.trusted = signing.load_trusted_keys(cfg.trusted_keys)
        except ConfigError as exc:
            self.keys_error = "; ".join(exc.errors)
            log.error("updates: trusted keys unusable, every manifest will be rejected: %s", self.keys_error)
        if not cfg.trusted_keys:
            self.keys_error = "no trusted keys configured (updates.trusted_keys)"
        self.metrics.subscribe(self._on_metrics)
        self.router.subscribe(self.live.topics.updates_filter, self.inputs.on_message, self.inputs.take)
        for group in self.live.config.device.groups:
            self.router.subscribe(self.live.topics.group_updates_filter(group), self.inputs.on_message,
                                  self.inputs.take)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # the transport (stopped after us) may still deliver a manifest: start nothing new now
        self._closing = True
        await self._stop_tasks()
        for t in list(self.transfers.values()):
            await asyncio.to_thread(t.close)
        self.transfers.clear()
        self.inputs.close()
        self.book.rejections.flush()
        await asyncio.to_thread(self.book.close)

    async def run(self) -> None:
        if not self.live.config.updates.enabled:
            return
        for job in self.journal.unfinished():
            self.start(job)
        try:
            while True:
                self._wake.clear()
                for jid, task in list(self._tasks.items()):
                    if task.done():
                        del self._tasks[jid]
                        if not task.cancelled() and task.exception() is not None:
                            await self._job_crashed(jid, task.exception())
                self.book.rejections.flush()
                await wait_event(self._wake, REJECTIONS_FLUSH_S)
        finally:
            await self._stop_tasks()

    async def _job_crashed(self, jid: str, exc: BaseException | None) -> None:
        """A bug or an unexpected OS error in one job: retry from its journaled state, then give up."""
        log.error("update job %s crashed: %r", jid, exc, exc_info=exc)
        crashed = self.journal.jobs.get(jid)
        if crashed is None or crashed.final:
            return
        self._crashes[jid] = self._crashes.get(jid, 0) + 1
        if self._crashes[jid] > MAX_CRASHES:
            try:
                await self.book.transition(crashed, "failed", f"internal error: {exc!r}")
            except Exception:  # the journal itself may be what fails: the log above has the story
                log.exception("update job %s: cannot record the failure", jid)
            return
        await asyncio.sleep(backoff_s(self._crashes[jid], CRASH_RETRY_INITIAL_S, CRASH_RETRY_MAX_S))
        self.start(crashed)  # the journal says where it stood: go on from there

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)

    def start(self, job: Job) -> None:
        if self._closing or (job.job in self._tasks and not self._tasks[job.job].done()):
            return
        task = asyncio.create_task(self.performer.drive(job), name=f"update-job:{job.job}")
        task.add_done_callback(lambda _t: self._wake.set())
        self._tasks[job.job] = task

    async def stop_job(self, job_id: str) -> None:
        """Stop one job's task (a cancel) and wait for it; our own cancellation still arrives."""
        task = self._tasks.pop(job_id, None)
        if task is not None:
            await cancel_and_wait(task)

    def _on_metrics(self, metrics: dict[str, Any]) -> None:
        self.averager.add(metrics)
        self.ctx_pulse.set()
        self.ctx_pulse.clear()

    # ------------------------------------------------------------------ facts
    def checks(self, m: manifest.Manifest) -> manifest.Checks:
        cfg = self.live.config
        return manifest.Checks(
            now=time.time(), device_id=cfg.device.id, groups=cfg.device.groups, arch=self.arch,
            hardware=cfg.device.hardware, agent_version=__version__,
            installed_version=self.installed_version(m.kind, m.name, m.pipeline),
            newest_issued_at=self.journal.newest_issued.get(f"{m.kind}/{m.name}"),
            max_size=int(cfg.updates.max_artifact_mb * d.MB), max_chunk=int(cfg.updates.max_chunk_kb * 1024))

    def installed_version(self, kind: str, name: str, pipeline: str | None = None) -> str | None:
        if kind == "model":
            inst = self.model_installer
            return inst.installed_version(name, pipeline) if inst is not None else None
        recorded = self.journal.firmware.get("version")
        current = installed_firmware_version(self.live.config.updates.firmware, None)
        versions = [v for v in (current, recorded) if v]
        valid = []
        for v in versions:
            try:
                manifest.version_key(v)
                valid.append(v)
            except ValueError:
                self.once.warning("fw-version", "unparseable firmware version %r ignored", v)
        return max(valid, key=manifest.version_key) if valid else None

    # ------------------------------------------------------------------ sections
    def section(self) -> dict[str, Any]:
        """The `updates` section of telemetry and health.json: unfinished jobs and chunk counters."""
        jobs = [j.summary() for j in self.journal.jobs.values() if not j.final]
        return {"jobs": jobs, "dropped_chunks": self.dropped_chunks, "rejected_chunks": self.rejected_chunks,
                "refused": dict(self.book.rejections.totals)}

    def firmware_section(self) -> dict[str, Any]:
        """The `firmware` section: the installed version and the booted slot."""
        return {"version": self.installed_version("firmware", "") or "",
                "slot": self.firmware.booted_slot or self.journal.firmware.get("slot", "")}
