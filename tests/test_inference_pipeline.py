"""The inference pipeline end to end: real sources, real interpreters, real model store on disk."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from edgeagent.core.errors import ModelRejected, ModelRolledBack
from edgeagent.inference.store import ModelStore
from tests.inference_helpers import (
    FIXTURES,
    MODELS,
    RUNTIMES,
    SHIPPED,
    Harness,
    ScriptedSource,
    bundle,
    events,
    make_config,
)

HEALTHY, FAULT, RECOVERED = 300, 300, 300  # windows per phase


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("variant", ["int8", "float"])
@pytest.mark.parametrize("fault", ["imbalance", "bearing", "spikes"])
def test_shipped_model_flags_faults_and_stays_quiet_when_healthy(tmp_path: Path, runtime: str, variant: str,
                                                                 fault: str) -> None:
    # chunk c completes window c - 15: switch the fault on at window HEALTHY, off at HEALTHY + FAULT
    on, off = HEALTHY + 15, HEALTHY + FAULT + 15
    src = ScriptedSource(max_chunks=HEALTHY + FAULT + RECOVERED + 15,
                         schedule={on: (fault, 0.6), off: ("clear", 0.0)})

    async def main() -> Harness:
        async with Harness(make_config(tmp_path, runtime=runtime, model_variant=variant), src) as h:
            await h.finished()
            return h

    h = asyncio.run(main())
    assert [r.seq for r in h.results] == list(range(HEALTHY + FAULT + RECOVERED))
    anomalies = events(h.outbox, "anomaly")
    raised = [d["seq"] for _k, sev, _m, d in anomalies if sev == "warning"]
    cleared = [d["seq"] for _k, sev, _m, d in anomalies if sev == "info"]
    assert len(raised) == 1, anomalies  # one rising edge: hysteresis, no flapping
    assert HEALTHY <= raised[0] < HEALTHY + 32  # flagged within 32 windows (0.3 s) of the fault
    assert len(cleared) == 1 and HEALTHY + FAULT <= cleared[0] < HEALTHY + FAULT + 32
    healthy = [r.score for r in h.results if r.seq < HEALTHY]
    assert all(s is not None and s < 0.5 for s in healthy)
    section = h.comp.section()
    assert section["model"] == "vibration-anomaly@1.0.0"
    assert section["count"] == HEALTHY + FAULT + RECOVERED and section["dropped"] == 0
    assert section["p50_ms"] > 0 and section["p99_ms"] >= section["p95_ms"] >= section["p50_ms"]
    assert 0 < section["anomaly_rate_1m"] < 1


def test_telemetry_section_while_running_at_100hz(tmp_path: Path) -> None:
    src = ScriptedSource(windows_hz=100.0)

    async def main() -> dict[str, object]:
        async with Harness(make_config(tmp_path), src) as h:
            await h.until(lambda: len(h.results) >= 150, what="150 windows")
            return h.comp.section()

    s = asyncio.run(main())
    assert set(s) >= {"model", "count", "rate_hz", "p50_ms", "p95_ms", "p99_ms", "dropped", "last_score",
                      "anomaly_rate_1m"}
    assert 60 <= float(s["rate_hz"]) <= 140  # type: ignore[arg-type]
    assert s["dropped"] == 0


def test_20_swaps_under_a_100hz_stream_lose_and_duplicate_no_window(tmp_path: Path) -> None:
    src = ScriptedSource(windows_hz=100.0)
    cfg = make_config(tmp_path / "state", probation_windows=5, keep_versions=3)
    models = [SHIPPED / "model_float.tflite", SHIPPED / "model.tflite"]
    versions = [f"1.0.{i}" for i in range(1, 21)]

    async def main() -> tuple[Harness, list[str]]:
        async with Harness(cfg, src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            for i, v in enumerate(versions):
                staged = bundle(tmp_path, "m", models[i % 2], SHIPPED / "model.toml", v)
                await h.comp.install(staged, "vibration-anomaly", v, f"job-{i}")
                assert h.comp.installed_version("vibration-anomaly") == v
            src.stop()
            await h.finished()
            return h, [d["model"] for _k, _s, _m, d in events(h.outbox, "update")]

    h, activated = asyncio.run(main())
    seqs = [r.seq for r in h.results]
    produced = h.comp.windows
    assert produced >= 20 + 20 * 5  # every probation served its windows
    assert sorted(seqs) == list(range(produced)), "every window served exactly once"
    assert seqs == sorted(seqs)  # one worker, FIFO
    assert h.comp.section()["dropped"] == 0
    # the serving model changes exactly 20 times, in install order, each between two windows
    tags = [h.results[0].model]
    for r in h.results:
        if r.model != tags[-1]:
            tags.append(r.model)
    assert tags == ["vibration-anomaly@1.0.0"] + [f"vibration-anomaly@{v}" for v in versions]
    assert activated == [f"vibration-anomaly@{v}" for v in versions]
    assert all(r.score is not None for r in h.results)
    store = ModelStore(tmp_path / "state" / "models", 3)
    rec = store.active("vibration-anomaly")
    assert rec is not None and rec.version == "1.0.20" and rec.previous == ("1.0.19", "1.0.18")
    assert store.versions("vibration-anomaly") == ["1.0.18", "1.0.19", "1.0.20"]


@pytest.mark.parametrize(("model", "why"), [
    (MODELS / "bad_shape.tflite", "takes 50 values"),
    (MODELS / "nan.tflite", "non-finite output on recent real window"),
    (MODELS / "select_tf_op.tflite", "FlexCumprod"),
    (FIXTURES / "too_new_op.tflite", "FULLY_CONNECTED"),
    (FIXTURES / "raw_window.tflite", "takes 768 values"),
])
def test_a_model_that_fails_validation_is_never_activated(tmp_path: Path, model: Path, why: str) -> None:
    src = ScriptedSource(windows_hz=200.0)
    cfg = make_config(tmp_path / "state")

    async def main() -> tuple[Harness, ModelRejected]:
        async with Harness(cfg, src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            with pytest.raises(ModelRejected) as info:
                await h.comp.install(bundle(tmp_path, "bad", model), "vibration-anomaly", "2.0.0", "job-1")
            n = len(h.results)
            await h.until(lambda: len(h.results) >= n + 10, what="serving on after the rejection")
            return h, info.value

    h, exc = asyncio.run(main())
    assert why in exc.reason
    assert {r.model for r in h.results} == {"vibration-anomaly@1.0.0"}
    assert all(r.result.ok for r in h.results)
    assert h.comp.installed_version("vibration-anomaly") == "1.0.0"
    store = ModelStore(tmp_path / "state" / "models")
    assert store.versions("vibration-anomaly") == ["1.0.0"]  # the candidate's directory is gone
    assert events(h.outbox, "update") == []


@pytest.mark.parametrize(("edit", "why"), [
    (None, "golden[0] (healthy): output"),  # the shipped goldens do not hold for another model
    (("size = 256", "size = 512"), "wants windows of 512x3"),
    (('name = "vibration-anomaly"', 'name = "other"'), "model.toml names model 'other'"),
    (("labels = [", "labels = [\"extra\", "), "labels"),
])
def test_a_bundle_whose_model_toml_disagrees_is_rejected(tmp_path: Path, edit: tuple[str, str] | None,
                                                         why: str) -> None:
    src = ScriptedSource(windows_hz=200.0)
    meta = tmp_path / "model.toml"
    text = (SHIPPED / "model.toml").read_text()
    meta.write_text(text.replace(*edit, 1) if edit else text)
    model = FIXTURES / "uint8_io.tflite" if edit is None else SHIPPED / "model.tflite"

    async def main() -> ModelRejected:
        async with Harness(make_config(tmp_path / "state"), src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            with pytest.raises(ModelRejected) as info:
                await h.comp.install(bundle(tmp_path, "g", model, meta, "2.0.0"), "vibration-anomaly",
                                     "2.0.0", "job-1")
            assert h.comp.installed_version("vibration-anomaly") == "1.0.0"
            return info.value

    exc = asyncio.run(main())
    assert why in exc.reason


@pytest.mark.parametrize("fixture", ["nan_when_large", "raise_when_large"])
def test_a_model_failing_during_probation_is_rolled_back(tmp_path: Path, fixture: str) -> None:
    src = ScriptedSource(windows_hz=200.0)
    cfg = make_config(tmp_path / "state", probation_windows=200)

    async def main() -> tuple[Harness, ModelRolledBack]:
        async with Harness(cfg, src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            # the candidate passes validation on healthy windows; once it serves, the signal gets huge
            h.comp.add_listener(lambda s: src.apply("gain", 1000.0) if s.model.endswith("@2.0.0") else None)
            staged = bundle(tmp_path, "f", FIXTURES / f"{fixture}.tflite")
            with pytest.raises(ModelRolledBack) as info:
                await h.comp.install(staged, "vibration-anomaly", "2.0.0", "job-1")
            src.apply("gain", 1.0)
            n = len(h.results)
            await h.until(lambda: len(h.results) >= n + 10, what="serving on after the rollback")
            return h, info.value

    h, exc = asyncio.run(main())
    assert "vibration-anomaly@1.0.0 is active again" in str(exc)
    assert h.results[-1].model == "vibration-anomaly@1.0.0" and h.results[-1].result.ok
    assert h.comp.installed_version("vibration-anomaly") == "1.0.0"
    assert ModelStore(tmp_path / "state" / "models").versions("vibration-anomaly") == ["1.0.0"]
    rolled = [e for e in events(h.outbox, "update") if "rolled back" in e[2]]
    assert len(rolled) == 1 and rolled[0][3]["restored"] == "vibration-anomaly@1.0.0"
    seqs = [r.seq for r in h.results]
    assert seqs == list(range(len(seqs)))  # the rollback lost and repeated no window either


@pytest.mark.parametrize("fixture", ["nan_when_large", "raise_when_large"])
def test_a_model_failing_after_probation_is_rolled_back_automatically(tmp_path: Path, fixture: str) -> None:
    src = ScriptedSource(windows_hz=200.0)
    cfg = make_config(tmp_path / "state", probation_windows=5)

    async def main() -> Harness:
        async with Harness(cfg, src) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            await h.comp.install(bundle(tmp_path, "f", FIXTURES / f"{fixture}.tflite"),
                                 "vibration-anomaly", "2.0.0", "job-1")
            assert h.comp.installed_version("vibration-anomaly") == "2.0.0"
            src.apply("gain", 1000.0)
            await h.until(lambda: h.comp.installed_version("vibration-anomaly") == "1.0.0",
                          what="the automatic rollback")
            src.apply("gain", 1.0)
            n = len(h.results)
            await h.until(lambda: len(h.results) >= n + 10 and h.results[-1].result.ok,
                          what="serving on after the rollback")
            return h

    h = asyncio.run(main())
    msgs = [m for _k, _s, m, _d in events(h.outbox, "update")]
    assert any("failed after activation; rolled back to vibration-anomaly@1.0.0" in m for m in msgs), msgs
    store = ModelStore(tmp_path / "state" / "models")
    rec = store.active("vibration-anomaly")
    assert rec is not None and rec.version == "1.0.0"
    assert store.versions("vibration-anomaly") == ["1.0.0"]
    seqs = [r.seq for r in h.results]
    assert seqs == list(range(len(seqs)))


def test_installed_model_survives_a_restart(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "state", probation_windows=5)

    async def install() -> None:
        async with Harness(cfg, ScriptedSource(windows_hz=200.0)) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            # a bare .tflite: read like the model it replaces (its model.toml is kept next to it)
            await h.comp.install(bundle(tmp_path, "f", SHIPPED / "model_float.tflite"),
                                 "vibration-anomaly", "1.1.0", "job-1")

    async def restart() -> Harness:
        async with Harness(cfg, ScriptedSource(max_chunks=40)) as h:
            await h.finished()
            return h

    asyncio.run(install())
    h = asyncio.run(restart())
    assert {r.model for r in h.results} == {"vibration-anomaly@1.1.0"}
    assert all(r.score is not None for r in h.results)
    assert (tmp_path / "state" / "models" / "vibration-anomaly" / "1.1.0" / "model.toml").is_file()


def test_install_checks_before_touching_anything(tmp_path: Path) -> None:
    async def main() -> list[str]:
        async with Harness(make_config(tmp_path / "state"), ScriptedSource(windows_hz=200.0)) as h:
            await h.until(lambda: len(h.results) >= 5, what="the pipeline serving")
            reasons = []
            for name, version in (("other-model", "2.0.0"), ("vibration-anomaly", "../x"),
                                  ("vibration-anomaly", "1.0.0")):
                with pytest.raises(ModelRejected) as info:
                    await h.comp.install(bundle(tmp_path, "ok", SHIPPED / "model.tflite"), name, version, "j")
                reasons.append(info.value.reason)
            return reasons

    reasons = asyncio.run(main())
    assert "not 'other-model'" in reasons[0]
    assert "must be" in reasons[1]
    assert "already the active model" in reasons[2]


def test_power_save_serves_fewer_windows_deliberately(tmp_path: Path) -> None:
    src = ScriptedSource(max_chunks=215)

    async def main() -> Harness:
        h = Harness(make_config(tmp_path), src)
        h.live.slowdown["inference"] = 2.0
        async with h:
            await h.finished()
        return h

    h = asyncio.run(main())
    assert [r.seq for r in h.results] == list(range(0, 200, 2))
    s = h.comp.section()
    assert s["skipped"] == 100 and s["dropped"] == 0


def test_result_cache_hits_when_inputs_repeat_exactly(tmp_path: Path) -> None:
    src = ScriptedSource(max_chunks=115, repeat=True)

    async def main() -> Harness:
        async with Harness(make_config(tmp_path, cache_size=8), src) as h:
            await h.finished()
            return h

    h = asyncio.run(main())
    s = h.comp.section()
    assert s["count"] == 100
    assert s["cache_hit_rate"] == pytest.approx(0.99)
    assert len({r.score for r in h.results}) == 1


def test_disabled_inference_idles_and_refuses_installs(tmp_path: Path) -> None:
    async def main() -> tuple[dict[str, object], ModelRejected]:
        h = Harness(make_config(tmp_path, enabled=False), ScriptedSource())
        async with h:
            await asyncio.sleep(0)  # let run() start; it must wait, not fail
            assert h.task is not None and not h.task.done()
            with pytest.raises(ModelRejected) as info:
                await h.comp.install(bundle(tmp_path, "ok", SHIPPED / "model.tflite"), "vibration-anomaly",
                                     "2.0.0", "j")
            return h.comp.section(), info.value

    section, exc = asyncio.run(main())
    assert section == {"enabled": False}
    assert "disabled" in exc.reason
    assert not (tmp_path / "models").exists()


def test_a_live_config_change_rebuilds_the_pipeline_and_seq_counts_on(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async def main() -> Harness:
        async with Harness(cfg, ScriptedSource(windows_hz=200.0)) as h:
            await h.until(lambda: len(h.results) >= 20, what="the pipeline serving")
            runner = h.comp.runner
            h.live.replace(dataclasses.replace(
                cfg, inference=dataclasses.replace(cfg.inference, num_threads=2, threshold=0.9)))
            await h.until(lambda: h.comp.runner not in (None, runner), what="a new runner")
            n = len(h.results)
            await h.until(lambda: len(h.results) >= n + 20, what="serving after the rebuild")
            h.source.stop()
            await h.finished()
            return h

    h = asyncio.run(main())
    seqs = [r.seq for r in h.results]
    assert seqs == list(range(len(seqs))) and len(seqs) == h.comp.windows
    assert h.comp.section()["count"] == len(seqs)  # counters add up across runners


def test_a_missing_delegate_is_reported_once_and_the_component_waits(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, delegate="libedgetpu-absent.so.1")

    async def main() -> Harness:
        async with Harness(cfg, ScriptedSource(windows_hz=200.0)) as h:
            await h.until(lambda: events(h.outbox, "error"), what="the error event")
            assert h.task is not None and not h.task.done()  # waiting for new settings, not crash-looping
            assert "inference.delegate" in h.comp.section()["problem"]
            h.live.replace(dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference,
                                                                                        delegate="")))
            await h.until(lambda: len(h.results) >= 10, what="serving once the delegate is unset")
            return h

    h = asyncio.run(main())
    assert len(events(h.outbox, "error")) == 1
    assert "problem" not in h.comp.section()
