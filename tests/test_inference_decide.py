"""The swap state machine on its own: no event loop, no interpreter, time passed in by the test."""

from __future__ import annotations

from dataclasses import dataclass

from edgeagent.inference.swap_fsm import (
    CANCELLED,
    Activate,
    Candidate,
    Commit,
    Defer,
    Load,
    NoModel,
    Phase,
    Reject,
    Rollback,
    RollbackActive,
    Serve,
    SwapMachine,
    Validate,
)

OLD = Candidate("m", "1.0.0")
NEW = Candidate("m", "2.0.0")


@dataclass(frozen=True)
class W:
    """A served window's outcome (what `runner.Result` offers the machine)."""

    seq: int
    tag: str
    error: str | None = None
    finite: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and self.finite


def on_probation(windows: int = 3) -> SwapMachine:
    m = SwapMachine(rollback_streak=3)
    assert m.opened(OLD) == ()
    assert m.begin(NEW) == Validate(NEW)
    assert m.validated(windows) == Activate(NEW)
    return m


def test_probation_passed_commits_once_then_the_candidate_is_active() -> None:
    m = on_probation(3)
    assert m.swapped(now=100.0, timeout_s=30.0) == ()
    assert m.served(W(10, OLD.tag)) == ()  # queued before the swap: served by the old model, not counted
    assert m.served(W(11, NEW.tag)) == ()
    assert m.served(W(12, NEW.tag)) == ()
    assert m.served(W(13, NEW.tag)) == (Commit(NEW, 3),)
    assert m.phase is Phase.COMMITTING
    assert m.served(W(14, NEW.tag)) == ()  # nothing decided twice
    assert m.tick(now=1000.0) == ()  # nor timed out while active.json is written
    m.committed()
    assert (m.phase, m.active) == (Phase.IDLE, NEW)


def test_results_may_finish_probation_before_the_swap_is_acknowledged() -> None:
    m = on_probation(1)
    assert m.served(W(1, NEW.tag)) == (Commit(NEW, 1),)
    assert m.swapped(now=0.0, timeout_s=30.0) == ()
    assert m.deadline is None


def test_probation_rolls_back_on_an_invoke_error() -> None:
    m = on_probation(5)
    m.served(W(1, NEW.tag))
    (d,) = m.served(W(2, NEW.tag, error="RuntimeError: boom"))
    assert d == Rollback(NEW, OLD.tag, "invoke failed on window 2: RuntimeError: boom")
    assert (m.phase, m.active, m.candidate) == (Phase.IDLE, OLD, None)


def test_probation_rolls_back_on_a_non_finite_output() -> None:
    m = on_probation(5)
    assert m.served(W(7, NEW.tag, finite=False)) == (Rollback(NEW, OLD.tag, "non-finite output on window 7"),)


def test_probation_rolls_back_when_its_deadline_passes() -> None:
    m = on_probation(5)
    m.swapped(now=100.0, timeout_s=30.0)
    assert m.deadline == 130.0
    m.served(W(1, NEW.tag))
    assert m.tick(now=129.9) == ()
    assert m.tick(now=130.0) == (
        Rollback(NEW, OLD.tag, "probation timed out: 1 of 5 windows served in 30 s"),)
    assert m.tick(now=200.0) == ()  # decided once
    assert m.served(W(2, NEW.tag)) == ()  # late results of the rolled-back candidate change nothing


def test_an_active_model_failing_a_streak_of_windows_is_rolled_back() -> None:
    m = on_probation(1)
    m.served(W(1, NEW.tag))
    m.committed()
    assert m.served(W(2, NEW.tag, finite=False)) == ()
    assert m.served(W(3, NEW.tag, error="E: x")) == ()
    assert m.served(W(4, NEW.tag)) == ()  # a good window breaks the streak
    m.served(W(5, NEW.tag, finite=False))
    m.served(W(6, NEW.tag, finite=False))
    assert m.served(W(7, NEW.tag, error="E: y")) == (
        RollbackActive(NEW.tag, "3 failing windows in a row (last: E: y)"),)
    assert m.served(W(8, NEW.tag, finite=False)) == ()  # asked once per streak
    m.restored(OLD)
    assert m.active == OLD
    assert m.served(W(9, OLD.tag, finite=False)) == ()  # a fresh count for the restored model


