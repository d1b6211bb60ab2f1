"""Which config file a command reads: `--config`, then `$EDGEAGENT_CONFIG`, then /etc/edgeagent/config.toml.

The first of these that is given is the one used: a path the operator named that does not exist is
an error, never a silent fall-through to another file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeagent.core.errors import EdgeAgentError

ENV_VAR = "EDGEAGENT_CONFIG"
DEFAULT_CONFIG = Path("/etc/edgeagent/config.toml")
EXIT_USAGE = 2


class ConfigNotFound(EdgeAgentError):
    """No config file where we looked; `tried` says where, in order, and why each was passed over."""

    def __init__(self, tried: list[str], hint: bool = True) -> None:
        self.tried = tuple(tried)
        fix = f"; pass --config FILE or set {ENV_VAR}" if hint else ""
        super().__init__(f"no config file: tried {', '.join(self.tried)}{fix}")


def find_config(given: Path | None, environ: Mapping[str, str] | None = None,
                default: Path = DEFAULT_CONFIG) -> Path:
    """The config file to read (it exists), or ConfigNotFound naming every place tried."""
    env = os.environ if environ is None else environ
    if given is not None:
        if given.exists():
            return given
        raise ConfigNotFound([f"{given} (no such file)"], hint=False)
    tried = ["--config (not given)"]
    named = env.get(ENV_VAR, "")
    if named:
        path = Path(named)
        if path.exists():
            return path
        raise ConfigNotFound([*tried, f"${ENV_VAR}={named} (no such file)"])
    tried.append(f"${ENV_VAR} (not set)")
    if default.exists():
        return default
    raise ConfigNotFound([*tried, f"{default} (no such file)"])


def add_config_argument(parser: Any, help_for: str = "") -> None:
    """`--config/-c FILE` with the lookup spelled out in its help (parser: a parser or a group)."""
    what = f", {help_for}" if help_for else ""
    parser.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                        help=f"the agent's TOML config{what} (default: ${ENV_VAR}, else {DEFAULT_CONFIG})")


def resolve_config(given: Path | None, command: str) -> Path | None:
    """find_config for a CLI command: the path, or None after one line on stderr (exit EXIT_USAGE)."""
    try:
        return find_config(given)
    except ConfigNotFound as exc:
        print(f"edgeagent {command}: {exc}", file=sys.stderr)
        return None


__all__ = ["DEFAULT_CONFIG", "ENV_VAR", "EXIT_USAGE", "ConfigNotFound", "add_config_argument",
           "find_config", "resolve_config"]
