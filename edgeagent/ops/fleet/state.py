"""Per-device fleet state built from wire messages: pure ingestion, seq-gap accounting, trouble ranking.

No I/O here: the collector feeds (topic, payload, receive time) in and stores what comes out, so
tests need neither a broker nor a clock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from edgeagent.core.errors import ProtocolError
from edgeagent.core.protocol import CONFIG_STATES, FINAL_JOB_STATES, JOB_STATES, dumps, loads_object
from edgeagent.ops.fleet import shadow_view

MAX_MISSING_RANGES = 64          # late arrivals older than this many open gaps count as duplicates
ANOMALY_TIMES_KEPT = 256
INTERVAL_EWMA_ALPHA = 0.2
LAG_WINDOW_S = 1.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What counts as trouble; units in names."""

    default_interval_s: float = 5.0      # the agent's default telemetry interval until one is observed
    stale_intervals: float = 3.0         # online but no sample for this many intervals -> stale
    stale_grace_s: float = 2.0           # plus this: snapshot delay of a database reader, jitter
    hot_c: float = 75.0
    cpu_percent: float = 90.0
    mem_percent: float = 90.0
    backlog: int = 100
    anomaly_window_s: float = 300.0
    stuck_update_s: float = 900.0        # a non-final job whose status has not changed for this long


@dataclass(slots=True)
class SeqTracker:
    """Counts missing `seq` numbers exactly; duplicates (QoS 1 redelivery) never count twice.

    A gap is the number of seq values currently missing; a late arrival that fills one (a spool
    drained out of order) takes it back. A seq of 0 or 1 after a higher one is a device reset.
    """

    last: int | None = None
    received: int = 0
    gaps: int = 0
    duplicates: int = 0
    resets: int = 0
    missing: list[list[int]] = field(default_factory=list)   # [[first, last], ...] oldest first

    def observe(self, seq: int) -> int:
        """Record one seq; return the change in `gaps` (positive: new loss, negative: late fill)."""
        if self.last is None:
            self.last = seq
            self.received += 1
            return 0
        if seq == self.last + 1:
            self.last = seq
            self.received += 1
            return 0
        if seq > self.last:
            first, end = self.last + 1, seq - 1
            self.missing.append([first, end])
            if len(self.missing) > MAX_MISSING_RANGES:
                del self.missing[0]
            self.last = seq
            self.received += 1
            missing = end - first + 1
            self.gaps += missing
            return missing
        if self._fill(seq):
            self.received += 1
            self.gaps -= 1
            return -1
        if seq <= 1 < self.last:
            self.resets += 1
            self.last = seq
            self.missing.clear()
            self.received += 1
            return 0
        self.duplicates += 1
        return 0

    def _fill(self, seq: int) -> bool:
        for i, (first, end) in enumerate(self.missing):
            if first <= seq <= end:
                if first == end:
                    del self.missing[i]
                elif seq == first:
                    self.missing[i][0] = seq + 1
                elif seq == end:
                    self.missing[i][1] = seq - 1
                else:
                    self.missing[i:i + 1] = [[first, seq - 1], [seq + 1, end]]
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"last_seq": self.last, "received": self.received, "gaps": self.gaps,
                "duplicates": self.duplicates, "resets": self.resets}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeqTracker:
        last = d.get("last_seq")
        return cls(last=int(last) if isinstance(last, int) else None, received=int(d.get("received", 0)),
                   gaps=int(d.get("gaps", 0)), duplicates=int(d.get("duplicates", 0)),
                   resets=int(d.get("resets", 0)))


