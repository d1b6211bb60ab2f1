"""Store-and-forward spool: every sample, event and message sits in SQLite (WAL) until PUBACKed.

One table `outbox` holds rows in arrival order (`id`): telemetry samples ("T", stored as the sample's
JSON so the publisher can batch them without re-parsing), events ("E") and one-off messages ("M").
Retained state messages live in `state`, one row per topic, last value wins, deleted once acked.
The `seq` counters of telemetry and events live in `meta` and advance in the same transaction as
the row they number, so they survive restarts and kill -9. Because a corrupt spool loses `meta`
too, seq numbers are also *reserved* in blocks in a small side file (`<spool>.seq.json`): a fresh
spool starts above every seq ever handed out, so seq stays strictly increasing (with a gap).

The spool is bounded by `max_bytes` (payload bytes + a per-row estimate): when full the oldest rows
are dropped and counted per kind. A file that SQLite cannot read is renamed aside and replaced.
Thread-safe (one connection behind a lock). In the agent every write comes from the outbox's
writer thread, many rows per transaction (`transaction()`); seq numbers are handed out under a
lock of their own (`reserve_seq`), so the event loop never waits for SQLite.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.core.errors import SpoolError
from edgeagent.core.fsutil import atomic_write_json
from edgeagent.core.protocol import event

log = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 48  # rough SQLite cost of a row besides its payload (id, kind, ts, b-tree)
SEQ_BLOCK = 10_000  # seq numbers reserved per write of the side file
KIND_SAMPLE, KIND_EVENT, KIND_MESSAGE = "T", "E", "M"
_KIND_NAMES = {KIND_SAMPLE: "samples", KIND_EVENT: "events", KIND_MESSAGE: "messages"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT,
    payload BLOB NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
_CORRUPT_TEXT = ("malformed", "not a database", "quick_check", "no such table", "no such column")


def is_corruption(exc: BaseException) -> bool:
    """A broken or foreign file (move it aside), as opposed to a busy, full or unwritable disk."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None and code & 0xFF in _CORRUPT_CODES:
        return True
    return any(t in str(exc) for t in _CORRUPT_TEXT)


def _rollback(db: sqlite3.Connection) -> None:
    """Undo a failed transaction, unless SQLite already did: a COMMIT that hits a full disk rolls
    back by itself, and a ROLLBACK then would raise "no transaction is active" in place of the
    error that tells what went wrong ("database or disk is full")."""
    if db.in_transaction:
        db.execute("ROLLBACK")


