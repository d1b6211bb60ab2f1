"""The collector's SQLite database: device snapshots, sample/event/job history, bounded retention.

Every write is one transaction (WAL, synchronous=NORMAL): a crash loses at most the last batch,
never corrupts. Readers (`fleet devices|history|watch`) open the same file read-only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgeagent.core.errors import FleetStoreError

SCHEMA = """
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

SAMPLE_COLUMNS = ("device", "seq", "ts", "recv", "cpu_percent", "mem_used_percent", "temp_c",
                  "p95_ms", "anomaly_rate_1m", "spool_backlog")
EVENT_COLUMNS = ("device", "seq", "ts", "recv", "kind", "severity", "message", "data")


class Store:
    """One connection, used by one thread at a time (the collector's writer, or a CLI reader)."""

    def __init__(self, path: Path | str, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.exists():
                    raise FleetStoreError(self.path, "no such database (see `fleet collect --db`)")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0,
                                          check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
            self.db.execute("SELECT count(*) FROM devices").fetchone()
        except sqlite3.DatabaseError as exc:
            raise FleetStoreError(self.path, f"not a fleet database: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes (collector) -------------------------------------------------------------------

    def write(self, samples: Sequence[tuple[Any, ...]] = (), events: Sequence[tuple[Any, ...]] = (),
              jobs: Sequence[tuple[Any, ...]] = (), devices: Iterable[dict[str, Any]] = (),
              now: float = 0.0) -> None:
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
