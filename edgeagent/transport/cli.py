"""`edgeagent spool stats|peek`: look into the store-and-forward spool, also while the agent runs.

Opens the SQLite file read-only (WAL lets a reader in beside the agent), so it never changes
what the agent will send.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from edgeagent.core.cli_args import positive_int
from edgeagent.core.config_path import add_config_argument, resolve_config
from edgeagent.core.errors import ConfigError
from edgeagent.transport.component import SPOOL_FILE


def _spool_path(args: argparse.Namespace) -> Path | None:
    if args.file:
        return Path(args.file)
    from edgeagent.core import config as cfgmod

    path = resolve_config(args.config, "spool")
    if path is None:
        return None
    try:
        cfg = cfgmod.load(path)
    except ConfigError as exc:
        print(f"{exc.source or path}: {'; '.join(exc.errors)}", file=sys.stderr)
        return None
    return cfg.state_dir / SPOOL_FILE


def _open(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(path)
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def stats(path: Path) -> dict[str, Any]:
    """What the spool holds: rows per kind, bytes, age of the oldest row, seq counters, drops."""
    db = _open(path)
    try:
        now = time.time()
        kinds = {"T": "samples", "E": "events", "M": "messages"}
        rows = db.execute("SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(ts) "
                          "FROM outbox GROUP BY kind").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        states = [r[0] for r in db.execute("SELECT topic FROM state ORDER BY topic")]
        oldest = min((r[3] for r in rows if r[3] is not None), default=None)
        return {
            "path": str(path),
            "backlog": {kinds.get(k, k): n for k, n, _, _ in rows},
            "payload_bytes": sum(int(b) for _, _, b, _ in rows),
            "oldest_age_s": round(now - oldest, 1) if oldest is not None else None,
            "last_seq": {"telemetry": meta.get("seq_telemetry", 0), "event": meta.get("seq_event", 0)},
            "dropped": {kinds[k]: meta.get(f"dropped_{k}", 0) for k in kinds},
            "states_pending": states,
        }
    finally:
        db.close()


def peek(path: Path, n: int) -> list[dict[str, Any]]:
    """The `n` oldest rows, as they will be sent (sample rows without their message envelope)."""
    db = _open(path)
    try:
        cur = db.execute("SELECT id, kind, topic, payload, ts FROM outbox ORDER BY id LIMIT ?", (n,))
        out = []
        for rid, kind, topic, payload, ts in cur.fetchall():
            try:
                body: Any = json.loads(payload)
            except ValueError:
                body = repr(bytes(payload)[:200])
            out.append({"id": rid, "kind": kind, "topic": topic, "ts": ts, "payload": body})
        return out
    finally:
        db.close()


def _cmd(args: argparse.Namespace) -> int:
    path = _spool_path(args)
    if path is None:
        return 2
    try:
        result: Any = stats(path) if args.spool_cmd == "stats" else peek(path, args.count)
    except FileNotFoundError:
        print(f"no spool at {path} (the agent has not run with this state_dir)", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:
        print(f"{path}: cannot read the spool: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("spool", help="what the store-and-forward spool holds (read-only)")
    p.add_argument("spool_cmd", choices=("stats", "peek"), help="stats: counts and seq; peek: oldest rows")
    add_config_argument(p, "for device.state_dir")
    p.add_argument("--file", "-f", type=Path, help="a spool.sqlite file instead of --config")
    p.add_argument("--count", "-n", type=positive_int, default=5, help="rows for peek (default 5)")
    p.set_defaults(func=_cmd)
