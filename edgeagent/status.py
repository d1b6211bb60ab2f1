"""`edgeagent status`: read the running agent's health.json and tell an operator whether it is well.

It only reads the state dir (the agent writes health.json atomically), so it works while the
service runs. Exit codes follow the LSB status convention: 0 running and healthy, 1 running but
unhealthy, 3 not running (stopped, stale or dead), 4 unknown (no readable health file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgeagent.core.config_path import add_config_argument

HEALTH_FILE = "health.json"  # edgeagent.health.HEALTH_FILE; not imported to keep `status` light
PROTOCOL_FILE = "mqtt_protocol"  # edgeagent.transport.negotiate.PROTOCOL_FILE (same reason)
DEFAULT_INTERVAL_S = 5.0
STALE_AFTER_INTERVALS = 3
FINAL_JOB_STATES = frozenset({"rejected", "succeeded", "failed", "rolled_back", "cancelled"})

EXIT_OK, EXIT_UNHEALTHY, EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True, slots=True)
class Assessment:
    """The verdict on one health snapshot; `problems` says why it is not healthy."""

    running: bool
    healthy: bool
    problems: tuple[str, ...]
    age_s: float

    @property
    def exit_code(self) -> int:
        if not self.running:
            return EXIT_NOT_RUNNING
        return EXIT_OK if self.healthy else EXIT_UNHEALTHY


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (EPERM: it does, it is just not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _num(value: object, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def assess(health: Mapping[str, Any], now: float, alive: Callable[[int], bool] = pid_alive) -> Assessment:
    """Decide running/healthy from a snapshot: fresh, pid alive, state running, components running."""
    problems: list[str] = []
    interval_s = _num(health.get("interval_s"), DEFAULT_INTERVAL_S) or DEFAULT_INTERVAL_S
    age_s = now - _num(health.get("ts"))
    state = health.get("state")
    pid = health.get("pid")
    running = True
    if state in ("stopped", "stopping"):
        running = False
        problems.append(f"agent is {state}")
    if isinstance(pid, int) and not isinstance(pid, bool) and not alive(pid):
        running = False
        problems.append(f"agent process {pid} is gone")
    if age_s > STALE_AFTER_INTERVALS * interval_s:
        running = False
        problems.append(f"health file is stale ({_duration(age_s)} old, written every {interval_s:g} s)")
    if running and state != "running":
        problems.append(f"agent is {state}")
    components = health.get("components")
    if isinstance(components, Mapping):
        for name, comp in sorted(components.items()):
            if not isinstance(comp, Mapping) or comp.get("state") == "running":
                continue
            detail = f" ({comp.get('restarts', 0)} restarts)" if comp.get("restarts") else ""
            error = f": {comp['last_error']}" if comp.get("last_error") else ""
            problems.append(f"component {name} is {comp.get('state')}{detail}{error}")
    return Assessment(running=running, healthy=running and not problems, problems=tuple(problems),
                      age_s=age_s)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes, _ = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"


def _clock(ts: object) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool) or ts <= 0:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _section(health: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sections = health.get("sections")
    value = sections.get(name) if isinstance(sections, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def pending_jobs(health: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Update jobs not in a final state, in the order the agent lists them."""
    jobs = _section(health, "updates").get("jobs")
    if not isinstance(jobs, list):
        return []
    return [j for j in jobs if isinstance(j, Mapping) and j.get("state") not in FINAL_JOB_STATES]


