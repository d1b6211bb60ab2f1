"""The PostgreSQL engine of the fleet store: the one database any number of collectors share.

History tables are partitioned by day of the device timestamp (declarative range partitions named
`samples_dYYYYMMDD`), so retention drops whole partitions. Writes are idempotent on
(device, seq, ts) and counted per device in `seqs` in the same statement, so sequence gaps are
exact across collectors. A batch is one transaction sent in pipeline mode: one round trip.
The collector's writer thread owns one synchronous connection (the collector is threaded, and
psycopg's pipeline gives the batching an async connection would).
"""

from __future__ import annotations

import calendar
import json
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from edgeagent.core.errors import FleetStoreError
from edgeagent.ops.fleet.schema import EVENT_COLUMNS, SAMPLE_COLUMNS, check_version

DAY_S = 86400
FUTURE_S = 2 * DAY_S             # samples stamped further ahead are not stored (a device's bad clock)
HISTORY = ("samples", "events", "job_log")
MIGRATION_LOCK = 0x65646765      # advisory lock ids: "edge", and one for partition creation
PARTITION_LOCK = 0x65646766

MIGRATIONS: tuple[str, ...] = (
    # 1: devices, per-device seq accounting, day-partitioned history
    """
    CREATE TABLE devices (
        device text PRIMARY KEY,
        updated double precision NOT NULL,
        last_seen double precision NOT NULL DEFAULT 0,
        last_sample_recv double precision,
        snapshot jsonb NOT NULL                 -- DeviceState.to_dict(); open to new fields
    );
    CREATE TABLE seqs (
        device text NOT NULL, stream "char" NOT NULL,      -- 's' telemetry, 'e' events
        first_seq bigint NOT NULL, max_seq bigint NOT NULL, received bigint NOT NULL,
        PRIMARY KEY (device, stream)
    );
    CREATE TABLE samples (
        device text NOT NULL, seq bigint NOT NULL, ts double precision NOT NULL,
        recv double precision NOT NULL, cpu_percent double precision, mem_used_percent double precision,
        temp_c double precision, p95_ms double precision, anomaly_rate_1m double precision,
        spool_backlog double precision,
        PRIMARY KEY (device, seq, ts)
    ) PARTITION BY RANGE (ts);
    CREATE INDEX samples_device_ts ON samples (device, ts);
    CREATE TABLE events (
        device text NOT NULL, seq bigint NOT NULL, ts double precision NOT NULL,
        recv double precision NOT NULL, kind text NOT NULL, severity text NOT NULL,
        message text NOT NULL, data jsonb NOT NULL,
        PRIMARY KEY (device, seq, ts)
    ) PARTITION BY RANGE (ts);
    CREATE TABLE job_log (
        device text NOT NULL, job text NOT NULL, state text NOT NULL, progress double precision NOT NULL,
        reason text NOT NULL, ts double precision NOT NULL, recv double precision NOT NULL,
        PRIMARY KEY (device, job, state, progress, ts)
    ) PARTITION BY RANGE (ts);
    CREATE TABLE gaps (
        device text NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
        found double precision NOT NULL,
        PRIMARY KEY (device, first_seq, last_seq)
    );
    """,
    # 2: a heartbeat row per collector (fleet stats)
    """
    CREATE TABLE collectors (id text PRIMARY KEY, beat double precision NOT NULL, info jsonb NOT NULL);
    """,
    # 3: liveness with every batch (newest receive time per device and stream), so the JSON snapshots
    # of a big fleet can be written less often
    """
    ALTER TABLE seqs ADD COLUMN last_recv double precision;
    """,
)

