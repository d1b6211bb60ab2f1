"""Signed support requests (`P/D/support/J/request`): checked as pure functions, plus the bounded,
persisted record of job ids already served (replays are refused) and the payloads we answer with.

Checks run cheapest and least trusting first: JSON shape, then `type` and signature (nothing else is
believed before it verifies), then the job of the topic, the audience, the expiry and the replay.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.core import audience, signing
from edgeagent.core.errors import EdgeAgentError, ProtocolError, SignatureInvalid
from edgeagent.core.fsutil import atomic_write_bytes
from edgeagent.core.protocol import loads_object

if TYPE_CHECKING:  # cryptography is imported on first use (core/signing.py)
    from edgeagent.core.signing import PublicKey

TYPE = "support"
ACTIONS = ("bundle", "log_level")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STATES = ("refused", "building", "sending", "done", "failed")
MAX_REQUEST_BYTES = 16 * 1024  # a request is a few hundred bytes; anything larger is not parsed
FUTURE_SKEW_S = 300.0  # clocks of operator and board may differ this much
MAX_JOB_LEN = 64
MAX_SEEN = 1024
DEFAULT_LINES = 500
_JOB_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Refused(EdgeAgentError):
    """A request we do not act on: `reason` is a short stable key (events, counters), `message` the story."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    max_lines: int
    max_log_level_s: float
    max_ttl_s: float


@dataclass(frozen=True, slots=True)
class SupportRequest:
    job: str
    action: str
    lines: int
    level: str
    duration_s: float
    issued_at: float
    expires: float
    key_id: str


def job_of(topic: str, base: str) -> str | None:
    """J of `base/support/J/request`, or None when the topic is not a well-formed request topic."""
    prefix = f"{base}/support/"
    if not topic.startswith(prefix) or not topic.endswith("/request"):
        return None
    job = topic[len(prefix):-len("/request")]
    if not job or len(job) > MAX_JOB_LEN or not set(job) <= _JOB_CHARS:
        return None
    return job


def _number(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Refused("malformed", f"{key}: expected a number")
    return float(value)


def check(topic: str, payload: bytes, *, base: str, trusted: Mapping[str, PublicKey],
          device_id: str, groups: Sequence[str], seen: Seen, limits: Limits,
          now: float) -> SupportRequest:
    """The request this message carries, or Refused with the reason."""
    job = job_of(topic, base)
    if job is None:
        raise Refused("topic", f"not a support request topic (job id: 1-{MAX_JOB_LEN} of A-Z a-z 0-9 . _ -)")
    if len(payload) > MAX_REQUEST_BYTES:
        raise Refused("malformed", f"request of {len(payload)} bytes (at most {MAX_REQUEST_BYTES})")
    try:
        doc = loads_object(topic, payload)
    except ProtocolError as exc:
        raise Refused("malformed", str(exc.reason)) from exc
    try:
        key_id = signing.verify(doc, trusted, TYPE)
    except SignatureInvalid as exc:
        raise Refused("signature", str(exc)) from exc
    if doc.get("job") != job:
        raise Refused("job", f"job {str(doc.get('job'))[:80]!r} does not match the topic's {job!r}")
    try:
        problem = audience.problem(audience.parse(doc.get("targets")), device_id, groups)
    except audience.AudienceError as exc:
        raise Refused("malformed", str(exc)) from exc
    if problem is not None:
        raise Refused("audience", problem)
    issued_at, expires = _number(doc, "issued_at"), _number(doc, "expires")
    if issued_at > now + FUTURE_SKEW_S:
        raise Refused("future", f"issued {issued_at - now:.0f} s in the future")
    if expires <= now:
        raise Refused("expired", f"expired {now - expires:.0f} s ago")
    if expires - issued_at > limits.max_ttl_s:
        raise Refused("malformed", f"valid for {expires - issued_at:.0f} s, at most "
                                   f"{limits.max_ttl_s:.0f} s (support.max_request_ttl_s)")
    if job in seen:
        raise Refused("replay", f"job {job!r} was requested before")
    action = doc.get("action")
    if action not in ACTIONS:
        raise Refused("malformed", f"action {str(action)[:40]!r}: expected one of {', '.join(ACTIONS)}")
    lines, level, duration_s = 0, "", 0.0
    if action == "bundle":
        raw = doc.get("lines", DEFAULT_LINES)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise Refused("malformed", "lines: expected a non-negative integer")
        lines = min(raw, limits.max_lines)
    else:
        level = str(doc.get("level", "")).upper()
        if level not in LEVELS:
            raise Refused("malformed", f"level {str(doc.get('level'))[:20]!r}: "
                                       f"expected one of {', '.join(LEVELS)}")
        duration_s = _number(doc, "duration_s")
        if duration_s <= 0:
            raise Refused("malformed", "duration_s: expected a positive number")
        duration_s = min(duration_s, limits.max_log_level_s)
    return SupportRequest(job, str(action), lines, level, duration_s, issued_at, expires, key_id)


class Seen:
    """Job ids already accepted, each with its expiry, persisted (JSON, atomic) and bounded.

    An expired id can be forgotten: its request is refused as expired before replay matters. When
    more than MAX_SEEN unexpired ids are held, the soonest to expire is dropped first."""

    def __init__(self, path: Path, max_ids: int = MAX_SEEN) -> None:
        self.path = path
        self.max_ids = max_ids
        self.ids: dict[str, float] = {}

    def load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            self.ids = {str(k): float(v) for k, v in doc.get("jobs", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            self.ids = {}  # missing or damaged: start empty (expiry still bounds replays)

    def __contains__(self, job: object) -> bool:
        return job in self.ids

    def add(self, job: str, expires: float, now: float) -> None:
        self.ids = {j: e for j, e in self.ids.items() if e > now}
        self.ids[job] = expires
        while len(self.ids) > self.max_ids:
            del self.ids[min(self.ids, key=lambda j: self.ids[j])]

    def dump(self) -> bytes:
        """What `write` persists; taken on the loop, so a write in a thread never sees it change."""
        return json.dumps({"v": 1, "jobs": self.ids}).encode()

    def write(self, data: bytes) -> None:
        """Blocking: run it off the event loop."""
        atomic_write_bytes(self.path, data)

    def save(self) -> None:
        self.write(self.dump())


def status(job: str, state: str, reason: str = "", progress: float = 0.0, ts: float | None = None,
           **extra: Any) -> dict[str, Any]:
    if state not in STATES:
        raise ValueError(f"unknown support state {state!r}")
    return {"v": 1, "job": job, "state": state, "reason": reason, "progress": round(progress, 4),
            "ts": ts if ts is not None else time.time(), **extra}


def manifest(job: str, size: int, sha256: str, chunk_size: int, files: Sequence[tuple[str, int]],
             omitted: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {"v": 1, "job": job, "size": size, "sha256": sha256, "chunks": chunk_count(size, chunk_size),
            "chunk_size": chunk_size, "files": [{"name": n, "size": s} for n, s in files],
            "omitted": [{"name": n, "reason": r} for n, r in omitted]}


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))
