"""The agent runs as edgeagent.service confines it: no capabilities, read-only OS, writes only its state.

No systemd here, so the unit's sandbox is rebuilt with plain tools: a private mount namespace whose
root is remounted read-only with only the state dir bound read-write (ProtectSystem=strict +
StateDirectory=), an empty /root (ProtectHome=), the process as nobody with an empty capability
bounding set and no_new_privs (User=, CapabilityBoundingSet=, NoNewPrivileges=), HOME unset, and
PR_SET_MDWE (MemoryDenyWriteExecute=). The agent must come up, talk to a real broker, and stop cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent import status
from tests.broker import Broker
from tests.util import wait_until

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
TIMEOUT_STOP_S = 15.0  # the unit's TimeoutStopSec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody and to unshare mounts"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("setpriv") is None,
                       reason="needs util-linux unshare and setpriv"),
]

# Runs inside the new mount namespace as root, then drops everything and execs the agent.
SANDBOX_HEAD = """set -eu
mount --make-rprivate /
mount --bind "$STATE" "$STATE"
"""
SANDBOX_TAIL = """mount -o remount,bind,ro /
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \\
     --no-new-privs -- "$@"
"""


def sandbox_script(needed: list[Path], hold: Path) -> str:
    """The namespace setup: ProtectHome= (an empty /root) and, for each needed path (interpreter,
    venv, sources) below a directory nobody may traverse (pyenv in /root, a CI clone in a 0700
    dir), a tmpfs over that directory with just the needed child bound back."""
    hidden: dict[Path, set[Path]] = {Path("/root"): set()}
    for path in needed:
        for parent, child in zip(path.parents[::-1][1:], [*path.parents[::-1][2:], path], strict=True):
            if parent.stat().st_mode & 0o001 == 0:
                hidden.setdefault(parent, set()).add(child)
                break
    lines = [SANDBOX_HEAD]
    for i, (parent, children) in enumerate(sorted(hidden.items())):
        held = [(child, hold / f"{i}-{j}") for j, child in enumerate(sorted(children))]
        for child, spot in held:
            spot.mkdir(parents=True)
            lines.append(f"mount --bind '{child}' '{spot}'\n")
        lines.append(f"mount -t tmpfs -o mode=0755,size=1m tmpfs '{parent}'\n")
        for child, spot in held:
            lines.append(f"mkdir -p '{child}'\nmount --bind '{spot}' '{child}'\n")
    lines.append(SANDBOX_TAIL)
    return "".join(lines)

# PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN): no writable+executable mappings, inherited across exec.
MDWE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(f'PR_SET_MDWE failed: errno {ctypes.get_errno()}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _mdwe_supported() -> bool:
    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (6, 3)


@pytest.fixture
def world() -> Iterator[Path]:
    """A temp dir nobody can traverse (pytest's tmp_path is 0700 root), removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="edgeagent-sandbox-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _caps(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: fields[k].strip() for k in ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                           "NoNewPrivs", "Groups")}


def _owned_by_nobody_since(marker: Path, roots: list[str]) -> list[str]:
    """Files nobody created after `marker` on the writable mounts the sandbox leaves (and /tmp)."""
    found: list[str] = []
    for top in roots:
        if os.path.isdir(top):
            cmd = ["find", top, "-xdev", "-newer", str(marker), "-user", str(NOBODY), "-print"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
            found += proc.stdout.split()
    return found


def test_agent_runs_unprivileged_and_writes_only_its_state_dir(world: Path, broker: Broker) -> None:
    state = world / "state"
    state.mkdir(mode=0o750)
    os.chown(state, NOBODY, NOBODY)
    config = world / "config.toml"
    shutil.copy(ROOT / "configs" / "dev.toml", config)
    config.chmod(0o644)
    marker = world / "marker"
    marker.touch()
    needed = [Path(os.path.realpath(p)) for p in (sys.executable, sys.prefix, sys.base_prefix, ROOT)]
    script = sandbox_script(needed, world / "hold")

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STATE": str(state), "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           "EDGEAGENT_STATE_DIR": str(state), "EDGEAGENT_DEVICE_ID": "sandboxed-1",
           "EDGEAGENT_MQTT_HOST": broker.host, "EDGEAGENT_MQTT_PORT": str(broker.port)}
    agent = [sys.executable, "-m", "edgeagent.cli", "run", "--config", str(config)]
    if _mdwe_supported():
        agent = [sys.executable, "-c", MDWE, *agent]
    # HOME is not in env: the unit gives the agent none either (dedicated user, no home).
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sandbox",
                             *agent], env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    health_path = state / "health.json"
    try:
        def running() -> bool:
            try:
                return bool(json.loads(health_path.read_text()).get("state") == "running")
            except (FileNotFoundError, ValueError):
                return proc.poll() is not None  # stop waiting if it died; asserted below

        wait_until(running, timeout_s=60, message="health.json says running")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""

        caps = _caps(proc.pid)
        assert caps["Uid"].split() == [str(NOBODY)] * 4 and caps["Gid"].split() == [str(NOBODY)] * 4
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(caps[key], 16) == 0, (key, caps[key])
        assert caps["NoNewPrivs"] == "1" and caps["Groups"] == ""

        # `edgeagent status` reads the live state dir while the sandboxed agent runs.
        parser = argparse.ArgumentParser()
        status.add_parser(parser.add_subparsers())
        args = parser.parse_args(["status", "--state-dir", str(state), "--json"])
        assert status.main(args) in (status.EXIT_OK, status.EXIT_UNHEALTHY)

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT_STOP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log
    assert json.loads(health_path.read_text())["state"] == "stopped", log
    for complaint in ("Read-only file system", "Permission denied", "Operation not permitted", "Traceback"):
        assert complaint not in log, log

    created = _owned_by_nobody_since(marker, ["/tmp", "/var/tmp", "/dev/shm", "/run", str(world)])
    outside = [p for p in created if not Path(p).is_relative_to(state)]
    assert outside == [], f"files written outside the state dir: {outside}"
    assert str(health_path) in created

    # a technician's support bundle, made as the service user in the same sandbox: it reads the
    # state dir the agent left and writes only where it is told (the state dir here)
    bundle = state / "support.tar.gz"
    cmd = [sys.executable, "-m", "edgeagent.cli", "support", "bundle", "--config", str(config),
           "-o", str(bundle), "--no-journal"]
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sandbox",
                        *cmd], env=env, cwd="/", capture_output=True, timeout=120)
    said = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, said
    assert bundle.stat().st_uid == NOBODY and bundle.stat().st_size > 0, said
    assert "Traceback" not in said and "Permission denied" not in said, said
