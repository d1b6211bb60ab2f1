"""TelemetryComponent: what a sample holds, its cadence and the last sample at stop (real spool)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from edgeagent.telemetry import TelemetryComponent, build_sample
from tests import rig
from tests.rig import wiring
from tests.transport_util import make_config
from tests.util import async_wait_until


def test_build_sample_takes_metrics_and_known_sections_only() -> None:
    s = build_sample({"cpu_percent": 3.0}, {"inference": {"count": 1}, "spool": {"backlog": 0},
                                            "updates": {"x": 1}}, 12.5)
    assert s == {"ts": 12.5, "metrics": {"cpu_percent": 3.0}, "inference": {"count": 1},
                 "spool": {"backlog": 0}}
    assert "inference" not in build_sample({}, {}, 1.0)  # absent sections are omitted, never faked


def test_samples_flow_into_the_spool_and_the_last_one_is_written_at_exit(tmp_path: Path) -> None:
    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", None, telemetry={"interval_s": 0.02}))
        w.metrics.publish({"cpu_percent": 7.0})
        async with rig.transport(w) as transport:
            spool = transport.spool
            assert spool is not None
            tel = rig.telemetry(w, transport)
            w.sections.bind({"telemetry": tel.section, "spool": transport.spool_section})
            async with tel:
                task = asyncio.create_task(tel.run())
                await async_wait_until(lambda: spool.count >= 10, 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert w.sections.snapshot()["telemetry"]["samples"] == tel.samples
                before = tel.samples
            assert tel.samples == before + 1  # exit flushed one more
            assert transport.outbox is not None
            assert await asyncio.to_thread(transport.outbox.flush)  # the spool writer thread has it
            rows = await asyncio.to_thread(spool.fetch, 0, None, 1000)
            samples = [json.loads(r.payload) for r in rows]
            assert [s["seq"] for s in samples] == list(range(1, tel.samples + 1))
            assert all(s["metrics"] == {"cpu_percent": 7.0} for s in samples)
            assert samples[-1]["seq"] == tel.last_seq
            assert "telemetry" not in samples[-1]  # its own section is not part of a sample

    asyncio.run(main())


def test_power_save_factor_slows_sampling(tmp_path: Path) -> None:
    async def main() -> None:
        w = wiring(make_config(tmp_path / "state", None, telemetry={"interval_s": 0.05}))
        async with rig.transport(w) as transport:
            tel = rig.telemetry(w, transport)
            assert tel.section()["interval_s"] == pytest.approx(0.05)
            w.live.slowdown["telemetry"] = 4.0
            w.live.notify_changed()
            assert tel.section()["interval_s"] == pytest.approx(0.2)

    asyncio.run(main())


def test_without_a_spool_samples_are_dropped_with_one_warning(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    w = wiring(make_config(tmp_path / "state", None))
    tel = TelemetryComponent(w.live, w.metrics, lambda: None, w.sections)
    with caplog.at_level(logging.WARNING, logger="edgeagent.telemetry"):
        assert tel.sample_now() is None
    assert any("no spool-backed outbox" in r.getMessage() for r in caplog.records)
