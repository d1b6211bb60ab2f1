"""What an update job does next, decided without I/O: events in, frozen decisions out.

The component (component.py) measures (disk, chunks, gates, installed versions), feeds what it
measured here as an event, and performs the decisions. Nothing here awaits, reads a clock or
touches a file: time comes in with the events and randomness through `rng`, so every transition
can be tested without an event loop, a broker or a disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edgeagent.core.backoff import backoff_s
from edgeagent.core.config import GateConfig
from edgeagent.monitor.context import DeviceContext, failing_gates, next_try_s
from edgeagent.updates import manifest
from edgeagent.updates.jobs import CANCELLABLE, JobFacts

MAX_RESUMES = 5  # restarts that found a job mid-install before we give up on it (loop breaker)
MB = 1024 * 1024
# shadowing: a candidate that crashes the agent while it is compared must not loop forever either
SIDE_EFFECT_STATES = frozenset({"installing", "rebooting", "health_check", "shadowing"})


# ---------------------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class ManifestReceived:
    """A manifest arrived; each problem is '' when that stage passed (or was not reached)."""

    digest: str = ""  # of the parsed message; '' when it could not be parsed
    parse_problem: str = ""  # too large, malformed, names another job
    signature_problem: str = ""  # untrusted, unsigned, no keys configured, malformed fields
    # signed, but names other devices or groups: a replay from elsewhere, refused like a forgery
    # (counted, nothing journaled), since this device was never meant to act on it
    audience_problem: str = ""
    check_problem: str = ""  # signed, but not for us (expired, arch, version not newer, ...)


@dataclass(frozen=True, slots=True)
class Restarted:
    """The agent started and found this job unfinished in the journal."""


@dataclass(frozen=True, slots=True)
class Resume:
    """The job's task starts or finished a step: what is the next step for its state?"""


@dataclass(frozen=True, slots=True)
class DiskMeasured:
    free_bytes: int
    artifact_bytes: int
    margin: float


@dataclass(frozen=True, slots=True)
class DownloadTick:
    """One turn of the transfer loop, before waiting for chunks."""

    now: float
    expires: float
    connected: bool
    was_connected: bool
    window_due: bool  # half the requested window has arrived
    received: int
    chunks: int


@dataclass(frozen=True, slots=True)
class ChunksQuiet:
    """No new chunk arrived within the request interval."""

    connected: bool
    unanswered: int  # requests that went unanswered before this one
    max_requests: int
    interval_s: float  # the configured request interval (the backoff's base)


@dataclass(frozen=True, slots=True)
class ChunkProgress:
    now: float  # monotonic
    last_published: float  # monotonic, 0.0 when never
    every_s: float


@dataclass(frozen=True, slots=True)
class DownloadComplete:
    sha256: str  # of the received file
    expected: str  # from the manifest


@dataclass(frozen=True, slots=True)
class Staged:
    problem: str = ""  # '' when the bundle unpacked safely


@dataclass(frozen=True, slots=True)
class GatesEvaluated:
    ctx: DeviceContext
    gates: GateConfig
    artifact_bytes: int
    critical: bool
    now: float


@dataclass(frozen=True, slots=True)
class InstallReady:
    """The kind's install lock is held; what is installed now?"""

    installed_version: str | None


@dataclass(frozen=True, slots=True)
class SwapCommitted:
    reason: str = "serving"


@dataclass(frozen=True, slots=True)
class SwapRolledBack:
    reason: str


@dataclass(frozen=True, slots=True)
class InstallFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class ShadowDone:
    """The shadow evaluation ended: promote, or not (`failed`: the candidate did not even validate)."""

    promote: bool
    reason: str
    failed: bool = False


@dataclass(frozen=True, slots=True)
class CancelRequested:
    problem: str = ""  # '' when the cancel is signed by a trusted key and names this job


Event = (ManifestReceived | Restarted | Resume | DiskMeasured | DownloadTick | ChunksQuiet | ChunkProgress
         | DownloadComplete | Staged | GatesEvaluated | InstallReady | SwapCommitted | SwapRolledBack
         | InstallFailed | ShadowDone | CancelRequested)


# ------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True, slots=True)
class Refuse:
    """A message we cannot take: say why (status and event), journal nothing, touch no job."""

    reason: str


@dataclass(frozen=True, slots=True)
class Accept:
    """A new, valid, applicable job: journal it as received and drive it."""


