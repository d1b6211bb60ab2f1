"""`edgeagent metrics`: what the monitor sees on this board, as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
import time

from edgeagent.core.cli_args import positive_int
from edgeagent.core.config_path import EXIT_USAGE, add_config_argument, resolve_config
from edgeagent.monitor.sampler import Sampler


def _cmd_metrics(args: argparse.Namespace) -> int:
    from edgeagent.core import config as cfgmod
    from edgeagent.core.errors import ConfigError

    path = resolve_config(args.config, "metrics")
    if path is None:
        return EXIT_USAGE
    try:
        cfg = cfgmod.load(path)
    except ConfigError as exc:
        print(f"{exc.source or path}: {'; '.join(exc.errors)}", file=sys.stderr)
        return EXIT_USAGE
    sampler = Sampler(cfg.monitor)
    sampler.sample(time.time())  # the rates need a baseline
    for _ in range(max(1, args.count)):
        time.sleep(cfg.monitor.interval_s)
        print(json.dumps(sampler.sample(time.time()).as_dict(), sort_keys=True), flush=True)
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("metrics", help="print what the monitor sees on this board (JSON lines)")
    add_config_argument(p, "for [monitor]")
    p.add_argument("--count", "-n", type=positive_int, default=1, help="samples to print (default 1)")
    p.set_defaults(func=_cmd_metrics)
