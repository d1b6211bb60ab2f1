"""The agent as a real process for the update tests (kill -9, "reboot"): transport + updates, plus
either the real inference component or FakeModelInstaller (our ModelInstaller seam).

    python -m tests.updates_agent CONFIG.toml [--fake-models STORE] [--install-gate FILE]

`--install-gate FILE`: the fake model install waits until FILE exists (so a test can kill -9 the
process while a job is `installing`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeagent.agent import Wiring, run_agent
from edgeagent.core import config as cfgmod
from edgeagent.core import logs
from tests.updates_helpers import FakeModelInstaller

GATE_DEADLINE_S = 120.0


class FakeModels:
    name = "fake-models"

    def __init__(self, store: Path, gate: Path | None) -> None:
        self.installer = FakeModelInstaller(store)
        self.gate = gate

    async def __aenter__(self) -> FakeModels:
        self.installer.store.mkdir(parents=True, exist_ok=True)
        if self.gate is not None:
            self.installer.block.clear()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def run(self) -> None:
        # the test writes the gate file only after kill -9 of an earlier run: poll a file (no other
        # signal crosses processes), with a deadline so a broken test cannot hang an install forever
        deadline = time.monotonic() + GATE_DEADLINE_S
        while self.gate is not None and not self.gate.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"install gate {self.gate} not opened within {GATE_DEADLINE_S:g} s")
            await asyncio.sleep(0.05)
        self.installer.block.set()
        await asyncio.Event().wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config", type=Path)
    p.add_argument("--fake-models", type=Path)
    p.add_argument("--install-gate", type=Path)
    a = p.parse_args()
    cfg = cfgmod.load(a.config)
    logs.setup("INFO")

    def components(w: Wiring) -> list[Any]:
        from edgeagent.transport import TransportComponent
        from edgeagent.updates import UpdatesComponent

        transport = TransportComponent(w.live, w.outbox, w.router, w.sections)
        out: list[Any] = [transport]
        link = (w.live, w.metrics, w.outbox, w.router)
        if a.fake_models:
            fake = FakeModels(a.fake_models, a.install_gate)
            out += [fake, UpdatesComponent(*link, fake.installer)]
        elif cfg.inference.enabled:
            from edgeagent.inference.component import InferenceComponent

            inference = InferenceComponent(w.live, w.outbox)
            w.sections.bind({"inference": inference.section})
            out += [inference, UpdatesComponent(*link, inference, inference.section)]
        else:
            out.append(UpdatesComponent(*link, None))
        return out

    return asyncio.run(run_agent(cfg, components))


if __name__ == "__main__":
    sys.exit(main())
