"""The runner: one worker thread, bounded drop-oldest queue, swaps between two windows, stats."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeagent.inference.preprocess import load_model_meta
from edgeagent.inference.runner import ModelSlot, Result, Runner
from edgeagent.inference.runtime import load_interpreter
from tests.inference_helpers import FIXTURES, RUNTIMES, SHIPPED

pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime installed")
FEATS = 102


class Sink:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, r: Result) -> None:
        with self.lock:
            self.results.append(r)
            self.threads.add(threading.current_thread().name)


def slot(path: str = "model.tflite", tag: str = "a",
         runtime: str = RUNTIMES[0] if RUNTIMES else "") -> ModelSlot:
    base = FIXTURES if path.endswith("_large.tflite") else SHIPPED
    return ModelSlot(load_interpreter(base / path, runtime), tag)


def feats(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(-2.0, 0.5, size=FEATS).astype(np.float32)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_results_come_back_in_order_on_the_worker_thread(runtime: str) -> None:
    sink = Sink()
    r = Runner(slot(runtime=runtime), sink, queue_max=1000)
    r.start()
    for i in range(200):
        r.submit(i, float(i), feats(i))
    assert r.wait_idle(30.0)
    assert r.stop()
    assert [x.seq for x in sink.results] == list(range(200))
    assert sink.threads == {"inference-runner"}
    assert all(x.ok and x.output is not None and x.output.shape == (4,) for x in sink.results)
    st = r.stats()
    assert st.count == 200 and st.dropped == 0 and st.errors == 0
    assert st.p50_ms is not None and st.p99_ms is not None and 0 < st.p50_ms <= st.p95_ms <= st.p99_ms


def test_a_full_queue_drops_the_oldest_window_and_counts_it() -> None:
    sink = Sink()
    r = Runner(slot(), sink, queue_max=8)  # not started: everything queues
    kept = [r.submit(i, 0.0, feats(i)) for i in range(20)]
    assert kept == [True] * 8 + [False] * 12
    assert r.stats().dropped == 12 and r.stats().queued == 8
    r.start()
    assert r.wait_idle(30.0)
    r.stop()
    assert [x.seq for x in sink.results] == list(range(12, 20))  # the newest 8 survive


def test_a_swap_takes_effect_before_the_next_window_and_loses_none() -> None:
    sink = Sink()
    r = Runner(slot(tag="old"), sink, queue_max=100)
    for i in range(5):
        r.submit(i, 0.0, feats(i))
    fut = r.swap(slot("model_float.tflite", "new"))  # windows still queued go to the new model
    for i in range(5, 10):
        r.submit(i, 0.0, feats(i))
    old = fut.result(5.0)
    assert old.tag == "old"
    r.start()
    assert r.wait_idle(30.0)
    fut2 = r.swap(old)
    assert fut2.result(5.0).tag == "new"
    r.submit(10, 0.0, feats(10))
    assert r.wait_idle(30.0)
    r.stop()
    assert [(x.seq, x.tag) for x in sink.results] == [(i, "new") for i in range(10)] + [(10, "old")]
    assert r.stats().swaps == 2


def test_a_failing_model_reports_errors_and_the_worker_goes_on() -> None:
    sink = Sink()
    r = Runner(slot("raise_when_large.tflite"), sink, queue_max=100)
    r.start()
    r.submit(0, 0.0, feats(0))
    r.submit(1, 0.0, np.full(FEATS, 5.0, np.float32))  # max(x) >= 1: GATHER out of bounds
    r.submit(2, 0.0, feats(2))
    assert r.wait_idle(30.0)
    r.stop()
    assert [x.ok for x in sink.results] == [True, False, True]
    assert sink.results[1].error is not None and "gather index out of bounds" in sink.results[1].error
    assert r.stats().errors == 1


def test_nan_outputs_are_results_that_are_not_ok() -> None:
    sink = Sink()
    r = Runner(slot("nan_when_large.tflite"), sink)
    r.start()
    r.submit(0, 0.0, np.full(FEATS, 5.0, np.float32))
    assert r.wait_idle(30.0)
    r.stop()
    (res,) = sink.results
    assert res.error is None and not res.ok and res.output is not None and np.isnan(res.output).all()


def test_preprocessing_runs_on_the_worker_with_the_serving_models_preprocessor() -> None:
    meta = load_model_meta(SHIPPED / "model.toml")
    s = slot()
    s.prepare = meta.preprocessor()
    sink = Sink()
    r = Runner(s, sink)
    r.start()
    window = np.random.default_rng(3).normal(0, 0.02, size=(256, 3)).astype(np.float32)
    r.submit(0, 0.0, window)
    assert r.wait_idle(30.0)
    r.stop()
    direct = s.model.infer(meta.preprocessor()(window))[0].reshape(-1)
    np.testing.assert_array_equal(sink.results[0].output, direct)


def test_cache_serves_exact_repeats_and_is_cleared_by_a_swap() -> None:
    sink = Sink()
    r = Runner(slot(), sink, cache_size=2)
    a, b, c = feats(1), feats(2), feats(3)
    for i, x in enumerate([a, a, b, a, c, a]):  # LRU of 2: c evicts b, a stays
        r.submit(i, 0.0, x)
    r.start()
    assert r.wait_idle(30.0)
    assert [x.cached for x in sink.results] == [False, True, False, True, False, True]
    r.swap(slot("model_float.tflite", "float")).result(5.0)
    r.submit(6, 0.0, a)
    assert r.wait_idle(30.0)
    r.stop()
    assert not sink.results[-1].cached and sink.results[-1].tag == "float"
    st = r.stats()
    assert (st.cache_hits, st.cache_misses) == (3, 4) and st.cache_hit_rate == pytest.approx(3 / 7)


def test_stop_serves_what_is_queued_unless_told_not_to() -> None:
    sink = Sink()
    r = Runner(slot(), sink)
    for i in range(10):
        r.submit(i, 0.0, feats(i))
    r.start()
    assert r.stop(drain=True, timeout_s=10.0)
    assert len(sink.results) == 10
    assert r.swap(slot()).exception(1.0) is not None  # a stopped runner takes no swaps
