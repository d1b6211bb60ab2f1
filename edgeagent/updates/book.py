"""Job bookkeeping: journal a transition before its side effect, then log, report and publish it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgeagent.core import protocol
from edgeagent.core.live import LiveConfig, Outbox
from edgeagent.core.rejections import Rejections
from edgeagent.updates.jobs import Job, Journal

log = logging.getLogger("edgeagent.updates.component")  # one logger name for the whole job story

# entering these clears a pending retry time (nothing is scheduled for them)
CLEARS_NEXT_TRY = frozenset({"succeeded", "failed", "rolled_back", "cancelled", "rejected", "verified"})

JOB_LOG_MAX_BYTES = 64 * 1024  # past this the oldest half of updates/J/log.txt is dropped


def append_capped(path: Path, text: str, max_bytes: int = JOB_LOG_MAX_BYTES) -> None:
    """Append a line; a log that would pass `max_bytes` keeps only its newest half (whole lines)
    after a marker saying how much was dropped. Blocks: the JobBook's writer thread calls it."""
    line = (text if text.endswith("\n") else text + "\n").encode("utf-8", errors="replace")
    line = line[-max_bytes // 2:]  # one huge line cannot defeat the cap
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if size + len(line) <= max_bytes:
        with open(path, "ab") as f:
            f.write(line)
        return
    data = path.read_bytes()
    keep = data[-(max_bytes // 2 - len(line)):] if max_bytes // 2 > len(line) else b""
    cut = keep.find(b"\n") + 1 if keep and len(keep) < len(data) else 0
    keep = keep[cut:]
    marker = f"[... {len(data) - len(keep)} bytes of older lines dropped]\n".encode()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(marker + keep + line)
    os.replace(tmp, path)


class JobBook:
    """The journal plus what every transition owes the operator: job log, retained status, event."""

    def __init__(self, live: LiveConfig, outbox: Outbox, journal: Journal, updates_dir: Path,
                 rejections: Rejections | None = None) -> None:
        self.live = live
        self.outbox = outbox
        self.journal = journal
        self.updates_dir = updates_dir
        # every refusal on the update path, one event per reason per window (kind "update")
        self.rejections = rejections if rejections is not None else Rejections(outbox)
        # job log lines leave the loop on one thread of their own: in order, never blocking it
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="updates-log")

    def close(self) -> None:
        """Let the queued log lines reach the disk, then stop the writer thread."""
        self._writer.shutdown(wait=True)

    def write_log(self, job_id: str, text: str) -> None:
        """Queue one line for updates/J/log.txt (the writer thread appends, capped, in order)."""
        path = self.updates_dir / job_id / "log.txt"

        def write() -> None:
            try:
                append_capped(path, text)
            except OSError as exc:
                log.debug("job log not written: %s", exc)

        with contextlib.suppress(RuntimeError):  # after close(): the agent is stopping
            self._writer.submit(write)

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
        self.write_log(job.job, f"[{stamp}] {job.state}: {job.reason}")
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
            job.next_try, shadow=job.shadow))

    def refuse(self, job_id: str, key: str, reason: str, existing: Job | None) -> None:
        """A manifest we cannot accept. Anyone who can publish can send these, so they cost little:
        counted per `key` (one event per window), and only the first of a window also gets a
        retained status (so an operator's push hears why, and a flood of random job ids does not
        become a flood of retained topics). A real job's status is never clobbered."""
        first = self.rejections.refuse("update", key, f"update {job_id} refused: {reason}",
                                       {"job": job_id})
        if existing is not None:
            if first:
                self.write_log(job_id, f"refused a manifest: {reason}")
            return
        if first:
            payload = protocol.job_status(job_id, "", "", "", "rejected", reason)
            self.outbox.put_state(self.live.topics.job_status(job_id), payload)

    def note(self, job: Job, key: str, reason: str) -> None:
        """A problem that does not change the job's state (a bad chunk): counted, and the first of
        its window goes in the job's log; the retained status changes only with the state."""
        if self.rejections.refuse("update", key, f"update {job.job}: {reason}", {"job": job.job}):
            self.write_log(job.job, reason)

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