@dataclass(slots=True)
class DeviceState:
    device: str
    first_seen: float
    state: str = "unknown"               # online | offline | unknown (no status seen yet)
    reason: str = ""
    status_ts: float | None = None
    agent: str | None = None
    model: str | None = None             # "name@version"
    firmware: str | None = None
    groups: list[str] = field(default_factory=list)
    hardware: str = ""                   # the status' device.hardware ("rpi4", ...), "" if not said
    last_seen: float = 0.0               # receive time of any message
    last_sample_recv: float | None = None
    last_sample_ts: float | None = None
    interval_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    spool: dict[str, Any] = field(default_factory=dict)
    telemetry: SeqTracker = field(default_factory=SeqTracker)
    events: SeqTracker = field(default_factory=SeqTracker)
    anomalies_total: int = 0
    anomaly_times: deque[float] = field(default_factory=lambda: deque(maxlen=ANOMALY_TIMES_KEPT))
    last_event: dict[str, Any] | None = None
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # last config/reported: version, state, ...
    invalid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "state": self.state, "reason": self.reason,
            "status_ts": self.status_ts, "agent": self.agent, "model": self.model,
            "firmware": self.firmware, "groups": list(self.groups), "hardware": self.hardware,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen, "last_sample_recv": self.last_sample_recv,
            "last_sample_ts": self.last_sample_ts, "interval_s": self.interval_s,
            "metrics": dict(self.metrics), "inference": dict(self.inference), "spool": dict(self.spool),
            "telemetry": self.telemetry.to_dict(), "events": self.events.to_dict(),
            "anomalies_total": self.anomalies_total, "anomaly_times": list(self.anomaly_times),
            "last_event": self.last_event, "jobs": [dict(j) for j in self.jobs.values()],
            "config": dict(self.config), "invalid": self.invalid,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceState:
        """Restore from a stored snapshot so seq accounting survives a collector restart."""
        dev = cls(device=str(d["device"]), first_seen=float(d.get("first_seen") or 0.0))
        for name in ("state", "reason", "status_ts", "agent", "model", "firmware", "hardware", "last_seen",
                     "last_sample_recv", "last_sample_ts", "interval_s", "anomalies_total",
                     "last_event", "invalid"):
            if d.get(name) is not None:
                setattr(dev, name, d[name])
        dev.groups = [str(g) for g in d.get("groups") or []]
        for name in ("metrics", "inference", "spool", "config"):
            setattr(dev, name, dict(d.get(name) or {}))
        dev.telemetry = SeqTracker.from_dict(d.get("telemetry") or {})
        dev.events = SeqTracker.from_dict(d.get("events") or {})
        dev.anomaly_times.extend(float(t) for t in d.get("anomaly_times") or [])
        dev.jobs = {str(j["job"]): dict(j) for j in d.get("jobs") or [] if isinstance(j, dict) and "job" in j}
        return dev


@dataclass(slots=True)
class Ingested:
    """Rows one message produced, for the store (tuples in the store's column order)."""

    samples: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    jobs: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(slots=True)
class CollectorStats:
    """Collector health: counters plus a one-second window for rate and lag."""

    messages: dict[str, int] = field(default_factory=lambda: {
        "status": 0, "telemetry": 0, "events": 0, "job": 0, "config": 0, "invalid": 0})
    samples: int = 0
    gaps: int = 0
    duplicates: int = 0
    lag_s: float = 0.0                   # max lag over the last closed window
    lag_max_s: float = 0.0               # max of window lags since start
    messages_per_s: float = 0.0
    samples_per_s: float = 0.0
    _window_start: float = 0.0
    _window_messages: int = 0
    _window_samples: int = 0
    _window_lag: float = 0.0

    def roll(self, now: float) -> None:
        """Close the current window if it is at least LAG_WINDOW_S old."""
        elapsed = now - self._window_start
        if self._window_start == 0.0:
            self._window_start = now
            return
        if elapsed < LAG_WINDOW_S:
            return
        self.messages_per_s = self._window_messages / elapsed
        self.samples_per_s = self._window_samples / elapsed
        self.lag_s = self._window_lag
        self.lag_max_s = max(self.lag_max_s, self._window_lag)
        self._window_start, self._window_messages, self._window_samples = now, 0, 0
        self._window_lag = 0.0


