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
import os
import select
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent import __version__
from edgeagent.core.cli_args import LOG_LEVEL_HELP, log_level
from edgeagent.core.config_path import add_config_argument, resolve_config
from edgeagent.core.errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:  # the runtime is imported lazily, per command
    from edgeagent.core.config import Config
    from edgeagent.core.config_layers import EffectiveConfig

# runtime modules with `add_parsers(sub: argparse._SubParsersAction) -> None`
PLUGINS: tuple[str, ...] = ("edgeagent.monitor.cli", "edgeagent.config_cli", "edgeagent.transport.cli",
                           "edgeagent.status", "edgeagent.support.cli")
# verbs the unit runs at every start (ExecStartPre): parsed without loading the other plugins
CORE_PLUGINS: tuple[str, ...] = ("edgeagent.check.cli",)
# operator tools plug in from outside the runtime (pyproject.toml [project.entry-points])
ENTRY_POINT_GROUP = "edgeagent.commands"


def _cmd_check_config(args: argparse.Namespace) -> int:
    from edgeagent.core import config as cfgmod

    path = resolve_config(args.file or args.config, "check-config")
    if path is None:
        return EXIT_USAGE
    try:
        cfg = cfgmod.load(path)
        _machine_check(cfg, path)
    except ConfigError as exc:
        return _config_errors(exc, path)
    print(f"{path}: OK")
    print(cfgmod.summary(cfg))
    if args.no_files:
        return 0
    # the files it names must be there too (a config can be valid and still name a missing CA file)
    from edgeagent.check.files import file_checks, service_user
    from edgeagent.check.result import failed, print_lines

    checks = file_checks(cfg, service_user())
    print_lines(checks, sys.stdout)
    return EXIT_FAILURE if failed(checks) else 0


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
            _machine_check(effective.config, path)
        except ConfigError as exc:
            return _config_errors(exc, path)
        cfg = effective.config
        logs.setup(args.log_level or cfg.logging.level, cfg.logging.format,
                   ring_lines=cfg.logging.ring_lines, ring_kb=cfg.logging.ring_kb)
        return asyncio.run(run_agent(cfg, effective=effective))
    finally:
        lock.release()


def _machine_check(cfg: Config, path: Path) -> None:
    """ConfigError for what this board lacks (a delegate library): said before anything starts."""
    from edgeagent.core.pipelines import machine_problems

    problems = machine_problems(cfg)
    if problems:
        raise ConfigError(problems, str(path))


def _config_errors(exc: ConfigError, path: Path) -> int:
    print(f"{exc.source or path}: {len(exc.errors)} error(s)", file=sys.stderr)
    for e in exc.errors:
        print(f"  {e}", file=sys.stderr)
    return EXIT_USAGE


CORE_COMMANDS = ("run", "check-config", "check")

# packages that come with an extra, not with the base install (pyproject.toml optional-dependencies)
OPTIONAL_PACKAGES = {"rich": "fleet", "prometheus_client": "fleet", "tflite_runtime": "tflite",
                     "ai_edge_litert": "litert"}

# exit statuses every verb keeps (the `--help` epilog says the same)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EPILOG = """\
exit status:
  0    success (also when a reader such as `head` closes the output early)
  1    failure: the command ran and something did not work (device, broker, permission)
  2    usage or config error: a bad flag value, a config file that is missing or invalid
  130  interrupted (Ctrl-C)
  `status` adds 3 (agent not running) and 4 (state unknown): see `edgeagent status --help`
Errors are one line on stderr; `edgeagent --debug COMMAND ...` shows the traceback.

examples:
  edgeagent check-config /etc/edgeagent/config.toml
  edgeagent check --config /etc/edgeagent/config.toml
  edgeagent run --config /etc/edgeagent/config.toml
  edgeagent status --json
  edgeagent COMMAND --help
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each flag's default (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("%(default)" not in text and "default" not in text and action.option_strings
                and action.default not in (None, False, [], argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """Every parser and subparser (the plugins' too) formats its help the same way."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _use_formatter(child)


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeagent", description="The edge agent (run it, check it) and the operator tools around it.",
        epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the agent (as the systemd service does)")
    add_config_argument(run)
    run.add_argument("--log-level", type=log_level, help=f"override logging.level; {LOG_LEVEL_HELP}")
    run.set_defaults(func=_cmd_run)

    chk = sub.add_parser("check-config", help="validate a config file and the files it names: exit 0 and "
                                              "a summary, 1 when a named file is missing or unreadable, "
                                              "2 and every error with its key path")
    chk.add_argument("file", type=Path, nargs="?", metavar="FILE",
                     help="the config to check (default: as --config)")
    add_config_argument(chk)
    chk.add_argument("--no-files", action="store_true",
                     help="check the config only, not the files it names (e.g. on a laptop, for a board)")
    chk.set_defaults(func=_cmd_check_config)

    for name in CORE_PLUGINS:
        importlib.import_module(name).add_parsers(sub)
    if plugins:
        from importlib.metadata import entry_points  # ~2.5 MiB (email, zipfile...): not for `run`

        for name in PLUGINS:
            importlib.import_module(name).add_parsers(sub)
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            ep.load()(sub)
    _use_formatter(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the daemon does not pay (in RSS and start time) for the operator tools' imports
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(plugins=command not in CORE_COMMANDS).parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit where nothing could catch it
        return status
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError as exc:
        if _stdout_closed():
            # the reader stopped reading (`| head`): as the Python docs advise, point stdout at
            # devnull so the flush at exit does not fail again, and end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        return _fail(args, _os_message(exc), EXIT_FAILURE)
    except ConfigError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except EdgeAgentError as exc:
        return _fail(args, str(exc), EXIT_FAILURE)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        return _fail(args, _os_message(exc), EXIT_USAGE)
    except OSError as exc:  # permission denied, connection refused, disk full ...
        return _fail(args, _os_message(exc), EXIT_FAILURE)
    except ModuleNotFoundError as exc:  # an optional package of an extra the install left out
        extra = OPTIONAL_PACKAGES.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        return _fail(args, f"needs {exc.name}, which is not installed: pip install 'edgeagent[{extra}]'",
                     EXIT_FAILURE)


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    """One line on stderr (the traceback too with --debug) and the documented exit status."""
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    command = getattr(args, "command", None)
    where = f"edgeagent {command}" if command else "edgeagent"
    first = message.strip().splitlines()[0] if message.strip() else "error"
    print(f"{where}: {first}", file=sys.stderr)
    return status


def _os_message(exc: OSError) -> str:
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {what}" if exc.filename is not None else what


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on the write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
