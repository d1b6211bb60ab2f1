"""One agent per state dir: the lock itself, then two real `edgeagent run` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent.core.instance import LOCK_FILE, AlreadyRunning, InstanceLock
from tests.util import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_lock_on_the_same_state_dir_names_the_holder(tmp_path: Path) -> None:
    with InstanceLock(tmp_path / "state"):
        assert (tmp_path / "state" / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(AlreadyRunning) as info:
            InstanceLock(tmp_path / "state").acquire()
        assert info.value.pid == os.getpid() and str(os.getpid()) in str(info.value)
    with InstanceLock(tmp_path / "state"):  # released on exit: the next one gets it
        pass


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "lock1"
state_dir = "{tmp_path / 'state'}"

[agent]
health_interval_s = 0.2

[mqtt]
host = ""

[inference]
enabled = false
""")
    return cfg


def _run(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "edgeagent.cli", "run", "-c", str(cfg)], cwd=ROOT,
                                stdout=out, stderr=out)


@pytest.mark.integration
def test_a_second_agent_on_one_state_dir_exits_1_naming_the_first(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    first = _run(cfg, tmp_path / "first.log")
    procs = [first]
    try:
        lock = tmp_path / "state" / LOCK_FILE
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), 30,
                   message="the first agent holds the lock")
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "edgeagent.cli", "run", "-c", str(cfg)], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1, second.stderr
        assert time.monotonic() - t0 < 10
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr
        assert first.poll() is None  # the first one is untouched

        # a read-only command keeps working beside the running agent
        wait_until(lambda: (tmp_path / "state" / "health.json").exists(), 30, message="health.json")
        status = subprocess.run([sys.executable, "-m", "edgeagent.cli", "status", "-c", str(cfg)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode in (0, 1), status.stderr

        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        third = _run(cfg, tmp_path / "third.log")
        procs.append(third)
        wait_until(lambda: lock.read_text().strip() == str(third.pid), 30, message="the new agent locks")
        time.sleep(0.5)
        assert third.poll() is None, (tmp_path / "third.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