class FleetState:
    """All devices under one topic prefix; thread-safe (the MQTT thread writes, others snapshot)."""

    def __init__(self, prefix: str = "edge", thresholds: Thresholds | None = None,
                 track_gaps: bool = True) -> None:
        self.prefix = prefix.rstrip("/")
        self.thresholds = thresholds or Thresholds()
        # With a shared subscription each collector sees only part of every device's stream.
        self.track_gaps = track_gaps
        self.devices: dict[str, DeviceState] = {}
        self.stats = CollectorStats()
        self.dirty: set[str] = set()
        self.lock = threading.Lock()

    def restore(self, snapshots: list[dict[str, Any]]) -> None:
        with self.lock:
            for snap in snapshots:
                dev = DeviceState.from_dict(snap)
                self.devices[dev.device] = dev

    def ingest(self, topic: str, payload: bytes, now: float) -> Ingested:
        """Apply one message; raise ProtocolError (state untouched) if it breaks the protocol."""
        with self.lock:
            try:
                return self._ingest(topic, payload, now)
            except ProtocolError:
                self.stats.messages["invalid"] += 1
                raise

    def _ingest(self, topic: str, payload: bytes, now: float) -> Ingested:
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError(topic, f"outside prefix {self.prefix!r}")
        parts = topic[len(head):].split("/")
        device = parts[0]
        if not device or device == "group":
            raise ProtocolError(topic, "not a device topic")
        if len(parts) == 2 and parts[1] in ("status", "telemetry", "events"):
            kind = parts[1]
        elif len(parts) == 4 and parts[1] == "updates" and parts[3] == "status" and parts[2]:
            kind = "updates/+/status"
        elif len(parts) == 3 and parts[1] == "config" and parts[2] == "reported":
            kind = "config/reported"
        else:
            raise ProtocolError(topic, "not a topic the collector reads")
        if not payload and kind in ("status", "updates/+/status", "config/reported"):
            return Ingested()            # a cleared retained message
        try:
            msg = loads_object(topic, payload)
        except RecursionError as exc:         # deeply nested JSON: json raises this, not a decode error
            raise ProtocolError(topic, "JSON nested too deeply") from exc
        dev = self.devices.get(device)
        fresh = dev is None
        if dev is None:
            dev = DeviceState(device=device, first_seen=now)
        if kind == "status":
            out = self._status(topic, dev, msg)
        elif kind == "telemetry":
            out = self._telemetry(topic, dev, msg, now)
        elif kind == "events":
            out = self._event(topic, dev, msg, now)
        elif kind == "config/reported":
            out = self._config(topic, dev, msg, now)
        else:
            out = self._job(topic, dev, parts[2], msg, now)
        if fresh:
            self.devices[device] = dev
        dev.last_seen = now
        self.dirty.add(device)
        return out

    def _status(self, topic: str, dev: DeviceState, msg: dict[str, Any]) -> Ingested:
        state = msg.get("state")
        if state not in ("online", "offline"):
            raise ProtocolError(topic, f"status.state must be online|offline, got {state!r}")
        dev.state = state
        dev.reason = str(msg.get("reason", "")) if state == "offline" else ""
        ts = msg.get("ts")
        dev.status_ts = float(ts) if _is_num(ts) else dev.status_ts
        if state == "online":
            model = msg.get("model")
            if isinstance(model, dict) and model.get("name"):
                dev.model = f"{model.get('name')}@{model.get('version', '?')}"
            fw = msg.get("firmware")
            if isinstance(fw, dict) and fw.get("version"):
                dev.firmware = f"{fw.get('version')}" + (f" ({fw['slot']})" if fw.get("slot") else "")
            if isinstance(msg.get("agent"), str):
                dev.agent = msg["agent"]
            groups = msg.get("groups")
            if isinstance(groups, list):
                dev.groups = [str(g) for g in groups]
            if isinstance(msg.get("hardware"), str):
                dev.hardware = msg["hardware"]
        self.stats.messages["status"] += 1
        return Ingested()

    def _telemetry(self, topic: str, dev: DeviceState, msg: dict[str, Any], now: float) -> Ingested:
        samples = msg.get("samples")
        if msg.get("device") != dev.device:
            raise ProtocolError(topic, f"device {msg.get('device')!r} does not match the topic")
        if not isinstance(samples, list):
            raise ProtocolError(topic, "samples must be a list")
        valid = [s for s in samples if isinstance(s, dict) and _is_int(s.get("seq")) and _is_num(s.get("ts"))]
        if len(valid) != len(samples):
            dev.invalid += len(samples) - len(valid)
            self.stats.messages["invalid"] += 1
        out = Ingested()
        stats = self.stats
        newest = None
        for s in valid:
            seq, ts = int(s["seq"]), float(s["ts"])
            tracker = dev.telemetry
            before = tracker.duplicates
            if self.track_gaps:
                delta = tracker.observe(seq)
                stats.gaps += delta
                if tracker.duplicates != before:
                    stats.duplicates += 1
                    continue
            else:
                tracker.received += 1
                tracker.last = seq if tracker.last is None else max(tracker.last, seq)
            metrics, inference = _dict(s.get("metrics")), _dict(s.get("inference"))
            spool = _dict(s.get("spool"))
            if newest is None or ts >= newest:
                if dev.last_sample_ts is not None and ts > dev.last_sample_ts:
                    step = ts - dev.last_sample_ts
                    dev.interval_s = step if dev.interval_s is None else (
                        dev.interval_s + INTERVAL_EWMA_ALPHA * (step - dev.interval_s))
                if dev.last_sample_ts is None or ts >= dev.last_sample_ts:
                    dev.last_sample_ts = ts
                    dev.metrics = metrics
                    if inference:
                        dev.inference = inference
                        if isinstance(inference.get("model"), str):
                            dev.model = inference["model"]
                    if spool:
                        dev.spool = spool
                newest = ts
            out.samples.append((
                dev.device, seq, ts, now, _num(metrics.get("cpu_percent")),
                _num(metrics.get("mem_used_percent")), _num(metrics.get("temp_c")),
                _num(inference.get("p95_ms")), _num(inference.get("anomaly_rate_1m")),
                _num(spool.get("backlog"))))
        dev.last_sample_recv = now
        stats.messages["telemetry"] += 1
        stats.samples += len(out.samples)
        stats._window_messages += 1
        stats._window_samples += len(out.samples)
        if newest is not None:
            # lag of the newest sample in the message: a drained backlog is late by design
            stats._window_lag = max(stats._window_lag, now - newest)
        return out

    def _event(self, topic: str, dev: DeviceState, msg: dict[str, Any], now: float) -> Ingested:
        if msg.get("device") != dev.device:
            raise ProtocolError(topic, f"device {msg.get('device')!r} does not match the topic")
        seq, ts, kind = msg.get("seq"), msg.get("ts"), msg.get("kind")
        if not (_is_int(seq) and _is_num(ts) and isinstance(kind, str)):
            raise ProtocolError(topic, "event needs integer seq, numeric ts and kind")
        self.stats.messages["events"] += 1
        self.stats._window_messages += 1
        if self.track_gaps:
            before = dev.events.duplicates
            self.stats.gaps += dev.events.observe(int(seq))
            if dev.events.duplicates != before:
                self.stats.duplicates += 1
                return Ingested()
        else:
            dev.events.received += 1
        severity = str(msg.get("severity", "info"))
        message = str(msg.get("message", ""))
        if kind == "anomaly":
            dev.anomalies_total += 1
            dev.anomaly_times.append(now)
        dev.last_event = {"seq": seq, "ts": ts, "kind": kind, "severity": severity, "message": message}
        data = _dict(msg.get("data"))
        return Ingested(events=[(dev.device, int(seq), float(ts), now, kind, severity, message,
                                 dumps(data).decode())])

    def _job(self, topic: str, dev: DeviceState, job: str, msg: dict[str, Any], now: float) -> Ingested:
        state = msg.get("state")
        if state not in JOB_STATES:
            raise ProtocolError(topic, f"unknown job state {state!r}")
        progress = msg.get("progress", 0.0)
        prev = dev.jobs.get(job)
        changed = now if prev is None or prev.get("state") != state or prev.get("progress") != progress \
            else prev.get("changed", now)
        entry = {"job": job, "kind": msg.get("kind"), "name": msg.get("name"),
                 "version": msg.get("version"), "state": state, "reason": str(msg.get("reason", "")),
                 "progress": float(progress) if _is_num(progress) else 0.0,
                 "ts": float(msg["ts"]) if _is_num(msg.get("ts")) else None, "changed": changed,
                 "shadow": shadow_view.figures(msg.get("shadow"))}
        dev.jobs[job] = entry
        self.stats.messages["job"] += 1
        logged = " | ".join(x for x in (entry["reason"], shadow_view.note(entry["shadow"])) if x)
        return Ingested(jobs=[(dev.device, job, state, entry["progress"], logged, entry["ts"], now)])

    def _config(self, topic: str, dev: DeviceState, msg: dict[str, Any], now: float) -> Ingested:
        state, version = msg.get("state"), msg.get("version")
        if state not in CONFIG_STATES or not _is_int(version):
            raise ProtocolError(topic, f"config report needs state in {CONFIG_STATES} and an integer version")
        dev.config = {"version": int(version), "state": state, "reason": str(msg.get("reason", "")),
                      "sha256": str(msg.get("sha256", "")),
                      "ts": float(msg["ts"]) if _is_num(msg.get("ts")) else None, "received": now}
        self.stats.messages["config"] += 1
        return Ingested()

    def snapshot(self, devices: set[str] | None = None) -> list[dict[str, Any]]:
        """Plain dicts (see DeviceState.to_dict) of all devices, or of `devices` only."""
        with self.lock:
            names = self.devices.keys() if devices is None else devices & self.devices.keys()
            return [self.devices[d].to_dict() for d in names]

    def take_dirty(self) -> list[dict[str, Any]]:
        with self.lock:
            names, self.dirty = self.dirty, set()
            return [self.devices[d].to_dict() for d in names if d in self.devices]


