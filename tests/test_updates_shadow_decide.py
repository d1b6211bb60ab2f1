"""The `shadowing` job state in the update state machine (decide.py, jobs.py), without I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.core.protocol import JOB_STATES, job_status
from edgeagent.updates import decide as d
from edgeagent.updates.jobs import CANCELLABLE, InvalidTransition, Job, JobFacts, Journal


def at(state: str, **kw: object) -> JobFacts:
    return JobFacts(job="j1", version="2.0.0", state=state, shadow=True, **kw)  # type: ignore[arg-type]


def one(job: JobFacts, event: d.Event) -> d.Decision:
    out = d.decide(job, event)
    assert len(out) == 1, out
    return out[0]


def test_a_shadow_manifest_shadows_before_it_installs_and_a_plain_one_installs() -> None:
    for state in ("verified", "deferred"):
        assert one(at(state), d.InstallReady("1.0.0")) == d.Shadow(enter=True)
        plain = JobFacts(job="j1", version="2.0.0", state=state)
        assert one(plain, d.InstallReady("1.0.0")) == d.Install(enter=True)
    # the anti-rollback check comes first: no shadow for a version that is not newer
    assert isinstance(one(at("verified"), d.InstallReady("2.0.0")), d.Reject)


def test_shadow_outcomes() -> None:
    job = at("shadowing")
    assert one(job, d.ShadowDone(True, "shadow passed")) == d.Promote("shadow passed")
    low = "agreement 0.100 (min 0.95)"
    assert one(job, d.ShadowDone(False, low)) == d.Reject(low)
    assert one(job, d.ShadowDone(False, "model rejected: x", failed=True)) == d.Finish("failed",
                                                                                        "model rejected: x")
    # promoted: the job is 'installing' now and installs as any model (not a second shadow run)
    assert one(at("installing"), d.InstallReady("1.0.0")) == d.Install(enter=False)


def test_a_restart_during_shadowing_counts_and_restarts_the_shadow_run() -> None:
    job = at("shadowing", resumes=1)
    assert one(job, d.Restarted()) == d.CountResume()
    assert one(job, d.Resume()) == d.CheckInstall()
    assert one(job, d.InstallReady("1.0.0")) == d.Shadow(enter=False)
    looping = at("shadowing", resumes=d.MAX_RESUMES + 1)
    verdict = one(looping, d.InstallReady("1.0.0"))
    assert isinstance(verdict, d.Finish) and verdict.state == "failed"
    assert "shadow evaluation interrupted" in verdict.reason


def test_an_operator_can_cancel_a_shadow_run() -> None:
    assert "shadowing" in CANCELLABLE
    assert d.decide(at("shadowing"), d.CancelRequested()) == (d.StopJob(), d.Finish("cancelled",
                                                                                    "cancelled by operator"))


def test_journal_transitions_and_the_figures_in_status_and_summary(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    job = Job(job="j1", kind="model", name="m", version="2.0.0", digest="x",
              manifest={"shadow": {"windows": 5}}, state="verified")
    journal.add(job)
    assert JobFacts.of(job).shadow
    journal.transition(job, "shadowing", "comparing", shadow={"compared": 3, "agreement": 1.0})
    journal.transition(job, "shadowing", "restarted")  # a restart re-enters it
    with pytest.raises(InvalidTransition):
        journal.transition(job, "succeeded")  # never straight to succeeded: it installs first
    journal.transition(job, "installing", "shadow passed")
    reread = Journal(tmp_path)
    reread.load()
    again = reread.jobs["j1"]
    assert again.shadow == {"compared": 3, "agreement": 1.0} and again.state == "installing"
    assert again.summary()["shadow"] == {"compared": 3, "agreement": 1.0}
    assert "shadowing" in JOB_STATES
    doc = job_status("j1", "model", "m", "2.0.0", "shadowing", shadow={"agreement": 0.5})
    assert doc["shadow"] == {"agreement": 0.5}
    assert "shadow" not in job_status("j1", "model", "m", "2.0.0", "installing")
    firmware = Job(job="f", kind="firmware", name="fw", version="2", digest="y", manifest={"shadow": {}})
    assert not JobFacts.of(firmware).shadow
