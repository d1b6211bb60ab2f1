"""`edgeagent config show|diff`: the effective config on a device and where each value comes from.

Layers, lowest first: defaults (the schema), the local file, the applied remote layer
(`<state_dir>/config.applied.toml`). `show` prints the effective config as TOML with the layer of
each value as a comment (or one layer alone); `diff` lists what the remote layer changes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeagent.core import config as cfgmod
from edgeagent.core.config_layers import (
    RESTART_KEYS,
    EffectiveConfig,
    applied_path,
    changed_paths,
    dumps_toml,
    load_effective,
    read_applied,
)
from edgeagent.core.config_path import EXIT_USAGE, add_config_argument, resolve_config
from edgeagent.core.errors import ConfigError

SECRET_KEYS = ("password",)  # never printed: `show` output ends up in tickets and chats


def _present(layer: Mapping[str, Any], path: str) -> bool:
    """Does `layer` set `path`? An array (rules) set by a layer covers everything under it."""
    node: Any = layer
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def origin(layers: Mapping[str, Mapping[str, Any]], path: str) -> str:
    if _present(layers.get("remote", {}), path):
        return "remote"
    if _present(layers.get("file", {}), path):
        return "file"
    return "default"


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("***" if k in SECRET_KEYS and v else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _load(path: Path) -> EffectiveConfig | None:
    try:
        return load_effective(path)
    except ConfigError as exc:
        if len(exc.errors) == 1:  # a missing or unreadable file: one line, as every verb says it
            print(f"{exc.source or path}: {exc.errors[0]}", file=sys.stderr)
            return None
        print(f"{exc.source or path}: {len(exc.errors)} error(s)", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return None


def _header(cfg: cfgmod.Config) -> str:
    state = read_applied(cfg.state_dir)
    where = applied_path(cfg.state_dir)
    if state is None or not state.version:
        return f"# remote layer: none ({where} absent or empty)\n"
    status = "confirmed" if state.confirmed else "on probation (not confirmed yet)"
    return f"# remote layer: version {state.version}, {status}, sha256 {state.sha256[:12]}… ({where})\n"


def cmd_show(args: argparse.Namespace) -> int:
    path = resolve_config(args.config, "config show")
    if path is None:
        return EXIT_USAGE
    loaded = _load(path)
    if loaded is None:
        return 2
    cfg, layers = loaded
    if args.layer != "effective":
        print(f"# layer {args.layer!r} of {path}")
        print(dumps_toml(_redact(layers[args.layer])), end="")
        return 0
    print(f"# effective config of {path}; each value says which layer set it")
    print(_header(cfg), end="")
    note = None if args.no_origin else (lambda p: origin(layers, p))
    print(dumps_toml(_redact(cfgmod.to_dict(cfg)), note=note), end="")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    path = resolve_config(args.config, "config diff")
    if path is None:
        return EXIT_USAGE
    loaded = _load(path)
    if loaded is None:
        return 2
    cfg, layers = loaded
    print(_header(cfg), end="")
    if not layers["remote"]:
        return 0
    try:
        base = cfgmod.build(layers["file"], str(path))
    except ConfigError as exc:  # pragma: no cover - load_effective built it a moment ago
        print(exc, file=sys.stderr)
        return 2
    before, after = _redact(cfgmod.to_dict(base)), _redact(cfgmod.to_dict(cfg))
    paths = changed_paths(base, cfg)
    if not paths:
        print("the remote layer changes nothing against the file")
    for p in paths:
        restart = any(p == k or p.startswith(k + ".") for k in RESTART_KEYS)
        print(f"{p}: {_get(before, p)!r} -> {_get(after, p)!r}{'  (needs a restart)' if restart else ''}")
    return 0


def _get(table: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(table, dict) or part not in table:
            return None
        table = table[part]
    return table


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("config", help="show the effective config and its layers (file, remote, defaults)")
    csub = p.add_subparsers(dest="config_command", metavar="{show,diff}")
    csub.required = True
    show = csub.add_parser("show", help="the effective config as TOML, each value with its layer")
    add_config_argument(show)
    show.add_argument("--layer", choices=("effective", "defaults", "file", "remote"), default="effective",
                      help="which layer to show (effective: all merged)")
    show.add_argument("--no-origin", action="store_true", help="leave out the layer comments")
    show.set_defaults(func=cmd_show)
    diff = csub.add_parser("diff", help="what the applied remote layer changes against the file")
    add_config_argument(diff)
    diff.set_defaults(func=cmd_diff)
