"""The RSS verdict: live samples of one process generation only (no processes needed)."""

from __future__ import annotations

from fieldtrial.records import RssSample
from fieldtrial.report import RSS_SETTLE_S, RssGrowth, rss_growth, rss_problems


def series(pid: int, t0: float, mbs: list[float | None], every_s: float = 2.0) -> list[RssSample]:
    return [RssSample(t0 + i * every_s, pid, mb) for i, mb in enumerate(mbs)]


def test_a_restart_is_measured_from_its_own_samples_not_a_dead_process() -> None:
    # the flake: pid 100 killed at +5 s (zombie: no VmRSS), pid 200 sampled right after exec
    # (VmRSS 0 kB) exactly when the old code took its "start" RSS, then ends at 43 MB
    samples = [
        *series(100, 0.0, [30.0, 40.0, 42.0]),
        RssSample(5.0, 100, None),  # killed, not reaped yet
        RssSample(10.0, 200, 0.0),  # just exec'd
        *series(200, 10.5, [0.4, 20.0, 35.0, 38.0, 40.0, 41.0, 42.0, 43.0, 43.0]),
        RssSample(29.0, 200, None),  # reaped between reading the pid and the status file
    ]
    assert rss_problems("trial-01", samples) == []
    # pid 100 lived under the settle time: not judged; pid 200 from its first live sample
    # RSS_SETTLE_S after its first live one (the 0.4 MB at +10.5 s), to its last live one
    assert rss_growth(samples) == [RssGrowth(200, 41.0, 43.0)]


def test_growth_within_one_process_fails_and_names_it() -> None:
    samples = [*series(300, 0.0, [50.0] * 8 + [120.0]), RssSample(18.5, 300, None)]
    assert rss_problems("trial-00", samples) == [
        "trial-00: RSS of pid 300 grew from 50 MB to 120 MB (bound: +40 MB + 50%)"]


def test_each_generation_is_judged_alone() -> None:
    # a lean first process and a fat second one: neither grew, so nothing is wrong, although the
    # second's end is far above the first's start
    first = series(100, 0.0, [10.0] * 8)
    second = series(200, 20.0, [90.0] * 8)
    assert rss_problems("d", first + second) == []
    assert [g.pid for g in rss_growth(first + second)] == [100, 200]
    # but the second leaking is caught even though the first was fine
    leaky = series(200, 20.0, [60.0] * 7 + [160.0])
    assert [g.pid for g in rss_growth(first + leaky) if not g.ok] == [200]


def test_no_live_samples_is_no_verdict() -> None:
    assert rss_growth([RssSample(0.0, 1, None), RssSample(RSS_SETTLE_S + 1, 1, 0.0)]) == []
    assert rss_problems("d", []) == []