@dataclass(frozen=True, slots=True)
class Republish:
    """The same manifest again: a no-op that re-sends the status (and wakes a waiting transfer)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Journal the job as rejected (a signed manifest is remembered, so its replay is a no-op)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Finish:
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class CountResume:
    """Persist one more restart in a side-effect state before anything runs again."""


@dataclass(frozen=True, slots=True)
class CheckDisk:
    pass


@dataclass(frozen=True, slots=True)
class StartDownload:
    reason: str = "waiting for chunks"


@dataclass(frozen=True, slots=True)
class Download:
    pass


@dataclass(frozen=True, slots=True)
class RequestChunks:
    restart: bool  # ask from the first missing chunk (else: the next window)
    wait_s: float | None = None  # the next request interval, when it changes


@dataclass(frozen=True, slots=True)
class PublishStatus:
    pass


@dataclass(frozen=True, slots=True)
class Stage:
    """Unpack the model bundle (safely) before calling it verified."""


@dataclass(frozen=True, slots=True)
class MarkVerified:
    reason: str = "sha256 ok"


@dataclass(frozen=True, slots=True)
class EvaluateGates:
    pass


@dataclass(frozen=True, slots=True)
class Defer:
    next_try: float
    reasons: str
    gates: tuple[str, ...]
    attempts: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Gates still closed for the same reasons: wait until `until` or a context change."""

    until: float


@dataclass(frozen=True, slots=True)
class CheckInstall:
    """Take the kind's install lock, then look at what is installed (InstallReady)."""


@dataclass(frozen=True, slots=True)
class Install:
    enter: bool  # journal 'installing' first (False: resuming an install)


@dataclass(frozen=True, slots=True)
class Shadow:
    """Run the candidate beside the serving model first (manifest `shadow`)."""

    enter: bool  # journal 'shadowing' first (False: restarting a shadow run after an agent restart)


@dataclass(frozen=True, slots=True)
class Promote:
    """The shadow run passed: journal 'installing' and install (hot swap, probation) as any model."""

    reason: str


@dataclass(frozen=True, slots=True)
class AwaitReboot:
    """Firmware: the reboot into the new slot happened (or was attempted): check its health."""


@dataclass(frozen=True, slots=True)
class StopJob:
    """Cancel the job's task and wait for it, before the final state is journaled."""


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str


Decision = (Refuse | Accept | Republish | Reject | Finish | CountResume | CheckDisk | StartDownload
            | Download | RequestChunks | PublishStatus | Stage | MarkVerified | EvaluateGates | Defer | Wait
            | CheckInstall | Install | Shadow | Promote | AwaitReboot | StopJob | Ignore)


# --------------------------------------------------------------------------------------- decide
def decide(job: JobFacts | None, event: Event, rng: random.Random | None = None) -> tuple[Decision, ...]:
    """The decisions for `event` about `job` (None: a job id the journal does not know)."""
    if isinstance(event, ManifestReceived):
        return (on_manifest(job, event),)
    if job is None:
        if isinstance(event, CancelRequested):
            return (Refuse(event.problem),) if event.problem else (Ignore("unknown job"),)
        return (Ignore("unknown job"),)
    if isinstance(event, CancelRequested):
        return on_cancel(job, event)
    if job.final:
        return (Ignore(f"already {job.state}"),)
    if isinstance(event, Restarted):
        return (CountResume(),) if job.state in SIDE_EFFECT_STATES else ()
    if isinstance(event, Resume):
        return (next_step(job),)
    if isinstance(event, DiskMeasured):
        need = event.artifact_bytes * event.margin
        if event.free_bytes < need:
            return (Finish("failed", f"disk {event.free_bytes // MB} MB free < {need / MB:.0f} MB needed "
                                     f"(artifact x {event.margin:g})"),)
        return (StartDownload(),)
    if isinstance(event, DownloadTick):
        return on_download_tick(event)
    if isinstance(event, ChunksQuiet):
        return on_quiet(event, rng)
    if isinstance(event, ChunkProgress):
        return (PublishStatus(),) if event.now - event.last_published >= event.every_s else ()
    if isinstance(event, DownloadComplete):
        if event.sha256 != event.expected:
            return (Reject(f"sha256 mismatch: got {event.sha256[:16]}..., manifest says "
                           f"{event.expected[:16]}..."),)
        return (Stage(),) if job.kind == "model" else (MarkVerified(),)
    if isinstance(event, Staged):
        return (Reject(f"bundle: {event.problem}"),) if event.problem else (MarkVerified(),)
    if isinstance(event, GatesEvaluated):
        return (on_gates(job, event, rng),)
    if isinstance(event, InstallReady):
        return (on_install_ready(job, event.installed_version),)
    if isinstance(event, SwapCommitted):
        return (Finish("succeeded", event.reason),)
    if isinstance(event, SwapRolledBack):
        return (Finish("rolled_back", event.reason),)
    if isinstance(event, ShadowDone):
        if event.promote:
            return (Promote(event.reason),)
        return (Finish("failed", event.reason),) if event.failed else (Reject(event.reason),)
    return (Finish("failed", event.reason),)  # InstallFailed


