"""One worker thread owns the interpreter; windows reach it through a bounded, drop-oldest queue.

Interpreters are not thread-safe and `invoke` blocks, so the event loop only ever enqueues. A swap is
a control message under the same lock, taken before the next window: every window is served by
exactly one model, none is lost or served twice, and the new model sees the windows queued behind
it. Preprocessing runs on the worker too, with the *serving* model's preprocessor, so a model that
brings different features cannot be fed features made for its predecessor.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeagent.inference.runtime import LoadedModel

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Data = Array | Sequence[Array]  # one window, or one array per model input (bench-model)
STATS_WINDOW = 1024  # latencies kept for the percentiles (a sliding window, not since start)
RATE_WINDOW_S = 10.0


@dataclass(slots=True)
class ModelSlot:
    """What serves windows: an allocated model, its tag ("name@version"), its preprocessing and what
    its head makes of (input, output) on the worker (an autoencoder: the reconstruction error)."""

    model: LoadedModel
    tag: str
    prepare: Callable[[Any], Array] | None = None
    finish: Callable[[Any, Array], Array] | None = None  # (model input, first output) -> output


@dataclass(frozen=True, slots=True)
class Result:
    seq: int
    ts: float
    tag: str  # the model that served this window
    output: Array | None  # first output, float32, dequantised, flat (after the slot's finish); None on error
    error: str | None = None
    infer_s: float = 0.0  # set inputs (quantise) + invoke + read outputs (dequantise)
    total_s: float = 0.0  # queue wait + preprocessing + infer
    cached: bool = False

    @property
    def ok(self) -> bool:
        """Served without error and every output value finite."""
        return self.error is None and self.output is not None and bool(np.isfinite(self.output).all())


@dataclass(slots=True)
class _Item:
    seq: int
    ts: float
    data: Data
    t_submit: float


@dataclass(slots=True)
class _Control:
    kind: str  # "swap" | "stop"
    slot: ModelSlot | None = None
    future: concurrent.futures.Future[ModelSlot] | None = None


class Lane(Protocol):
    """Lower-priority work on the worker (shadow_lane.ShadowLane): offered every served window, run
    only while no serving window or control message waits."""

    def offer(self, data: Data, served: Result) -> None: ...

    def pending(self) -> bool: ...

    def run_one(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RunnerStats:
    model: str
    count: int
    errors: int
    dropped: int
    queued: int
    rate_hz: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    e2e_p95_ms: float | None
    cache_hits: int
    cache_misses: int
    swaps: int
    swap_pause_max_ms: float | None

    @property
    def cache_hit_rate(self) -> float | None:
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else None


@dataclass
class _Stats:
    count: int = 0
    errors: int = 0
    dropped: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    swaps: int = 0
    infer: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    total: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    done: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))
    swap_pauses: deque[float] = field(default_factory=lambda: deque(maxlen=64))


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000.0, 3) if values else None


class Runner:
    """`submit` from the event loop (never blocks); `on_result` is called on the worker thread."""

    def __init__(self, slot: ModelSlot, on_result: Callable[[Result], None], *, queue_max: int = 64,
                 cache_size: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self._slot = slot
        self._on_result = on_result
        self._queue_max = queue_max
        self._items: deque[_Item] = deque()
        self._control: deque[_Control] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._cache: OrderedDict[bytes, Array] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lane: Lane | None = None

    @property
    def slot(self) -> ModelSlot:
        return self._slot

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="inference-runner", daemon=True)
            self._thread.start()

    def submit(self, seq: int, ts: float, data: Data) -> bool:
        """Queue one window; when the queue is full the oldest waiting window is dropped (counted).
        Returns False if this submit dropped one."""
        item = _Item(seq, ts, data, self._clock())
        with self._cond:
            dropped = len(self._items) >= self._queue_max
            if dropped:
                self._items.popleft()
            self._items.append(item)
            self._cond.notify()
        if dropped:
            with self._stats_lock:
                self._stats.dropped += 1
        return not dropped

    def swap(self, slot: ModelSlot) -> concurrent.futures.Future[ModelSlot]:
        """Serve `slot` from the next window on; the future gives back the slot it replaced."""
        fut: concurrent.futures.Future[ModelSlot] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                fut.set_exception(RuntimeError("runner is stopped"))
                return fut
            self._control.append(_Control("swap", slot, fut))
            self._cond.notify()
        if self._thread is None:  # not started: swap at once (tests, bench setup)
            self._drain_control()
        return fut

    def attach_lane(self, lane: Lane | None) -> None:
        """Feed `lane` (None: stop feeding) from the next served window on."""
        with self._cond:
            self._lane = lane
            self._cond.notify()

    @property
    def lane(self) -> Lane | None:
        return self._lane

    def stop(self, drain: bool = True, timeout_s: float = 5.0) -> bool:
        """Stop the worker, serving what is queued first if `drain`; True if it ended in time."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._items.clear()
            self._control.append(_Control("stop"))
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block (in a thread, or tests) until nothing is queued or running; True if idle in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._items or self._control or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def clear_cache(self) -> None:
        with self._cond:  # only the worker touches the cache: ask it to clear between two items
            self._control.append(_Control("clear-cache"))
            self._cond.notify()

    def stats(self) -> RunnerStats:
        with self._stats_lock:
            s = self._stats
            infer, total, done = list(s.infer), list(s.total), list(s.done)
            pauses = list(s.swap_pauses)
            counts = (s.count, s.errors, s.dropped, s.cache_hits, s.cache_misses, s.swaps)
        recent = [t for t in done if done[-1] - t <= RATE_WINDOW_S] if done else []
        span = (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
        # no result for a while means the rate is ~0, not the rate of the last burst
        idle = (self._clock() - done[-1]) if done else 0.0
        rate = (len(recent) - 1) / span if span > 0 and idle < RATE_WINDOW_S else 0.0
        with self._cond:
            queued = len(self._items)
        return RunnerStats(
            model=self._slot.tag, count=counts[0], errors=counts[1], dropped=counts[2], queued=queued,
            rate_hz=round(rate, 2), p50_ms=_pct(infer, 50), p95_ms=_pct(infer, 95), p99_ms=_pct(infer, 99),
            e2e_p95_ms=_pct(total, 95), cache_hits=counts[3], cache_misses=counts[4], swaps=counts[5],
            swap_pause_max_ms=round(max(pauses) * 1000.0, 3) if pauses else None)

    def swap_pauses(self) -> list[float]:
        """Seconds the worker spent on each of the last 64 swaps (bench)."""
        with self._stats_lock:
            return list(self._stats.swap_pauses)

    def latencies(self) -> tuple[list[float], list[float]]:
        """(infer_s, total_s) of the last STATS_WINDOW results (bench)."""
        with self._stats_lock:
            return list(self._stats.infer), list(self._stats.total)

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        while True:
            with self._cond:
                lane = self._lane
                while not self._control and not self._items and not (lane is not None and lane.pending()):
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                    lane = self._lane
                self._busy = True
                control = self._control.popleft() if self._control else None
                item = self._items.popleft() if control is None and self._items else None
            if control is None and item is None and lane is not None:
                lane.run_one()  # idle: only now the shadow candidate gets the thread
                continue
            if control is not None:
                if control.kind == "stop":
                    if self._drain_items():
                        break
                    continue
                self._apply(control)
            elif item is not None:
                self._serve(item)
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _drain_items(self) -> bool:
        """On stop: serve what is left (unless cleared), then report done."""
        while True:
            with self._cond:
                item = self._items.popleft() if self._items else None
            if item is None:
                return True
            self._serve(item)

    def _drain_control(self) -> None:
        with self._cond:
            pending = list(self._control)
            self._control.clear()
        for c in pending:
            if c.kind != "stop":
                self._apply(c)

    def _apply(self, control: _Control) -> None:
        t0 = self._clock()
        if control.kind == "clear-cache":
            self._cache.clear()
            return
        assert control.slot is not None and control.future is not None
        if not control.future.set_running_or_notify_cancel():
            return  # cancelled before it ran: keep serving the current model
        old, self._slot = self._slot, control.slot
        self._cache.clear()  # cached outputs belong to the old model
        pause = self._clock() - t0
        with self._stats_lock:
            self._stats.swaps += 1
            self._stats.swap_pauses.append(pause)
        control.future.set_result(old)

    def _serve(self, item: _Item) -> None:
        slot = self._slot
        output: Array | None = None
        error: str | None = None
        cached = False
        infer_s = 0.0
        key = b""
        try:
            if self._cache_size:
                key = _digest(item.data)
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    output, cached = hit, True
            if output is None:
                x = slot.prepare(item.data) if slot.prepare is not None else item.data
                t_inf = self._clock()
                outs = slot.model.infer(x)
                infer_s = self._clock() - t_inf
                output = outs[0].reshape(-1)
                if slot.finish is not None:
                    output = slot.finish(x, output)
                if self._cache_size:
                    self._cache[key] = output
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        except Exception as exc:  # a failing model must not kill the worker: report, count, go on
            error = f"{type(exc).__name__}: {exc}"
            output = None
        t_end = self._clock()
        result = Result(item.seq, item.ts, slot.tag, output, error, infer_s, t_end - item.t_submit, cached)
        with self._stats_lock:
            s = self._stats
            s.count += 1
            if error is not None:
                s.errors += 1
            if cached:
                s.cache_hits += 1
            else:
                if self._cache_size:
                    s.cache_misses += 1
                if error is None:
                    s.infer.append(infer_s)
            s.total.append(t_end - item.t_submit)
            s.done.append(t_end)
        try:
            self._on_result(result)
        except Exception:
            log.exception("inference result handler failed")
        lane = self._lane
        if lane is not None:
            lane.offer(item.data, result)


def _digest(data: Data) -> bytes:
    """Cache key: a hash of the input bytes (the shape is fixed per model, so bytes suffice)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (data,) if isinstance(data, np.ndarray) else data:
        h.update(a.tobytes())
    return h.digest()
