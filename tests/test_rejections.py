"""Refusals are aggregated: one event at once, one summary with the count per reason and window."""

from __future__ import annotations

from edgeagent.core.live import MemoryOutbox
from edgeagent.core.rejections import Rejections


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_flood_becomes_one_event_per_reason_and_window() -> None:
    out, clock = MemoryOutbox(), Clock()
    r = Rejections(out, clock, window_s=60.0)
    for i in range(2000):
        clock.t = i * 0.01
        r.refuse("update", "signature", f"manifest {i} refused: bad signature", {"job": f"j{i}"})
    for _ in range(200):
        r.refuse("update", "orphan-chunk", "chunk for an unknown job")
    assert [(e[2], e[3]["count"]) for e in out.events] == [
        ("manifest 0 refused: bad signature", 1), ("chunk for an unknown job", 1)]
    r.flush()
    assert len(out.events) == 2, "nothing is summarized before its window has passed"
    clock.t = 80.0  # both windows (opened at 0 s and at 19.99 s) have passed
    r.flush()
    summaries = [(e[3]["reason"], e[3]["count"]) for e in list(out.events)[2:]]
    assert sorted(summaries) == [("orphan-chunk", 199), ("signature", 1999)]
    assert r.totals == {"signature": 2000, "orphan-chunk": 200}
    r.flush()
    assert len(out.events) == 4


def test_a_refusal_after_the_window_summarizes_and_starts_anew() -> None:
    out, clock = MemoryOutbox(), Clock()
    r = Rejections(out, clock, window_s=10.0)
    r.refuse("config", "signature", "a")
    clock.t = 5.0
    r.refuse("config", "signature", "b")
    clock.t = 11.0
    r.refuse("config", "signature", "c")
    assert [(e[2], e[3]["count"]) for e in out.events] == [
        ("a", 1), ("1 more refused in 10 s like: a", 1), ("c", 1)]
    clock.t = 30.0
    r.flush()  # "c" had no repeats: no summary
    assert len(out.events) == 3
