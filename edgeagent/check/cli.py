"""`edgeagent check`: the deep self-check a support person asks for first.

It loads the config (every error at once), then checks what the agent will meet when it starts: the
files the config names, the state dir, the clock (`--static` stops there: the unit's ExecStartPre), then
the model in its runtime, the broker (resolve, TLS, a real CONNECT), the sensor sources, systemd and the
installer helper. One line per check; exit 0 when nothing FAILs, 1 when something does, 2 when the
config itself is invalid. It changes nothing (a probe file in the state dir comes and goes), so it
runs beside a running agent.
"""

from __future__ import annotations

import argparse
import sys
import time

from edgeagent.core.cli_args import positive_float
from edgeagent.core.config_path import add_config_argument, resolve_config

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EPILOG = """\
exit status: 0 nothing failed (warnings allowed), 1 a check FAILed, 2 the config is missing or invalid

examples:
  sudo edgeagent check                      # as the service user edgeagent sees it
  edgeagent check --static -c config.toml   # files, state dir, clock: offline, under a second
  edgeagent check --json | jq '.checks[] | select(.status == "FAIL")'
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="self-check: config, files, state dir, clock, model, broker, sensors, "
                                     "systemd; one line per check, exit 1 on any FAIL",
                       description=__doc__, epilog=EPILOG)
    add_config_argument(p)
    p.add_argument("--static", action="store_true",
                   help="only the offline checks (config, files, state dir, clock), as the unit's "
                        "ExecStartPre runs them")
    p.add_argument("--json", action="store_true", help="one JSON document for machines")
    p.add_argument("--timeout", type=positive_float, default=5.0, metavar="S",
                   help="seconds each network step may take (resolve, connect, handshake, CONNACK)")
    p.add_argument("--user", metavar="NAME", default=None,
                   help="judge file access as this user (default: edgeagent when root runs the check and "
                        "that user exists, else yourself)")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from edgeagent.check.files import service_user
    from edgeagent.check.result import as_json, failed, print_lines, summary_line
    from edgeagent.check.run import load_for_check, run_checks

    started = time.monotonic()
    path = resolve_config(args.config, "check")
    if path is None:
        return EXIT_CONFIG
    try:
        user = service_user(args.user)
    except KeyError:
        print(f"edgeagent check: --user {args.user}: no such user", file=sys.stderr)
        return EXIT_CONFIG
    cfg, checks = load_for_check(path)
    if cfg is not None:
        checks += run_checks(cfg, user, static=args.static, timeout_s=args.timeout)
    elapsed = time.monotonic() - started
    if args.json:
        print(as_json(checks, str(path), elapsed))
    else:
        print_lines(checks, sys.stdout)
        print(summary_line(checks, elapsed))
    if cfg is None:
        return EXIT_CONFIG
    return EXIT_FAILED if failed(checks) else EXIT_OK