def remembered_protocol(state_dir: Path) -> str | None:
    """The MQTT version the agent last negotiated (mqtt.protocol "auto"), from the state dir."""
    try:
        text = (state_dir / PROTOCOL_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text in ("5", "3.1.1") else None


def render(health: Mapping[str, Any], verdict: Assessment, now: float,
           protocol: str | None = None) -> str:
    """The human report; every section is optional, absent ones say so instead of failing.
    `protocol`: the remembered MQTT version, shown when health has none (not connected yet)."""
    lines: list[str] = []
    if verdict.running:
        head = f"running (pid {health.get('pid')}, up {_duration(now - _num(health.get('started_at'), now))}"
        head += f", health {_duration(verdict.age_s)} old)"
    else:
        head = f"NOT RUNNING (last state {health.get('state')}, health written {_clock(health.get('ts'))})"
    head += ", healthy" if verdict.healthy else ", UNHEALTHY"
    lines.append(f"edgeagent {health.get('agent', '?')} on {health.get('device', '?')}: {head}")

    components = health.get("components")
    if isinstance(components, Mapping) and components:
        lines.append("components:")
        for name, comp in sorted(components.items()):
            if not isinstance(comp, Mapping):
                continue
            extra = f"  restarts {comp['restarts']}" if comp.get("restarts") else ""
            extra += "  CRASH LOOP" if comp.get("crash_loop") else ""
            extra += f"  last error: {comp['last_error']}" if comp.get("last_error") else ""
            lines.append(f"  {name:<14}{comp.get('state', '?')}{extra}")

    mqtt = _section(health, "mqtt")
    if mqtt.get("offline"):
        lines.append(f"{'mqtt':<16}offline (no broker configured; spooling only)")
    elif mqtt:
        word = "connected" if mqtt.get("connected") else "disconnected"
        since = f" since {_clock(mqtt['since'])}" if mqtt.get("since") else ""
        spoken = mqtt.get("protocol")
        version = f", MQTT {spoken}" if spoken else (f", MQTT {protocol} last time" if protocol else "")
        lines.append(f"{'mqtt':<16}{word}{since}{version}")
    inference = _section(health, "inference")
    pipelines = inference.get("pipelines")
    if isinstance(pipelines, dict):  # [[pipelines]]: one line each
        for name, p in pipelines.items():
            model = p.get("model") if isinstance(p, dict) else None
            lines.append(f"{'model ' + str(name):<16}{model or 'none'}")
    else:
        lines.append(f"{'model':<16}{inference.get('model') or 'none'}")
    firmware = _section(health, "firmware")
    if firmware:
        slot = f" (slot {firmware['slot']})" if firmware.get("slot") else ""
        lines.append(f"{'firmware':<16}{firmware.get('version', '?')}{slot}")
    loop = _section(health, "loop")
    if loop.get("lag_p99_ms") is not None:
        lines.append(f"{'loop lag':<16}p99 {loop.get('lag_p99_ms')} ms over the last minute "
                     f"(max {loop.get('lag_max_ms')} ms)")
    spool = _section(health, "spool")
    if spool:
        size_kib = _num(spool.get("bytes")) / 1024
        lines.append(f"{'spool':<16}backlog {spool.get('backlog', '?')}, dropped {spool.get('dropped', 0)}, "
                     f"{size_kib:.1f} KiB")
    else:
        lines.append(f"{'spool':<16}no data")
    jobs = pending_jobs(health)
    lines.append(f"{'pending jobs':<16}{len(jobs) or 'none'}")
    for job in jobs:
        progress = f" {_num(job.get('progress')) * 100:.0f}%" if job.get("progress") is not None else ""
        retry = f" (next try {_clock(job['next_try'])})" if job.get("next_try") else ""
        lines.append(f"  {job.get('job')}: {job.get('kind')} {job.get('name')} {job.get('version')} "
                     f"{job.get('state')}{progress}{retry}")
    if verdict.problems:
        lines.append("problems:")
        lines += [f"  - {p}" for p in verdict.problems]
    return "\n".join(lines)


def resolve_state_dir(args: argparse.Namespace) -> Path:
    """--state-dir wins; else the config's device.state_dir (ConfigError, ConfigNotFound propagate)."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    from edgeagent.core import config as cfgmod
    from edgeagent.core.config_path import find_config

    return cfgmod.load(find_config(args.config)).state_dir


def main(args: argparse.Namespace) -> int:
    """`edgeagent status [--config F | --state-dir D] [--json]`."""
    from edgeagent.core.config_path import EXIT_USAGE, ConfigNotFound
    from edgeagent.core.errors import ConfigError

    try:
        state_dir = resolve_state_dir(args)
    except ConfigNotFound as exc:
        print(f"edgeagent status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"edgeagent status: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    path = state_dir / HEALTH_FILE
    try:
        health = json.loads(path.read_bytes())
        if not isinstance(health, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        print(f"edgeagent status: no {path}: the agent has not run with this state dir", file=sys.stderr)
        return EXIT_UNKNOWN
    except PermissionError:
        print(f"edgeagent status: cannot read {path}: run as root or as a member of the agent's group",
              file=sys.stderr)
        return EXIT_UNKNOWN
    except (OSError, ValueError) as exc:
        print(f"edgeagent status: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    now = time.time()
    verdict = assess(health, now)
    protocol = remembered_protocol(state_dir)
    if args.json:
        out = {"running": verdict.running, "healthy": verdict.healthy, "problems": list(verdict.problems),
               "age_s": round(verdict.age_s, 3), "pending_jobs": pending_jobs(health),
               "mqtt_protocol": protocol, "health": health}
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        print(render(health, verdict, now, protocol))
    return verdict.exit_code


def add_parser(sub: Any) -> None:
    """Register `status` on the CLI's subparsers (an argparse._SubParsersAction)."""
    p = sub.add_parser("status", help="health, versions, pending jobs and spool backlog of the local agent; "
                                      "exit 0 healthy, 1 unhealthy, 2 no config or a bad one, "
                                      "3 not running, 4 unknown")
    where = p.add_mutually_exclusive_group()
    add_config_argument(where, "for device.state_dir")
    where.add_argument("--state-dir", type=Path, help="read this state dir instead of the config's")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main)


def add_parsers(sub: Any) -> None:
    """The cli's PLUGINS hook: `edgeagent status`."""
    add_parser(sub)
