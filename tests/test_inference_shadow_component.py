"""The inference component's shadow run (installer.Installer.shadow) with real interpreters and no
broker: it survives a pipeline rebuild, shows in the telemetry section, and a cancellation (an
operator's cancel, a shutdown) detaches the candidate at once."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core.shadow_spec import ShadowSpec
from edgeagent.core.tasks import cancel_and_wait
from tests.inference_helpers import RUNTIMES, SHIPPED, Harness, ScriptedSource, bundle, make_config

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")


def test_a_pipeline_rebuild_during_shadow_keeps_feeding_the_candidate(tmp_path: Path) -> None:
    staged = bundle(tmp_path, "cand", SHIPPED / "model_float.tflite", SHIPPED / "model.toml", "2.0.0")
    reports: list[dict[str, Any]] = []

    async def main() -> tuple[Any, list[dict[str, Any]]]:
        async with Harness(make_config(tmp_path / "state"), ScriptedSource(windows_hz=200.0)) as h:
            await h.until(lambda: len(h.results) > 20, what="serving")
            first_runner = h.comp.runner
            run = asyncio.ensure_future(h.comp.shadow(staged, "vibration-anomaly", "2.0.0", "j1",
                                                      ShadowSpec(windows=1000), reports.append))
            await h.until(lambda: (h.comp.section().get("shadow") or {}).get("compared", 0) >= 20,
                          what="shadow started")
            in_telemetry = h.comp.section()["shadow"]
            cfg = h.live.config  # a structural change: the pipeline (runner) is rebuilt
            h.live.replace(dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference,
                                                                                  queue_max=5000)))
            await h.until(lambda: h.comp.runner is not None and h.comp.runner is not first_runner,
                          what="rebuilt")
            outcome = await asyncio.wait_for(run, 60)
            assert h.comp.runner is not None and h.comp.runner.lane is None
            assert "shadow" not in h.comp.section()
            return outcome, [in_telemetry]

    outcome, telemetry = asyncio.run(main())
    assert outcome.promote, outcome.reason
    assert outcome.figures["compared"] == 1000 and outcome.figures["agreement"] >= 0.95
    assert telemetry[0]["candidate"] == "vibration-anomaly@2.0.0" and telemetry[0]["windows"] == 1000
    assert reports and reports[-1]["compared"] == 1000


def test_a_cancelled_shadow_run_detaches_the_candidate(tmp_path: Path) -> None:
    staged = bundle(tmp_path, "cand", SHIPPED / "model_float.tflite", SHIPPED / "model.toml", "2.0.0")

    async def main() -> None:
        async with Harness(make_config(tmp_path / "state"), ScriptedSource(windows_hz=200.0)) as h:
            await h.until(lambda: len(h.results) > 20, what="serving")
            run = asyncio.ensure_future(h.comp.shadow(staged, "vibration-anomaly", "2.0.0", "j1",
                                                      ShadowSpec(windows=100_000), lambda f: None))
            await h.until(lambda: h.comp.runner is not None and h.comp.runner.lane is not None,
                          what="attached")
            await cancel_and_wait(run)
            assert run.cancelled()
            runner = h.comp.runner
            assert runner is not None and runner.lane is None and "shadow" not in h.comp.section()
            served = len(h.results)
            await h.until(lambda: len(h.results) > served + 20, what="still serving")
            assert h.comp.installed_version("vibration-anomaly") == "1.0.0"

    asyncio.run(main())