def test_rejections_come_before_activation_and_leave_the_active_model() -> None:
    m = SwapMachine()
    m.opened(OLD)
    assert m.begin(OLD) == Reject("m@1.0.0 is already the active model")
    assert m.phase is Phase.IDLE
    assert m.begin(NEW) == Validate(NEW)
    assert m.validation_failed("m@2.0.0: golden[0] differs") == Reject("m@2.0.0: golden[0] differs", NEW)
    assert (m.phase, m.active, m.probation) == (Phase.IDLE, OLD, None)
    assert m.begin(NEW) == Validate(NEW)
    m.validated(5)
    assert m.swap_failed("runner is stopped") == Reject("runner is stopped", NEW)
    assert (m.phase, m.active) == (Phase.IDLE, OLD)


def test_a_second_install_while_one_is_on_probation_is_deferred() -> None:
    m = on_probation(2)
    third = Candidate("m", "3.0.0")
    d = m.begin(third)
    assert isinstance(d, Defer) and "m@2.0.0" in d.reason and "probation" in d.reason
    assert m.candidate == NEW  # the first install is untouched
    m.served(W(1, NEW.tag))
    m.served(W(2, NEW.tag))
    assert isinstance(m.begin(third), Defer)  # still committing
    m.committed()
    assert m.begin(third) == Validate(third)


def test_a_pipeline_restart_during_probation_rolls_the_unproven_model_back() -> None:
    m = on_probation(5)
    m.swapped(now=0.0, timeout_s=30.0)
    m.served(W(1, NEW.tag))
    # the rebuilt runner serves what active.json names: the proven model
    assert m.opened(OLD) == (Rollback(NEW, OLD.tag, "the pipeline restarted during probation"),)
    assert (m.phase, m.active, m.deadline) == (Phase.IDLE, OLD, None)
    assert m.served(W(2, NEW.tag)) == ()
    assert m.begin(NEW) == Validate(NEW)  # a retry is possible


def test_a_restart_whose_recorded_model_does_not_load_falls_back_to_the_proven_one() -> None:
    previous = ("1.0.0", "0.9.0")
    assert SwapMachine.start("2.0.0") == Load("2.0.0")
    failures = ["2.0.0: does not load"]
    assert SwapMachine.load_failed("2.0.0", previous, failures) == Load("1.0.0")
    assert SwapMachine.loaded("2.0.0", "1.0.0", failures) == Serve("1.0.0", "2.0.0",
                                                                   ("2.0.0: does not load",))
    assert SwapMachine.loaded("2.0.0", "2.0.0", []) == Serve("2.0.0", None, ())
    failures += ["1.0.0: bad", "0.9.0: bad"]
    assert SwapMachine.load_failed("2.0.0", previous, failures) == NoModel(
        "no stored version loads: 2.0.0: does not load; 1.0.0: bad; 0.9.0: bad")


def test_cancel_undoes_what_is_not_on_disk_yet() -> None:
    m = SwapMachine()
    m.opened(OLD)
    m.begin(NEW)
    assert m.cancel() == (Reject(CANCELLED, NEW),)  # validating: the candidate's files go
    on = on_probation(5)
    assert on.cancel() == (Rollback(NEW, OLD.tag, CANCELLED),)  # swapped in: swap back
    assert (on.phase, on.active) == (Phase.IDLE, OLD)
    committing = on_probation(1)
    committing.served(W(1, NEW.tag))
    assert committing.cancel() == ()  # active.json is being written: the commit stands
    committing.committed()
    assert committing.active == NEW
    assert SwapMachine().cancel() == ()


def test_a_failed_commit_is_a_rollback() -> None:
    m = on_probation(1)
    m.served(W(1, NEW.tag))
    assert m.commit_failed("disk full") == Rollback(NEW, OLD.tag, "disk full")
    assert (m.phase, m.active) == (Phase.IDLE, OLD)
