"""The job state machine without an event loop, a broker or a file: every transition, and the
decisions each event must produce (decide.py)."""

from __future__ import annotations

import ast
import random
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from edgeagent.core.config import GateConfig
from edgeagent.monitor.context import DeviceContext
from edgeagent.updates import decide as d
from edgeagent.updates.decide import (
    Accept,
    AwaitReboot,
    CheckDisk,
    CheckInstall,
    CountResume,
    Defer,
    Download,
    EvaluateGates,
    Finish,
    Ignore,
    Install,
    MarkVerified,
    PublishStatus,
    Refuse,
    Reject,
    Republish,
    RequestChunks,
    Stage,
    StartDownload,
    StopJob,
    Wait,
)
from edgeagent.updates.jobs import CANCELLABLE, JobFacts

NOW = 1_800_000_000.0
WED_10 = datetime(2026, 11, 25, 10, 0)  # a Wednesday
OPEN = DeviceContext(now=WED_10, battery_percent=90, on_external_power=False)
LOW_BATTERY = replace(OPEN, battery_percent=8)
GATES = GateConfig(battery_min_percent=30, backoff_initial_s=30.0, backoff_max_s=3600.0)
JOB = JobFacts(job="m-1", kind="model", version="2.0.0", digest="abc")


def at(state: str, **kw: object) -> JobFacts:
    return replace(JOB, state=state, **kw)  # type: ignore[arg-type]


def one(job: JobFacts | None, event: d.Event, rng: random.Random | None = None) -> d.Decision:
    decisions = d.decide(job, event, rng)
    assert len(decisions) == 1, decisions
    return decisions[0]


def gates(ctx: DeviceContext, cfg: GateConfig = GATES, now: float = NOW) -> d.GatesEvaluated:
    return d.GatesEvaluated(ctx, cfg, artifact_bytes=1 << 20, critical=False, now=now)


# ----------------------------------------------------------------------------------- manifests
def test_new_valid_manifest_is_accepted() -> None:
    assert one(None, d.ManifestReceived(digest="abc")) == Accept()


def test_received_to_rejected_when_signed_but_not_applicable() -> None:
    assert one(None, d.ManifestReceived(digest="abc", check_problem="expired: expires 1 <= now 2")) \
        == Reject("expired: expires 1 <= now 2")


@pytest.mark.parametrize("event", [
    d.ManifestReceived(parse_problem="manifest: malformed JSON"),
    d.ManifestReceived(digest="abc", signature_problem="bad signature"),
])
def test_unparseable_or_unsigned_manifest_is_refused_not_journaled(event: d.ManifestReceived) -> None:
    decision = one(None, event)
    assert isinstance(decision, Refuse) and decision.reason in (event.parse_problem, event.signature_problem)


@pytest.mark.parametrize("state", ["downloading", "deferred", "succeeded", "rejected"])
def test_duplicate_manifest_is_a_noop(state: str) -> None:
    assert one(at(state), d.ManifestReceived(digest="abc")) == Republish()


def test_same_job_id_with_a_different_manifest_is_refused_and_the_job_untouched() -> None:
    decision = one(at("succeeded"), d.ManifestReceived(digest="other"))
    assert decision == Refuse("job id m-1 reused with a different manifest (job stays succeeded)")


def test_known_job_wins_over_a_signature_problem() -> None:
    """A replay is recognised before verifying again: no refusal noise for a job we already have."""
    assert one(at("verified"), d.ManifestReceived(digest="abc", signature_problem="untrusted")) == Republish()


# ---------------------------------------------------------------------------- the happy path
def test_received_downloading_verified_deferred_installing_succeeded() -> None:
    job = at("received")
    assert one(job, d.Resume()) == CheckDisk()
    disk = d.DiskMeasured(free_bytes=100 << 20, artifact_bytes=1 << 20, margin=2.0)
    assert one(job, disk) == StartDownload()

    job = at("downloading")
    assert one(job, d.Resume()) == Download()
    tick = d.DownloadTick(NOW, NOW + 60, connected=True, was_connected=False, window_due=False,
                          received=0, chunks=10)
    assert one(job, tick) == RequestChunks(restart=True)
    assert one(job, replace(tick, was_connected=True, window_due=True)) == RequestChunks(restart=False)
    assert d.decide(job, replace(tick, was_connected=True)) == ()
    assert one(job, d.DownloadComplete("f" * 64, "f" * 64)) == Stage()
    assert one(job, d.Staged()) == MarkVerified("sha256 ok")

    job = at("verified")
    assert one(job, d.Resume()) == EvaluateGates()
    deferred = one(job, gates(LOW_BATTERY), random.Random(1))
    assert isinstance(deferred, Defer)
    assert deferred.reasons == "battery 8% < 30% (on battery)" and deferred.gates == ("battery",)
    assert deferred.attempts == 1 and NOW + 15 <= deferred.next_try <= NOW + 30

    job = at("deferred", attempts=1, next_try=deferred.next_try, deferred_gates=("battery",))
    assert one(job, d.Resume()) == EvaluateGates()
    assert one(job, gates(OPEN)) == CheckInstall()
    assert one(job, d.InstallReady(installed_version="1.0.0")) == Install(enter=True)

    job = at("installing")
    assert one(job, d.SwapCommitted()) == Finish("succeeded", "serving")


