"""Deep check of what sits around the agent: the systemd unit, and the firmware installer (the root
helper's path unit in privileged mode, the installer tool itself in direct mode)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeagent.check.result import Check, fail, info, ok, warn
from edgeagent.core.config import Config

UNIT_DIRS = (Path("/etc/systemd/system"), Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
SYSTEMD_RUNNING = Path("/run/systemd/system")  # exists when systemd is PID 1 (sd_booted)


def find_unit(name: str, dirs: tuple[Path, ...] = UNIT_DIRS) -> Path | None:
    return next((d / name for d in dirs if (d / name).is_file()), None)


def system_checks(cfg: Config, dirs: tuple[Path, ...] = UNIT_DIRS,
                  systemd: bool | None = None) -> list[Check]:
    booted = SYSTEMD_RUNNING.is_dir() if systemd is None else systemd
    checks: list[Check] = []
    unit = find_unit("edgeagent.service", dirs)
    if unit is not None:
        checks.append(ok("systemd", f"{unit}"))
    elif booted:
        checks.append(warn("systemd", "edgeagent.service is not installed: nothing restarts the agent",
                           "sudo scripts/install.sh"))
    else:
        checks.append(info("systemd", "systemd is not running here: no unit to check"))
    fw = cfg.updates.firmware
    if not cfg.updates.enabled:
        return checks
    if fw.mode == "privileged":
        helper = find_unit("edgeagent-installer.path", dirs)
        if helper is not None:
            checks.append(ok("updates.firmware.mode", f"privileged: {helper}"))
        else:
            make = fail if booted else warn
            checks.append(make("updates.firmware.mode", "privileged, but the root helper "
                                                        "(edgeagent-installer.path) is not installed: "
                                                        "firmware updates cannot finish",
                               "sudo scripts/install.sh, or updates.firmware.mode = \"direct\""))
        return checks
    from edgeagent.core.errors import InstallerCommandError
    from edgeagent.updates.installer_presets import SAFE_PATH, command_for

    try:
        overrides = {op: list(argv) for op, argv in fw.commands.items()}
        program = command_for(fw.installer, "install", "ARTIFACT", overrides)[0]
    except InstallerCommandError as exc:
        return [*checks, fail("updates.firmware.commands", str(exc), "see docs/install.md")]
    found = shutil.which(program, path=SAFE_PATH)
    if found:
        checks.append(ok("updates.firmware.installer", f"direct: {found}"))
    else:
        checks.append(warn("updates.firmware.installer", f"direct: {program} is not installed: firmware "
                                                         "updates will fail",
                           f"install it (preset {fw.installer}) or name another in "
                           "updates.firmware.commands.install"))
    return checks
