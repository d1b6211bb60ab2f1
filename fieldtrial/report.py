"""The trial's verdict and table: produced vs received by seq, events, update jobs, restarts and
crashes, RSS, and time for the fleet to be back online after each fault. Checks are plain
functions of what the recorder saw and what the agents' spools handed out."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fieldtrial.records import FaultRecord, RssSample
from fieldtrial.updates import EXPECTED

if TYPE_CHECKING:
    from fieldtrial.fleet import AgentProc
    from fieldtrial.recorder import Recorder
    from fieldtrial.updates import UpdateCase

RECOVERY_MAX_S = 60.0  # the fleet must be fully back within this after any fault ...
# ... but a wall-clock jump must not interrupt delivery at all (timers run on the monotonic clock):
# the jumped device's telemetry must keep arriving, checked when no link/broker fault overlaps
CLOCK_JUMP_MAX_S = 10.0
NETWORK_FAULTS = ("link-flaky", "link-stall", "link-down", "broker-restart")
RSS_GROWTH_MAX_MB = 40.0  # a process's end RSS may exceed its start by at most this ...
RSS_GROWTH_MAX_RATIO = 0.5  # ... plus this fraction of the start
RSS_SETTLE_S = 10.0  # a process's "start" RSS is its first live sample this long after its first one
_CRASH_RE = re.compile(r"component (\S+) crashed; restarting")


@dataclass
class TrialData:
    seed: int
    cycles: int
    names: list[str]
    recorder: Recorder
    agents: dict[str, AgentProc]
    produced: dict[str, dict[str, int]]
    exit_codes: dict[str, int | None]
    faults: list[FaultRecord]
    cases: list[UpdateCase]
    collector: list[dict[str, Any]]
    t0: float
    notes: list[str]
    link_method: str
    proxy_resets: int
    broker_starts: int

    def old_spools(self, name: str, kind: str) -> list[int]:
        return [m.get(kind, 0) for m in self.agents[name].old_spool_seqs()]


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    recovery: list[tuple[FaultRecord, float | None, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def expected(produced_upto: int, received: set[int], old_spools: list[int]) -> set[int]:
    """Seqs handed out: 1..last, less the block skipped after each spool that was moved aside as
    corrupt (its last seq + 1 up to the next seq the recorder saw)."""
    want = set(range(1, produced_upto + 1))
    for last in old_spools:
        above = [r for r in received if r > last]
        if above:
            want -= set(range(last + 1, min(above)))
    return want


def missing(produced_upto: int, received: set[int], old_spools: list[int] | None = None) -> list[int]:
    return sorted(expected(produced_upto, received, old_spools or []) - received)


def ranges(values: list[int], limit: int = 6) -> str:
    """[1,2,3,7,9,10] -> '1-3,7,9-10' (first `limit` ranges)."""
    out: list[str] = []
    i = 0
    while i < len(values) and len(out) < limit:
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(f"{values[i]}" if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out) + (",..." if i < len(values) else "")


def recovery_s(arrivals: dict[str, list[float]], end: float) -> tuple[float | None, str]:
    """Seconds from `end` until every device had delivered telemetry again (None: some never did),
    and the device that took longest."""
    worst, slowest = 0.0, ""
    for device, times in arrivals.items():
        after = [t for t in times if t >= end]
        if not after:
            return None, device
        if after[0] - end >= worst:
            worst, slowest = after[0] - end, device
    return worst, slowest


@dataclass(frozen=True, slots=True)
class RssGrowth:
    """One process generation's memory: its settled start and its last live sample."""

    pid: int
    start_mb: float
    end_mb: float

    @property
    def bound_mb(self) -> float:
        return RSS_GROWTH_MAX_MB + RSS_GROWTH_MAX_RATIO * self.start_mb

    @property
    def ok(self) -> bool:
        return self.end_mb - self.start_mb <= self.bound_mb