# ---- reading a device snapshot (live or from the store) ---------------------------------------

TROUBLE_RANK = {"offline": 100, "stale": 90, "update-failed": 80, "update-stuck": 70, "hot": 60,
                "overloaded": 50, "anomalies": 40, "gaps": 30, "backlog": 20, "updating": 10}


def is_stale(dev: dict[str, Any], now: float, th: Thresholds) -> bool:
    """Online but silent for `stale_intervals` telemetry intervals (never sent: counted from status)."""
    if dev.get("state") != "online":
        return False
    interval = dev.get("interval_s") or th.default_interval_s
    since = dev.get("last_sample_recv") or dev.get("last_seen") or 0.0
    return bool(now - since > th.stale_intervals * max(interval, 0.05) + th.stale_grace_s)


def recent_anomalies(dev: dict[str, Any], now: float, th: Thresholds) -> int:
    return sum(1 for t in dev.get("anomaly_times") or [] if now - t <= th.anomaly_window_s)


def active_job(dev: dict[str, Any]) -> dict[str, Any] | None:
    """The job to show: a running one if any, else the most recently changed."""
    jobs = dev.get("jobs") or []
    if not jobs:
        return None
    running = [j for j in jobs if j.get("state") not in FINAL_JOB_STATES]
    pool = running or jobs
    best: dict[str, Any] = max(pool, key=lambda j: j.get("changed") or 0.0)
    return best


