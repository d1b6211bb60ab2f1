"""The updates component: receives signed manifests and chunks over MQTT and drives each job to an end.

One named task per unfinished job walks the state machine of jobs.py; every state is journaled
before its side effect, so a restart (kill -9, power loss, the firmware reboot) resumes each job
where it stood. Downloads run while gates are closed (balena-style); only the apply is gated, one
job per kind at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from edgeagent import __version__
from edgeagent.core import protocol, signing
from edgeagent.core.config import GateConfig
from edgeagent.core.errors import (
    BundleRejected,
    ChunkRejected,
    ConfigError,
    ManifestRejected,
    ModelRejected,
    ModelRolledBack,
    ProtocolError,
)
from edgeagent.core.hub import Hub
from edgeagent.core.logs import Once
from edgeagent.monitor.context import DeviceContext, MetricsAverager, build_context, failing_gates, next_try_s
from edgeagent.updates import bundle, manifest
from edgeagent.updates.firmware import FirmwareFlow
from edgeagent.updates.installers import FirmwareRunner, append_log, installed_firmware_version
from edgeagent.updates.jobs import CANCELLABLE, Job, Journal
from edgeagent.updates.transfer import Puller, Transfer, disk_free_bytes

if TYPE_CHECKING:  # cryptography is imported on first use (signing.py): ~8 MiB of RSS
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 256 * 1024
PROGRESS_EVERY_S = 1.0
MAX_RESUMES = 5  # restarts that found a job mid-install before we give up on it (loop breaker)
MB = 1024 * 1024


class UpdatesComponent:
    name = "updates"

    def __init__(self, hub: Hub, runner: FirmwareRunner | None = None, arch: str | None = None,
                 local_now: Callable[[], datetime] = datetime.now) -> None:
        self.hub = hub
        self.arch = arch or platform.machine()
        self.local_now = local_now  # the clock of maintenance windows (a seam for tests)
        self.state_dir = Path(hub.config.device.state_dir)
        self.updates_dir = self.state_dir / "updates"
        self.journal = Journal(self.state_dir)
        self.trusted: dict[str, Ed25519PublicKey] = {}
        self.keys_error = ""
        self.averager = MetricsAverager()
        self._transfers: dict[str, Transfer] = {}
        self._chunk_events: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self._manifest_lock = asyncio.Lock()
        self._kind_locks = {"model": asyncio.Lock(), "firmware": asyncio.Lock()}
        self._wake = asyncio.Event()
        self._ctx_pulse = asyncio.Event()
        self._last_progress: dict[str, float] = {}
        self._deferred_gates: dict[str, list[str]] = {}
        self._crashes: dict[str, int] = {}
        self._once = Once(log)
        self.dropped_chunks = 0
        self.rejected_chunks = 0
        self.firmware = FirmwareFlow(hub, self.journal, self.updates_dir, self._transition, runner)
        # chunk writes on one thread of our own: in order, and one malloc arena instead of one per
        # default-executor thread (which would keep freed chunk buffers as RSS)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="updates-io")

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> UpdatesComponent:
        cfg = self.hub.config.updates
        if not cfg.enabled:
            log.info("updates disabled (updates.enabled = false): not subscribing")
            return self
        await asyncio.to_thread(self.journal.load)
        interrupted = [j for j in self.journal.unfinished() if j.state in ("installing", "rebooting",
                                                                           "health_check")]
        for job in interrupted:
            job.resumes += 1  # persisted before anything runs again: the loop breaker survives crashes
        if interrupted:
            await asyncio.to_thread(self.journal.save)
        try:
            self.trusted = signing.load_trusted_keys(cfg.trusted_keys)
        except ConfigError as exc:
            self.keys_error = "; ".join(exc.errors)
            log.error("updates: trusted keys unusable, every manifest will be rejected: %s", self.keys_error)
        if not cfg.trusted_keys:
            self.keys_error = "no trusted keys configured (updates.trusted_keys)"
        self.hub.on_metrics(self._on_metrics)
        self.hub.router.subscribe(self.hub.topics.updates_filter, self._on_message)
        for group in self.hub.config.device.groups:
            self.hub.router.subscribe(self.hub.topics.group_updates_filter(group), self._on_message)
        self.hub.providers["updates"] = self._provider
        self.hub.providers["firmware"] = self._firmware_provider
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # the transport (stopped after us) may still deliver a manifest: start nothing new now
        self._closing = True
        await self._stop_tasks()
        for t in list(self._transfers.values()):
            await asyncio.to_thread(t.close)
        self._transfers.clear()
        self._io.shutdown(wait=False)

    async def run(self) -> None:
        if not self.hub.config.updates.enabled:
            return
        for job in self.journal.unfinished():
            self._start(job)
        try:
            while True:
                self._wake.clear()
                for jid, task in list(self._tasks.items()):
                    if task.done():
                        del self._tasks[jid]
                        if not task.cancelled() and task.exception() is not None:
                            await self._job_crashed(jid, task.exception())
                await self._wake.wait()
        finally:
            await self._stop_tasks()

    async def _job_crashed(self, jid: str, exc: BaseException | None) -> None:
        """A bug or an unexpected OS error in one job: retry from its journaled state, then give up."""
        log.error("update job %s crashed: %r", jid, exc, exc_info=exc)
        crashed = self.journal.jobs.get(jid)
        if crashed is None or crashed.final:
            return
        self._crashes[jid] = self._crashes.get(jid, 0) + 1
        if self._crashes[jid] > 3:
            with contextlib.suppress(Exception):
                await self._transition(crashed, "failed", f"internal error: {exc!r}")
            return
        await asyncio.sleep(self._crashes[jid])
        self._start(crashed)  # the journal says where it stood: go on from there

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()

    def _start(self, job: Job) -> None:
        if self._closing or (job.job in self._tasks and not self._tasks[job.job].done()):
            return
        task = asyncio.create_task(self._drive(job), name=f"update-job:{job.job}")
        task.add_done_callback(lambda _t: self._wake.set())
        self._tasks[job.job] = task

    # ------------------------------------------------------------------ inputs
    def _on_metrics(self, metrics: dict[str, Any]) -> None:
        self.averager.add(metrics)
        self._ctx_pulse.set()
        self._ctx_pulse.clear()

    def _split_topic(self, topic: str) -> tuple[str, str] | None:
        """(job, rest) for a topic under our device's or one of our groups' updates."""
        t = self.hub.topics
        groups = self.hub.config.device.groups
        bases = [f"{t.base}/updates/"] + [f"{t.prefix}/group/{g}/updates/" for g in groups]
        for base in bases:
            if topic.startswith(base):
                job, _, rest = topic[len(base):].partition("/")
                return job, rest
        return None

    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            split = self._split_topic(topic)
            if split is None:
                return
            job_id, rest = split
            if rest in ("status", "request"):
                return  # our own publications coming back
            if not manifest.JOB_ID_RE.match(job_id):
                self._once.warning("bad-job-id", "update message with an invalid job id dropped: %s", topic)
                return
            if rest == "manifest":
                # the device topic and each group topic have their own worker: one manifest at a
                # time, so the same job id cannot be accepted twice (or twice differently)
                async with self._manifest_lock:
                    await self._on_manifest(job_id, topic, payload)
            elif rest.startswith("chunk/"):
                await self._on_chunk(job_id, rest[6:], payload)
            elif rest == "cancel":
                await self._on_cancel(job_id, topic, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("update message handling failed", extra={"kv": {"topic": topic}})

    async def _on_manifest(self, job_id: str, topic: str, payload: bytes) -> None:
        existing = self.journal.jobs.get(job_id)
        try:
            if len(payload) > MAX_MANIFEST_BYTES:
                raise ManifestRejected(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", job_id)
            try:
                msg = protocol.loads_object(topic, payload)
            except ProtocolError as exc:
                raise ManifestRejected(f"manifest: {exc.reason}", job_id) from None
            if msg.get("job") != job_id:
                raise ManifestRejected(f"manifest names job {msg.get('job')!r}, topic says {job_id!r}",
                                       job_id)
            if existing is not None:
                if manifest.digest_of(msg) == existing.digest:
                    log.info("manifest for known job %s received again: no-op", job_id)
                    self._publish(existing)
                    ev = self._chunk_events.get(job_id)
                    if ev is not None:
                        ev.set()
                    return
                raise ManifestRejected(f"job id {job_id} reused with a different manifest "
                                       f"(job stays {existing.state})", job_id)
            if self.keys_error:
                raise ManifestRejected(f"signature: {self.keys_error}", job_id)
            m = manifest.verify(msg, self.trusted)
        except ManifestRejected as exc:
            self._refuse(job_id, exc.reason, existing)
            return
        job = Job(job=m.job, kind=m.kind, name=m.name, version=m.version, digest=m.digest, manifest=msg)
        try:
            manifest.check(m, self._checks(m))
        except ManifestRejected as exc:
            # signed by a trusted key: remember it, so a replay of it is recognised as a no-op
            job.state, job.reason = "rejected", exc.reason
            await asyncio.to_thread(self.journal.add, job)
            self._after_transition(job)
            return
        await asyncio.to_thread(self.journal.add, job, (f"{m.kind}/{m.name}", m.issued_at))
        self._after_transition(job)
        self._start(job)

    def _refuse(self, job_id: str, reason: str, existing: Job | None) -> None:
        """A manifest we cannot accept: say why in the status (without clobbering a real job's state)."""
        log.warning("manifest refused: %s", reason, extra={"kv": {"job": job_id}})
        self.hub.emit_event("update", "warning", f"update {job_id} refused: {reason}",
                            {"job": job_id, "reason": reason})
        if existing is not None:
            payload = protocol.job_status(existing.job, existing.kind, existing.name, existing.version,
                                          existing.state, f"{existing.reason} (refused a manifest: {reason})"
                                          .strip(), existing.progress, existing.next_try)
        else:
            payload = protocol.job_status(job_id, "", "", "", "rejected", reason)
        self.hub.outbox.put_state(self.hub.topics.job_status(job_id), payload)

    def _checks(self, m: manifest.Manifest) -> manifest.Checks:
        cfg = self.hub.config
        return manifest.Checks(
            now=time.time(), arch=self.arch, hardware=cfg.device.hardware, agent_version=__version__,
            installed_version=self._installed_version(m.kind, m.name),
            newest_issued_at=self.journal.newest_issued.get(f"{m.kind}/{m.name}"),
            max_size=int(cfg.updates.max_artifact_mb * MB), max_chunk=int(cfg.updates.max_chunk_kb * 1024))

    def _installed_version(self, kind: str, name: str) -> str | None:
        if kind == "model":
            inst = self.hub.model_installer
            return inst.installed_version(name) if inst is not None else None
        recorded = self.journal.firmware.get("version")
        current = installed_firmware_version(self.hub.config.updates.firmware, None)
        versions = [v for v in (current, recorded) if v]
        valid = []
        for v in versions:
            try:
                manifest.version_key(v)
                valid.append(v)
            except ValueError:
                self._once.warning("fw-version", "unparseable firmware version %r ignored", v)
        return max(valid, key=manifest.version_key) if valid else None

    async def _on_chunk(self, job_id: str, index_text: str, data: bytes) -> None:
        transfer = self._transfers.get(job_id)
        if transfer is None:
            self.dropped_chunks += 1
            return
        if not index_text.isdigit() or len(index_text) > 9:
            self.rejected_chunks += 1
            self._chunk_problem(job_id, f"chunk topic index {index_text!r} is not a number")
            return
        try:
            loop = asyncio.get_running_loop()
            new = await loop.run_in_executor(self._io, transfer.write, int(index_text), data)
        except ChunkRejected as exc:
            self.rejected_chunks += 1
            self._chunk_problem(job_id, str(exc))
            return
        if new:
            ev = self._chunk_events.get(job_id)
            if ev is not None:
                ev.set()

    def _chunk_problem(self, job_id: str, reason: str) -> None:
        self._once.warning(f"chunk:{job_id}", "chunk dropped: %s", reason, extra={"kv": {"job": job_id}})
        job = self.journal.jobs.get(job_id)
        if job is not None:
            job.reason = f"chunk dropped: {reason}"
            with contextlib.suppress(OSError):
                append_log(self.updates_dir / job_id / "log.txt", job.reason)
            self._publish(job)

    async def _on_cancel(self, job_id: str, topic: str, payload: bytes) -> None:
        job = self.journal.jobs.get(job_id)
        try:
            msg = protocol.loads_object(topic, payload)
            manifest.verify_cancel(msg, job_id, self.trusted)
        except (ProtocolError, ManifestRejected) as exc:
            log.warning("cancel refused: %s", exc, extra={"kv": {"job": job_id}})
            self.hub.emit_event("update", "warning", f"cancel of {job_id} refused: {exc}", {"job": job_id})
            return
        if job is None or job.final:
            return
        if job.state not in CANCELLABLE:
            log.warning("cancel of job %s ignored: already %s", job_id, job.state)
            self.hub.emit_event("update", "warning", f"cancel of {job_id} too late: {job.state}",
                                {"job": job_id})
            return
        task = self._tasks.pop(job_id, None)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # unlike awaiting it, this keeps our own cancellation
        await self._transition(job, "cancelled", "cancelled by operator")
        await self._cleanup(job)

    # ------------------------------------------------------------------ job driver
    async def _drive(self, job: Job) -> None:
        while not job.final:
            if job.state == "received":
                await self._start_download(job)
            elif job.state == "downloading":
                await self._download(job)
            elif job.state in ("verified", "deferred"):
                async with self._kind_locks[job.kind]:
                    await self._wait_for_gates(job)
                    await self._install(job)
            elif job.state == "installing":
                async with self._kind_locks[job.kind]:
                    await self._install(job)
            elif job.state in ("rebooting", "health_check"):
                async with self._kind_locks[job.kind]:
                    await self.firmware.after_reboot(job)
            else:  # pragma: no cover - every non-final state is handled above
                raise RuntimeError(f"job {job.job}: no handler for state {job.state}")
        await self._cleanup(job)

    def _manifest(self, job: Job) -> manifest.Manifest:
        return manifest.parse(job.manifest)

    def _gate_cfg(self, kind: str) -> GateConfig:
        gates = self.hub.config.updates.gates
        return gates.model if kind == "model" else gates.firmware

    async def _start_download(self, job: Job) -> None:
        m = self._manifest(job)
        margin = self._gate_cfg(job.kind).disk_margin
        free = await asyncio.to_thread(disk_free_bytes, self.updates_dir)
        if free < m.size * margin:
            need = m.size * margin / MB
            await self._transition(job, "failed", f"disk {free // MB} MB free < {need:.0f} MB needed "
                                                  f"(artifact x {margin:g})")
            return
        await self._transition(job, "downloading", "waiting for chunks")

    async def _download(self, job: Job) -> None:
        m = self._manifest(job)
        cfg = self.hub.config.updates
        transfer = Transfer(self.updates_dir / job.job, m)
        await asyncio.to_thread(transfer.open)
        event = asyncio.Event()
        self._chunk_events[job.job] = event
        self._transfers[job.job] = transfer
        window = max(2, int(cfg.request_window_kb * 1024) // m.chunk_size)
        puller = Puller(transfer, window)
        interval = cfg.request_interval_s
        unanswered = 0
        was_connected = False
        try:
            while not transfer.complete:
                now = time.time()
                if now >= m.expires:
                    missing = m.chunks - transfer.received
                    await self._transition(job, "failed", f"transfer incomplete: {missing} of {m.chunks} "
                                                          f"chunks missing when the job expired")
                    return
                connected = self.hub.router.connected
                if connected and not was_connected:
                    # at start, after a restart or a reconnect: ask for the first window at once
                    asked = puller.ask(restart=True)
                    log.info("asking for chunks", extra={"kv": {"job": job.job, "received": transfer.received,
                                                                "first": asked[0][0] if asked else None}})
                    self._request(job, asked)
                elif connected and puller.due():
                    self._request(job, puller.ask())  # half the window arrived: ask for more
                was_connected = connected
                event.clear()
                timeout = min(interval, max(0.01, m.expires - now))
                try:
                    await asyncio.wait_for(event.wait(), timeout)
                    interval, unanswered = cfg.request_interval_s, 0
                    self._progress(job, transfer)
                    continue
                except asyncio.TimeoutError:
                    pass
                if not transfer.complete and self.hub.router.connected:
                    unanswered += 1
                    if unanswered > cfg.max_requests:
                        await self._transition(job, "failed", f"transfer incomplete: {unanswered - 1} "
                                                              f"requests for missing chunks went unanswered")
                        return
                    self._request(job, puller.ask(restart=True))
                    interval = min(interval * 2, cfg.request_interval_s * 8) * random.uniform(0.8, 1.2)
        finally:
            self._transfers.pop(job.job, None)
            self._chunk_events.pop(job.job, None)
            await asyncio.to_thread(transfer.close)
        digest = await asyncio.to_thread(transfer.finish)
        if digest != m.sha256:
            await self._transition(job, "rejected", f"sha256 mismatch: got {digest[:16]}..., manifest says "
                                                    f"{m.sha256[:16]}...")
            return
        if job.kind == "model":
            try:
                await asyncio.to_thread(bundle.stage, transfer.artifact_path, self._staged(job),
                                        int(m.size * cfg.max_unpacked_ratio) + 64 * 1024)
            except BundleRejected as exc:
                await self._transition(job, "rejected", f"bundle: {exc.reason}")
                return
        await self._transition(job, "verified", "sha256 ok", progress=1.0)

    def _staged(self, job: Job) -> Path:
        return self.updates_dir / job.job / "staged"

    def _request(self, job: Job, missing: list[tuple[int, int]]) -> None:
        if missing:
            self.hub.outbox.put_message(self.hub.topics.job_request(job.job),
                                        protocol.job_request(job.job, missing))
            log.debug("requested chunks", extra={"kv": {"job": job.job, "ranges": len(missing)}})

    def _progress(self, job: Job, transfer: Transfer) -> None:
        job.progress = transfer.progress
        now = time.monotonic()
        if now - self._last_progress.get(job.job, 0.0) >= PROGRESS_EVERY_S:
            self._last_progress[job.job] = now
            self._publish(job)

    # ------------------------------------------------------------------ gates
    def context(self) -> DeviceContext:
        mqtt = self.hub.providers.get("mqtt")
        rtt = None
        if mqtt is not None:
            with contextlib.suppress(Exception):
                value = mqtt().get("rtt_ms")
                rtt = float(value) if isinstance(value, (int, float)) else None
        try:
            disk_mb: float | None = disk_free_bytes(self.updates_dir) / MB
        except OSError:
            disk_mb = None
        return build_context(self.hub.metrics, self.averager, self.hub.busy, rtt, disk_mb,
                             os.cpu_count() or 1, now=self.local_now())

    async def _wait_for_gates(self, job: Job) -> None:
        m = self._manifest(job)
        while True:
            cfg = self._gate_cfg(job.kind)
            ctx = self.context()
            fails = failing_gates(ctx, cfg, m.size, m.critical)
            if not fails:
                return
            names = sorted(f.gate for f in fails)
            reason = "; ".join(str(f) for f in fails)
            due = job.next_try is None or time.time() >= job.next_try
            if job.state != "deferred" or due or names != self._deferred_gates.get(job.job):
                self._deferred_gates[job.job] = names
                attempts = job.attempts + 1
                delay = next_try_s(attempts, cfg, fails, ctx)
                await self._transition(job, "deferred", reason, attempts=attempts,
                                       next_try=time.time() + delay)
            assert job.next_try is not None
            await self._wait_context_change(max(0.05, job.next_try - time.time()))

    async def _wait_context_change(self, timeout_s: float) -> None:
        waits = [asyncio.create_task(self.hub.changed.wait(), name="updates:wait-changed"),
                 asyncio.create_task(self._ctx_pulse.wait(), name="updates:wait-metrics")]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # ------------------------------------------------------------------ install
    async def _install(self, job: Job) -> None:
        if job.state == "installing" and job.resumes > MAX_RESUMES:
            await self._transition(job, "failed", f"install interrupted {job.resumes} times; giving up")
            return
        m = self._manifest(job)
        installed = self._installed_version(job.kind, job.name)
        if job.kind == "model" and installed == job.version and job.state == "installing":
            await self._transition(job, "succeeded", "active after restart")
            return
        if installed is not None and manifest.compare_versions(job.version, installed) <= 0:
            await self._transition(job, "rejected", f"rollback refused: version {job.version} is not above "
                                                    f"installed {installed}")
            return
        if job.state != "installing":
            await self._transition(job, "installing", "", next_try=None)
        if job.kind == "model":
            await self._install_model(job, m)
        else:
            await self.firmware.install(job)

    async def _install_model(self, job: Job, m: manifest.Manifest) -> None:
        inst = self.hub.model_installer
        if inst is None:
            await self._transition(job, "failed", "no model installer (inference is disabled)")
            return
        staged = self._staged(job)
        if not (staged / bundle.MODEL_FILE).is_file():  # e.g. resumed after the staged dir was lost
            try:
                await asyncio.to_thread(bundle.stage, self.updates_dir / job.job / "artifact", staged,
                                        int(m.size * self.hub.config.updates.max_unpacked_ratio) + 64 * 1024)
            except (BundleRejected, OSError) as exc:
                await self._transition(job, "failed", f"cannot stage the model: {exc}")
                return
        try:
            await asyncio.wait_for(inst.install(staged, job.name, job.version, job.job),
                                   self.hub.config.updates.model_install_timeout_s)
        except ModelRejected as exc:
            await self._transition(job, "failed", f"model rejected: {exc.reason}")
        except ModelRolledBack as exc:
            await self._transition(job, "rolled_back", f"model rolled back: {exc.reason}")
        except asyncio.TimeoutError:
            await self._transition(job, "failed", "model install timed out")
        else:
            await self._transition(job, "succeeded", "serving")

    def _log_path(self, job: Job) -> Path:
        return self.updates_dir / job.job / "log.txt"

    # ------------------------------------------------------------------ bookkeeping
    async def _transition(self, job: Job, state: str, reason: str = "", **changes: Any) -> None:
        if state in ("succeeded", "failed", "rolled_back", "cancelled", "rejected", "verified"):
            changes.setdefault("next_try", None)
        await asyncio.to_thread(self.journal.transition, job, state, reason, **changes)
        self._after_transition(job)

    def _after_transition(self, job: Job) -> None:
        kv = {"job": job.job, "kind": job.kind, "state": job.state, "reason": job.reason}
        log.info("update %s %s@%s: %s %s", job.job, job.name, job.version, job.state, job.reason,
                 extra={"kv": kv})
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):
            append_log(self._log_path(job), f"[{stamp}] {job.state}: {job.reason}")
        self._publish(job)
        # Retained status is last-value-wins (a fast job may skip states on the wire); the event
        # stream is in order and complete, so operators and tests see every transition there.
        severity = "warning" if job.state in ("rejected", "failed", "rolled_back") else "info"
        self.hub.emit_event("update", severity, f"update {job.job} ({job.kind} {job.name} {job.version}) "
                                                f"{job.state}{': ' + job.reason if job.reason else ''}",
                            {"job": job.job, "state": job.state, "reason": job.reason})

    def _publish(self, job: Job) -> None:
        self.hub.outbox.put_state(self.hub.topics.job_status(job.job), protocol.job_status(
            job.job, job.kind, job.name, job.version, job.state, job.reason, round(job.progress, 4),
            job.next_try))

    async def _cleanup(self, job: Job) -> None:
        """A finished job keeps only its log."""
        d = self.updates_dir / job.job

        def clean() -> None:
            if not d.is_dir():
                return
            for p in d.iterdir():
                if p.name == "log.txt":
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()

        await asyncio.to_thread(clean)

    def _provider(self) -> dict[str, Any]:
        jobs = [j.summary() for j in self.journal.jobs.values() if not j.final]
        return {"jobs": jobs, "dropped_chunks": self.dropped_chunks, "rejected_chunks": self.rejected_chunks}

    def _firmware_provider(self) -> dict[str, Any]:
        return {"version": self._installed_version("firmware", "") or "",
                "slot": self.firmware.booted_slot or self.journal.firmware.get("slot", "")}
