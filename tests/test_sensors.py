"""Sensor sources and windowing: exact windows, CSV replay, MQTT on a real Mosquitto, simulator faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.core.config import CsvSensorConfig, MqttSensorConfig, SensorsConfig, SimulatedSensorConfig
from edgeagent.core.errors import SensorError, SensorPayloadError
from edgeagent.sensors.sources import (
    CsvSource,
    MqttSource,
    SimulatedSource,
    VibrationSimulator,
    Windower,
    make_source,
    parse_payload,
)
from tests.broker import Broker
from tests.util import async_wait_until

# --------------------------------------------------------------------------- windowing


def reference_windows(data: np.ndarray, size: int, stride: int) -> list[np.ndarray]:
    return [data[s:s + size] for s in range(0, len(data) - size + 1, stride)]


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 40), stride=st.integers(1, 50), n=st.integers(0, 300),
       cuts=st.lists(st.integers(0, 300), max_size=12))
def test_windower_matches_reference_for_any_chunking(size: int, stride: int, n: int, cuts: list[int]) -> None:
    rate = 100.0
    data = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    bounds = sorted({0, n, *(c for c in cuts if c <= n)})
    w = Windower(size, stride, 2, rate_hz=rate)
    got = []
    for a, b in itertools.pairwise(bounds):
        got += w.push((b - 1) / rate, data[a:b])  # ts of the chunk's last sample
    expected = reference_windows(data, size, stride)
    assert [x.seq for x in got] == list(range(len(expected)))
    assert len(got) == len(expected)
    for k, (win, ref) in enumerate(zip(got, expected, strict=True)):
        assert win.data.dtype == np.float32 and win.data.shape == (size, 2)
        np.testing.assert_array_equal(win.data, ref)
        assert win.ts == pytest.approx((k * stride + size - 1) / rate)
    assert w.samples_seen == n


def test_windower_overlap_and_stride_are_exact() -> None:
    w = Windower(4, 2, 1)
    wins = w.push(9.0, np.arange(10, dtype=np.float32).reshape(-1, 1))
    assert [list(x.data[:, 0]) for x in wins] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert {x.ts for x in wins} == {9.0}  # no rate: the chunk's timestamp
    # windows own their data: later pushes do not change them
    w.push(10.0, np.full((5, 1), -1, np.float32))
    assert list(wins[-1].data[:, 0]) == [6, 7, 8, 9]


def test_windower_stride_larger_than_size_skips_samples() -> None:
    w = Windower(2, 5, 1)
    wins = w.push(0.0, np.arange(12, dtype=np.float32).reshape(-1, 1))
    assert [list(x.data[:, 0]) for x in wins] == [[0, 1], [5, 6], [10, 11]]


def test_windower_rejects_wrong_shape_and_keeps_state() -> None:
    w = Windower(3, 1, 2)
    assert w.push(0.0, np.zeros((2, 2), np.float32)) == []
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        w.push(1.0, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError):
        w.push(1.0, np.zeros(4, np.float32))
    wins = w.push(2.0, np.ones((1, 2), np.float32))
    assert [x.seq for x in wins] == [0] and w.samples_seen == 3
    with pytest.raises(ValueError):
        Windower(0, 1, 1)


# --------------------------------------------------------------------------- simulator


def spectrum(x: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    x = x - x.mean(axis=0)
    amp = np.abs(np.fft.rfft(x * np.hanning(len(x))[:, None], axis=0)) * 2 / len(x)
    return np.fft.rfftfreq(len(x), 1 / rate), amp


def band(freqs: np.ndarray, amp: np.ndarray, lo: float, hi: float) -> float:
    sel = (freqs >= lo) & (freqs <= hi)
    return float(np.sqrt(np.mean(amp[sel] ** 2)))


def run(fault: str | None, severity: float = 0.5, seed: int = 11, n: int = 4096) -> tuple[VibrationSimulator,
                                                                                          np.ndarray]:
    sim = VibrationSimulator(1600.0, seed)
    if fault:
        sim.set_fault(fault, severity)
    return sim, sim.generate(n)


def test_simulator_is_seeded_and_chunking_does_not_change_the_signal() -> None:
    a = VibrationSimulator(1600.0, 5).generate(640)
    sim = VibrationSimulator(1600.0, 5)
    b = np.concatenate([sim.generate(32) for _ in range(20)])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, VibrationSimulator(1600.0, 6).generate(640))
    assert a.dtype == np.float32 and a.shape == (640, 3)
    assert abs(float(a[:, 2].mean()) - 1.0) < 0.05  # gravity on z


def test_imbalance_raises_the_1x_harmonic_on_radial_axes() -> None:
    sim, healthy = run(None)
    _, faulty = run("imbalance")
    f, ah = spectrum(healthy, 1600.0)
    _, af = spectrum(faulty, 1600.0)
    rot = sim.rotation_hz
    for axis in (0, 1):
        assert band(f, af[:, axis], rot - 2, rot + 2) > 4 * band(f, ah[:, axis], rot - 2, rot + 2)
    # and only there: the bearing band stays where it was
    assert band(f, af[:, 0], 300, 600) < 1.5 * band(f, ah[:, 0], 300, 600)


def test_bearing_fault_adds_high_frequency_energy() -> None:
    _, healthy = run(None)
    _, faulty = run("bearing")
    f, ah = spectrum(healthy, 1600.0)
    _, af = spectrum(faulty, 1600.0)
    for axis in range(3):
        assert band(f, af[:, axis], 350, 550) > 3 * band(f, ah[:, axis], 350, 550)
    assert band(f, af[:, 0], 0, 100) < 1.5 * band(f, ah[:, 0], 0, 100)


def test_spikes_are_large_sparse_impulses() -> None:
    _, healthy = run(None)
    _, faulty = run("spikes", severity=1.0)
    dev_h = np.abs(healthy - healthy.mean(axis=0)).max(axis=1)
    dev_f = np.abs(faulty - faulty.mean(axis=0)).max(axis=1)
    assert dev_h.max() < 0.5
    hits = int((dev_f > 1.5).sum())
    expected = VibrationSimulator.SPIKE_RATE_HZ * len(faulty) / 1600.0
    assert 0.5 * expected < hits < 1.5 * expected


def test_faults_switch_at_run_time_and_bad_faults_change_nothing() -> None:
    sim = VibrationSimulator(1600.0, 3)
    sim.set_fault("bearing", 0.8)
    with pytest.raises(ValueError, match="unknown fault"):
        sim.set_fault("misalignment", 0.5)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        sim.set_fault("bearing", 1.5)
    with pytest.raises(ValueError):
        sim.set_fault("bearing", math.nan)
    assert sim.faults == {"bearing": 0.8}
    sim.set_fault("bearing", 0.0)
    assert sim.faults == {}


def test_temperature_drifts_slowly_and_runs_hotter_under_fault() -> None:
    healthy = VibrationSimulator(1600.0, 1, base_temp_c=40.0)
    faulty = VibrationSimulator(1600.0, 1, base_temp_c=40.0)
    faulty.set_fault("imbalance", 1.0)
    first = faulty.temperature_c
    for _ in range(120):  # two simulated minutes, one second at a time
        healthy.generate(1600)
        faulty.generate(1600)
    assert abs(healthy.temperature_c - 40.0) < 3.0
    assert faulty.temperature_c > healthy.temperature_c + 10.0
    assert faulty.temperature_c < first + 21.0  # a first-order lag, no jumps past the target


async def take(stream: AsyncIterator[tuple[float, np.ndarray]], n_samples: int,
               timeout_s: float = 20.0) -> list[tuple[float, np.ndarray]]:
    chunks: list[tuple[float, np.ndarray]] = []

    async def collect() -> None:
        got = 0
        async for ts, samples in stream:
            chunks.append((ts, samples))
            got += len(samples)
            if got >= n_samples:
                return

    await asyncio.wait_for(collect(), timeout_s)
    return chunks


def test_simulated_source_streams_paced_chunks_and_takes_faults_live() -> None:
    async def main() -> None:
        src = SimulatedSource(1600.0, seed=2, realtime=False)
        stream = src.stream()
        first = await take(stream, 320)
        assert all(c.shape == (32, 3) and c.dtype == np.float32 for _, c in first)
        ts = [t for t, _ in first]
        assert np.allclose(np.diff(ts), 32 / 1600.0)
        src.set_fault("spikes", 1.0)
        later = await take(stream, 3200)
        data = np.concatenate([c for _, c in later])
        assert np.abs(data - data.mean(axis=0)).max() > 1.5
        await stream.aclose()

        paced = SimulatedSource(1600.0, seed=2)  # realtime: 0.25 s of data cannot arrive much sooner
        t0 = time.monotonic()
        await take(paced.stream(), 400)
        assert time.monotonic() - t0 >= 0.2

    asyncio.run(main())


# --------------------------------------------------------------------------- CSV replay


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_replay_stops_at_end_with_the_file_values(tmp_path: Path) -> None:
    rows = ["ts,ax,ay,az"] + [f"{1000 + i / 100:.2f},{i},{-i},{i * 0.5}" for i in range(100)]
    src = CsvSource(write_csv(tmp_path / "a.csv", rows), realtime=False)
    assert (src.channels, src.rate_hz, src.bad_rows) == (3, pytest.approx(100.0), [])

    async def main() -> list[tuple[float, np.ndarray]]:
        return [c async for c in src.stream()]

    chunks = asyncio.run(main())
    data = np.concatenate([c for _, c in chunks])
    assert data.shape == (100, 3)
    np.testing.assert_array_equal(data[:, 0], np.arange(100))
    ts = np.array([t for t, _ in chunks])
    assert np.all(np.diff(ts) > 0) and ts[-1] - ts[0] == pytest.approx(0.99 - 0.01, abs=1e-6)


def test_csv_replay_loops_with_increasing_time(tmp_path: Path) -> None:
    rows = [f"{i},{i * 10}" for i in range(10)]  # no header: first column is the time, 1 Hz
    src = CsvSource(write_csv(tmp_path / "loop.csv", rows), loop=True, realtime=False, chunk_s=3.0)
    assert src.channels == 1

    async def main() -> list[tuple[float, np.ndarray]]:
        return await take(src.stream(), 25)

    chunks = asyncio.run(main())
    data = np.concatenate([c for _, c in chunks])[:25, 0]
    np.testing.assert_array_equal(data, [(i % 10) * 10 for i in range(25)])
    ts = np.array([t for t, _ in chunks])
    assert np.all(np.diff(ts) > 0)


def test_csv_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    rows = ["ts,ax,ay,az",
            "0.00,1,2,3",
            "0.01,1,2",  # line 3: short
            "0.02,1,x,3",  # line 4: not a number
            "",
            "0.03,1,nan,3",  # line 6: not finite
            "0.00,4,5,6",  # line 7: time did not move forward
            "# a comment",
            "0.04,7,8,9"]
    with caplog.at_level(logging.WARNING, logger="edgeagent.sensors.sources"):
        src = CsvSource(write_csv(tmp_path / "bad.csv", rows), realtime=False)
    assert [b.line for b in src.bad_rows] == [3, 4, 6, 7]
    assert "expected 4 columns" in src.bad_rows[0].reason and "'x'" in src.bad_rows[1].reason
    assert "line 3" in caplog.text and "line 7" in caplog.text

    async def main() -> np.ndarray:
        return np.concatenate([c async for _, c in src.stream()])

    np.testing.assert_array_equal(asyncio.run(main()), [[1, 2, 3], [7, 8, 9]])


def test_csv_values_only_need_a_rate(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "v.csv", ["ax,ay", "1,2", "3,4", "5,6"])
    with pytest.raises(SensorError, match="rate_hz"):
        CsvSource(path)
    src = CsvSource(path, rate_hz=50.0, realtime=False)
    assert (src.channels, src.rate_hz) == (2, 50.0)
    plain = CsvSource(write_csv(tmp_path / "p.csv", ["1,2", "3,4"]), rate_hz=10.0, timestamps=False)
    assert plain.channels == 2


@pytest.mark.parametrize("rows, match", [
    (["ts,a", "x,y"], "no valid data rows"),
    ([], "no valid data rows"),
    (["0,1"], "two timestamped rows"),
])
def test_csv_unusable_files_raise_clear_errors(tmp_path: Path, rows: list[str], match: str) -> None:
    with pytest.raises(SensorError, match=match) as err:
        CsvSource(write_csv(tmp_path / "u.csv", rows))
    assert "u.csv" in str(err.value)


def test_csv_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match=r"nope\.csv"):
        CsvSource(tmp_path / "nope.csv")


def test_csv_realtime_replay_follows_the_timestamps(tmp_path: Path) -> None:
    rows = [f"{i / 100:.2f},{i}" for i in range(30)]  # 0.29 s of data at 100 Hz
    src = CsvSource(write_csv(tmp_path / "rt.csv", rows))

    async def main() -> float:
        t0 = time.monotonic()
        [c async for c in src.stream()]
        return time.monotonic() - t0

    assert asyncio.run(main()) >= 0.25


# --------------------------------------------------------------------------- MQTT payloads


@pytest.mark.parametrize("payload, channels, expected, ts", [
    (b"1.5", 1, [[1.5]], 99.0),
    (b"[0.1, 0.2, 0.3]", 3, [[0.1, 0.2, 0.3]], 99.0),
    (b"[1, 2, 3, 4]", 1, [[1], [2], [3], [4]], 99.0),
    (b"[[1, 2], [3, 4]]", 2, [[1, 2], [3, 4]], 99.0),
    (b'{"ts": 12.5, "values": [[1, 2, 3]]}', 3, [[1, 2, 3]], 12.5),
    (b'{"values": 7}', 1, [[7]], 99.0),
    ('{"ts": 1, "values": [1, 2]}', 2, [[1, 2]], 1.0),
])
def test_payload_formats(payload: bytes, channels: int, expected: list[list[float]], ts: float) -> None:
    got_ts, samples = parse_payload(payload, channels, now=99.0)
    assert got_ts == ts and samples.dtype == np.float32
    np.testing.assert_allclose(samples, expected, rtol=1e-6)


@pytest.mark.parametrize("payload, channels", [
    (b"not json", 3), (b"\xff\xfe", 3), (b"1.5", 3), (b"[1, 2]", 3), (b"[[1, 2, 3], [1, 2]]", 3),
    (b'["1", "2", "3"]', 3), (b"[true, 1, 2]", 3), (b"NaN", 1), (b"[1e999, 1, 2]", 3), (b"[]", 1),
    (b'{"ts": 1}', 1), (b'{"ts": "now", "values": 1}', 1), (b"null", 1), (b'{"values": [[]]}', 1),
])
def test_malformed_payloads_are_rejected(payload: bytes, channels: int) -> None:
    with pytest.raises(SensorPayloadError):
        parse_payload(payload, channels, now=0.0)


# --------------------------------------------------------------------------- MQTT source (real broker)


@pytest.mark.integration
def test_mqtt_source_receives_counts_malformed_and_survives_a_broker_restart(broker: Broker) -> None:
    import aiomqtt

    topic = "test/sensors/vibration"
    src = MqttSource(host=broker.host, port=broker.port, topic=topic, channels=3, rate_hz=100.0)
    got: list[tuple[float, np.ndarray]] = []

    async def consume() -> None:
        async for item in src.stream():
            got.append(item)

    async def publish(*payloads: str) -> None:
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            for p in payloads:
                await pub.publish(topic, p, qos=1)

    async def main() -> None:
        task = asyncio.create_task(consume(), name="mqtt-source")
        try:
            await asyncio.wait_for(src.subscribed.wait(), 10)
            await publish("[1, 2, 3]", "garbage", '{"ts": 5.0, "values": [[4, 5, 6], [7, 8, 9]]}', "[1, 2]")
            await async_wait_until(lambda: len(got) == 2 and src.malformed == 2, 10, message="2 good, 2 bad")
            assert got[1][0] == 5.0
            samples = np.concatenate([s for _, s in got])
            np.testing.assert_array_equal(samples, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
            assert src.received == 2

            await asyncio.to_thread(broker.restart)
            # the reconnect can be quicker than any poll of `subscribed`: count connections instead
            await async_wait_until(lambda: src.connects >= 2 and src.subscribed.is_set(), 30,
                                   message="reconnected and subscribed again")
            await publish("[0, 0, 1]")
            await async_wait_until(lambda: len(got) == 3, 10, message="message after reconnect")
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


# --------------------------------------------------------------------------- config


def test_make_source_builds_each_kind(tmp_path: Path) -> None:
    sim = make_source(SensorsConfig(simulated=SimulatedSensorConfig(fault="bearing", fault_severity=0.4)))
    assert isinstance(sim, SimulatedSource) and sim.sim.faults == {"bearing": 0.4}
    assert sim.sim.rotation_hz == pytest.approx(30.0)

    path = write_csv(tmp_path / "c.csv", ["ts,a,b,c", "0,1,2,3", "0.5,1,2,3"])
    csv = make_source(SensorsConfig(source="csv", csv=CsvSensorConfig(path=str(path))))
    assert isinstance(csv, CsvSource) and csv.rate_hz == 2.0 and csv.loop
    with pytest.raises(SensorError, match="3 value columns"):
        make_source(SensorsConfig(source="csv", channels=2, csv=CsvSensorConfig(path=str(path))))
    with pytest.raises(SensorError, match="path is empty"):
        make_source(SensorsConfig(source="csv"))

    mq = make_source(SensorsConfig(source="mqtt", channels=1, mqtt=MqttSensorConfig(topic="a/b")))
    assert isinstance(mq, MqttSource) and (mq.topic, mq.channels) == ("a/b", 1)
    with pytest.raises(SensorError, match="3 channels"):
        make_source(SensorsConfig(channels=2))


def test_payload_json_roundtrip_of_simulated_chunk() -> None:
    """What a publisher process would send for one simulated chunk parses back to the same samples."""
    chunk = VibrationSimulator(1600.0, 0).generate(32)
    payload = json.dumps({"ts": 1.0, "values": chunk.tolist()})
    _, samples = parse_payload(payload, 3, now=0.0)
    np.testing.assert_array_equal(samples, chunk)


def test_scheduled_fault_switches_on_and_off_by_signal_time() -> None:
    """sensors.simulated.fault_start_s/fault_duration_s: the demo's anomaly that comes and goes."""
    from edgeagent.core.config import build
    from edgeagent.sensors.sources import SimulatedSource, make_source

    cfg = build({"sensors": {"simulated": {"fault": "imbalance", "fault_severity": 1.0,
                                           "fault_start_s": 0.2, "fault_duration_s": 0.2}}}, env={})
    src = make_source(cfg.sensors)
    assert isinstance(src, SimulatedSource)
    src.realtime = False

    async def collect() -> list[float]:
        out: list[float] = []
        async for _ts, _samples in src.stream():
            out.append(src.sim.faults.get("imbalance", 0.0))  # severity the chunk was generated with
            if len(out) >= 30:  # 30 chunks of 20 ms = 0.6 s of signal
                return out
        return out

    severity = asyncio.run(collect())
    assert severity[:10] == [0.0] * 10  # t < 0.2 s
    assert severity[10:20] == [1.0] * 10  # 0.2 s <= t < 0.4 s
    assert severity[20:] == [0.0] * 10


@pytest.mark.parametrize("payload", [
    b"[" * 100_000,  # nested too deep for the JSON parser
    b'{"ts": 1' + b"0" * 400 + b', "values": [1, 2, 3]}',  # ts overflows a float
    b"[1" + b"0" * 400 + b", 2, 3]",  # a value overflows a float
    b"[1" + b"0" * 5000 + b", 2, 3]",  # beyond Python's integer-string limit
])
def test_hostile_payloads_are_rejected_not_raised(payload: bytes) -> None:
    """One bad message from a local publisher must not crash the inference pipeline."""
    with pytest.raises(SensorPayloadError):
        parse_payload(payload, 3, 0.0)
