"""The shipped units: `systemd-analyze verify` passes and the agent's exposure stays <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
MAX_EXPOSURE = 2.0



def setup_module() -> None:
    # Not a skip: CI must fail loudly if the check cannot run (apt-get install systemd).
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (Debian package systemd)"


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def staged(tmp_path: Path) -> Path:
    """Copies of the units whose Exec paths point at binaries that exist here, so verify can check them."""
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.iterdir():
        if unit.is_file():
            text = unit.read_text()
            text = text.replace("/opt/edgeagent/venv/bin/edgeagent", "/bin/true")
            text = text.replace("/opt/edgeagent/venv/bin/python", "/bin/true")
            (out / unit.name).write_text(text)
    return out


def exposure(unit: Path) -> tuple[float, str]:
    proc = analyze("security", "--offline=true", "--no-pager", unit.name, cwd=unit.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1)), proc.stdout


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = staged(tmp_path)
    for name in ("edgeagent.service", "edgeagent-installer.service", "edgeagent-installer.path"):
        proc = analyze("verify", "--no-pager", name, cwd=units)
        # Warnings about this machine (no running systemd, missing targets) are not the unit's fault;
        # anything naming the unit file itself is.
        own = [ln for ln in (proc.stdout + proc.stderr).splitlines() if name.split(".")[0] in ln]
        assert proc.returncode == 0 and own == [], proc.stdout + proc.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo in a directive is reported."""
    units = staged(tmp_path)
    unit = units / "edgeagent.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    proc = analyze("verify", "--no-pager", unit.name, cwd=units)
    assert "ProtectSytem" in proc.stdout + proc.stderr


def test_agent_exposure_is_at_most_2(tmp_path: Path) -> None:
    score, report = exposure(staged(tmp_path) / "edgeagent.service")
    print(f"edgeagent.service exposure {score}")
    assert score <= MAX_EXPOSURE, report


def test_exposure_check_notices_a_weakened_unit(tmp_path: Path) -> None:
    units = staged(tmp_path)
    unit = units / "edgeagent.service"
    weakened = re.sub(r"^(ProtectSystem|ProtectHome|PrivateDevices|PrivateUsers|CapabilityBoundingSet|"
                      r"SystemCallFilter|RestrictAddressFamilies)=.*\n", "", unit.read_text(), flags=re.M)
    unit.write_text(weakened)
    score, _ = exposure(unit)
    assert score > MAX_EXPOSURE


def test_agent_unit_contract() -> None:
    """The settings the agent and the docs rely on, independent of the score."""
    text = (UNITS / "edgeagent.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure"
    assert settings["User"] == "edgeagent"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == settings["LogsDirectory"] == "edgeagent"
    assert settings["ExecStart"].endswith("run --config /etc/edgeagent/config.toml")
    # the static self-check runs first, on the same config, so a broken one fails with a readable line
    assert settings["ExecStartPre"] == ("/opt/edgeagent/venv/bin/edgeagent check --static "
                                        "--config /etc/edgeagent/config.toml")
    # Shutdown: the agent's default agent.shutdown_timeout_s is 10 s; systemd must wait longer.
    assert _seconds(settings["TimeoutStopSec"]) > 10
    assert _seconds(settings["WatchdogSec"]) >= 10
    assert "@system-service" in text
    path_unit = (UNITS / "edgeagent-installer.path").read_text()
    assert "PathExists=/var/lib/edgeagent/installer/request.json" in path_unit
    installer = (UNITS / "edgeagent-installer.service").read_text()
    assert ("-m edgeagent.updates.privileged --state-dir /var/lib/edgeagent "
            "--config /etc/edgeagent/installer.toml") in installer


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value.strip())
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)
