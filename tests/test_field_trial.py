"""The field trial's quick run as the CI test: real agents, Mosquitto, collector and faults; it must
lose nothing and end every update in its right state (scripts/field-trial exits 1 otherwise)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fieldtrial.report import expected, missing, ranges, recovery_s
from fieldtrial.schedule import CYCLE_S, FAULT_SLOTS_S, make_schedule

ROOT = Path(__file__).resolve().parent.parent


def test_schedule_is_repeatable_and_covers_every_fault() -> None:
    agents = ["a", "b", "c"]
    one, again, other = make_schedule(7, agents, 3), make_schedule(7, agents, 3), make_schedule(8, agents, 3)
    assert one == again
    assert one != other
    actions = {s.action for s in one}
    assert actions == {"broker-restart", "kill9", "link", "disk-full", "clock-jump", "update"}
    assert {s.params["mode"] for s in one if s.action == "link"} == {"flaky", "stall", "down"}
    kills = {s.params["kill"] for s in one if s.action == "update"}
    assert {"mid-download", "mid-install"} <= kills
    for c in range(3):  # every cycle: the clock goes forward, then back
        jumps = [s.params["delta_s"] for s in one
                 if s.action == "clock-jump" and c * CYCLE_S <= s.at_s < (c + 1) * CYCLE_S]
        assert len(jumps) == 2 and isinstance(jumps[0], float) and jumps[0] > 0 and jumps[1] == "back"
    assert len([s for s in one if s.action != "update"]) == 3 * len(FAULT_SLOTS_S)


def test_seq_accounting() -> None:
    assert missing(5, {1, 2, 4, 5}) == [3]
    assert ranges([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    # a spool moved aside at seq 4: the fresh one continues above a reserved block (10001..)
    got = {1, 2, 3, 4, 10001, 10002}
    assert expected(10002, got, [4]) == got
    assert missing(10002, got - {3}, [4]) == [3]
    assert recovery_s({"a": [1.0, 5.0], "b": [2.0, 3.5]}, 3.0) == (2.0, "a")
    assert recovery_s({"a": [1.0], "b": [4.0]}, 3.0) == (None, "a")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_field_trial_loses_nothing(tmp_path: Path) -> None:
    seed = os.environ.get("FIELD_TRIAL_SEED", "11")
    log = tmp_path / "trial.out"
    with open(log, "w") as out_file:
        # its own session: on a timeout the whole group (agents, broker, collector) goes
        proc = subprocess.Popen([str(ROOT / "scripts" / "field-trial"), "--quick", "--seed", seed,
                                 "--workdir", str(tmp_path / "trial")],
                                cwd=ROOT, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHON": sys.executable})
        try:
            rc = proc.wait(400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the trial cleans up (and unmounts) on SIGTERM
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise AssertionError("field trial timed out:\n" + log.read_text()[-12000:]) from None
    out = log.read_text()
    assert rc == 0, out[-12000:]
    assert "PASS: every sample and event arrived" in out
    # every fault is named with its time as it happens
    for fault in ("broker-restart", "kill -9", "link-flaky", "link-stall", "link-down", "clock-jump",
                  "firmware-reboot"):
        assert f"FAULT {fault}" in out, fault
    assert "FAULT disk-full" in out or "disk-full faults SKIPPED" in out
    table = out[out.index("FIELD TRIAL RESULT"):]
    for case in ("model-good", "model-nan", "bad-signature", "version-rollback", "sha-mismatch", "fw-good",
                 "fw-fail-install", "fw-fail-health"):
        assert case in table, case
