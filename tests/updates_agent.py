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
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeagent.agent import run_agent
from edgeagent.core import config as cfgmod
from edgeagent.core import logs
from edgeagent.core.hub import Hub
from tests.updates_helpers import FakeModelInstaller


class FakeModels:
    name = "fake-models"

    def __init__(self, hub: Hub, store: Path, gate: Path | None) -> None:
        self.hub = hub
        self.installer = FakeModelInstaller(store)
        self.gate = gate

    async def __aenter__(self) -> FakeModels:
        self.installer.store.mkdir(parents=True, exist_ok=True)
        self.hub.model_installer = self.installer
        if self.gate is not None:
            self.installer.block.clear()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def run(self) -> None:
        while self.gate is not None and not self.gate.exists():
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

    def components(hub: Hub) -> list[Any]:
        from edgeagent.transport import TransportComponent
        from edgeagent.updates import UpdatesComponent

        out: list[Any] = [TransportComponent(hub)]
        if a.fake_models:
            out.append(FakeModels(hub, a.fake_models, a.install_gate))
        elif cfg.inference.enabled:
            from typing import cast

            from edgeagent.core.live import LiveConfig, Outbox
            from edgeagent.inference.pipeline import InferenceComponent

            # as edgeagent.agent does until it holds a LiveConfig and an OutboxRelay (issue 14)
            inference = InferenceComponent(cast(LiveConfig, hub), cast(Outbox, hub))
            hub.model_installer = inference
            hub.providers["inference"] = inference.section
            out.append(inference)
        out.append(UpdatesComponent(hub))
        return out

    return asyncio.run(run_agent(cfg, components))


if __name__ == "__main__":
    sys.exit(main())