def _json_default(o: object) -> Any:
    item = getattr(o, "item", None)  # numpy scalars from the inference section
    if callable(item):
        return item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def encode(payload: dict[str, Any]) -> bytes:
    """Compact JSON that strict consumers accept: NaN/inf become null, numpy scalars numbers."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          default=_json_default)
    except ValueError:
        text = json.dumps(_finite(payload), separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          default=_json_default)
    return text.encode()


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    kind: str
    topic: str | None
    payload: bytes
    ts: float


@dataclass(frozen=True, slots=True)
class StateRow:
    topic: str
    payload: bytes
    version: int


@dataclass(frozen=True, slots=True)
class Recovered:
    """A corrupt spool that was moved aside at open: the caller reports it as an error event."""

    moved_to: Path
    reason: str


class Spool:
    def __init__(self, path: Path, max_bytes: int, device: str) -> None:
        self.path = Path(path)
        self.max_bytes = max(1, int(max_bytes))
        self.device = device
        self._lock = threading.RLock()
        self._seq_lock = threading.Lock()  # seq numbers: never held while SQLite works
        self._in_tx = False  # inside transaction(): single writes join it
        self._db: sqlite3.Connection | None = None
        self._seq = {"telemetry": 0, "event": 0}
        self._reserved = {"telemetry": 0, "event": 0}
        self._dropped = {KIND_SAMPLE: 0, KIND_EVENT: 0, KIND_MESSAGE: 0}
        self.count = 0  # rows in outbox
        self.bytes = 0  # estimated bytes of those rows
        self.states_pending = 0
        self.recovered: Recovered | None = None
        self._high_id = 0  # the highest outbox row id ever handed out (survives a recovery)

    # ------------------------------------------------------------------ open / close

    @property
    def seq_path(self) -> Path:
        return self.path.with_name(self.path.name + ".seq.json")

    def open(self) -> Recovered | None:
        """Open (or create) the spool; a corrupt file is moved aside and replaced by a new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open_db()
        except sqlite3.DatabaseError as exc:
            self._close_db()
            if not is_corruption(exc):
                raise SpoolError(self.path, str(exc)) from exc
            self.recovered = Recovered(self._move_aside(), f"{type(exc).__name__}: {exc}")
            log.error("spool is corrupt; moved aside and starting a new one",
                      extra={"kv": {"path": str(self.path), "moved_to": str(self.recovered.moved_to),
                                    "error": self.recovered.reason}})
            try:
                self._open_db()
            except sqlite3.Error as exc2:
                raise SpoolError(self.path, f"cannot create a new spool: {exc2}") from exc2
        except sqlite3.Error as exc:
            raise SpoolError(self.path, str(exc)) from exc
        return self.recovered

    def recover(self, reason: str) -> Recovered:
        """The spool went bad while running: move it aside and continue with a new one."""
        with self._lock:
            high_id = self._high_id
            self._close_db()
            self.recovered = Recovered(self._move_aside(), reason)
            log.error("spool is corrupt; moved aside and starting a new one",
                      extra={"kv": {"path": str(self.path), "moved_to": str(self.recovered.moved_to),
                                    "error": reason}})
            try:
                self._open_db()
                # row ids go on from where the old file was: the running publisher asks for rows
                # after the last id it saw, and would never see a new file's ids 1, 2, ...
                self.db.execute("INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)",
                                (high_id,))
            except sqlite3.Error as exc:
                raise SpoolError(self.path, f"cannot create a new spool: {exc}") from exc
            return self.recovered

    def _open_db(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives kill -9 (it is in the WAL); a power cut may lose the last ones
        db.execute("PRAGMA synchronous=NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._high_id = max(self._high_id, int(row[0]) if row else 0)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        reserved = self._read_reserved()
        with self._seq_lock:
            for name in self._seq:
                # a new spool (no meta) continues above every seq ever reserved (and handed out)
                self._seq[name] = max(int(meta.get(f"seq_{name}", reserved.get(name, 0))),
                                      self._seq[name] if self.recovered else 0)
                self._reserved[name] = max(int(reserved.get(name, 0)), self._seq[name])
        for kind in self._dropped:
            self._dropped[kind] = int(meta.get(f"dropped_{kind}", 0))
        row = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        self.count = int(row[0])
        self.bytes = int(row[1]) + self.count * ROW_OVERHEAD_BYTES
        self.states_pending = int(db.execute("SELECT COUNT(*) FROM state").fetchone()[0])

    def _read_reserved(self) -> dict[str, int]:
        try:
            data = json.loads(self.seq_path.read_text())
            return {k: int(v) for k, v in data.items() if k in self._seq}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError, OSError) as exc:
            log.warning("seq reservation file unreadable; ignoring it",
                        extra={"kv": {"path": str(self.seq_path), "error": str(exc)}})
            return {}

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        return target

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def close(self) -> None:
        with self._lock:
            self._close_db()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(self.path, "spool is not open")
        return self._db

    # ------------------------------------------------------------------ writes

    def reserve_seq(self, name: str) -> int:
        """The next `seq` of `name` ("telemetry" or "event"), handed out before its row is written:
        a row whose write fails and is retried keeps its number. Writes the side file once per
        SEQ_BLOCK numbers, before the number is used (crash-safe order)."""
        with self._seq_lock:
            seq = self._seq[name] + 1
            if seq >= self._reserved[name]:
                reserved = dict(self._reserved)
                reserved[name] = seq + SEQ_BLOCK
                atomic_write_json(self.seq_path, reserved)
                self._reserved = reserved
            self._seq[name] = seq
            return seq

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Many writes in one SQLite transaction (the writer thread's batches): all or none."""
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            self._in_tx = True
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                self._refresh_counts()
                raise
            finally:
                self._in_tx = False

    def add_sample(self, sample: dict[str, Any], seq: int | None = None) -> int:
        """Number the sample (`seq`, unless reserved before) and store it; returns the seq."""
        if seq is None:
            seq = self.reserve_seq("telemetry")
        body = encode({"seq": seq, **{k: v for k, v in sample.items() if k != "seq"}})
        with self._lock:
            self._insert(KIND_SAMPLE, None, body, "telemetry", seq)
        return seq

    def add_event(self, topic: str, kind: str, severity: str, message: str,
                  data: dict[str, Any] | None = None, ts: float | None = None, seq: int | None = None) -> int:
        """Build an events payload with the next event seq and store it; returns the seq."""
        if seq is None:
            seq = self.reserve_seq("event")
        body = encode(event(self.device, seq, kind, severity, message, data, ts))
        with self._lock:
            self._insert(KIND_EVENT, topic, body, "event", seq)
        return seq

    def add_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._insert(KIND_MESSAGE, topic, payload, None, 0)

    def _insert(self, kind: str, topic: str | None, payload: bytes, seq_name: str | None,
                seq: int) -> None:
        db = self.db
        size = len(payload) + ROW_OVERHEAD_BYTES
        own_tx = not self._in_tx
        if own_tx:
            db.execute("BEGIN IMMEDIATE")
        try:
            if self.bytes + size > self.max_bytes:
                self._drop_oldest(self.bytes + size - self.max_bytes)
            cur = db.execute("INSERT INTO outbox (kind, topic, payload, ts) VALUES (?, ?, ?, ?)",
                             (kind, topic, payload, time.time()))
            if seq_name is not None:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"seq_{seq_name}", seq))
            if own_tx:
                db.execute("COMMIT")
        except BaseException:
            if own_tx:
                _rollback(db)
                self._refresh_counts()
            raise
        self._high_id = max(self._high_id, cur.lastrowid or 0)
        self.count += 1
        self.bytes += size

    def _drop_oldest(self, need: int) -> None:
        """Inside a transaction: delete the oldest rows until `need` bytes are free."""
        db = self.db
        freed = 0
        last_id = 0
        dropped: dict[str, int] = {}
        while freed < need:
            rows = db.execute("SELECT id, kind, LENGTH(payload) FROM outbox WHERE id > ? ORDER BY id "
                              "LIMIT 256", (last_id,)).fetchall()
            if not rows:
                break
            for rid, kind, length in rows:
                if freed >= need:
                    break
                freed += int(length) + ROW_OVERHEAD_BYTES
                last_id = int(rid)
                dropped[kind] = dropped.get(kind, 0) + 1
        if not dropped:
            return
        db.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
        for kind, n in dropped.items():
            self._dropped[kind] = self._dropped.get(kind, 0) + n
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (f"dropped_{kind}", self._dropped[kind]))
        self.count -= sum(dropped.values())
        self.bytes -= freed

    def _refresh_counts(self) -> None:
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        self.count = int(row[0])
        self.bytes = int(row[1]) + self.count * ROW_OVERHEAD_BYTES
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        for kind in self._dropped:
            self._dropped[kind] = int(meta.get(f"dropped_{kind}", 0))
        self.states_pending = int(self.db.execute("SELECT COUNT(*) FROM state").fetchone()[0])

    def put_state(self, topic: str, payload: bytes) -> int:
        """Store the latest retained value for `topic`; returns its version."""
        with self._lock:
            db = self.db
            own_tx = not self._in_tx
            if own_tx:
                db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT version FROM state WHERE topic = ?", (topic,)).fetchone()
                version = (int(row[0]) if row else 0) + 1
                db.execute("INSERT OR REPLACE INTO state (topic, payload, version) VALUES (?, ?, ?)",
                           (topic, payload, version))
                if own_tx:
                    db.execute("COMMIT")
            except BaseException:
                if own_tx:
                    _rollback(db)
                raise
            if row is None:
                self.states_pending += 1
            return version

    # ------------------------------------------------------------------ publisher side

    def max_id(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])

    def fetch(self, after_id: int, below_id: int | None, limit: int) -> list[Row]:
        """Up to `limit` rows with after_id < id (< below_id), oldest first."""
        with self._lock:
            if below_id is None:
                cur = self.db.execute("SELECT id, kind, topic, payload, ts FROM outbox WHERE id > ? "
                                      "ORDER BY id LIMIT ?", (after_id, limit))
            else:
                cur = self.db.execute("SELECT id, kind, topic, payload, ts FROM outbox WHERE id > ? "
                                      "AND id < ? ORDER BY id LIMIT ?", (after_id, below_id, limit))
            return [Row(int(r[0]), str(r[1]), r[2], bytes(r[3]), float(r[4])) for r in cur.fetchall()]

    def delete(self, ids: Iterable[int]) -> int:
        """Remove acknowledged rows (ids no longer present, e.g. dropped, are ignored)."""
        id_list = sorted(set(ids))
        if not id_list:
            return 0
        with self._lock:
            db = self.db
            removed = 0
            freed = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(id_list), 500):
                    part = id_list[i:i + 500]
                    marks = ",".join("?" * len(part))
                    row = db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox "
                                     f"WHERE id IN ({marks})", part).fetchone()
                    db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", part)
                    removed += int(row[0])
                    freed += int(row[1]) + int(row[0]) * ROW_OVERHEAD_BYTES
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self.count -= removed
            self.bytes -= freed
            return removed

    def pending_states(self) -> list[StateRow]:
        with self._lock:
            rows = self.db.execute("SELECT topic, payload, version FROM state ORDER BY topic").fetchall()
            return [StateRow(str(r[0]), bytes(r[1]), int(r[2])) for r in rows]

    def ack_state(self, topic: str, version: int) -> None:
        """The broker has this version: forget it (unless a newer one arrived meanwhile)."""
        with self._lock:
            cur = self.db.execute("DELETE FROM state WHERE topic = ? AND version = ?", (topic, version))
            if cur.rowcount:
                self.states_pending -= 1

    # ------------------------------------------------------------------ figures

    @property
    def dropped(self) -> dict[str, int]:
        return {_KIND_NAMES[k]: v for k, v in self._dropped.items()}

    @property
    def dropped_total(self) -> int:
        return sum(self._dropped.values())

    @property
    def last_seq(self) -> dict[str, int]:
        return dict(self._seq)

    def stats(self) -> dict[str, Any]:
        """The telemetry `spool` section: cheap, from counters kept in memory."""
        return {"backlog": self.count, "bytes": self.bytes, "max_bytes": self.max_bytes,
                "dropped": self.dropped_total, "dropped_by_kind": self.dropped,
                "states_pending": self.states_pending}
