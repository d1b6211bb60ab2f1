"""`edgeagent status`: verdicts from health snapshots, and the command on real state dirs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edgeagent import status
from edgeagent.core.fsutil import atomic_write_json

NOW = 1_800_000_000.0


def snapshot(**over: Any) -> dict[str, Any]:
    health: dict[str, Any] = {
        "v": 1, "ts": NOW - 2, "pid": 4242, "agent": "0.1.0", "device": "pi-line3-07", "state": "running",
        "started_at": NOW - 3 * 3600, "interval_s": 5.0,
        "components": {"monitor": {"state": "running", "restarts": 0, "last_error": None},
                       "mqtt": {"state": "running", "restarts": 1, "last_error": None}},
        "sections": {
            "spool": {"backlog": 37, "dropped": 2, "bytes": 20480},
            "inference": {"model": "vibration-anomaly@1.4.0", "rate_hz": 10.0},
            "mqtt": {"connected": True, "since": NOW - 60},
            "firmware": {"version": "2.1.0", "slot": "B"},
            "updates": {"jobs": [
                {"job": "j-41", "kind": "model", "name": "vibration-anomaly", "version": "1.4.0",
                 "state": "succeeded", "progress": 1.0, "next_try": None},
                {"job": "j-42", "kind": "firmware", "name": "os", "version": "2.2.0",
                 "state": "deferred", "progress": 1.0, "next_try": NOW + 600},
                {"job": "j-43", "kind": "model", "name": "kws", "version": "0.3.0",
                 "state": "downloading", "progress": 0.45, "next_try": None},
            ]},
        },
    }
    health.update(over)
    return health


def alive(pid: int) -> bool:
    return pid == 4242


def test_fresh_running_snapshot_is_healthy() -> None:
    v = status.assess(snapshot(), NOW, alive)
    assert (v.running, v.healthy, v.problems, v.exit_code) == (True, True, (), 0)


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"ts": NOW - 16}, "stale"),
        ({"pid": 999}, "process 999 is gone"),
        ({"state": "stopped"}, "agent is stopped"),
        ({"state": "stopping"}, "agent is stopping"),
    ],
)
def test_not_running(over: dict[str, Any], why: str) -> None:
    v = status.assess(snapshot(**over), NOW, alive)
    assert not v.running and not v.healthy and v.exit_code == status.EXIT_NOT_RUNNING
    assert any(why in p for p in v.problems), v.problems


def test_staleness_follows_the_agents_interval() -> None:
    assert status.assess(snapshot(ts=NOW - 14), NOW, alive).running
    assert not status.assess(snapshot(ts=NOW - 14, interval_s=1.0), NOW, alive).running
    assert status.assess(snapshot(ts=NOW - 14, interval_s="?"), NOW, alive).running  # default 5 s


def test_failed_component_is_unhealthy_but_running() -> None:
    comps = {"mqtt": {"state": "restarting", "restarts": 3, "last_error": "connection refused"},
             "inference": {"state": "failed", "restarts": 5, "last_error": "model missing"}}
    v = status.assess(snapshot(components=comps), NOW, alive)
    assert v.running and not v.healthy and v.exit_code == status.EXIT_UNHEALTHY
    assert "component inference is failed (5 restarts): model missing" in v.problems
    assert "component mqtt is restarting (3 restarts): connection refused" in v.problems
    assert status.assess(snapshot(state="starting"), NOW, alive).exit_code == status.EXIT_UNHEALTHY


def test_render_shows_versions_jobs_and_backlog() -> None:
    health = snapshot()
    text = status.render(health, status.assess(health, NOW, alive), NOW)
    assert "edgeagent 0.1.0 on pi-line3-07: running (pid 4242, up 3h 0m" in text
    assert "healthy" in text and "UNHEALTHY" not in text
    assert "vibration-anomaly@1.4.0" in text
    assert "2.1.0 (slot B)" in text
    assert "backlog 37, dropped 2, 20.0 KiB" in text
    assert "pending jobs    2" in text
    assert "j-42: firmware os 2.2.0 deferred 100% (next try" in text
    assert "j-43: model kws 0.3.0 downloading 45%" in text
    assert "j-41" not in text  # final states are history, not pending
    assert "connected since" in text


def test_render_offline_agent_and_crash_loops() -> None:
    comps = {"inference": {"state": "restarting", "restarts": 6, "crash_loop": True, "last_error": "boom"}}
    mqtt = {"connected": False, "offline": True, "since": None}
    health = snapshot(components=comps, sections={"mqtt": mqtt})
    text = status.render(health, status.assess(health, NOW, alive), NOW)
    assert "offline (no broker configured" in text
    assert "restarts 6  CRASH LOOP  last error: boom" in text
    assert "UNHEALTHY" in text and "component inference is restarting (6 restarts): boom" in text


def test_render_tolerates_missing_and_malformed_sections() -> None:
    health = {"v": 1, "ts": NOW, "pid": 4242, "state": "running",
              "sections": {"updates": {"jobs": "oops"}, "spool": 7}, "components": []}
    verdict = status.assess(health, NOW, alive)
    text = status.render(health, verdict, NOW)
    assert verdict.exit_code == 0
    assert "model           none" in text and "spool           no data" in text
    assert "pending jobs    none" in text


# ---------------------------------------------------------------- the command on real files


def run_status(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    status.add_parser(sub)
    args = parser.parse_args(["status", *argv])
    return int(args.func(args))


def write_health(state: Path, **over: Any) -> None:
    atomic_write_json(state / "health.json", snapshot(ts=time.time(), pid=os.getpid(), **over))


def test_command_reads_a_live_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_health(tmp_path)
    assert run_status("--state-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "running" in out and "backlog 37" in out

    assert run_status("--state-dir", str(tmp_path), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["running"] is True and doc["healthy"] is True
    assert [j["job"] for j in doc["pending_jobs"]] == ["j-42", "j-43"]
    assert doc["health"]["sections"]["spool"]["backlog"] == 37


def test_command_says_not_running_for_a_dead_pid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    atomic_write_json(tmp_path / "health.json", snapshot(ts=time.time(), pid=dead.pid))
    assert run_status("--state-dir", str(tmp_path)) == status.EXIT_NOT_RUNNING
    assert "NOT RUNNING" in capsys.readouterr().out


def test_command_finds_the_state_dir_through_the_config(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    write_health(state)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[device]\nid = "t1"\nstate_dir = "{state}"\n')
    assert run_status("--config", str(cfg)) == 0
    assert "pi-line3-07" in capsys.readouterr().out


def test_command_unknown_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_status("--state-dir", str(tmp_path)) == status.EXIT_UNKNOWN
    assert "has not run" in capsys.readouterr().err
    (tmp_path / "health.json").write_text("{torn")
    assert run_status("--state-dir", str(tmp_path)) == status.EXIT_UNKNOWN
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[device]\ncolour = 1\n")
    assert run_status("--config", str(bad)) == status.EXIT_CONFIG
    assert "colour" in capsys.readouterr().err
