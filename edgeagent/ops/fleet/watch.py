"""`fleet watch` / `fleet devices` / `fleet history`: the fleet as a table, worst devices first.

Rows are built from device snapshots (live from a collector, or read from its database) by pure
functions, so the JSON a script reads and the table an operator sees say the same thing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeagent.ops.fleet import shadow_view
from edgeagent.ops.fleet.state import Thresholds, active_job, recent_anomalies, sort_by_trouble, troubles

JOB_FIELDS = ("job", "kind", "name", "version", "state", "progress", "reason", "shadow")
STATE_FILTERS = ("online", "offline", "stale", "updating", "trouble", "ok")
TROUBLE_STYLE = {"offline": "bold red", "stale": "red", "update-failed": "red", "update-stuck": "yellow",
                 "hot": "bold yellow", "overloaded": "yellow", "anomalies": "magenta", "gaps": "cyan",
                 "backlog": "cyan", "updating": "blue"}


def device_row(d: dict[str, Any], now: float, th: Thresholds) -> dict[str, Any]:
    """The JSON-friendly view of one device that `watch --json` prints and the table shows."""
    m = d.get("metrics") or {}
    inf = d.get("inference") or {}
    job = active_job(d)
    tele, ev = d.get("telemetry") or {}, d.get("events") or {}
    trouble = troubles(d, now, th)
    last_seen = d.get("last_seen") or None
    return {
        "device": d.get("device"),
        "state": "stale" if "stale" in trouble else d.get("state"),
        "status": d.get("state"),
        "reason": d.get("reason") or "",
        "troubles": trouble,
        "groups": d.get("groups") or [],
        "last_seen": last_seen,
        "last_seen_ago_s": round(now - last_seen, 3) if last_seen else None,
        "cpu_percent": m.get("cpu_percent"),
        "mem_used_percent": m.get("mem_used_percent"),
        "temp_c": m.get("temp_c"),
        "model": d.get("model"),
        "agent": d.get("agent"),
        "firmware": d.get("firmware"),
        "inference_p95_ms": inf.get("p95_ms"),
        "anomalies_recent": recent_anomalies(d, now, th),
        "anomalies_total": d.get("anomalies_total") or 0,
        "spool_backlog": (d.get("spool") or {}).get("backlog"),
        "update": None if job is None else {k: job.get(k) for k in JOB_FIELDS},
        "config": {k: (d.get("config") or {}).get(k) for k in ("version", "state", "reason")}
        if d.get("config") else None,
        "telemetry": {k: tele.get(k) for k in ("last_seq", "received", "gaps", "duplicates", "resets")},
        "events": {k: ev.get(k) for k in ("last_seq", "received", "gaps", "duplicates", "resets")},
    }


def select(devs: list[dict[str, Any]], now: float, th: Thresholds, group: str | None = None,
           state: str | None = None) -> list[dict[str, Any]]:
    """Filter by group and state, then sort worst first."""
    out = []
    for d in devs:
        if group is not None and group not in (d.get("groups") or []):
            continue
        if state is not None:
            t = troubles(d, now, th)
            live = d.get("state") == "online" and "stale" not in t
            keep = {"online": live, "offline": d.get("state") == "offline", "stale": "stale" in t,
                    "updating": any(x.startswith("updat") for x in t), "trouble": bool(t),
                    "ok": not t}[state]
            if not keep:
                continue
        out.append(d)
    return sort_by_trouble(out, now, th)


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    s = {"devices": len(rows), "online": 0, "offline": 0, "stale": 0, "trouble": 0}
    for r in rows:
        if r["state"] in s:
            s[r["state"]] += 1
        if r["troubles"]:
            s["trouble"] += 1
    return s


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _num(v: object, fmt: str = "{:.0f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def table(rows: list[dict[str, Any]], title: str = "") -> Table:
    t = Table(title=title or None, expand=False, show_lines=False, header_style="bold")
    for col, justify in (("device", "left"), ("state", "left"), ("seen", "right"), ("cpu%", "right"),
                         ("mem%", "right"), ("temp", "right"), ("model", "left"), ("p95 ms", "right"),
                         ("anom", "right"), ("gaps", "right"), ("update", "left"), ("shadow", "right"),
                         ("trouble", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        state_style = {"online": "green", "offline": "bold red", "stale": "red"}.get(str(r["state"]), "")
        up = r["update"]
        update = "" if up is None else f"{up['state']} {100 * (up.get('progress') or 0):.0f}%"
        gaps = (r["telemetry"].get("gaps") or 0) + (r["events"].get("gaps") or 0)
        trouble = Text()
        for i, name in enumerate(r["troubles"]):
            trouble.append(("," if i else "") + name, style=TROUBLE_STYLE.get(name, ""))
        temp_style = "bold yellow" if "hot" in r["troubles"] else ""
        t.add_row(str(r["device"]), Text(str(r["state"]), style=state_style), _ago(r["last_seen_ago_s"]),
                  _num(r["cpu_percent"]), _num(r["mem_used_percent"]),
                  Text(_num(r["temp_c"], "{:.1f}"), style=temp_style), r["model"] or "-",
                  _num(r["inference_p95_ms"], "{:.1f}"), str(r["anomalies_recent"] or ""),
                  str(gaps or ""), update, shadow_view.cell(up), trouble)
    return t


def watch(source: Callable[[], list[dict[str, Any]]], th: Thresholds, group: str | None, state: str | None,
          once: bool, as_json: bool, refresh_s: float, out: TextIO, stop: threading.Event | None = None,
          limit: int = 0) -> int:
    """Print once (table or JSON), or refresh a live table until `stop` or Ctrl-C."""

    def view() -> tuple[list[dict[str, Any]], float]:
        now = time.time()
        devs = select(source(), now, th, group, state)
        return [device_row(d, now, th) for d in devs], now

    if once:
        rows, now = view()
        if as_json:
            json.dump({"ts": now, "summary": summary(rows), "devices": rows}, out, indent=1)
            out.write("\n")
        else:
            shown = rows[:limit] if limit else rows
            print_table(table(shown, title=_title(summary(rows))), out)
        return 0
    from rich.live import Live

    stop = stop or threading.Event()
    if not out.isatty():  # a pipe or a file: one plain table per refresh, never redrawn in place
        while True:
            rows, _ = view()
            print_table(table(rows[:limit] if limit else rows, _title(summary(rows))), out)
            out.write("\n")
            out.flush()
            if stop.wait(refresh_s):
                return 0
    console = Console(file=out)
    rows, _ = view()
    with Live(table(rows, _title(summary(rows))), console=console, auto_refresh=False,
              screen=False) as live:
        while not stop.wait(refresh_s):
            rows, _ = view()
            height = max(5, console.size.height - 6)
            live.update(table(rows[:limit or height], _title(summary(rows))), refresh=True)
    return 0


def print_table(t: Table, out: TextIO) -> None:
    """A rich table on a terminal; on a pipe or into a file, plain text at full width (rich would
    cut it to the 80 columns it assumes without a terminal)."""
    if out.isatty():
        Console(file=out).print(t)
    else:
        out.write(plain_table(t))


def plain_table(t: Table) -> str:
    """The table as space-aligned columns, no styles, no truncation: what `grep` and `awk` want."""
    headers = [_plain(c.header) for c in t.columns]
    cells = [[_plain(x) for x in c.cells] for c in t.columns]
    rows = [headers, *([col[i] for col in cells] for i in range(t.row_count))]
    widths = [max(len(r[j]) for r in rows) for j in range(len(headers))]
    lines = [_plain(t.title)] if t.title else []
    for r in rows:
        parts = [x.rjust(w) if t.columns[j].justify == "right" else x.ljust(w)
                 for j, (x, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _plain(v: object) -> str:
    text = v.plain if isinstance(v, Text) else ("" if v is None else str(v))
    return " ".join(text.split())  # one line per row, whatever a cell holds


def _title(s: dict[str, int]) -> str:
    return (f"{s['devices']} devices: {s['online']} online, {s['offline']} offline, {s['stale']} stale, "
            f"{s['trouble']} in trouble")
