"""health.json in the state dir: what `edgeagent status` and operators read while the agent runs.

Written atomically every `agent.health_interval_s` and at stop, so a reader never sees a torn file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from edgeagent import __version__
from edgeagent.core.fsutil import atomic_write_json
from edgeagent.core.logs import Once

if TYPE_CHECKING:
    from edgeagent.agent import Agent

log = logging.getLogger(__name__)
HEALTH_FILE = "health.json"


class HealthWriter:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._last_ts = 0.0
        self._once = Once(log)

    def snapshot(self) -> dict[str, Any]:
        a = self.agent
        return {
            "v": 1,
            "ts": time.time(),
            "pid": os.getpid(),
            "agent": __version__,
            "device": a.config.device.id,
            "state": a.state,
            "started_at": a.started_at,
            "interval_s": a.config.agent.health_interval_s,
            "components": {name: s.as_dict() for name, s in a.states.items()},
            "busy": dict(a.hub.busy),
            "sections": a.hub.sections(),
        }

    def write_now(self) -> None:
        """Synchronous write (at stop, when nothing else runs any more)."""
        self._write(self.snapshot())

    def _write(self, snapshot: dict[str, Any]) -> None:
        with self._lock:  # an older snapshot never renames over a newer one
            if snapshot["ts"] < self._last_ts:
                return
            self._last_ts = snapshot["ts"]
            try:
                atomic_write_json(self.agent.config.state_dir / HEALTH_FILE, snapshot)
            except (OSError, TypeError, ValueError) as exc:
                self._once.warning("write", "cannot write health file: %s", exc)

    async def loop(self) -> None:
        while True:
            try:
                # the snapshot is taken on the loop (providers read loop-owned state); only the
                # write and its fsync go to a thread
                await asyncio.to_thread(self._write, self.snapshot())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken provider must not end health reporting for good
                self._once.warning("snapshot", "health snapshot failed: %s", exc)
            await asyncio.sleep(self.agent.config.agent.health_interval_s)
