"""Record types the runner fills in and the report reads: kept apart so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FaultRecord:
    name: str
    target: str
    start: float  # monotonic
    end: float
    detail: str
    skipped: bool = False
    wall: float = 0.0  # time.time() at the start, to line up with the agents' logs


@dataclass(frozen=True, slots=True)
class RssSample:
    """One read of an agent's /proc/PID/status. `pid` names the process generation: a restarted
    agent is a new process whose memory says nothing about the one before it."""

    at_s: float  # monotonic
    pid: int
    mb: float | None  # None: no VmRSS line (a killed process, a zombie) or no status file at all
