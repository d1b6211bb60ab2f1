"""health.json in the state dir: what `edgeagent status` and operators read while the agent runs.

Written atomically every `agent.health_interval_s` and at stop, so a reader never sees a torn file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from edgeagent import __version__
from edgeagent.fsutil import atomic_write_json

if TYPE_CHECKING:
    from edgeagent.agent import Agent

log = logging.getLogger(__name__)
HEALTH_FILE = "health.json"


class HealthWriter:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

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
        try:
            atomic_write_json(self.agent.config.state_dir / HEALTH_FILE, self.snapshot())
        except OSError as exc:
            log.warning("cannot write health file: %s", exc)

    async def loop(self) -> None:
        while True:
            await asyncio.to_thread(self.write_now)
            await asyncio.sleep(self.agent.config.agent.health_interval_s)
