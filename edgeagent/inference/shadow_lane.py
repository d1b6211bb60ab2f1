"""The shadow lane: a candidate interpreter fed the serving model's windows, at a lower priority.

It lives on the pipeline runner's own worker thread (the inference thread budget is not exceeded):
after each served window the runner offers the lane that window and the serving result; the lane
keeps at most `queue_max` of them and runs the candidate on one only when the runner has no serving
window or control message waiting. Under load the serving queue never empties, the lane's queue
fills and the oldest offers are shed (counted). CPU pressure shows as serving windows that come
back late (submit -> result well above its running typical value): such a window's offer is shed
and so are the next COOLDOWN_OFFERS, so the candidate does not compete for a contended CPU. While the
device saves power (a rule's power_save slows inference down) the lane is `paused`: every offer is
shed. The serving path waits at most for one candidate invoke that had started while idle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeagent.core.shadow_spec import ShadowSpec
from edgeagent.inference.preprocess import ModelMeta
from edgeagent.inference.runner import Data, ModelSlot, Result
from edgeagent.inference.shadow import Answer, RejectCandidate, ShadowTally, Verdict

QUEUE_MAX = 8
LATE_FACTOR = 3.0  # a served window this many times slower than typical signals CPU pressure ...
LATE_MIN_S = 0.002  # ... and at least this slow (a few hundred microseconds are only noise)
COOLDOWN_OFFERS = 32  # offers shed after a late window
TYPICAL_WEIGHT = 0.05  # EWMA weight of the typical submit -> result time


def answer(meta: ModelMeta, output: Any, infer_s: float, ok: bool) -> Answer:
    """A model's answer read with its own meta (its head decides what a class and a score are)."""
    if not ok or output is None:
        return Answer(None, float("nan"), infer_s, ok=False)
    out = np.asarray(output, dtype=np.float64).reshape(-1)
    label = int(np.argmax(out)) if meta.output == "softmax" else None
    return Answer(label, meta.score(out), infer_s)


class ShadowLane:
    """One candidate beside one serving model; `offer` and `run_one` are called on the worker."""

    def __init__(self, slot: ModelSlot, serving: ModelMeta, candidate: ModelMeta, spec: ShadowSpec, *,
                 queue_max: int = QUEUE_MAX, on_done: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.slot = slot
        self.serving_meta = serving
        self.candidate_meta = candidate
        self.tally = ShadowTally(spec, serving.output)
        self._queue: deque[tuple[Data, Result]] = deque()
        self._queue_max = queue_max
        self._lock = threading.Lock()  # the tally is read from the event loop (figures)
        self._on_done = on_done
        self._clock = clock
        self.done = threading.Event()
        self.paused = False  # set from the event loop: shed every offer (the device is under pressure)
        self._typical_s: float | None = None  # EWMA of served windows' submit -> result time
        self._cooldown = 0

    @property
    def tag(self) -> str:
        return self.slot.tag

    def pending(self) -> bool:
        return bool(self._queue) and not self.done.is_set()

    def offer(self, data: Data, served: Result) -> None:
        """A window the serving model just answered; the oldest waiting one is shed when full."""
        if self.done.is_set() or not served.ok or served.tag == self.slot.tag:
            return
        late = self._late(served.total_s)
        with self._lock:
            if late:
                self._cooldown = COOLDOWN_OFFERS
            if self.paused or late or self._cooldown > 0:
                self._cooldown = max(0, self._cooldown - (0 if late else 1))
                self.tally.shed_one()
                return
            if len(self._queue) >= self._queue_max:
                self._queue.popleft()
                self.tally.shed_one()
            self._queue.append((data, served))

    def _late(self, total_s: float) -> bool:
        """Was this serving window late (CPU pressure or a backlog)? Updates the typical time; a late
        window moves it by at most 4x the typical, so one stall does not hide the next."""
        typical = self._typical_s
        if typical is None:
            self._typical_s = total_s
            return False
        self._typical_s = typical + TYPICAL_WEIGHT * (min(total_s, 4.0 * typical) - typical)
        return total_s > max(LATE_MIN_S, LATE_FACTOR * typical)

    def run_one(self) -> None:
        """Run the candidate on the oldest waiting window and count the pair."""
        with self._lock:
            if not self._queue or self.done.is_set():
                return
            data, served = self._queue.popleft()
        output: Any = None
        infer_s = 0.0
        try:
            x = self.slot.prepare(data) if self.slot.prepare is not None else data
            t0 = self._clock()
            outs = self.slot.model.infer(x)
            infer_s = self._clock() - t0
            output = outs[0].reshape(-1)
            ok = bool(np.isfinite(output).all())
        except Exception:  # a failing candidate is a disagreement, never a crash of the worker
            ok = False
        serving = answer(self.serving_meta, served.output, served.infer_s, served.ok)
        candidate = answer(self.candidate_meta, output, infer_s, ok)
        with self._lock:
            finished = self.tally.observe(serving, candidate)
            if finished:
                self._queue.clear()
                self.done.set()
        if finished and self._on_done is not None:
            self._on_done()

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"candidate": self.slot.tag, **self.tally.figures()}

    def verdict(self) -> Verdict | None:
        with self._lock:
            return self.tally.verdict()

    def timed_out(self, elapsed_s: float) -> RejectCandidate:
        with self._lock:
            return self.tally.timed_out(elapsed_s)
