"""health.json keeps following the agent when the wall clock is set back."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from edgeagent.health import HEALTH_FILE, HealthWriter

JUMP_S = 21600.0  # the field trial's clock-jump: six hours forward, then back


def read(state_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / HEALTH_FILE).read_text())
    return data


def test_a_snapshot_taken_after_the_clock_went_back_is_written(tmp_path: Path) -> None:
    snapshots = iter([{"ts": time.time() + JUMP_S, "backlog": 1}, {"ts": time.time(), "backlog": 0}])
    writer = HealthWriter(tmp_path, lambda: next(snapshots), lambda: 0.5)
    writer.write_now()
    assert read(tmp_path)["backlog"] == 1
    writer.write_now()  # the clock is back: `ts` is smaller, the content is newer
    assert read(tmp_path)["backlog"] == 0


def test_the_loop_keeps_writing_while_ts_goes_backwards(tmp_path: Path) -> None:
    taken = 0

    def snapshot() -> dict[str, Any]:
        nonlocal taken
        taken += 1
        return {"ts": time.time() + (JUMP_S if taken == 1 else 0.0), "n": taken}

    async def main() -> int:
        writer = HealthWriter(tmp_path, snapshot, lambda: 0.01)
        task = asyncio.create_task(writer.loop(), name="health")
        try:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                n = int(read(tmp_path)["n"]) if (tmp_path / HEALTH_FILE).exists() else 0
                if n >= 3:
                    return n
            return n
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(main()) >= 3, "health.json froze at the snapshot taken before the clock went back"
