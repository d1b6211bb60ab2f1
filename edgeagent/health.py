"""health.json in the state dir: what `edgeagent status` and operators read while the agent runs.

Written atomically every `agent.health_interval_s` and at stop, so a reader never sees a torn file.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeagent.core.fsutil import atomic_write_json
from edgeagent.core.logs import Once

log = logging.getLogger(__name__)
HEALTH_FILE = "health.json"


class HealthWriter:
    """Writes `snapshot()` (built on the loop by the agent) to health.json, in order, off the loop."""

    def __init__(self, state_dir: Path, snapshot: Callable[[], dict[str, Any]],
                 interval_s: Callable[[], float]) -> None:
        self.path = state_dir / HEALTH_FILE
        self.snapshot = snapshot
        self.interval_s = interval_s
        self._lock = threading.Lock()
        # snapshots are ordered by when they were taken, not by their wall-clock `ts`: after the
        # clock was set back, `ts` goes backwards and the file would stay frozen until it caught up
        self._taken = itertools.count(1)
        self._last_written = 0
        self._once = Once(log)

    def write_now(self) -> None:
        """Synchronous write (at stop, when nothing else runs any more)."""
        self._write(next(self._taken), self.snapshot())

    def _write(self, number: int, snapshot: dict[str, Any]) -> None:
        with self._lock:  # an older snapshot never renames over a newer one
            if number <= self._last_written:
                return
            self._last_written = number
            try:
                atomic_write_json(self.path, snapshot)
            except (OSError, TypeError, ValueError) as exc:
                self._once.warning("write", "cannot write health file: %s", exc)

    async def loop(self) -> None:
        while True:
            try:
                # the snapshot is taken on the loop (providers read loop-owned state); only the
                # write and its fsync go to a thread
                await asyncio.to_thread(self._write, next(self._taken), self.snapshot())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken provider must not end health reporting for good
                self._once.warning("snapshot", "health snapshot failed: %s", exc)
            await asyncio.sleep(self.interval_s())