def rss_growth(samples: list[RssSample], settle_s: float = RSS_SETTLE_S) -> list[RssGrowth]:
    """Growth per process generation, in order of first appearance. A missing or zero VmRSS (a
    killed, exiting or just-exec'd process) is not a sample, and one process's memory is never
    compared with another's: comparing a restart's start with a survivor's end was the flake. A
    generation that never lived `settle_s` past its first live sample is not judged (its growth
    is start-up, not a leak)."""
    live: dict[int, list[tuple[float, float]]] = {}  # pid -> (at_s, mb)
    for s in samples:
        if s.mb is not None and s.mb > 0:
            live.setdefault(s.pid, []).append((s.at_s, s.mb))
    out: list[RssGrowth] = []
    for pid, gen in live.items():
        first = gen[0][0]
        settled = [mb for at_s, mb in gen if at_s - first >= settle_s]
        if settled:
            out.append(RssGrowth(pid, settled[0], gen[-1][1]))
    return out


def rss_problems(device: str, samples: list[RssSample]) -> list[str]:
    """The RSS part of the verdict: one line per process that outgrew its bound."""
    return [f"{device}: RSS of pid {g.pid} grew from {g.start_mb:.0f} MB to {g.end_mb:.0f} MB (bound: +"
            f"{RSS_GROWTH_MAX_MB:.0f} MB + {RSS_GROWTH_MAX_RATIO:.0%})"
            for g in rss_growth(samples) if not g.ok]


def worst_rss(samples: list[RssSample]) -> RssGrowth | None:
    """The generation closest to (or furthest over) its bound, for the table."""
    return max(rss_growth(samples), key=lambda g: g.end_mb - g.start_mb - g.bound_mb, default=None)


def component_crashes(agent: AgentProc) -> dict[str, int]:
    """Supervised restarts per component, and `ERROR` log lines (key "log-errors")."""
    try:
        text = agent.log_path.read_text(errors="replace")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for m in _CRASH_RE.finditer(text):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    errors = text.count("level=ERROR")
    if errors:
        out["log-errors"] = errors
    return out


def evaluate(d: TrialData) -> Verdict:
    v = Verdict()
    rec = d.recorder
    for name in d.names:
        tele, ev = rec.received(name)
        p = d.produced.get(name, {})
        if p.get("telemetry", 0) == 0:
            v.problems.append(f"{name}: produced no telemetry at all")
        lost_t = missing(p.get("telemetry", 0), tele, d.old_spools(name, "telemetry"))
        lost_e = missing(p.get("event", 0), ev, d.old_spools(name, "event"))
        if lost_t:
            v.problems.append(f"{name}: {len(lost_t)} telemetry samples lost (seq {ranges(lost_t)})")
        if lost_e:
            v.problems.append(f"{name}: {len(lost_e)} events lost (seq {ranges(lost_e)})")
        a = d.agents[name]
        with rec.lock:
            last_status = dict(rec.devices[name].status)
        if (last_status.get("state"), last_status.get("reason")) != ("offline", "shutdown"):
            got = f"{last_status.get('state')}/{last_status.get('reason')}"
            v.problems.append(f"{name}: last retained status after the clean stop is {got} "
                              f"(want offline/shutdown)")
        if a.given_up():
            v.problems.append(f"{name}: the agent gave up on {a.given_up()} spool entries (outbox `lost`)")
        if a.unrecorded():
            v.problems.append(f"{name}: {a.unrecorded()} telemetry samples were built but never got a seq "
                              f"(never spooled, e.g. disk full); no consumer could see them missing")
        if a.spool_recoveries():
            v.warnings.append(f"{name}: spool moved aside as corrupt {len(a.spool_recoveries())} time(s): "
                              f"{', '.join(x.name for x in a.spool_recoveries())}")
        if a.unexpected:
            v.problems.append(f"{name}: {len(a.unexpected)} unexpected exit(s): {'; '.join(a.unexpected)}")
        if d.exit_codes.get(name) != 0:
            v.problems.append(f"{name}: final SIGTERM stop exited with {d.exit_codes.get(name)} (want 0)")
        v.problems.extend(rss_problems(name, a.rss_mb))
    for u in d.cases:
        if not u.ok:
            v.problems.append(f"update {u.job} ({u.case}): ended {u.final or 'without a final state'}, want "
                              f"{'/'.join(sorted(EXPECTED[u.case]))}; {u.reason[:160]}")
        elif u.journal != u.final and not (u.final == "rejected" and not u.journal):
            v.problems.append(f"update {u.job}: reported {u.final} but the device's journal says {u.journal}")
    with rec.lock:
        arrivals = {n: list(rec.devices[n].arrivals) for n in d.names}
    for f in d.faults:
        if f.skipped:
            continue
        # a fault on one device: that device's recovery; the broker or every link: the whole fleet's
        affected = {f.target: arrivals[f.target]} if f.target in arrivals else arrivals
        r, slowest = recovery_s(affected, f.end)
        v.recovery.append((f, r, slowest))
        at = f"{f.name} {f.target} at +{f.start - d.t0:.1f} s"
        if r is None or r > RECOVERY_MAX_S:
            v.problems.append(f"not back online within {RECOVERY_MAX_S:.0f} s after {at}")
        elif f.name == "clock-jump" and r > CLOCK_JUMP_MAX_S:
            window_end = f.end + r
            confounders = [g.name for g in d.faults if g.name in NETWORK_FAULTS or
                           (g.target == f.target and g is not f)
                           if g.start <= window_end and g.end >= f.start]
            if confounders:
                v.warnings.append(f"telemetry paused {r:.1f} s after {at} (overlaps "
                                  f"{', '.join(sorted(set(confounders)))}: not counted)")
            else:
                v.problems.append(f"telemetry stopped for {r:.1f} s after {at} (a wall-clock jump must not "
                                  f"interrupt delivery; bound {CLOCK_JUMP_MAX_S:.0f} s)")
    return v


