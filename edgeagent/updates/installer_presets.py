"""Command lines of the A/B firmware tools edgeagent drives, one preset per tool.

Each preset maps an op to an argv (never a shell string). `{artifact}` is replaced inside a single
argv element, so a path with spaces or shell characters stays one argument. Bare program names
are looked up on a fixed system PATH by whoever runs the command, never on the caller's PATH.
"""

from __future__ import annotations

import shlex

from edgeagent.core.errors import InstallerCommandError

__all__ = ["ARTIFACT", "OPS", "PRESETS", "SAFE_PATH", "InstallerCommandError", "command_for", "parse_slot",
           "validate_override"]

# mark-bad: the booted (new) slot failed its health check; abort: still booted in the old slot,
# drop the pending install (a reboot that failed) so the untested slot never boots later
OPS = ("install", "reboot", "mark-good", "mark-bad", "abort", "slot")
ARTIFACT = "{artifact}"

# The installer service runs with this PATH; an override may also name an absolute path.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The script preset calls one executable with the op as first argument (see docs/install.md).
DEFAULT_SCRIPT = "/usr/local/libexec/edgeagent-firmware"

_REBOOT = ["systemctl", "reboot"]

PRESETS: dict[str, dict[str, list[str]]] = {
    # RAUC: the CLI hands the bundle to rauc.service over D-Bus; RAUC checks the bundle signature.
    "rauc": {
        "install": ["rauc", "install", ARTIFACT],
        "reboot": _REBOOT,
        "mark-good": ["rauc", "status", "mark-good"],
        "mark-bad": ["rauc", "status", "mark-bad"],
        "abort": ["rauc", "status", "mark-active", "booted"],
        "slot": ["rauc", "status", "--output-format=shell"],
    },
    # SWUpdate with a U-Boot environment and the usual `ustate` transaction variable
    # (0 ok, 3 failed); the booted slot variable is board-specific, `rootfs` is the common one.
    "swupdate": {
        "install": ["swupdate", "-v", "-i", ARTIFACT],
        "reboot": _REBOOT,
        "mark-good": ["fw_setenv", "ustate", "0"],
        "mark-bad": ["fw_setenv", "ustate", "3"],
        "abort": ["fw_setenv", "upgrade_available", "0"],  # board-specific: override where needed
        "slot": ["fw_printenv", "-n", "rootfs"],
    },
    # Mender client 4 (mender-update); for Mender 3 override with `mender install|commit|rollback`.
    "mender": {
        "install": ["mender-update", "install", ARTIFACT],
        "reboot": _REBOOT,
        "mark-good": ["mender-update", "commit"],
        "mark-bad": ["mender-update", "rollback"],
        "abort": ["mender-update", "rollback"],
        "slot": ["fw_printenv", "-n", "mender_boot_part"],
    },
    # A site script of your own: `<script> install <artifact>`, `<script> slot`, ...
    "script": {op: [DEFAULT_SCRIPT, op, ARTIFACT] if op == "install" else [DEFAULT_SCRIPT, op] for op in OPS},
}


def validate_override(op: str, argv: object) -> list[str]:
    """Check one per-op override from a config file: a non-empty list of non-empty strings."""
    if op not in OPS:
        raise InstallerCommandError(f"unknown op {op!r} (known: {', '.join(OPS)})", op=op)
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and a for a in argv)
    ):
        raise InstallerCommandError(f"command for {op!r} must be a non-empty list of strings", op=op)
    if ARTIFACT in argv[0]:
        raise InstallerCommandError(f"command for {op!r}: the program cannot be the artifact", op=op)
    return list(argv)


def command_for(preset: str, op: str, artifact: str | None, overrides: dict[str, list[str]]) -> list[str]:
    """The argv for `op`: the override if one is set, else the preset's, with `{artifact}` filled in."""
    if preset not in PRESETS:
        raise InstallerCommandError(
            f"unknown installer preset {preset!r} (known: {', '.join(PRESETS)})", preset=preset, op=op
        )
    if op not in OPS:
        raise InstallerCommandError(f"unknown op {op!r} (known: {', '.join(OPS)})", preset=preset, op=op)
    template = validate_override(op, overrides[op]) if op in overrides else PRESETS[preset][op]
    if any(ARTIFACT in arg for arg in template):
        if not artifact:
            raise InstallerCommandError(f"op {op!r} needs an artifact", preset=preset, op=op)
        return [arg.replace(ARTIFACT, artifact) for arg in template]
    return list(template)


def parse_slot(preset: str, output: str) -> str | None:
    """The booted slot from the `slot` op's output (RAUC prints shell variables; others print the slot)."""
    if preset == "rauc":
        for line in output.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "RAUC_SYSTEM_BOOTED_BOOTNAME":
                words = shlex.split(value)
                return words[0] if words else None
        return None
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else None