def test_firmware_is_verified_without_staging() -> None:
    assert one(replace(JOB, kind="firmware", state="downloading"), d.DownloadComplete("a" * 64, "a" * 64)) \
        == MarkVerified()


# ------------------------------------------------------------------------------ download ends
def test_not_enough_disk_fails_before_downloading() -> None:
    decision = one(at("received"), d.DiskMeasured(free_bytes=3 << 20, artifact_bytes=2 << 20, margin=2.0))
    assert decision == Finish("failed", "disk 3 MB free < 4 MB needed (artifact x 2)")


def test_transfer_expires() -> None:
    tick = d.DownloadTick(NOW, NOW, connected=True, was_connected=True, window_due=False, received=3,
                          chunks=10)
    assert one(at("downloading"), tick) == Finish("failed", "transfer incomplete: 7 of 10 chunks missing "
                                                            "when the job expired")


def test_quiet_sender_is_asked_again_with_backoff_then_given_up() -> None:
    job = at("downloading")
    rng = random.Random(7)
    waits = []
    for unanswered in range(3):
        quiet = d.ChunksQuiet(connected=True, unanswered=unanswered, max_requests=3, interval_s=0.5)
        decision = one(job, quiet, rng)
        assert isinstance(decision, RequestChunks) and decision.restart and decision.wait_s is not None
        waits.append(decision.wait_s)
    assert 0.8 <= waits[0] <= 1.0 and 1.6 <= waits[1] <= 2.0 and 3.2 <= waits[2] <= 4.0  # doubling, capped 8x
    assert one(job, d.ChunksQuiet(connected=True, unanswered=3, max_requests=3, interval_s=0.5)) \
        == Finish("failed", "transfer incomplete: 3 requests for missing chunks went unanswered")
    # offline, nobody could answer: neither a request nor a count
    assert d.decide(job, d.ChunksQuiet(connected=False, unanswered=3, max_requests=3, interval_s=0.5)) == ()


def test_progress_is_published_at_most_once_per_interval() -> None:
    job = at("downloading")
    assert one(job, d.ChunkProgress(now=10.0, last_published=0.0, every_s=1.0)) == PublishStatus()
    assert d.decide(job, d.ChunkProgress(now=10.5, last_published=10.0, every_s=1.0)) == ()


def test_sha256_mismatch_and_evil_bundle_are_rejected() -> None:
    job = at("downloading")
    decision = one(job, d.DownloadComplete("0" * 64, "f" * 64))
    assert decision == Reject(f"sha256 mismatch: got {'0' * 16}..., manifest says {'f' * 16}...")
    assert one(job, d.Staged("member '../model.tflite' escapes (contains '..')")) \
        == Reject("bundle: member '../model.tflite' escapes (contains '..')")


# ------------------------------------------------------------------------------------- gates
def test_deferred_waits_while_the_same_gates_fail_and_backs_off_when_due() -> None:
    first = one(at("verified"), gates(LOW_BATTERY), random.Random(3))
    assert isinstance(first, Defer)
    job = at("deferred", attempts=first.attempts, next_try=first.next_try, deferred_gates=first.gates)
    # same failure before the retry time: no new journal entry, wait until next_try (or a change)
    assert one(job, gates(LOW_BATTERY, now=NOW + 1)) == Wait(first.next_try)
    # a different failure: defer again at once, with the new reason
    hot = replace(LOW_BATTERY, busy={"rules": "press cycle"})
    changed = one(job, gates(hot, now=NOW + 1), random.Random(3))
    assert isinstance(changed, Defer) and changed.gates == ("battery", "busy") and changed.attempts == 2
    # due: defer again with a doubled delay
    due = one(job, gates(LOW_BATTERY, now=first.next_try), random.Random(3))
    assert isinstance(due, Defer) and due.attempts == 2
    assert 30 <= due.next_try - first.next_try <= 60
    # and the gates opening resumes the job
    assert one(job, gates(OPEN, now=NOW + 2)) == CheckInstall()


