"""What both store engines share: history columns and the schema version check."""

from __future__ import annotations

from edgeagent.core.errors import FleetStoreError

SAMPLE_COLUMNS = ("device", "seq", "ts", "recv", "cpu_percent", "mem_used_percent", "temp_c",
                  "p95_ms", "anomaly_rate_1m", "spool_backlog")
EVENT_COLUMNS = ("device", "seq", "ts", "recv", "kind", "severity", "message", "data")


class SchemaTooNew(FleetStoreError):
    """The database was migrated by a newer edgeagent: writing could corrupt what it expects."""

    def __init__(self, where: object, found: int, known: int) -> None:
        self.found = found
        self.known = known
        super().__init__(where, f"schema version {found} is newer than this edgeagent knows ({known}); "
                                "upgrade edgeagent before collecting into it")


def check_version(where: object, found: int, known: int) -> None:
    if found > known:
        raise SchemaTooNew(where, found, known)