def troubles(dev: dict[str, Any], now: float, th: Thresholds) -> list[str]:
    """Names of what is wrong with a device, worst first ([] when healthy)."""
    out: list[str] = []
    if dev.get("state") == "offline":
        out.append("offline")
    elif is_stale(dev, now, th):
        out.append("stale")
    live = dev.get("state") == "online"
    job = active_job(dev)
    if job:
        if job.get("state") in ("failed", "rolled_back") and now - (job.get("changed") or 0) < 86400:
            out.append("update-failed")
        elif job.get("state") not in FINAL_JOB_STATES:
            stuck = now - (job.get("changed") or now) > th.stuck_update_s
            out.append("update-stuck" if stuck else "updating")
    m = dev.get("metrics") or {}
    if live and _num(m.get("temp_c")) is not None and m["temp_c"] >= th.hot_c:
        out.append("hot")
    if live and ((_num(m.get("cpu_percent")) or 0) >= th.cpu_percent
                 or (_num(m.get("mem_used_percent")) or 0) >= th.mem_percent):
        out.append("overloaded")
    if recent_anomalies(dev, now, th):
        out.append("anomalies")
    if ((dev.get("telemetry") or {}).get("gaps") or 0) + ((dev.get("events") or {}).get("gaps") or 0) > 0:
        out.append("gaps")
    if (_num((dev.get("spool") or {}).get("backlog")) or 0) >= th.backlog:
        out.append("backlog")
    return sorted(out, key=lambda t: -TROUBLE_RANK[t])


def trouble_score(dev: dict[str, Any], now: float, th: Thresholds) -> int:
    ts = troubles(dev, now, th)
    return TROUBLE_RANK[ts[0]] if ts else 0


def sort_by_trouble(devs: list[dict[str, Any]], now: float, th: Thresholds) -> list[dict[str, Any]]:
    return sorted(devs, key=lambda d: (-trouble_score(d, now, th), str(d.get("device"))))


def _is_num(x: object) -> TypeGuard[float]:
    """A JSON number we can use as a float (ints beyond 2**63 would overflow or lose meaning)."""
    if isinstance(x, float):
        return True
    return isinstance(x, int) and not isinstance(x, bool) and -(2**63) < x < 2**63


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: object) -> float | None:
    return float(x) if _is_num(x) else None


def _dict(x: object) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}