def test_backoff_is_capped() -> None:
    job = at("deferred", attempts=30, next_try=NOW, deferred_gates=("battery",))
    decision = one(job, gates(LOW_BATTERY))
    assert isinstance(decision, Defer) and decision.next_try - NOW <= GATES.backoff_max_s


def test_window_gate_defers_exactly_until_the_window_opens() -> None:
    cfg = GateConfig(maintenance_windows=("Mon-Fri 10:30-11:00",))
    decision = one(at("verified"), gates(OPEN, cfg))
    assert isinstance(decision, Defer) and decision.gates == ("window",)
    assert decision.next_try == NOW + 30 * 60


# ----------------------------------------------------------------------------------- install
def test_downgrade_or_same_version_is_refused_at_install_time() -> None:
    assert one(at("verified"), d.InstallReady(installed_version="2.0.0")) \
        == Reject("rollback refused: version 2.0.0 is not above installed 2.0.0")
    assert one(at("deferred"), d.InstallReady(installed_version="2.1.0")) \
        == Reject("rollback refused: version 2.0.0 is not above installed 2.1.0")


def test_swap_rolled_back_in_probation() -> None:
    assert one(at("installing"), d.SwapRolledBack("model rolled back: NaN outputs during probation")) \
        == Finish("rolled_back", "model rolled back: NaN outputs during probation")


def test_failed_install() -> None:
    assert one(at("installing"), d.InstallFailed("model rejected: input shape (1, 7)")) \
        == Finish("failed", "model rejected: input shape (1, 7)")


# ------------------------------------------------------------------------------------ cancel
@pytest.mark.parametrize("state", sorted(CANCELLABLE))
def test_cancel_in_each_cancellable_state_stops_then_finishes(state: str) -> None:
    assert d.decide(at(state), d.CancelRequested()) == (StopJob(), Finish("cancelled",
                                                                          "cancelled by operator"))


@pytest.mark.parametrize("state", ["installing", "rebooting", "health_check"])
def test_cancel_during_a_side_effect_is_too_late(state: str) -> None:
    assert d.decide(at(state), d.CancelRequested()) == (Ignore(f"too late: {state}"),)


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled", "rejected", "rolled_back"])
def test_cancel_of_a_finished_job_is_ignored(state: str) -> None:
    assert d.decide(at(state), d.CancelRequested()) == (Ignore(f"already {state}"),)


def test_unsigned_cancel_is_refused_even_for_a_cancellable_job() -> None:
    assert d.decide(at("deferred"), d.CancelRequested("not signed")) == (Refuse("not signed"),)
    assert d.decide(None, d.CancelRequested("not signed")) == (Refuse("not signed"),)
    assert d.decide(None, d.CancelRequested()) == (Ignore("unknown job"),)


# ------------------------------------------------------------------------- restart and resume
@pytest.mark.parametrize(("state", "counted", "step"), [
    ("received", False, CheckDisk()),
    ("downloading", False, Download()),
    ("verified", False, EvaluateGates()),
    ("deferred", False, EvaluateGates()),
    ("installing", True, CheckInstall()),
    ("rebooting", True, AwaitReboot()),
    ("health_check", True, AwaitReboot()),
])
def test_resume_after_restart_from_each_journaled_state(state: str, counted: bool, step: d.Decision) -> None:
    job = at(state)
    assert d.decide(job, d.Restarted()) == ((CountResume(),) if counted else ())
    assert one(job, d.Resume()) == step


def test_install_interrupted_by_a_restart_resumes_without_re_entering() -> None:
    assert one(at("installing", resumes=1), d.InstallReady(installed_version="1.0.0")) == Install(enter=False)


def test_install_that_finished_before_the_restart_is_succeeded() -> None:
    assert one(at("installing", resumes=1), d.InstallReady(installed_version="2.0.0")) \
        == Finish("succeeded", "active after restart")


def test_install_that_keeps_crashing_the_agent_gives_up() -> None:
    job = at("installing", resumes=d.MAX_RESUMES + 1)
    assert one(job, d.InstallReady(installed_version="1.0.0")) \
        == Finish("failed", f"install interrupted {d.MAX_RESUMES + 1} times; giving up")


def test_finished_jobs_ignore_everything_but_manifests_and_cancels() -> None:
    for event in (d.Resume(), d.Restarted(), d.SwapCommitted(), d.InstallReady(None)):
        assert d.decide(at("succeeded"), event) == (Ignore("already succeeded"),)


# ------------------------------------------------------------------------------------ purity
def test_the_decision_module_does_no_io() -> None:
    """No event loop, clock, file system or network can be reached from decide.py."""
    tree = ast.parse(Path(d.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {str(n.module).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported.isdisjoint({"asyncio", "time", "os", "socket", "shutil", "subprocess", "threading"})
    assert "open(" not in Path(d.__file__).read_text()
