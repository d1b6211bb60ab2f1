"""`edgeagent support bundle`: a technician's support bundle, made on the device without a broker.

It only reads the state dir, so it runs as the service user while the agent runs. The agent's
in-memory log ring lives in the agent's process; here the bundle carries journald's lines instead
(or says in its manifest why there are none). Exit 0 written, 1 could not be built or written,
2 a bad config or argument.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from edgeagent.core.cli_args import positive_int
from edgeagent.core.config_path import add_config_argument, resolve_config

MB = 1024 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def default_output(device: str, now: float) -> Path:
    return Path(f"edgeagent-support-{device}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.tar.gz")


def _cmd_bundle(args: argparse.Namespace) -> int:
    # deferred: `edgeagent status` and friends do not pay for the bundle's imports
    from edgeagent.core.config_layers import load_effective
    from edgeagent.core.errors import ConfigError, EdgeAgentError
    from edgeagent.support.bundle import build_bundle

    config_path = resolve_config(args.config, "support bundle")
    if config_path is None:
        return EXIT_USAGE
    try:
        cfg = load_effective(config_path).config
    except ConfigError as exc:
        print(f"edgeagent support bundle: {exc.source or config_path}: {'; '.join(exc.errors)}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.lines < 1:
        print("edgeagent support bundle: --lines must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    out: Path = args.output or default_output(cfg.device.id, time.time())
    if not out.parent.is_dir():
        print(f"edgeagent support bundle: no such directory: {out.parent}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = build_bundle(cfg, out, max_bytes=int(cfg.support.max_bundle_mb * MB), log_lines=(),
                              config_path=config_path, journal=not args.no_journal,
                              journal_lines=args.lines)
    except (OSError, EdgeAgentError) as exc:
        print(f"edgeagent support bundle: cannot write {out}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{result.path}: {result.size} bytes, sha256 {result.sha256}, {len(result.files)} files, "
          f"{len(result.omitted)} omitted")
    for name, why in result.omitted:
        print(f"  omitted {name}: {why}", file=sys.stderr)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """The cli's PLUGINS hook: `edgeagent support bundle`."""
    support = sub.add_parser("support", help="support bundles: what it takes to diagnose this board")
    verbs = support.add_subparsers(dest="support_command", metavar="ACTION")
    verbs.required = True
    b = verbs.add_parser("bundle", help="write a .tar.gz of config (secrets redacted), health, journal, "
                                         "spool figures, models, logs and board facts")
    add_config_argument(b)
    b.add_argument("-o", "--output", type=Path,
                   help="the bundle to write (default ./edgeagent-support-<device>-<time>.tar.gz)")
    b.add_argument("--lines", type=positive_int, default=2000, metavar="N",
                   help="log lines to include at most (journald's, offline; default 2000)")
    b.add_argument("--no-journal", action="store_true", help="leave out journalctl's last hour")
    b.set_defaults(func=_cmd_bundle)
