"""`edgeagent <command>`: the agent itself and the operator tools around it.

The device's own verbs (run, check-config, status, metrics, config, spool) are imported lazily from
the runtime; the operator's verbs (keygen, sign, push, fleet, bench-model) come from the
`edgeagent.commands` entry points of `edgeagent.ops`, which the runtime never imports, so that
`edgeagent run` pays for neither.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent import __version__
from edgeagent.core.config_path import EXIT_USAGE, add_config_argument, resolve_config
from edgeagent.core.errors import ConfigError

if TYPE_CHECKING:  # the runtime is imported lazily, per command
    from edgeagent.core.config_layers import EffectiveConfig

# runtime modules with `add_parsers(sub: argparse._SubParsersAction) -> None`
PLUGINS: tuple[str, ...] = ("edgeagent.monitor.cli", "edgeagent.config_cli", "edgeagent.transport.cli",
                           "edgeagent.status", "edgeagent.support.cli")
# operator tools plug in from outside the runtime (pyproject.toml [project.entry-points])
ENTRY_POINT_GROUP = "edgeagent.commands"


def _cmd_check_config(args: argparse.Namespace) -> int:
    from edgeagent.core import config as cfgmod

    path = resolve_config(args.file or args.config, "check-config")
    if path is None:
        return EXIT_USAGE
    try:
        cfg = cfgmod.load(path)
    except ConfigError as exc:
        return _config_errors(exc, path)
    print(f"{path}: OK")
    print(cfgmod.summary(cfg))
    return 0


def load_run_config(path: Path) -> EffectiveConfig:
    """The effective config for `run`: the file plus the applied remote layer, if any."""
    from edgeagent.core.config_layers import load_effective

    return load_effective(path, starting=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from edgeagent.agent import run_agent
    from edgeagent.core import config as cfgmod
    from edgeagent.core import logs
    from edgeagent.core.instance import AlreadyRunning, InstanceLock

    path = resolve_config(args.config, "run")
    if path is None:
        return EXIT_USAGE
    try:
        # the file's state dir is the one to lock: load_effective counts this start in it
        lock = InstanceLock(cfgmod.load(path).state_dir)
    except ConfigError as exc:
        return _config_errors(exc, path)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"edgeagent run: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edgeagent run: cannot lock {lock.path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:  # held until the agent has stopped
        try:
            effective = load_run_config(path)
        except ConfigError as exc:
            return _config_errors(exc, path)
        cfg = effective.config
        logs.setup(args.log_level or cfg.logging.level, cfg.logging.format,
                   ring_lines=cfg.logging.ring_lines, ring_kb=cfg.logging.ring_kb)
        return asyncio.run(run_agent(cfg, effective=effective))
    finally:
        lock.release()


def _config_errors(exc: ConfigError, path: Path) -> int:
    print(f"{exc.source or path}: {len(exc.errors)} error(s)", file=sys.stderr)
    for e in exc.errors:
        print(f"  {e}", file=sys.stderr)
    return EXIT_USAGE


CORE_COMMANDS = ("run", "check-config")


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeagent", description="The edge agent (run it, check it) and the operator tools around it.")
    p.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the agent (as the systemd service does)")
    add_config_argument(run)
    run.add_argument("--log-level", help="override logging.level")
    run.set_defaults(func=_cmd_run)

    chk = sub.add_parser("check-config", help="validate a config file: exit 0 and a summary, or 2 "
                                              "and every error with its key path")
    chk.add_argument("file", type=Path, nargs="?", metavar="FILE",
                     help="the config to check (default: as --config)")
    add_config_argument(chk)
    chk.set_defaults(func=_cmd_check_config)

    if plugins:
        for name in PLUGINS:
            importlib.import_module(name).add_parsers(sub)
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            ep.load()(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the daemon does not pay (in RSS and start time) for the operator tools' imports
    args = build_parser(plugins=not argv or argv[0] not in CORE_COMMANDS).parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
