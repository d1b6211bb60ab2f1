"""The fleet store: one typed interface, two engines chosen by URL (`sqlite:///path`, `postgresql://...`).

SQLite (store_sqlite.py) is the embedded default for one collector on one machine and needs no
dependency; PostgreSQL (store_pg.py, psycopg 3) is the store several collectors share. Both keep
their schema as numbered migrations recorded in a `schema_version` table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edgeagent.core.errors import FleetStoreError
from edgeagent.ops.fleet.schema import SchemaTooNew

DEFAULT_URL = "sqlite:///fleet.sqlite"
__all__ = ["DEFAULT_URL", "FleetStore", "SchemaTooNew", "open_store", "parse_url", "pending_migrations"]


class FleetStore(Protocol):
    """What the collector writes and the readers (watch, devices, history, stats, Prometheus) read."""

    url: str
    shared: bool            # True: several collectors may write it; seq gaps are counted in the store

    def close(self) -> None: ...
    def __enter__(self) -> FleetStore: ...
    def __exit__(self, *exc: object) -> None: ...

    def write(self, samples: Sequence[tuple[Any, ...]] = (), events: Sequence[tuple[Any, ...]] = (),
              jobs: Sequence[tuple[Any, ...]] = (), devices: Iterable[dict[str, Any]] = (),
              now: float = 0.0, heartbeat: dict[str, Any] | None = None) -> None:
        """One transaction (one round trip on PostgreSQL); (device, seq) rows already there are ignored."""

    def prune(self, before: float) -> int:
        """Drop history older than `before` (whole day partitions on PostgreSQL); device state stays."""

    def devices(self) -> list[dict[str, Any]]: ...
    def device(self, device: str) -> dict[str, Any] | None: ...
    def samples(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]: ...
    def events(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]: ...
    def jobs(self, device: str, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]: ...
    def gaps(self, device: str) -> list[tuple[int, int]]:
        """Missing telemetry seq ranges [(first, last), ...] of one device, as the store sees them."""
    def sample_seqs(self, device: str) -> list[int]: ...
    def count(self, table: str) -> int: ...
    def forget(self, devices: Sequence[str] = (), offline_before: float | None = None) -> list[str]:
        """Remove devices from state (named, and/or not heard from since `offline_before`); history stays."""
    def stats(self) -> dict[str, Any]:
        """Rows, partitions, size on disk, and each collector's last heartbeat."""
    def schema_version(self) -> int: ...
    def migrate(self) -> list[int]:
        """Apply pending migrations; return their numbers."""
    def scan_gaps(self, now: float, settle_s: float = 5.0) -> int:
        """Shared stores: record missing seq ranges as gap events; returns how many new (SQLite: 0,
        its one collector counts gaps in memory)."""


def parse_url(url: str) -> tuple[str, str]:
    """('sqlite', path) or ('postgresql', conninfo); a bare path means SQLite (the old --db)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if path.startswith("/") and not path.startswith("//"):
            path = path[1:] or "."           # sqlite:///rel/path -> rel/path; sqlite:////abs -> /abs
        elif path.startswith("//"):
            path = path[1:]
        if not path:
            raise FleetStoreError(url, "no path in the sqlite URL (sqlite:///fleet.sqlite)")
        return "sqlite", path
    if "://" in url:
        raise FleetStoreError(url, "store URL must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return "sqlite", url


def open_store(url: str | Path, readonly: bool = False, migrate: bool = True) -> FleetStore:
    """Open the store a URL names; a writer applies pending migrations first (unless `migrate` is off)."""
    engine, where = parse_url(str(url))
    if engine == "postgresql":
        from edgeagent.ops.fleet.store_pg import PgStore

        return PgStore(where, readonly=readonly, migrate=migrate)
    from edgeagent.ops.fleet.store_sqlite import Store

    return Store(where, readonly=readonly, migrate=migrate)


def pending_migrations(url: str | Path) -> tuple[int, int]:
    """(version in the database, latest this edgeagent knows), without changing anything."""
    engine, where = parse_url(str(url))
    if engine == "postgresql":
        from edgeagent.ops.fleet import store_pg

        with store_pg.PgStore(where, readonly=True, migrate=False) as pg:
            return pg.schema_version(), len(store_pg.MIGRATIONS)
    from edgeagent.ops.fleet import store_sqlite

    if not Path(where).exists():
        return 0, len(store_sqlite.MIGRATIONS)
    with store_sqlite.Store(where, readonly=True, migrate=False) as lite:
        return lite.schema_version(), len(store_sqlite.MIGRATIONS)
