"""The update job state machine and its journal (`<state_dir>/journal.json`, written atomically).

Mender's rule: the new state is persisted *before* the side effect it announces, so a restart at
any point resumes from a state that says what may have half-happened. A per-job resume counter
breaks loops (a job that keeps crashing the agent in the same state ends instead of looping).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.core.fsutil import atomic_write_json, read_json
from edgeagent.core.protocol import FINAL_JOB_STATES, JOB_STATES

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
MAX_FINAL_JOBS = 200  # finished jobs kept for idempotency/replay checks; oldest dropped

# state -> states it may move to (rejected/failed/cancelled are reachable where they make sense)
TRANSITIONS: dict[str, frozenset[str]] = {
    "received": frozenset({"downloading", "rejected", "failed", "cancelled"}),
    "downloading": frozenset({"verified", "rejected", "failed", "cancelled"}),
    "verified": frozenset({"deferred", "installing", "shadowing", "failed", "cancelled", "rejected"}),
    "deferred": frozenset({"deferred", "installing", "shadowing", "failed", "cancelled"}),
    # a candidate runs beside the serving model (manifest `shadow`); restarted after an agent restart
    "shadowing": frozenset({"shadowing", "installing", "rejected", "failed", "cancelled"}),
    "installing": frozenset({"rebooting", "succeeded", "failed", "rolled_back", "rejected"}),
    "rebooting": frozenset({"health_check", "failed", "rolled_back"}),
    "health_check": frozenset({"succeeded", "rolled_back", "failed", "health_check"}),
}
CANCELLABLE = frozenset({"received", "downloading", "verified", "deferred", "shadowing"})


class InvalidTransition(RuntimeError):
    """A bug, not bad input: the code tried a move the state machine does not allow."""


@dataclass
class Job:
    job: str
    kind: str
    name: str
    version: str
    digest: str
    manifest: dict[str, Any]
    state: str = "received"
    reason: str = ""
    progress: float = 0.0
    next_try: float | None = None
    attempts: int = 0  # gate evaluations that deferred
    resumes: int = 0  # agent restarts that found this job unfinished in a side-effect state
    boot_attempts: int = 0
    previous_slot: str | None = None
    shadow: dict[str, Any] | None = None  # figures of the shadow evaluation, kept after it ends
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    history: list[tuple[str, float]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        job = cls(**{k: v for k, v in d.items() if k in names})
        job.history = [(str(s), float(t)) for s, t in job.history]
        if job.state not in JOB_STATES:
            raise ValueError(f"unknown state {job.state!r}")
        return job

    def summary(self) -> dict[str, Any]:
        return {"job": self.job, "kind": self.kind, "name": self.name, "version": self.version,
                "state": self.state, "reason": self.reason, "progress": round(self.progress, 3),
                "next_try": self.next_try, **({"shadow": self.shadow} if self.shadow else {})}


@dataclass(frozen=True, slots=True)
class JobFacts:
    """A read-only snapshot of a job: what the decisions depend on."""

    job: str
    kind: str = "model"
    version: str = "1.0.0"
    state: str = "received"
    attempts: int = 0
    next_try: float | None = None
    resumes: int = 0
    deferred_gates: tuple[str, ...] = ()  # gates that failed at the last deferral (in memory)
    digest: str = ""
    shadow: bool = False  # the manifest asks for a shadow evaluation before the install

    @classmethod
    def of(cls, job: Job, deferred_gates: tuple[str, ...] = ()) -> JobFacts:
        return cls(job=job.job, kind=job.kind, version=job.version, state=job.state,
                   attempts=job.attempts, next_try=job.next_try, resumes=job.resumes,
                   deferred_gates=deferred_gates, digest=job.digest,
                   shadow=job.kind == "model" and "shadow" in job.manifest)

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES


class Journal:
    """All jobs plus per-kind/name facts (newest issued_at, firmware record), in one JSON file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / JOURNAL
        self.jobs: dict[str, Job] = {}
        self.newest_issued: dict[str, float] = {}  # "kind/name" -> issued_at
        self._lock = threading.RLock()  # saves come from several worker threads
        self.firmware: dict[str, str] = {}  # {"version", "slot"} of the last committed firmware

    def load(self) -> None:
        try:
            raw = read_json(self.path)
        except FileNotFoundError:
            return
        except ValueError:
            # atomic writes make this unreachable short of disk corruption: keep the evidence
            bad = self.path.with_suffix(".corrupt")
            self.path.replace(bad)
            log.error("journal unreadable; moved aside", extra={"kv": {"path": str(bad)}})
            return
        for d in raw.get("jobs", []):
            try:
                job = Job.from_dict(d)
            except (TypeError, ValueError) as exc:
                log.error("journal entry skipped: %s", exc)
                continue
            self.jobs[job.job] = job
        self.newest_issued = {str(k): float(v) for k, v in raw.get("newest_issued", {}).items()}
        self.firmware = {str(k): str(v) for k, v in raw.get("firmware", {}).items()}

    def save(self) -> None:
        """Persist everything. Jobs of both kinds save from worker threads: one lock makes each
        save see a whole state and land in order (an older snapshot never renames over a newer)."""
        with self._lock:
            finals = sorted((j for j in self.jobs.values() if j.final), key=lambda j: j.updated)
            for old in finals[:-MAX_FINAL_JOBS] if len(finals) > MAX_FINAL_JOBS else []:
                del self.jobs[old.job]
            atomic_write_json(self.path, {"v": 1, "jobs": [j.as_dict() for j in self.jobs.values()],
                                          "newest_issued": self.newest_issued, "firmware": self.firmware},
                              mode=0o600)

    def transition(self, job: Job, state: str, reason: str = "", **changes: Any) -> Job:
        """Move `job` to `state` and persist it before returning (before any side effect)."""
        with self._lock:
            if state not in TRANSITIONS.get(job.state, frozenset()):
                raise InvalidTransition(f"job {job.job}: {job.state} -> {state} is not allowed")
            job.state = state
            job.reason = reason
            for k, v in changes.items():
                setattr(job, k, v)
            job.updated = time.time()
            job.history.append((state, job.updated))
            del job.history[:-50]
            self.jobs[job.job] = job
            self.save()
        return job

    def add(self, job: Job, issued: tuple[str, float] | None = None) -> None:
        """Record a new job (and, for an accepted manifest, its kind/name's newest issued_at)."""
        with self._lock:
            job.history.append((job.state, job.updated))
            self.jobs[job.job] = job
            if issued is not None:
                key, issued_at = issued
                self.newest_issued[key] = max(issued_at, self.newest_issued.get(key, 0.0))
            self.save()

    def unfinished(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if not j.final), key=lambda j: j.created)
