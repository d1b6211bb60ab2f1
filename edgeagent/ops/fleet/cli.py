"""`edgeagent fleet collect|watch|devices|history|stats|forget|migrate` and `edgeagent simulate`.

Heavy imports (paho, rich, prometheus_client) happen inside the commands, so registering these
parsers costs the agent nothing.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeagent.core.cli_args import (
    LOG_LEVEL_HELP,
    log_level,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from edgeagent.core.errors import EdgeAgentError
from edgeagent.ops.fleet.state import Thresholds


def _broker_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--broker", required=required, metavar="URL",
                   help="mqtt://[user[:password]@]host[:port] or mqtts://... (TLS)")
    p.add_argument("--ca-file", help="CA bundle for mqtts://")
    p.add_argument("--cert-file", help="client certificate for mqtts://")
    p.add_argument("--key-file", help="client key for mqtts://")
    p.add_argument("--mqtt311", action="store_true", help="speak MQTT 3.1.1 instead of 5")
    p.add_argument("--prefix", default="edge", help="topic prefix (config mqtt.topic_prefix)")


def _threshold_args(p: argparse.ArgumentParser) -> None:
    d = Thresholds()
    p.add_argument("--stale-intervals", type=positive_float, default=d.stale_intervals,
                   help="online but silent this many telemetry intervals -> stale (default %(default)s)")
    p.add_argument("--interval-s", type=positive_float, default=d.default_interval_s,
                   help="telemetry interval assumed until one is observed (default %(default)s)")
    p.add_argument("--hot-c", type=float, default=d.hot_c, help="hot at or above (default %(default)s)")
    p.add_argument("--stuck-update-s", type=positive_float, default=d.stuck_update_s,
                   help="a running update job unchanged this long is stuck (default %(default)s)")


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(default_interval_s=args.interval_s, stale_intervals=args.stale_intervals,
                      hot_c=args.hot_c, stuck_update_s=args.stuck_update_s)


def _broker(args: argparse.Namespace) -> Any:
    from edgeagent.ops.fleet.connect import BrokerUrl

    return BrokerUrl.parse(args.broker, args.ca_file, args.cert_file, args.key_file)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _setup_logging(level: str) -> None:
    from edgeagent.core import logs

    logs.setup(level)


# ---- commands -------------------------------------------------------------------------------

def cmd_collect(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.collector import Collector, CollectorOptions

    _setup_logging(args.log_level)
    opts = CollectorOptions(
        broker=_broker(args), prefix=args.prefix, store=None if args.no_db else args.store,
        share_group=None if args.plain else args.share_group, client_id=args.client_id or "",
        clean_session=args.clean_session, session_expiry_s=args.session_expiry_s, mqtt5=not args.mqtt311,
        keepalive_s=args.keepalive_s, retention_h=args.retention_h, batch_max=args.batch_max,
        queue_max=args.queue_max,
        track_gaps=args.track_gaps, thresholds=_thresholds(args))
    stop = _stop_on_signals()
    with Collector(opts) as collector:
        if args.prometheus:
            from edgeagent.ops.fleet.metrics import FleetMetrics, serve

            serve(args.prometheus, FleetMetrics(_fleet_snapshot(collector, args.store), collector.health,
                                                opts.thresholds))
        print(f"collecting from {args.broker} (filters: {', '.join(opts.filters())})", file=sys.stderr)
        while not stop.wait(args.report_s):
            h = collector.health()
            print(f"devices={h['devices']} msg/s={h['messages_per_s']:.0f} "
                  f"samples/s={h['samples_per_s']:.0f} "
                  f"lag_s={h['lag_s']:.2f} gaps={h['gaps']} dups={h['duplicates']} "
                  f"queue={h['queue_depth']} rows={h['rows_written']} write_errors={h['write_errors']} "
                  f"connected={int(h['connected'])}", file=sys.stderr, flush=True)
    return 0


def _fleet_snapshot(collector: Any, url: str) -> Callable[[], list[dict[str, Any]]]:
    """What the exporter shows: with a shared store the fleet as all collectors see it (a reader
    connection of its own), else this collector's memory."""
    if collector.store is None or not collector.store.shared:
        return collector.state.snapshot  # type: ignore[no-any-return]
    from edgeagent.ops.fleet.store import open_store

    reader = open_store(url, readonly=True)
    lock = threading.Lock()

    def snapshot() -> list[dict[str, Any]]:
        with lock:
            return reader.devices()
    return snapshot