def on_manifest(job: JobFacts | None, ev: ManifestReceived) -> Decision:
    """A job id is taken once: the same manifest again is a no-op, a different one is refused."""
    if ev.parse_problem:
        return Refuse(ev.parse_problem)
    if job is not None:
        if ev.digest == job.digest:
            return Republish()
        return Refuse(f"job id {job.job} reused with a different manifest (job stays {job.state})")
    if ev.signature_problem:
        return Refuse(ev.signature_problem)
    if ev.audience_problem:
        return Refuse(ev.audience_problem)
    if ev.check_problem:
        return Reject(ev.check_problem)
    return Accept()


def next_step(job: JobFacts) -> Decision:
    if job.state == "received":
        return CheckDisk()
    if job.state == "downloading":
        return Download()
    if job.state in ("verified", "deferred"):
        return EvaluateGates()
    if job.state in ("installing", "shadowing"):
        return CheckInstall()
    if job.state in ("rebooting", "health_check"):
        return AwaitReboot()
    return Ignore(f"no step for state {job.state}")  # final states end the task before asking


def on_download_tick(ev: DownloadTick) -> tuple[Decision, ...]:
    if ev.now >= ev.expires:
        return (Finish("failed", f"transfer incomplete: {ev.chunks - ev.received} of {ev.chunks} chunks "
                                 f"missing when the job expired"),)
    if ev.connected and not ev.was_connected:
        return (RequestChunks(restart=True),)  # at start, after a restart or a reconnect: at once
    if ev.connected and ev.window_due:
        return (RequestChunks(restart=False),)  # half the window arrived: ask for more
    return ()


def on_quiet(ev: ChunksQuiet, rng: random.Random | None = None) -> tuple[Decision, ...]:
    """The sender went quiet: ask again from the first gap, backing off, and give up eventually."""
    if not ev.connected:
        return ()  # nobody could have answered
    unanswered = ev.unanswered + 1
    if unanswered > ev.max_requests:
        return (Finish("failed", f"transfer incomplete: {unanswered - 1} requests for missing chunks "
                                 f"went unanswered"),)
    wait = backoff_s(unanswered + 1, ev.interval_s, ev.interval_s * 8, rng, jitter=0.2)
    return (RequestChunks(restart=True, wait_s=wait),)


def on_gates(job: JobFacts, ev: GatesEvaluated, rng: random.Random | None = None) -> Decision:
    """Open gates install; new or changed failures (or a due retry) defer again with backoff."""
    fails = failing_gates(ev.ctx, ev.gates, ev.artifact_bytes, ev.critical)
    if not fails:
        return CheckInstall()
    names = tuple(sorted(f.gate for f in fails))
    reasons = "; ".join(str(f) for f in fails)
    due = job.next_try is None or ev.now >= job.next_try
    if job.state != "deferred" or due or names != job.deferred_gates:
        attempts = job.attempts + 1
        return Defer(ev.now + next_try_s(attempts, ev.gates, fails, ev.ctx, rng), reasons, names, attempts)
    assert job.next_try is not None
    return Wait(job.next_try)


def on_install_ready(job: JobFacts, installed: str | None) -> Decision:
    """Resume limits, an install that finished before a restart, no downgrades, shadow first."""
    resuming = job.state in ("installing", "shadowing")
    if resuming and job.resumes > MAX_RESUMES:
        what = "shadow evaluation" if job.state == "shadowing" else "install"
        return Finish("failed", f"{what} interrupted {job.resumes} times; giving up")
    if job.kind == "model" and resuming and installed == job.version:
        return Finish("succeeded", "active after restart")
    if installed is not None and manifest.compare_versions(job.version, installed) <= 0:
        return Reject(f"rollback refused: version {job.version} is not above installed {installed}")
    if job.state == "shadowing":
        return Shadow(enter=False)
    if job.shadow and job.state != "installing":
        return Shadow(enter=True)
    return Install(enter=not resuming)


def on_cancel(job: JobFacts, ev: CancelRequested) -> tuple[Decision, ...]:
    if ev.problem:
        return (Refuse(ev.problem),)
    if job.final:
        return (Ignore(f"already {job.state}"),)
    if job.state not in CANCELLABLE:
        return (Ignore(f"too late: {job.state}"),)
    return StopJob(), Finish("cancelled", "cancelled by operator")
