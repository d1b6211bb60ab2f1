"""The SQLite engine of the fleet store: one collector, one file, no dependency (store.py: the interface).

Every write is one transaction (WAL, synchronous=NORMAL): a crash loses at most the last batch,
never corrupts. Readers (`fleet devices|history|watch`) open the same file read-only.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgeagent.core.errors import FleetStoreError
from edgeagent.ops.fleet.schema import EVENT_COLUMNS, SAMPLE_COLUMNS, check_version

# Version 1 is the schema from before versioning: a file written by an older collector has those
# tables and no schema_version row, and migrating it is a no-op plus the row.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    updated REAL NOT NULL,
    snapshot TEXT NOT NULL            -- JSON of DeviceState.to_dict()
);
CREATE TABLE IF NOT EXISTS samples (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, recv REAL NOT NULL,
    cpu_percent REAL, mem_used_percent REAL, temp_c REAL, p95_ms REAL, anomaly_rate_1m REAL,
    spool_backlog REAL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_recv ON samples (recv);
CREATE TABLE IF NOT EXISTS events (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, recv REAL NOT NULL,
    kind TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_recv ON events (recv);
CREATE TABLE IF NOT EXISTS job_log (
    device TEXT NOT NULL, job TEXT NOT NULL, state TEXT NOT NULL, progress REAL NOT NULL,
    reason TEXT NOT NULL, ts REAL, recv REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_log_recv ON job_log (recv);
"""
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS collectors (
    id TEXT PRIMARY KEY, beat REAL NOT NULL, info TEXT NOT NULL   -- JSON: the collector's health
);
"""
MIGRATIONS = (SCHEMA_V1, SCHEMA_V2)
NOW_SQL = "(julianday('now') - 2440587.5) * 86400.0"     # unix time, in any SQLite version


class Store:
    """One connection, used by one thread at a time (the collector's writer, or a CLI reader)."""

    shared = False

    def __init__(self, path: Path | str, readonly: bool = False, migrate: bool = True) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        try:
            if readonly:
                if not self.path.exists():
                    raise FleetStoreError(self.path, "no such database (see `fleet collect --store`)")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0,
                                          check_same_thread=False)
                check_version(self.path, self.schema_version(), len(MIGRATIONS))
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                if migrate:
                    self.migrate()
                else:
                    check_version(self.path, self.schema_version(), len(MIGRATIONS))
            self.db.execute("SELECT count(*) FROM devices").fetchone()
        except sqlite3.DatabaseError as exc:
            raise FleetStoreError(self.path, f"not a fleet database: {exc}") from exc

    def schema_version(self) -> int:
        """0: empty; 1: an unversioned file from before migrations (it has the devices table)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            row = self.db.execute("SELECT max(version) FROM schema_version").fetchone()
            return int(row[0] or 0)
        return 1 if "devices" in tables else 0

    def migrate(self) -> list[int]:
        """Apply the migrations this file lacks, each in its own transaction; return their numbers."""
        found = self.schema_version()
        check_version(self.path, found, len(MIGRATIONS))
        done = []
        for version in range(found + 1, len(MIGRATIONS) + 1):
            self.db.executescript("BEGIN;" + MIGRATIONS[version - 1]
                                  + "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                                    " applied REAL NOT NULL);"
                                  + f"INSERT INTO schema_version VALUES ({version}, {NOW_SQL});"
                                  + "COMMIT;")
            done.append(version)
        if found == 1 and "schema_version" not in {
                r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}:
            with self.db:   # an unversioned file already at the latest schema: just record it
                self.db.execute("CREATE TABLE schema_version "
                                "(version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
                self.db.execute(f"INSERT INTO schema_version VALUES (1, {NOW_SQL})")
        return done

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes (collector) -------------------------------------------------------------------

    def write(self, samples: Sequence[tuple[Any, ...]] = (), events: Sequence[tuple[Any, ...]] = (),
              jobs: Sequence[tuple[Any, ...]] = (), devices: Iterable[dict[str, Any]] = (),
              now: float = 0.0, heartbeat: dict[str, Any] | None = None) -> None:
        """One transaction for a batch; duplicate (device, seq) rows are ignored, never doubled."""
        with self.db:
            if samples:
                self.db.executemany(
                    f"INSERT OR IGNORE INTO samples VALUES ({','.join('?' * len(SAMPLE_COLUMNS))})", samples)
            if events:
                self.db.executemany(
                    f"INSERT OR IGNORE INTO events VALUES ({','.join('?' * len(EVENT_COLUMNS))})", events)
            if jobs:
                self.db.executemany("INSERT INTO job_log VALUES (?,?,?,?,?,?,?)", jobs)
            rows = [(d["device"], now, json.dumps(d, separators=(",", ":"))) for d in devices]
            if rows:
                self.db.executemany(
                    "INSERT INTO devices VALUES (?,?,?) ON CONFLICT(device) DO UPDATE SET "
                    "updated=excluded.updated, snapshot=excluded.snapshot", rows)
            if heartbeat is not None:
                self.db.execute("INSERT INTO collectors VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET "
                                "beat=excluded.beat, info=excluded.info",
                                (heartbeat["id"], now, json.dumps(heartbeat, separators=(",", ":"))))

    def prune(self, before: float) -> int:
        """Delete history received before `before`; device snapshots stay. Returns rows deleted."""
        with self.db:
            n = 0
            for table in ("samples", "events", "job_log"):
                n += self.db.execute(f"DELETE FROM {table} WHERE recv < ?", (before,)).rowcount
        return n

    # ---- reads --------------------------------------------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT snapshot FROM devices ORDER BY device").fetchall()
        return [json.loads(r[0]) for r in rows]

    def device(self, device: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT snapshot FROM devices WHERE device = ?", (device,)).fetchone()
        return json.loads(row[0]) if row else None

    def samples(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest `limit` samples received since `since`, oldest first."""
        rows = self.db.execute(
            "SELECT * FROM samples WHERE device = ? AND recv >= ? ORDER BY seq DESC LIMIT ?",
            (device, since, limit)).fetchall()
        return [dict(zip(SAMPLE_COLUMNS, r, strict=True)) for r in reversed(rows)]

    def events(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM events WHERE device = ? AND recv >= ? ORDER BY seq DESC LIMIT ?",
            (device, since, limit)).fetchall()
        out = []
        for r in reversed(rows):
            d = dict(zip(EVENT_COLUMNS, r, strict=True))
            d["data"] = json.loads(d["data"])
            out.append(d)
        return out

    def jobs(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT job, state, progress, reason, ts, recv FROM job_log WHERE device = ? AND recv >= ? "
            "ORDER BY recv DESC LIMIT ?", (device, since, limit)).fetchall()
        cols = ("job", "state", "progress", "reason", "ts", "recv")
        return [dict(zip(cols, r, strict=True)) for r in reversed(rows)]

    def sample_seqs(self, device: str) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT seq FROM samples WHERE device = ? ORDER BY seq",
                                              (device,))]

    def count(self, table: str) -> int:
        if table not in ("samples", "events", "job_log", "devices"):
            raise ValueError(table)
        return int(self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def gaps(self, device: str) -> list[tuple[int, int]]:
        rows = self.db.execute(
            "SELECT prev + 1, seq - 1 FROM (SELECT seq, lag(seq) OVER (ORDER BY seq) AS prev FROM samples "
            "WHERE device = ?) WHERE seq > prev + 1", (device,)).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def scan_gaps(self, now: float, settle_s: float = 5.0) -> int:
        return 0

    def forget(self, devices: Sequence[str] = (), offline_before: float | None = None) -> list[str]:
        gone = [d["device"] for d in self.devices()
                if d["device"] in devices
                or (offline_before is not None and (d.get("last_seen") or 0.0) < offline_before)]
        with self.db:
            self.db.executemany("DELETE FROM devices WHERE device = ?", [(d,) for d in gone])
        return gone

    def stats(self) -> dict[str, Any]:
        tables = {t: self.count(t) for t in ("samples", "events", "job_log", "devices")}
        collectors = [] if self.schema_version() < 2 else [
            dict(json.loads(info), beat=beat)
            for beat, info in self.db.execute("SELECT beat, info FROM collectors ORDER BY id")]
        size = sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {"engine": "sqlite", "url": self.url, "host": socket.gethostname(),
                "schema_version": self.schema_version(), "rows": tables, "partitions": {},
                "size_bytes": size, "collectors": collectors}