_F8 = "%s::float8[]"
INSERT_SAMPLES = f"""
WITH ins AS (
    INSERT INTO samples SELECT * FROM unnest(%s::text[], %s::int8[], {', '.join([_F8] * 8)})
    ON CONFLICT DO NOTHING RETURNING device, seq, recv)
INSERT INTO seqs (device, stream, first_seq, max_seq, received, last_recv)
SELECT device, 's', min(seq), max(seq), count(*), max(recv) FROM ins GROUP BY device ORDER BY device
ON CONFLICT (device, stream) DO UPDATE SET first_seq = LEAST(seqs.first_seq, excluded.first_seq),
    max_seq = GREATEST(seqs.max_seq, excluded.max_seq), received = seqs.received + excluded.received,
    last_recv = GREATEST(seqs.last_recv, excluded.last_recv)
"""
INSERT_EVENTS = """
WITH ins AS (
    INSERT INTO events SELECT d, s, t, r, k, v, m, x::jsonb
    FROM unnest(%s::text[], %s::int8[], %s::float8[], %s::float8[], %s::text[], %s::text[], %s::text[],
                %s::text[]) AS u(d, s, t, r, k, v, m, x)
    ON CONFLICT DO NOTHING RETURNING device, seq, recv)
INSERT INTO seqs (device, stream, first_seq, max_seq, received, last_recv)
SELECT device, 'e', min(seq), max(seq), count(*), max(recv) FROM ins GROUP BY device ORDER BY device
ON CONFLICT (device, stream) DO UPDATE SET first_seq = LEAST(seqs.first_seq, excluded.first_seq),
    max_seq = GREATEST(seqs.max_seq, excluded.max_seq), received = seqs.received + excluded.received,
    last_recv = GREATEST(seqs.last_recv, excluded.last_recv)
"""
INSERT_JOBS = """
INSERT INTO job_log SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::text[],
                                         %s::float8[], %s::float8[])
ON CONFLICT DO NOTHING
"""
# The newest observation wins the snapshot; liveness columns only move forward, whichever
# collector saw the device last.
UPSERT_DEVICES = """
INSERT INTO devices SELECT d, u, l, r, s::jsonb
FROM unnest(%s::text[], %s::float8[], %s::float8[], %s::float8[], %s::text[]) AS x(d, u, l, r, s) ORDER BY d
ON CONFLICT (device) DO UPDATE SET updated = excluded.updated,
    snapshot = CASE WHEN excluded.last_seen >= devices.last_seen THEN excluded.snapshot
                    ELSE devices.snapshot END,
    last_seen = GREATEST(devices.last_seen, excluded.last_seen),
    last_sample_recv = GREATEST(devices.last_sample_recv, excluded.last_sample_recv)
"""
UPSERT_HEARTBEAT = """
INSERT INTO collectors VALUES (%s, %s, %s::jsonb)
ON CONFLICT (id) DO UPDATE SET beat = excluded.beat, info = excluded.info
"""
# Gap events: ranges missing between two stored samples of a device whose counts say something is
# missing, once the later sample is older than `settled` (rows of other collectors' batches land).
SCAN_GAPS = """
INSERT INTO gaps
SELECT device, prev + 1, seq - 1, %(now)s FROM (
    SELECT device, seq, recv, lag(seq) OVER (PARTITION BY device ORDER BY seq) AS prev FROM samples
    WHERE ts >= %(since)s AND device IN (
        SELECT device FROM seqs WHERE stream = 's' AND max_seq - first_seq + 1 > received)) x
WHERE seq > prev + 1 AND recv < %(settled)s
ON CONFLICT DO NOTHING
"""


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to one list per column: each becomes one array parameter of an unnest()."""
    return [list(c) for c in zip(*rows, strict=True)]


def day_name(table: str, day: int) -> str:
    return f"{table}_d{time.strftime('%Y%m%d', time.gmtime(day * DAY_S))}"


class PgStore:
    """One connection, used by one thread at a time; reconnects on the next call after a failure."""

    shared = True

    def __init__(self, conninfo: str, readonly: bool = False, migrate: bool = True) -> None:
        self.url = conninfo
        self.readonly = readonly
        self._days: set[tuple[str, int]] = set()
        self.conn: psycopg.Connection[Any] | None = None
        try:
            self._connect()
        except psycopg.Error as exc:
            raise FleetStoreError(self._where(), f"cannot connect: {exc}".strip()) from exc
        found = self.schema_version()
        if readonly or not migrate:
            check_version(self._where(), found, len(MIGRATIONS))
            if readonly and migrate and found == 0:     # a reader (migrate=False: `fleet migrate --check`)
                raise FleetStoreError(self._where(), "empty database (run `fleet migrate` or a collector)")
        else:
            self.migrate()

    def _where(self) -> str:
        """The URL without a password, for messages."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', '')}/" \
               f"{info.get('dbname', '')}"

    def _connect(self) -> psycopg.Connection[Any]:
        """A fresh connection; psycopg.OperationalError while the server is away (the writer retries)."""
        self.conn = psycopg.connect(self.url, autocommit=self.readonly, connect_timeout=10,
                                    application_name="edgeagent-fleet")
        return self.conn

    def _db(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self._days.clear()
            return self._connect()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- schema -------------------------------------------------------------------------------

    def schema_version(self) -> int:
        db = self._db()
        with db.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            row = cur.fetchone()
            if not row or not row[0]:
                version = 0
            else:
                cur.execute("SELECT coalesce(max(version), 0) FROM schema_version")
                version = int(cur.fetchone()[0])  # type: ignore[index]
        if not db.autocommit:
            db.commit()
        return version

    def migrate(self, target: int | None = None) -> list[int]:
        """Apply missing migrations (up to `target`) under an advisory lock; return their numbers."""
        db = self._db()
        target = len(MIGRATIONS) if target is None else target
        done: list[int] = []
        with db.transaction(), db.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version "
                        "(version integer PRIMARY KEY, applied double precision NOT NULL)")
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            found = int(cur.fetchone()[0])  # type: ignore[index]
            check_version(self._where(), found, len(MIGRATIONS))
            for version in range(found + 1, target + 1):
                cur.execute(MIGRATIONS[version - 1].encode())
                cur.execute("INSERT INTO schema_version VALUES (%s, %s)", (version, time.time()))
                done.append(version)
        return done

    # ---- writes -------------------------------------------------------------------------------

    def _ensure_partitions(self, days: set[tuple[str, int]]) -> None:
        missing = days - self._days
        if not missing:
            return
        db = self._db()
        with db.transaction(), db.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            for table, day in sorted(missing):
                cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} "
                                    "FOR VALUES FROM ({}) TO ({})")
                            .format(sql.Identifier(day_name(table, day)), sql.Identifier(table),
                                    sql.Literal(day * DAY_S), sql.Literal((day + 1) * DAY_S)))
        self._days |= missing

    def write(self, samples: Sequence[tuple[Any, ...]] = (), events: Sequence[tuple[Any, ...]] = (),
              jobs: Sequence[tuple[Any, ...]] = (), devices: Iterable[dict[str, Any]] = (),
              now: float = 0.0, heartbeat: dict[str, Any] | None = None) -> None:
        now = now or time.time()
        horizon = now + FUTURE_S
        samples = sorted(r for r in samples if r[2] < horizon)
        events = sorted(r for r in events if r[2] < horizon)
        jobs = [r if r[5] is not None else (*r[:5], r[6], r[6]) for r in jobs]
        jobs = [r for r in jobs if r[5] < horizon]
        days = {("samples", int(r[2] // DAY_S)) for r in samples}
        days |= {("events", int(r[2] // DAY_S)) for r in events}
        days |= {("job_log", int(r[5] // DAY_S)) for r in jobs}
        self._ensure_partitions(days)
        devs = sorted(devices, key=lambda d: str(d["device"]))
        db = self._db()
        try:
            self._write(db, samples, events, jobs, devs, now, heartbeat)
        except Exception:
            self._days.clear()        # a partition another collector's retention dropped: ensure again
            raise

    def _write(self, db: psycopg.Connection[Any], samples: Sequence[tuple[Any, ...]],
               events: Sequence[tuple[Any, ...]], jobs: Sequence[tuple[Any, ...]], devs: list[dict[str, Any]],
               now: float, heartbeat: dict[str, Any] | None) -> None:
        with db.transaction(), db.pipeline(), db.cursor() as cur:
            if samples:
                cur.execute(INSERT_SAMPLES, _columns(samples))
            if events:
                cur.execute(INSERT_EVENTS, _columns(events))
            if jobs:
                cur.execute(INSERT_JOBS, _columns(jobs))
            if devs:
                cur.execute(UPSERT_DEVICES, (
                    [d["device"] for d in devs], [now] * len(devs),
                    [float(d.get("last_seen") or 0.0) for d in devs],
                    [d.get("last_sample_recv") for d in devs],
                    [json.dumps(d, separators=(",", ":")) for d in devs]))
            if heartbeat is not None:
                cur.execute(UPSERT_HEARTBEAT, (heartbeat["id"], now, json.dumps(heartbeat)))

    def scan_gaps(self, now: float, settle_s: float = 5.0, window_s: float = 3600.0) -> int:
        """Record missing seq ranges as gap events (one collector at a time; idempotent)."""
        db = self._db()
        with db.transaction(), db.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (PARTITION_LOCK + 1,))
            if not cur.fetchone()[0]:  # type: ignore[index]
                return 0
            cur.execute(SCAN_GAPS, {"now": now, "since": now - window_s, "settled": now - settle_s})
            return cur.rowcount

    def partitions(self) -> list[tuple[str, str, int]]:
        """(parent, partition, day) of every day partition, oldest first."""
        db = self._db()
        with db.cursor() as cur:
            cur.execute("SELECT p.relname, c.relname FROM pg_inherits i "
                        "JOIN pg_class c ON c.oid = i.inhrelid "
                        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY(%s)", (list(HISTORY),))
            rows = cur.fetchall()
        if not db.autocommit:
            db.commit()
        out = []
        for parent, name in rows:
            try:
                day = calendar.timegm(time.strptime(name.rsplit("_d", 1)[-1], "%Y%m%d")) // DAY_S
            except ValueError:
                continue
            out.append((parent, name, day))
        return sorted(out, key=lambda r: (r[2], r[0]))

    def prune(self, before: float) -> int:
        """Drop every day partition that ends at or before `before`; returns how many."""
        dropped = 0
        db = self._db()
        for parent, name, day in self.partitions():
            if (day + 1) * DAY_S > before:
                continue
            with db.transaction(), db.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '5s'")
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            self._days.discard((parent, day))
            dropped += 1
        return dropped

    # ---- reads --------------------------------------------------------------------------------

    def _rows(self, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        db = self._db()
        with db.cursor() as cur:
            cur.execute(query.encode(), params)
            rows = cur.fetchall()
        if not db.autocommit:
            db.commit()
        return rows

    def devices(self) -> list[dict[str, Any]]:
        return [self._merge(r) for r in self._rows(DEVICES_QUERY + " ORDER BY d.device")]

    def device(self, device: str) -> dict[str, Any] | None:
        rows = self._rows(DEVICES_QUERY + " WHERE d.device = %s", (device,))
        return self._merge(rows[0]) if rows else None

    @staticmethod
    def _merge(row: tuple[Any, ...]) -> dict[str, Any]:
        """The snapshot with the fields several collectors share: liveness and seq counts."""
        snap: dict[str, Any] = dict(row[0])
        snap["last_seen"] = max(t for t in (row[1], row[9], row[10]) if t is not None)
        recv = [t for t in (row[2], row[9]) if t is not None]
        if recv:
            snap["last_sample_recv"] = max(recv)
        for key, (first, last, received) in (("telemetry", row[3:6]), ("events", row[6:9])):
            if first is None:
                continue
            mine = dict(snap.get(key) or {})
            mine.update(last_seq=last, received=received, gaps=max(0, last - first + 1 - received))
            snap[key] = mine
        return snap

    def samples(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._rows(f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM samples WHERE device = %s AND ts >= %s "
                          "ORDER BY seq DESC LIMIT %s", (device, since, limit))
        return [dict(zip(SAMPLE_COLUMNS, r, strict=True)) for r in reversed(rows)]

    def events(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._rows(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE device = %s AND ts >= %s "
                          "ORDER BY seq DESC LIMIT %s", (device, since, limit))
        return [dict(zip(EVENT_COLUMNS, r, strict=True)) for r in reversed(rows)]

    def jobs(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        cols = ("job", "state", "progress", "reason", "ts", "recv")
        rows = self._rows(f"SELECT {', '.join(cols)} FROM job_log WHERE device = %s AND ts >= %s "
                          "ORDER BY recv DESC LIMIT %s", (device, since, limit))
        return [dict(zip(cols, r, strict=True)) for r in reversed(rows)]

    def gaps(self, device: str) -> list[tuple[int, int]]:
        rows = self._rows("SELECT prev + 1, seq - 1 FROM (SELECT seq, lag(seq) OVER (ORDER BY seq) AS prev "
                          "FROM samples WHERE device = %s) x WHERE seq > prev + 1", (device,))
        return [(int(a), int(b)) for a, b in rows]

    def gap_events(self, device: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE device = %s", (device,)) if device else ("", ())
        rows = self._rows(f"SELECT device, first_seq, last_seq, found FROM gaps {where} "
                          "ORDER BY found, device",
                          params)
        return [{"device": d, "first": a, "last": b, "found": f} for d, a, b, f in rows]

    def sample_seqs(self, device: str) -> list[int]:
        return [int(r[0]) for r in self._rows("SELECT seq FROM samples WHERE device = %s ORDER BY seq",
                                              (device,))]

    def count(self, table: str) -> int:
        if table not in ("samples", "events", "job_log", "devices", "gaps"):
            raise ValueError(table)
        return int(self._rows(f"SELECT count(*) FROM {table}")[0][0])

    def forget(self, devices: Sequence[str] = (), offline_before: float | None = None) -> list[str]:
        gone = [d["device"] for d in self.devices()
                if d["device"] in devices
                or (offline_before is not None and (d.get("last_seen") or 0.0) < offline_before)]
        db = self._db()
        with db.transaction(), db.cursor() as cur:
            cur.execute("DELETE FROM devices WHERE device = ANY(%s)", (gone,))
            cur.execute("DELETE FROM seqs WHERE device = ANY(%s)", (gone,))
        return gone

    def stats(self) -> dict[str, Any]:
        parts = self.partitions()
        sizes = dict(self._rows(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c WHERE c.relname = ANY(%s)",
            ([p[1] for p in parts] + ["devices", "seqs", "gaps"],)))
        rows = {t: self.count(t) for t in ("samples", "events", "job_log", "devices", "gaps")}
        partitions: dict[str, list[dict[str, Any]]] = {}
        for parent, name, day in parts:
            partitions.setdefault(parent, []).append(
                {"name": name, "day": time.strftime("%Y-%m-%d", time.gmtime(day * DAY_S)),
                 "size_bytes": sizes.get(name, 0)})
        collectors = [dict(info, beat=beat) for beat, info in
                      self._rows("SELECT beat, info FROM collectors ORDER BY id")]
        size = int(self._rows("SELECT pg_database_size(current_database())")[0][0])
        return {"engine": "postgresql", "url": self._where(), "host": socket.gethostname(),
                "schema_version": self.schema_version(), "rows": rows, "partitions": partitions,
                "size_bytes": size, "collectors": collectors}


DEVICES_QUERY = """
SELECT d.snapshot, d.last_seen, d.last_sample_recv, s.first_seq, s.max_seq, s.received,
       e.first_seq, e.max_seq, e.received, s.last_recv, e.last_recv
FROM devices d LEFT JOIN seqs s ON s.device = d.device AND s.stream = 's'
               LEFT JOIN seqs e ON e.device = d.device AND e.stream = 'e'"""
