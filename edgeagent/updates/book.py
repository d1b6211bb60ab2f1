"""Job bookkeeping: journal a transition before its side effect, then log, report and publish it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from edgeagent.core import protocol
from edgeagent.core.live import LiveConfig, Outbox
from edgeagent.updates.installers import append_log
from edgeagent.updates.jobs import Job, Journal

log = logging.getLogger("edgeagent.updates.component")  # one logger name for the whole job story

# entering these clears a pending retry time (nothing is scheduled for them)
CLEARS_NEXT_TRY = frozenset({"succeeded", "failed", "rolled_back", "cancelled", "rejected", "verified"})


class JobBook:
    """The journal plus what every transition owes the operator: job log, retained status, event."""

    def __init__(self, live: LiveConfig, outbox: Outbox, journal: Journal, updates_dir: Path) -> None:
        self.live = live
        self.outbox = outbox
        self.journal = journal
        self.updates_dir = updates_dir

    def log_path(self, job: Job) -> Path:
        return self.updates_dir / job.job / "log.txt"

    async def transition(self, job: Job, state: str, reason: str = "", **changes: Any) -> None:
        """Persist the new state (before its side effect), then report it."""
        if state in CLEARS_NEXT_TRY:
            changes.setdefault("next_try", None)
        await asyncio.to_thread(self.journal.transition, job, state, reason, **changes)
        self.reported(job)

    async def add(self, job: Job, issued: tuple[str, float] | None = None) -> None:
        await asyncio.to_thread(self.journal.add, job, issued)
        self.reported(job)

    def reported(self, job: Job) -> None:
        kv = {"job": job.job, "kind": job.kind, "state": job.state, "reason": job.reason}
        log.info("update %s %s@%s: %s %s", job.job, job.name, job.version, job.state, job.reason,
                 extra={"kv": kv})
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):
            append_log(self.log_path(job), f"[{stamp}] {job.state}: {job.reason}")
        self.publish(job)
        # Retained status is last-value-wins (a fast job may skip states on the wire); the event
        # stream is in order and complete, so operators and tests see every transition there.
        severity = "warning" if job.state in ("rejected", "failed", "rolled_back") else "info"
        self.outbox.emit_event("update", severity, f"update {job.job} ({job.kind} {job.name} {job.version}) "
                                                   f"{job.state}{': ' + job.reason if job.reason else ''}",
                               {"job": job.job, "state": job.state, "reason": job.reason})

    def publish(self, job: Job) -> None:
        self.outbox.put_state(self.live.topics.job_status(job.job), protocol.job_status(
            job.job, job.kind, job.name, job.version, job.state, job.reason, round(job.progress, 4),
            job.next_try))

    def refuse(self, job_id: str, reason: str, existing: Job | None) -> None:
        """A manifest we cannot accept: say why in the status (without clobbering a real job's state)."""
        log.warning("manifest refused: %s", reason, extra={"kv": {"job": job_id}})
        self.outbox.emit_event("update", "warning", f"update {job_id} refused: {reason}",
                               {"job": job_id, "reason": reason})
        if existing is not None:
            payload = protocol.job_status(existing.job, existing.kind, existing.name, existing.version,
                                          existing.state, f"{existing.reason} (refused a manifest: {reason})"
                                          .strip(), existing.progress, existing.next_try)
        else:
            payload = protocol.job_status(job_id, "", "", "", "rejected", reason)
        self.outbox.put_state(self.live.topics.job_status(job_id), payload)

    def note(self, job: Job, reason: str) -> None:
        """A problem worth showing in the status that does not change the state (a bad chunk)."""
        job.reason = reason
        with contextlib.suppress(OSError):
            append_log(self.log_path(job), reason)
        self.publish(job)

    async def cleanup(self, job: Job) -> None:
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