def render(d: TrialData, v: Verdict) -> str:
    rec = d.recorder
    L: list[str] = []
    L.append("")
    L.append(f"FIELD TRIAL RESULT  seed={d.seed} cycles={d.cycles} agents={len(d.names)} "
             f"date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    L.append(f"link faults via: {d.link_method}; proxy resets injected: {d.proxy_resets}; "
             f"broker starts: {d.broker_starts}")
    L.append("")
    L.append("Telemetry and events (produced = seqs the agent's spool handed out, read from it after a clean "
             "stop; received = our own QoS 1 recorder; unspooled = samples built but never given a seq, "
             "given up = entries the outbox dropped, both from health.json)")
    L.append(f"{'device':<10} {'samples produced':>16} {'received':>9} {'lost':>5} {'dups':>5} "
             f"{'unspooled':>9} {'given up':>8} {'events produced':>15} {'received':>9} {'lost':>5} "
             f"{'collector gaps t/e':>19}")
    coll = {str(r.get("device")): r for r in d.collector}
    for name in d.names:
        tele, ev = rec.received(name)
        p = d.produced.get(name, {})
        pt, pe = p.get("telemetry", 0), p.get("event", 0)
        want_t = expected(pt, tele, d.old_spools(name, "telemetry"))
        want_e = expected(pe, ev, d.old_spools(name, "event"))
        with rec.lock:
            dups = rec.devices[name].telemetry_dups
        row = coll.get(name, {})
        gaps = _collector_gaps(row)
        a = d.agents[name]
        L.append(f"{name:<10} {len(want_t):>16} {len(tele & want_t):>9} {len(want_t - tele):>5} "
                 f"{dups:>5} {a.unrecorded():>9} {a.given_up():>8} {len(want_e):>15} "
                 f"{len(ev & want_e):>9} {len(want_e - ev):>5} {gaps:>19}")
    L.append("")
    L.append("Update jobs (final state from the retained job status)")
    L.append(f"{'job':<32} {'case':<17} {'kill -9':<13} {'final':<12} {'expected':<28} {'ok':<3} "
             f"{'s':>6}  reason")
    for u in d.cases:
        L.append(f"{u.job:<32} {u.case:<17} {u.kill or '-':<13} {u.final or '-':<12} "
                 f"{'/'.join(sorted(EXPECTED[u.case])):<28} {'yes' if u.ok else 'NO':<3} "
                 f"{(u.finished_s or 0):>6.1f}  {u.reason[:70]}")
    L.append("")
    L.append("Agent processes")
    L.append(f"{'device':<10} {'starts':>6} {'kill -9':>7} {'SIGTERM':>7} {'crashes':>7} {'stop rc':>7} "
             f"{'RSS start MB':>12} {'RSS end MB':>10} {'RSS max MB':>10}  "
             f"component restarts, ERROR lines (log)")
    for name in d.names:
        a = d.agents[name]
        g = worst_rss(a.rss_mb)
        start, end = (g.start_mb, g.end_mb) if g is not None else (None, None)
        mx = max((s.mb for s in a.rss_mb if s.mb is not None), default=None)
        comp = component_crashes(a)
        L.append(f"{name:<10} {a.starts:>6} {a.kills:>7} {a.terms:>7} {len(a.unexpected):>7} "
                 f"{d.exit_codes.get(name)!s:>7} {_mb(start):>12} {_mb(end):>10} {_mb(mx):>10}  "
                 f"{', '.join(f'{k}={n}' for k, n in sorted(comp.items())) or '-'}")
    L.append(f"RSS bound, per process: end <= start + {RSS_GROWTH_MAX_MB:.0f} MB + "
             f"{RSS_GROWTH_MAX_RATIO:.0%} of start (start = its first live sample {RSS_SETTLE_S:.0f} s after "
             f"its first, end = its last; a restart is a new process; the table shows the process "
             f"nearest its bound)")
    L.append("crashes = exits the trial did not cause; component restarts = 'component X crashed; "
             "restarting' in the agent's log (supervised restarts inside a running process)")
    L.append("")
    L.append(f"Faults (back after = from the fault's end until the device it hit, or for broker and link "
             f"faults every device, delivered telemetry again; bound {RECOVERY_MAX_S:.0f} s, clock jumps "
             f"{CLOCK_JUMP_MAX_S:.0f} s)")
    L.append(f"{'at':>8} {'UTC':<8} {'fault':<16} {'target':<12} {'lasted s':>8} {'back after s':>12} "
             f"{'slowest':<9} {'overlapping':<22} detail")
    recov = {id(f): (r, slow) for f, r, slow in v.recovery}
    faults = sorted(d.faults, key=lambda f: f.start)
    for f in faults:
        r, slow = recov.get(id(f), (None, ""))
        back = "skipped" if f.skipped else ("never" if r is None else f"{r:.1f}")
        until = f.end + (r or 0.0)
        over = [g.name for g in faults if g is not f and g.start <= until and g.end >= f.start]
        L.append(f"{'+%.1f' % (f.start - d.t0):>8} {time.strftime('%H:%M:%S', time.gmtime(f.wall)):<8} "
                 f"{f.name:<16} {f.target:<12} {f.end - f.start:>8.1f} "
                 f"{back:>12} {slow or '-':<9} {','.join(over)[:22] or '-':<22} {f.detail}")
    L.append("")
    L.append(f"{'fault':<16} {'count':>5} {'back median s':>13} {'back worst s':>12}")
    kinds: dict[str, list[float]] = {}
    for f, r, _ in v.recovery:
        kinds.setdefault(f.name, []).append(r if r is not None else float("inf"))
    for kind, rs in sorted(kinds.items()):
        rs.sort()
        L.append(f"{kind:<16} {len(rs):>5} {rs[len(rs) // 2]:>13.1f} {rs[-1]:>12.1f}")
    done = [r for _, r, _ in v.recovery if r is not None]
    if done:
        L.append(f"back online: median {sorted(done)[len(done) // 2]:.1f} s, worst {max(done):.1f} s "
                 f"over {len(done)} faults")
    for n in d.notes:
        L.append(f"NOTE {n}")
    for w in v.warnings:
        L.append(f"WARNING {w}")
    L.append("")
    if v.ok:
        L.append("PASS: every sample and event arrived, every update ended in its right state, no crash")
    else:
        L.append(f"FAIL: {len(v.problems)} broken promise(s)")
        L.extend(f"  - {p}" for p in v.problems)
    return "\n".join(L)


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _collector_gaps(row: dict[str, Any]) -> str:
    if not row:
        return "-"
    t = row.get("telemetry") or {}
    e = row.get("events") or {}
    tg = t.get("gaps") if isinstance(t, dict) else row.get("telemetry_gaps")
    eg = e.get("gaps") if isinstance(e, dict) else row.get("event_gaps")
    return f"{tg if tg is not None else '?'}/{eg if eg is not None else '?'}"