def _source(args: argparse.Namespace, stop: threading.Event) -> Any:
    """A callable giving device snapshots: from --db, or from a live in-memory collector (--broker)."""
    if args.broker:
        from edgeagent.ops.fleet.collector import Collector, CollectorOptions

        opts = CollectorOptions(broker=_broker(args), prefix=args.prefix, mqtt5=not args.mqtt311,
                                clean_session=True, thresholds=_thresholds(args))
        collector = Collector(opts).__enter__()
        stop.wait(args.settle_s)      # retained statuses arrive at once, telemetry within an interval
        return collector.state.snapshot, collector
    from edgeagent.ops.fleet.store import open_store

    store = open_store(args.store, readonly=True)
    return store.devices, store


def cmd_watch(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.watch import watch

    stop = _stop_on_signals()
    source, owner = _source(args, stop)
    try:
        return watch(source, _thresholds(args), args.group, args.state, args.once, args.json,
                     args.refresh_s, sys.stdout, stop=stop, limit=args.limit)
    finally:
        owner.__exit__(None, None, None)


def cmd_devices(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.store import open_store
    from edgeagent.ops.fleet.watch import device_row, print_table, select, table

    th = _thresholds(args)
    with open_store(args.store, readonly=True) as store:
        now = time.time()
        rows = [device_row(d, now, th) for d in select(store.devices(), now, th, args.group, args.state)]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print_table(table(rows), sys.stdout)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.store import open_store

    since = time.time() - args.since_s
    with open_store(args.store, readonly=True) as store:
        dev = store.device(args.device)
        if dev is None:
            print(f"unknown device {args.device!r} in {args.store}", file=sys.stderr)
            return 2
        out = {"device": args.device, "samples": store.samples(args.device, since, args.limit),
               "events": store.events(args.device, since, args.limit),
               "jobs": store.jobs(args.device, since, args.limit),
               "gaps": [list(g) for g in store.gaps(args.device)]}
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    from rich.table import Table

    from edgeagent.ops.fleet.watch import print_table

    t = Table(title=f"{args.device}: last {len(out['samples'])} samples")
    cols = ("seq", "ts", "cpu_percent", "mem_used_percent", "temp_c", "p95_ms", "anomaly_rate_1m",
            "spool_backlog")
    for c in cols:
        t.add_column(c, justify="right")
    for s in out["samples"]:
        t.add_row(*[time.strftime("%H:%M:%S", time.localtime(s[c])) if c == "ts" else
                    ("-" if s[c] is None else f"{s[c]:g}") for c in cols])
    print_table(t, sys.stdout)
    for e in out["events"]:
        print(f"event #{e['seq']} {time.strftime('%H:%M:%S', time.localtime(e['ts']))} "
                      f"{e['kind']}/{e['severity']}: {e['message']}")
    for j in out["jobs"]:
        print(f"job {j['job']}: {j['state']} {100 * j['progress']:.0f}% {j['reason']}")
    for first, last in out["gaps"]:
        print(f"gap: seq {first}..{last} missing ({last - first + 1})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.store import open_store, pending_migrations

    found, latest = pending_migrations(args.store)
    if args.check:
        state = "up to date" if found == latest else ("newer than this edgeagent" if found > latest
                                                        else f"{latest - found} migration(s) pending")
        print(f"{args.store}: schema version {found}, this edgeagent knows {latest}: {state}")
        return 0 if found == latest else 1
    with open_store(args.store, migrate=False) as store:
        done = store.migrate()
    print(f"{args.store}: schema version {latest}" + (f" (applied {', '.join(map(str, done))})" if done
                                                      else " (nothing to do)"))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from edgeagent.core.units import parse_duration_s
    from edgeagent.ops.fleet.store import open_store

    if not args.device and not args.offline_for:
        print("name a DEVICE or give --offline-for", file=sys.stderr)
        return 2
    before = None
    if args.offline_for:
        try:
            before = time.time() - parse_duration_s(args.offline_for)
        except ValueError as exc:
            print(f"--offline-for: {exc}", file=sys.stderr)
            return 2
    with open_store(args.store) as store:
        gone = store.forget(args.device, before)
    for d in gone:
        print(f"forgot {d}")
    unknown = sorted(set(args.device) - set(gone))
    for d in unknown:
        print(f"unknown device {d!r}", file=sys.stderr)
    if gone:
        print("history stays until the retention drops it; clear a device's retained status on the broker "
              "(mosquitto_pub -r -n -t P/D/status) or a collector's restart brings it back", file=sys.stderr)
    return 1 if unknown else 0


def cmd_stats(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.store import open_store

    with open_store(args.store, readonly=True) as store:
        st = store.stats()
    now = time.time()
    if args.json:
        json.dump(st, sys.stdout, indent=1)
        print()
        return 0
    print(f"{st['engine']} {st['url']}: schema {st['schema_version']}, {st['size_bytes'] / 1e6:.1f} MB")
    print("rows: " + ", ".join(f"{k}={v}" for k, v in st["rows"].items()))
    for parent, parts in st["partitions"].items():
        print(f"{parent}: {len(parts)} partitions ({parts[0]['day']} .. {parts[-1]['day']}, "
              f"{sum(p['size_bytes'] for p in parts) / 1e6:.1f} MB)")
    for c in st["collectors"]:
        age = now - c["beat"]
        print(f"collector {c['id']} on {c.get('host')} pid {c.get('pid')}: "
              f"{c.get('samples_per_s', 0):.0f} samples/s, lag {c.get('lag_s', 0):.2f} s "
              f"(max {c.get('lag_max_s', 0):.2f}), {c.get('rows_written', 0)} rows written, "
              f"queue {c.get('queue_depth', 0)}, last beat {age:.0f} s ago"
              + (" (gone?)" if age > 30 else ""))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.simulate import Outage, SimOptions, Simulator

    _setup_logging(args.log_level)
    if args.devices < 1 or args.interval_s <= 0:
        print("--devices must be >= 1 and --interval-s > 0", file=sys.stderr)
        return 2
    try:
        outage = Outage.parse(args.outage) if args.outage else None
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    opts = SimOptions(
        broker=_broker(args), devices=args.devices, prefix=args.prefix, id_prefix=args.id_prefix,
        interval_s=args.interval_s, duration_s=args.duration_s, count=args.count,
        per_device=args.per_device_connections, pool_size=args.pool_size, keepalive_s=args.keepalive_s,
        mqtt5=not args.mqtt311, anomaly_rate=args.anomaly_rate, outage=outage, drop_every=args.drop_every,
        hot=args.hot, updates=args.updates, stuck_updates=args.stuck_updates,
        update_duration_s=args.update_duration_s, groups=tuple(g for g in args.groups.split(",") if g),
        seed=args.seed)
    sim = Simulator(opts)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sim.stop.set())
    started = time.time()
    print(f"simulating {opts.devices} devices "
          f"({'one connection each' if opts.use_per_device else 'pooled connections'}) -> {args.broker}",
          file=sys.stderr, flush=True)
    c = sim.run()
    elapsed = time.time() - started
    print(json.dumps({"devices": opts.devices, "samples_published": c.samples_published,
                      "samples_dropped": c.samples_dropped, "events_published": c.events_published,
                      "messages": c.messages, "acked": c.acked, "elapsed_s": round(elapsed, 3),
                      "messages_per_s": round(c.messages / elapsed, 1) if elapsed > 0 else None}), flush=True)
    return 0


# ---- parsers --------------------------------------------------------------------------------

def _db_arg(p: argparse.ArgumentParser) -> None:
    from edgeagent.ops.fleet.store import DEFAULT_URL

    p.add_argument("--store", "--db", dest="store", default=DEFAULT_URL, metavar="URL",
                   help="fleet store: sqlite:///PATH (a bare path works too) or "
                        "postgresql://USER@HOST:PORT/DB (default %(default)s)")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fleet = sub.add_parser("fleet", help="operator side: collect, watch and export fleet telemetry")
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    fsub.required = True

    c = fsub.add_parser("collect", help="subscribe to all devices, keep state and history, export metrics")
    _broker_args(c)
    _db_arg(c)
    c.add_argument("--no-db", action="store_true", help="keep state in memory only")
    c.add_argument("--prometheus", metavar="[HOST]:PORT", help="serve /metrics here (e.g. :9108)")
    c.add_argument("--share-group", default="edgeagent-fleet",
                   help="split telemetry/events with other collectors via $share/GROUP/... (%(default)s)")
    c.add_argument("--plain", action="store_true", help="plain subscription instead of a shared one")
    c.add_argument("--no-track-gaps", dest="track_gaps", action="store_false",
                   help="do not count seq gaps: use when several collectors share one group (each then "
                        "sees only part of every device's stream)")
    c.add_argument("--client-id", help="MQTT client id (default: stable from host, store and share group, "
                                       "so a restart resumes the session); give each collector on one "
                                       "host and store its own")
    c.add_argument("--clean-session", action="store_true",
                   help="start a clean session: nothing is queued for this collector while it is away")
    c.add_argument("--session-expiry-s", type=non_negative_int, default=3600,
                   help="the broker keeps our session and queues QoS 1 messages this long while we are "
                        "away (%(default)s; 0: no persistent session)")
    c.add_argument("--keepalive-s", type=positive_int, default=30, help="MQTT keepalive in seconds")
    c.add_argument("--retention-h", type=positive_float, default=24.0,
                   help="history kept (%(default)s h; PostgreSQL drops whole day partitions)")
    c.add_argument("--batch-max", type=positive_int, default=5000,
                   help="messages per write at most (%(default)s); a batch also closes after 250 ms")
    c.add_argument("--queue-max", type=positive_int, default=50_000,
                   help="messages held for the writer (%(default)s); when full the collector stops "
                        "reading from the broker, which keeps the rest (nothing is dropped)")
    c.add_argument("--report-s", type=positive_float, default=10.0, help="health line to stderr every N s")
    c.add_argument("--log-level", type=log_level, default="INFO", help=LOG_LEVEL_HELP)
    _threshold_args(c)
    c.set_defaults(func=cmd_collect)

    w = fsub.add_parser("watch", help="live table of devices, worst first")
    _broker_args(w, required=False)
    _db_arg(w)
    w.add_argument("--group", help="only devices in this group")
    w.add_argument("--state", choices=["online", "offline", "stale", "updating", "trouble", "ok"],
                   help="only devices in this state")
    w.add_argument("--once", action="store_true", help="print once and exit")
    w.add_argument("--json", action="store_true", help="with --once: JSON for scripts")
    w.add_argument("--refresh-s", type=positive_float, default=1.0, help="redraw the table every N s")
    w.add_argument("--settle-s", type=non_negative_float, default=3.0,
                   help="with --broker: listen this long first")
    w.add_argument("--limit", type=non_negative_int, default=0,
                   help="at most N rows (default: fit the terminal)")
    _threshold_args(w)
    w.set_defaults(func=cmd_watch)

    d = fsub.add_parser("devices", help="devices known to the collector's database")
    _db_arg(d)
    d.add_argument("--group", help="only devices in this group")
    d.add_argument("--state", choices=["online", "offline", "stale", "updating", "trouble", "ok"],
                   help="only devices in this state")
    d.add_argument("--json", action="store_true", help="JSON for scripts")
    _threshold_args(d)
    d.set_defaults(func=cmd_devices)

    h = fsub.add_parser("history", help="one device's recent samples, events and update jobs")
    h.add_argument("device", help="the device id")
    _db_arg(h)
    h.add_argument("--since-s", type=positive_float, default=3600.0,
                   help="look back this far (%(default)s s)")
    h.add_argument("--limit", type=positive_int, default=100, help="at most N samples, events and jobs")
    h.add_argument("--json", action="store_true", help="JSON for scripts")
    h.set_defaults(func=cmd_history)

    m = fsub.add_parser("migrate", help="apply the store's pending schema migrations")
    _db_arg(m)
    m.add_argument("--check", action="store_true", help="only report; exit 1 when migrations are pending")
    m.set_defaults(func=cmd_migrate)

    fg = fsub.add_parser("forget", help="remove decommissioned devices from the fleet state")
    fg.add_argument("device", nargs="*", help="device ids")
    _db_arg(fg)
    fg.add_argument("--offline-for", metavar="DURATION",
                    help="also every device not heard from for this long (30d, 12h, 90m)")
    fg.set_defaults(func=cmd_forget)

    st = fsub.add_parser("stats", help="rows, partitions, size, and each collector's rate and lag")
    _db_arg(st)
    st.add_argument("--json", action="store_true", help="JSON for scripts")
    st.set_defaults(func=cmd_stats)

    s = sub.add_parser(
        "simulate", help="N virtual devices speaking the real protocol (demos, load tests)",
        description="Virtual devices publish status, telemetry, events and update job status with "
                    "the agent's payload builders. With --per-device-connections (default for N <= 50) "
                    "each device has its own MQTT client and last will; otherwise devices share a small "
                    "pool of clients (one per 200 devices, at most 8), each publishing on its devices' "
                    "own topics: no per-device last will, a clean stop publishes 'offline' for each. "
                    "Roles by index: the first COUNT devices take the --outage, the next --hot run hot, "
                    "the last --updates run an update job (the last --stuck-updates of them stall).")
    _broker_args(s)
    s.add_argument("--devices", type=positive_int, default=10, help="how many virtual devices")
    s.add_argument("--id-prefix", default="sim-", help="device ids are PREFIX0000, PREFIX0001, ...")
    s.add_argument("--interval-s", type=positive_float, default=1.0,
                   help="seconds between samples per device")
    s.add_argument("--duration-s", type=positive_float, help="stop after this long (default: until Ctrl-C)")
    s.add_argument("--count", type=positive_int, help="stop after N samples per device")
    conn = s.add_mutually_exclusive_group()
    conn.add_argument("--per-device-connections", dest="per_device_connections", action="store_true",
                      default=None, help="one MQTT client (and last will) per device")
    conn.add_argument("--pooled", dest="per_device_connections", action="store_false",
                      help="devices share a pool of clients")
    s.add_argument("--pool-size", type=non_negative_int, default=0,
                   help="clients in the pool (0: one per 200 devices, at most 8)")
    s.add_argument("--keepalive-s", type=positive_int, default=30, help="MQTT keepalive in seconds")
    s.add_argument("--anomaly-rate", type=probability, default=0.0,
                   help="probability of an anomaly per sample")
    s.add_argument("--outage", metavar="AT_S:DURATION_S[:COUNT]",
                   help="the first COUNT devices go silent (a clean disconnect, no last will) and spool, "
                        "then reconnect and send the backlog: late but complete")
    s.add_argument("--drop-every", type=non_negative_int, default=0, metavar="K",
                   help="skip every K-th sample (its seq is used): deliberate gaps")
    s.add_argument("--hot", type=non_negative_int, default=0, help="N devices run hot")
    s.add_argument("--updates", type=non_negative_int, default=0, help="N devices run a model update job")
    s.add_argument("--stuck-updates", type=non_negative_int, default=0,
                   help="of which N stall in downloading")
    s.add_argument("--update-duration-s", type=positive_float, default=20.0,
                   help="how long a simulated update job takes")
    s.add_argument("--groups", default="sim", help="comma-separated groups announced in the status")
    s.add_argument("--seed", type=int, default=1, help="random seed (same seed, same run)")
    s.add_argument("--log-level", type=log_level, default="WARNING", help=LOG_LEVEL_HELP)
    s.set_defaults(func=cmd_simulate)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgeagent")
    add_parsers(p.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except (EdgeAgentError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
