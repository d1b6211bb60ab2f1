"""Several pipelines on the real interpreter: side by side with their own results, the shipped
autoencoder flagging faults of held-out machines and quiet on healthy ones, on-device calibration
kept across a restart, and a regression head's value with its unit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import config
from edgeagent.inference.heads import calibration_path
from edgeagent.inference.store import SHIPPED_DIR, ModelStore
from tests.inference_helpers import RUNTIMES, SHIPPED, UNSEEN_SEED, Harness, ScriptedSource, events

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")]

AE = "vibration-autoencoder"
WARMUP = 16  # chunks before the first window (256 samples)


def pipelines_config(state: Path, *entries: dict[str, Any], **inference: Any) -> config.Config:
    return config.build(
        {
            "device": {"id": "multi", "state_dir": str(state)},
            "inference": {"queue_max": 100_000, **inference},
            "pipelines": list(entries),
        },
        env={},
    )


class Multi(Harness):
    """Harness for several pipelines: one scripted source per pipeline name."""

    def __init__(self, cfg: config.Config, sources: dict[str, ScriptedSource]) -> None:
        super().__init__(cfg, None, sources=sources)

    def of(self, pipeline: str) -> list[Any]:
        return [r for r in self.results if r.pipeline == pipeline]


def test_two_pipelines_serve_side_by_side_with_their_own_results(tmp_path: Path) -> None:
    cfg = pipelines_config(
        tmp_path / "state",
        {"name": "vibration", "model": "vibration-anomaly"},
        {"name": "pump", "model": AE, "head": "autoencoder"},
        threads_budget=2,
    )
    faulty = ScriptedSource(max_chunks=WARMUP + 150, seed=UNSEEN_SEED + 1, schedule={0: ("bearing", 1.0)})
    healthy = ScriptedSource(max_chunks=WARMUP + 100)

    async def main() -> Multi:
        async with Multi(cfg, {"vibration": healthy, "pump": faulty}) as h:
            await h.finished()
            return h

    h = asyncio.run(main())
    vib, pump = h.of("vibration"), h.of("pump")
    assert [r.seq for r in vib] == list(range(101)) and [r.seq for r in pump] == list(range(151))
    assert {r.model for r in vib} == {"vibration-anomaly@1.0.0"} and {r.model for r in pump} == {
        f"{AE}@1.0.0"
    }
    assert not any(r.anomaly for r in vib) and pump[-1].anomaly  # each pipeline its own anomaly state
    anomalies = events(h.outbox, "anomaly")
    assert anomalies and {d["pipeline"] for _k, _s, _m, d in anomalies} == {"pump"}
    section = h.comp.section()
    assert section["pipelines"]["vibration"]["count"] == 101 and section["pipelines"]["pump"]["count"] == 151
    assert section["model"] == "vibration-anomaly@1.0.0" and section["count"] == 101  # flat: the first one
    assert (tmp_path / "state" / "models" / "pump" / AE / "1.0.0" / "model.tflite").is_file()
    assert (tmp_path / "state" / "models" / "vibration" / "vibration-anomaly" / "active.json").is_file()
    assert h.comp.pipeline("pump").runner is None  # closed once its source ended


@pytest.mark.parametrize("fault", ["imbalance", "bearing", "spikes"])
def test_the_autoencoder_flags_faults_of_unseen_machines_and_stays_quiet_on_healthy_ones(
    tmp_path: Path, fault: str
) -> None:
    healthy_chunks, fault_chunks = 300, 200
    cfg = pipelines_config(tmp_path / "state", {"name": "pump", "model": AE, "head": "autoencoder"})
    src = ScriptedSource(
        max_chunks=WARMUP + healthy_chunks + fault_chunks,
        seed=UNSEEN_SEED + 7,
        schedule={WARMUP + healthy_chunks: (fault, 1.0)},
    )

    async def main() -> Multi:
        async with Multi(cfg, {"pump": src}) as h:
            await h.finished()
            return h

    h = asyncio.run(main())
    res = h.of("pump")
    before = [r for r in res if r.seq < healthy_chunks]  # windows made only of healthy samples
    after = [r for r in res if r.seq >= healthy_chunks + WARMUP]  # windows made only of faulty samples
    assert len(before) == healthy_chunks and len(after) == fault_chunks - WARMUP + 1
    assert not any(r.anomaly for r in before), max(r.score for r in before)
    flagged = sum(r.score >= 0 and r.label == "anomaly" for r in after) / len(after)
    assert flagged >= 0.9, flagged
    raised = [d for _k, sev, _m, d in events(h.outbox, "anomaly") if sev == "warning"]
    assert raised and raised[0]["seq"] >= healthy_chunks and raised[0]["pipeline"] == "pump"


def test_calibration_learns_the_threshold_keeps_it_and_reuses_it_after_a_restart(tmp_path: Path) -> None:
    entry = {
        "name": "pump",
        "model": AE,
        "head": "autoencoder",
        "calibrate_windows": 200,
        "calibrate_sigma": 6.0,
    }
    cfg = pipelines_config(tmp_path / "state", entry)
    src = ScriptedSource(
        max_chunks=WARMUP + 400 + 150, seed=UNSEEN_SEED + 3, schedule={WARMUP + 400: ("bearing", 1.0)}
    )

    async def first() -> Multi:
        async with Multi(cfg, {"pump": src}) as h:
            await h.finished()
            return h

    h = asyncio.run(first())
    res = h.of("pump")
    assert not any(r.anomaly or r.label for r in res[:200])  # calibrating: no verdicts yet
    assert not any(r.anomaly for r in res[200:400]) and res[-1].anomaly
    (cal,) = [d for _k, _s, _m, d in events(h.outbox, "config")]
    assert cal["pipeline"] == "pump" and cal["windows"] == 200 and cal["model"] == f"{AE}@1.0.0"
    saved = json.loads(calibration_path(tmp_path / "state", "pump").read_text())
    assert saved["threshold"] == cal["threshold"] == pytest.approx(saved["mean"] + 6.0 * saved["std"])
    assert h.comp.section()["pipelines"]["pump"]["threshold"] == saved["threshold"]

    again = ScriptedSource(max_chunks=WARMUP + 50, seed=UNSEEN_SEED + 3)

    async def restarted() -> Multi:
        async with Multi(cfg, {"pump": again}) as h2:
            await h2.finished()
            return h2

    h2 = asyncio.run(restarted())
    assert events(h2.outbox, "config") == []  # reused, not calibrated again
    assert all(r.label == "normal" for r in h2.of("pump"))  # verdicts from the first window on
    assert h2.comp.section()["pipelines"]["pump"]["threshold"] == saved["threshold"]


def test_a_regression_head_reports_a_value_with_its_unit(tmp_path: Path) -> None:
    """The shipped classifier read as a regression (out[0] = p(healthy)): the head's plumbing, with a
    real interpreter, without a regression model to ship."""
    d = tmp_path / "bundle"
    d.mkdir()
    shutil.copyfile(SHIPPED / "model.tflite", d / "model.tflite")
    meta = (
        (SHIPPED / "model.toml")
        .read_text()
        .replace('output = "softmax"', 'output = "regression"\nunit = "p"')
    )
    meta = meta.replace('name = "vibration-anomaly"', 'name = "health-value"')
    (d / "model.toml").write_text(meta.split("\n[[golden]]")[0] + "\n")
    state = tmp_path / "state"
    store = ModelStore(state / "models" / "health")
    store.add("health-value", "1.0.0", d)
    store.activate("health-value", "1.0.0")
    cfg = pipelines_config(
        state,
        {"name": "health", "model": "health-value", "head": "regression", "unit": "prob", "threshold": 2.0},
    )
    src = ScriptedSource(max_chunks=WARMUP + 40)

    async def main() -> Multi:
        async with Multi(cfg, {"health": src}) as h:
            await h.finished()
            return h

    h = asyncio.run(main())
    res = h.of("health")
    assert len(res) == 41 and all(
        r.unit == "prob" and r.score is not None and 0.5 < r.score <= 1.0 for r in res
    )
    section = h.comp.section()["pipelines"]["health"]
    assert section["unit"] == "prob" and section["value"] == pytest.approx(res[-1].score, abs=1e-5)
    assert not events(h.outbox, "anomaly")  # the configured threshold (2.0) is never reached


def test_a_pipeline_whose_model_does_not_fit_its_head_fails_alone(tmp_path: Path) -> None:
    """With several pipelines a broken one is restarted on its own; the other keeps serving."""
    cfg = pipelines_config(
        tmp_path / "state",
        {"name": "good", "model": "vibration-anomaly"},
        {"name": "bad", "model": "vibration-anomaly", "head": "autoencoder"},
    )
    good = ScriptedSource(windows_hz=200.0)

    async def main() -> Multi:
        async with Multi(cfg, {"good": good, "bad": ScriptedSource(max_chunks=WARMUP + 5)}) as h:
            await h.until(
                lambda: events(h.outbox, "error") and len(h.of("good")) >= 50, what="error + serving"
            )
            assert h.task is not None and not h.task.done()
            return h  # "bad" keeps being retried with backoff: leaving cancels it

    h = asyncio.run(main())
    (_k, _s, msg, data) = events(h.outbox, "error")[0]
    assert data["pipeline"] == "bad" and "head is 'autoencoder'" in data["error"], msg
    assert h.of("bad") == [] and [r.seq for r in h.of("good")] == list(range(len(h.of("good"))))


def test_a_live_config_change_adds_a_pipeline_without_stopping_the_first(tmp_path: Path) -> None:
    cfg = pipelines_config(tmp_path / "state", {"name": "vibration", "model": "vibration-anomaly"})
    vib, pump = ScriptedSource(windows_hz=200.0), ScriptedSource(windows_hz=200.0, seed=UNSEEN_SEED + 2)

    async def main() -> Multi:
        async with Multi(cfg, {"vibration": vib, "pump": pump}) as h:
            await h.until(lambda: len(h.of("vibration")) >= 20, what="first pipeline serving")
            more = dataclasses.replace(
                cfg,
                pipelines=(
                    *cfg.pipelines,
                    *pipelines_config(tmp_path, {"name": "pump", "model": AE}).pipelines,
                ),
            )
            h.live.replace(more)
            await h.until(lambda: len(h.of("pump")) >= 20, what="second pipeline serving")
            vib.stop()
            pump.stop()
            await h.finished()
            return h

    h = asyncio.run(main())
    seqs = [r.seq for r in h.of("vibration")]
    assert seqs == list(range(len(seqs)))  # the first pipeline's windows count on: nothing lost
    assert SHIPPED_DIR.joinpath(AE, "model.toml").is_file()
