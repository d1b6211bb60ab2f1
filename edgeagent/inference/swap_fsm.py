"""What to do next about a model swap, decided without awaiting, touching files or reading a clock.

The installer (`installer.py`) tells a `SwapMachine` what happened (an install was asked for, the
candidate validated, a window was served, time passed, the pipeline restarted, the install was
cancelled) and carries out the frozen decisions it gets back. Every path through a swap, including
cancellation and restart, is therefore testable without an event loop or an interpreter.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

CANCELLED = "install cancelled"


class Outcome(Protocol):
    """One served window as far as a decision cares (`runner.Result` is one)."""

    @property
    def seq(self) -> int: ...

    @property
    def tag(self) -> str: ...

    @property
    def error(self) -> str | None: ...

    @property
    def ok(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    version: str

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"


# ---------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True, slots=True)
class Validate:
    """Store the candidate and validate it off the loop."""

    candidate: Candidate


@dataclass(frozen=True, slots=True)
class Defer:
    """Another install holds the swap: try again once it is finished."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """The candidate never served a window: delete its files, report ModelRejected."""

    reason: str
    candidate: Candidate | None = None


@dataclass(frozen=True, slots=True)
class Activate:
    """Swap the candidate in between two windows; probation already counts its results."""

    candidate: Candidate


@dataclass(frozen=True, slots=True)
class Commit:
    """Probation passed: record the candidate as active on disk."""

    candidate: Candidate
    served: int


@dataclass(frozen=True, slots=True)
class Rollback:
    """Probation failed: swap `restore` back, delete the candidate, report ModelRolledBack."""

    candidate: Candidate
    restore: str
    reason: str


@dataclass(frozen=True, slots=True)
class RollbackActive:
    """The active, proven model keeps failing: go back to the previous stored version."""

    tag: str
    reason: str


@dataclass(frozen=True, slots=True)
class Load:
    """At start: try to load this stored version."""

    version: str


@dataclass(frozen=True, slots=True)
class Serve:
    """At start: serve `version`; when it is not the recorded one, roll active.json back to it."""

    version: str
    rolled_back_from: str | None
    failures: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoModel:
    """At start: no stored version loads."""

    reason: str


Decision = (Validate | Defer | Reject | Activate | Commit | Rollback | RollbackActive | Load | Serve
            | NoModel)


# ---------------------------------------------------------------------------------------- counters
class Probation:
    """Counts the first `windows` results of a newly swapped-in model; one bad result fails it."""

    def __init__(self, tag: str, windows: int) -> None:
        self.tag = tag
        self.needed = windows
        self.served = 0
        self.failure: str | None = None
        self.first_seq: int | None = None

    @property
    def done(self) -> bool:
        return self.failure is not None or self.served >= self.needed

    def observe(self, r: Outcome) -> bool:
        """Count one result; True when probation just finished (passed or failed)."""
        if r.tag != self.tag or self.done:
            return False
        if self.first_seq is None:
            self.first_seq = r.seq
        self.served += 1
        if r.error is not None:
            self.failure = f"invoke failed on window {r.seq}: {r.error}"
        elif not r.ok:
            self.failure = f"non-finite output on window {r.seq}"
        return self.done


class FailureWatch:
    """After probation: `streak` consecutive failing results of the active model ask for a rollback."""

    def __init__(self, streak: int = 3) -> None:
        self.streak = streak
        self.bad = 0
        self.last_error = ""

    def observe(self, r: Outcome) -> bool:
        if r.ok:
            self.bad = 0
            return False
        self.bad += 1
        self.last_error = r.error or "non-finite output"
        return self.bad == self.streak


# ---------------------------------------------------------------------------------------- machine
class Phase(enum.Enum):
    IDLE = "idle"
    VALIDATING = "validating"
    PROBATION = "probation"  # from the swap request on: its first results may arrive before the ack
    COMMITTING = "committing"  # active.json is being written; a cancellation no longer undoes it


class SwapMachine:
    """One model's swap state: the proven active model, at most one candidate, its probation."""

    def __init__(self, rollback_streak: int = 3) -> None:
        self.rollback_streak = rollback_streak
        self.phase = Phase.IDLE
        self.active: Candidate | None = None
        self.candidate: Candidate | None = None
        self.probation: Probation | None = None
        self.watch = FailureWatch(rollback_streak)
        self._deadline: float | None = None
        self._timeout_s = 0.0

    # -- start / restart
    @staticmethod
    def start(recorded: str) -> Load:
        """At start the version active.json names is tried first."""
        return Load(recorded)

    @staticmethod
    def load_failed(recorded: str, previous: Sequence[str], failures: Sequence[str]) -> Load | NoModel:
        """The last Load failed (`failures` so far, one per tried version): next one, or give up."""
        chain = (recorded, *previous)
        if len(failures) < len(chain):
            return Load(chain[len(failures)])
        return NoModel("no stored version loads: " + "; ".join(failures))

    @staticmethod
    def loaded(recorded: str, version: str, failures: Sequence[str]) -> Serve:
        return Serve(version, None if version == recorded else recorded, tuple(failures))

    def opened(self, active: Candidate) -> tuple[Decision, ...]:
        """The pipeline (re)started serving `active` (read back from active.json). A candidate that
        was on probation went with the old runner and is unproven: it is rolled back."""
        out: tuple[Decision, ...] = ()
        if self.phase is Phase.PROBATION and self.candidate is not None:
            out = (Rollback(self.candidate, active.tag, "the pipeline restarted during probation"),)
            self._idle()
        self.active = active
        self.watch = FailureWatch(self.rollback_streak)
        return out

    # -- install
    def begin(self, candidate: Candidate) -> Validate | Defer | Reject:
        """An install, once the pipeline serves (`opened` was called)."""
        if self.phase is not Phase.IDLE:
            busy = self.candidate.tag if self.candidate is not None else "another model"
            return Defer(f"{busy} is being installed ({self.phase.value})")
        if self.active is not None and candidate.version == self.active.version \
                and candidate.name == self.active.name:
            return Reject(f"{candidate.tag} is already the active model")
        self.phase, self.candidate = Phase.VALIDATING, candidate
        return Validate(candidate)

    def validated(self, probation_windows: int) -> Activate:
        """The candidate passed validation: it is swapped in and serves `probation_windows` on trial."""
        assert self.phase is Phase.VALIDATING and self.candidate is not None, self.phase
        self.phase = Phase.PROBATION
        self.probation = Probation(self.candidate.tag, probation_windows)
        self._deadline = None
        return Activate(self.candidate)

    def validation_failed(self, reason: str) -> Reject:
        return self._reject(reason)

    def swap_failed(self, reason: str) -> Reject:
        """The runner refused the swap (it stopped: the pipeline is being rebuilt)."""
        return self._reject(reason)

    def swapped(self, now: float, timeout_s: float) -> tuple[Decision, ...]:
        """The candidate serves from now on; probation must finish by `now + timeout_s`."""
        if self.phase is not Phase.PROBATION:
            return ()  # decided already (results came first, or the pipeline restarted)
        self._deadline, self._timeout_s = now + timeout_s, timeout_s
        return ()

    def served(self, r: Outcome) -> tuple[Decision, ...]:
        """One window's result, whichever model served it."""
        p, c = self.probation, self.candidate
        if self.phase is Phase.PROBATION and p is not None and c is not None:
            if not p.observe(r):
                return ()
            if p.failure is not None:
                return (self._rollback(p.failure),)
            self.phase = Phase.COMMITTING
            return (Commit(c, p.served),)
        if self.phase in (Phase.IDLE, Phase.VALIDATING) and self.active is not None \
                and r.tag == self.active.tag and self.watch.observe(r):
            return (RollbackActive(self.active.tag, f"{self.rollback_streak} failing windows in a row "
                                   f"(last: {self.watch.last_error})"),)
        return ()

    def tick(self, now: float) -> tuple[Decision, ...]:
        """Time passed: a probation past its deadline fails."""
        p = self.probation
        if self.phase is not Phase.PROBATION or p is None or self._deadline is None or now < self._deadline:
            return ()
        return (self._rollback(f"probation timed out: {p.served} of {p.needed} windows served in "
                               f"{self._timeout_s:.0f} s"),)

    @property
    def deadline(self) -> float | None:
        """When the running probation times out (None: not swapped in yet, or no probation)."""
        return self._deadline if self.phase is Phase.PROBATION else None

    def commit_failed(self, reason: str) -> Rollback:
        """active.json could not be written: the candidate is not the active model."""
        assert self.phase is Phase.COMMITTING, self.phase
        return self._rollback(reason)

    def committed(self) -> None:
        """active.json names the candidate now."""
        assert self.phase is Phase.COMMITTING and self.candidate is not None, self.phase
        self.active = self.candidate
        self.watch = FailureWatch(self.rollback_streak)
        self._idle()

    def cancel(self) -> tuple[Decision, ...]:
        """The install was cancelled: undo whatever is not yet on disk."""
        if self.phase is Phase.VALIDATING:
            return (self._reject(CANCELLED),)
        if self.phase is Phase.PROBATION:
            return (self._rollback(CANCELLED),)
        return ()  # idle, or committing: active.json is being written, the commit stands

    def restored(self, active: Candidate) -> None:
        """A RollbackActive was carried out: `active` serves and is recorded."""
        self.active = active
        self.watch = FailureWatch(self.rollback_streak)

    # -- internals
    def _reject(self, reason: str) -> Reject:
        c = self.candidate
        self._idle()
        return Reject(reason, c)

    def _rollback(self, reason: str) -> Rollback:
        c, active = self.candidate, self.active
        assert c is not None and active is not None
        self._idle()
        return Rollback(c, active.tag, reason)

    def _idle(self) -> None:
        self.phase, self.candidate, self.probation, self._deadline = Phase.IDLE, None, None, None
