"""`edgeagent simulate`: N virtual devices in one process speaking the real wire protocol.

Payloads come from `edgeagent.core.protocol` (the builders the agent uses). Two connection modes:
per-device (each device its own MQTT client and last will: offline-by-last-will works) and
pooled (devices share a few clients and publish on their own topics: light enough for 1,000+
devices; no per-device last will, a clean stop publishes each "offline" status instead).

Device roles by index (deterministic, so tests know who does what): the first `outage_count`
devices take the outage, the next `hot` run hot, the last `updates` run an update job (the
last `stuck_updates` of those stall in "downloading").
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edgeagent.core import paho_io, protocol
from edgeagent.core.protocol import Topics
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client

log = logging.getLogger(__name__)

SPOOL_MAX = 10_000
MODEL = "vibration-anomaly"


@dataclass(frozen=True, slots=True)
class Outage:
    """Devices [0, count) go silent at `at_s` for `duration_s`, spooling samples, then drain."""

    at_s: float
    duration_s: float
    count: int = 1

    @classmethod
    def parse(cls, spec: str) -> Outage:
        try:
            parts = [float(p) for p in spec.split(":")]
        except ValueError as exc:
            raise ValueError(f"--outage {spec!r}: expected AT_S:DURATION_S[:COUNT]") from exc
        if len(parts) not in (2, 3) or parts[0] < 0 or parts[1] <= 0:
            raise ValueError(f"--outage {spec!r}: expected AT_S:DURATION_S[:COUNT] with positive times")
        return cls(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 1)


@dataclass(frozen=True, slots=True)
class SimOptions:
    broker: BrokerUrl
    devices: int = 10
    prefix: str = "edge"
    id_prefix: str = "sim-"
    interval_s: float = 1.0
    duration_s: float | None = None
    count: int | None = None             # samples per device, then a clean stop
    per_device: bool | None = None       # None: per-device connections when devices <= 50
    pool_size: int = 0                   # 0: one client per 200 devices (at most 8)
    keepalive_s: int = 30
    qos: int = 1
    mqtt5: bool = True
    batch_max: int = 50
    anomaly_rate: float = 0.0
    outage: Outage | None = None
    drop_every: int = 0
    hot: int = 0
    updates: int = 0
    stuck_updates: int = 0
    update_duration_s: float = 20.0
    groups: tuple[str, ...] = ("sim",)
    seed: int = 1

    @property
    def use_per_device(self) -> bool:
        return self.per_device if self.per_device is not None else self.devices <= 50


@dataclass(slots=True)
class SimCounters:
    samples_published: int = 0
    samples_dropped: int = 0
    events_published: int = 0
    messages: int = 0
    acked: int = 0  # messages the broker acknowledged (QoS 1) before the simulator disconnected


@dataclass(slots=True)
class VirtualDevice:
    """One simulated board: metric random walks, seq counters, a spool during outages."""

    index: int
    name: str
    topics: Topics
    rng: random.Random
    opts: SimOptions
    seq: int = 0
    event_seq: int = 0
    cpu: float = 20.0
    mem: float = 40.0
    temp: float = 50.0
    model_version: str = "1.0.0"
    count: int = 0
    spool: list[dict[str, Any]] = field(default_factory=list)
    pending_events: list[dict[str, Any]] = field(default_factory=list)
    out: bool = False
    job_sent: tuple[str, float] | None = None
    anomalies: list[float] = field(default_factory=list)

    @property
    def hot(self) -> bool:
        o = self.opts
        first = o.outage.count if o.outage else 0
        return first <= self.index < first + o.hot

    @property
    def updating(self) -> bool:
        return self.index >= self.opts.devices - self.opts.updates

    @property
    def stuck(self) -> bool:
        return self.index >= self.opts.devices - min(self.opts.stuck_updates, self.opts.updates)

    def in_outage(self, t: float) -> bool:
        o = self.opts.outage
        return o is not None and self.index < o.count and o.at_s <= t < o.at_s + o.duration_s

    def status(self, now: float) -> bytes:
        payload = protocol.status_online(model={"name": MODEL, "version": self.model_version},
                                         firmware={"version": "2026.11.1", "slot": "a"}, ts=now)
        payload["groups"] = list(self.opts.groups)   # extra field: lets `fleet watch --group` filter
        return protocol.dumps(payload)

    def sample(self, now: float) -> dict[str, Any] | None:
        """The next sample, or None when this seq is dropped on purpose (--drop-every)."""
        rng = self.rng
        self.seq += 1
        self.count += 1
        self.cpu = min(100.0, max(1.0, self.cpu + rng.gauss(0, 3)))
        self.mem = min(99.0, max(10.0, self.mem + rng.gauss(0, 0.5)))
        base = 82.0 if self.hot else 50.0
        self.temp = self.temp + 0.2 * (base + self.cpu / 10 - self.temp) + rng.gauss(0, 0.3)
        anomaly = rng.random() < self.opts.anomaly_rate
        score = rng.uniform(0.9, 1.0) if anomaly else rng.uniform(0.0, 0.3)
        self.anomalies = [t for t in self.anomalies if now - t < 60.0]
        if anomaly:
            self.anomalies.append(now)
            self.event_seq += 1
            self.pending_events.append(protocol.event(
                self.name, self.event_seq, "anomaly", "warning", f"anomaly score {score:.2f}",
                {"score": round(score, 3)}, ts=now))
        if self.opts.drop_every and self.seq % self.opts.drop_every == 0:
            return None
        p50 = 6.0 + rng.random()
        return {
            "seq": self.seq, "ts": now,
            "metrics": {"cpu_percent": round(self.cpu, 1), "load1": round(self.cpu / 25, 2),
                        "mem_used_percent": round(self.mem, 1),
                        "mem_available_mb": round(40 * (100 - self.mem)), "disk_free_mb": 12000,
                        "temp_c": round(self.temp, 1), "net_rx_bps": rng.randint(0, 9000),
                        "net_tx_bps": rng.randint(0, 9000), "agent_rss_mb": 48.5, "agent_cpu_percent": 3.0},
            "inference": {"model": f"{MODEL}@{self.model_version}", "count": self.count * 10,
                          "rate_hz": 10.0, "p50_ms": round(p50, 2), "p95_ms": round(p50 * 1.6, 2),
                          "p99_ms": round(p50 * 2.2, 2), "dropped": 0, "last_score": round(score, 3),
                          "anomaly_rate_1m": len(self.anomalies) / 60.0},
            "spool": {"backlog": len(self.spool), "dropped": 0, "bytes": 300 * len(self.spool)},
        }

    def job_update(self, t: float, now: float) -> bytes | None:
        """The update job's status when it changed (progress in 10% steps), else None."""
        if not self.updating or t < 1.0:
            return None
        d = self.opts.update_duration_s
        progress = min(1.0, (t - 1.0) / d)
        if self.stuck:
            state, progress = "downloading", min(progress, 0.4)
        elif progress < 1.0:
            state = "downloading"
        else:
            state = "succeeded"
        progress = math.floor(progress * 10) / 10
        if self.job_sent == (state, progress):
            return None
        self.job_sent = (state, progress)
        if state == "succeeded":
            self.model_version = "1.1.0"
        return protocol.dumps(protocol.job_status("sim-upd-1", "model", MODEL, "1.1.0", state,
                                                  progress=progress, ts=now))


class Simulator:
    """Runs the devices until `duration_s`, `count` or `stop` (an Event set by a signal handler)."""

    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self.counters = SimCounters()
        self.stop = threading.Event()
        self.devices = [
            VirtualDevice(i, f"{opts.id_prefix}{i:04d}", Topics(opts.prefix, f"{opts.id_prefix}{i:04d}"),
                          random.Random(opts.seed * 100_003 + i), opts)
            for i in range(opts.devices)]
        self.clients: list[mqtt.Client] = []
        self._last: dict[int, mqtt.MQTTMessageInfo] = {}
        self._acked: dict[int, int] = {}  # per client: each counted by the thread that reads it
        self._pumped = False  # pooled: paho's I/O runs on this thread (`_pump`), no network threads
        self._next_misc = 0.0

    def _count_acks(self, client: mqtt.Client) -> None:
        key = id(client)
        self._acked[key] = 0

        def on_publish(*_args: object) -> None:
            self._acked[key] += 1

        client.on_publish = on_publish

    def _pump(self, timeout_s: float) -> None:
        """Pooled mode: read the PUBACKs that came, write what the sockets did not take, keep the
        connections alive (reconnect a dropped one), waiting up to `timeout_s` for something."""
        socks = {}
        for c in self.clients:
            sock = c.socket()
            if sock is None:
                if time.monotonic() >= self._next_misc:
                    with contextlib.suppress(OSError):
                        c.reconnect()
                continue
            socks[sock] = c
        if not socks:
            time.sleep(min(timeout_s, 0.1))
            return
        ready = [s for s in socks if getattr(s, "pending", lambda: 0)() > 0]
        writers = [s for s, c in socks.items() if c.want_write()]
        try:
            readable, writable, _ = select.select(list(socks), writers, [], 0.0 if ready else timeout_s)
        except (OSError, ValueError):
            readable, writable = [], []
        for sock in set(ready) | set(readable):
            socks[sock].loop_read()
        for sock in writable:
            socks[sock].loop_write()
        now = time.monotonic()
        if now >= self._next_misc:
            self._next_misc = now + 1.0
            for c in socks.values():
                c.loop_misc()  # keepalive pings, and the check that the broker answers them

    def _client_for(self, dev: VirtualDevice) -> mqtt.Client:
        return self.clients[dev.index % len(self.clients)]

    def _connect(self) -> None:
        o = self.opts
        if o.use_per_device:
            for dev in self.devices:
                c = make_client(o.broker, f"{dev.name}-sim", mqtt5=o.mqtt5)
                c.will_set(dev.topics.status, protocol.dumps(protocol.status_offline("connection-lost")),
                           qos=1, retain=True)
                c.max_inflight_messages_set(100)
                self._count_acks(c)
                connect_and_wait(c, o.broker, o.keepalive_s, mqtt5=o.mqtt5)
                self.clients.append(c)
        else:
            n = o.pool_size or max(1, min(8, math.ceil(o.devices / 200)))
            for i in range(n):
                c = make_client(o.broker, f"{o.id_prefix}pool-{i}-{os.getpid()}-{id(self):x}", mqtt5=o.mqtt5)
                # paho walks its in-flight messages on every PUBACK; 100 per connection (up to 800
                # in all) keep a loopback broker busy (1,000 measured no faster)
                c.max_inflight_messages_set(100)
                paho_io.buffer_reads(c)  # the PUBACKs: one recv for many, not three each
                self._count_acks(c)
                # paho's I/O runs on this thread (`_pump`): eight network threads fighting for the
                # GIL, and a wake-up write for each publish, cost more than the messages themselves
                connect_and_wait(c, o.broker, o.keepalive_s, mqtt5=o.mqtt5, threaded=False)
                self.clients.append(c)
            self._pumped = True

    def _publish(self, dev: VirtualDevice, topic: str, payload: bytes, retain: bool = False) -> None:
        client = self._client_for(dev)
        info = client.publish(topic, payload, qos=self.opts.qos, retain=retain)
        self._last[id(client)] = info
        self.counters.messages += 1

    def _set_outage(self, dev: VirtualDevice, out: bool, now: float) -> None:
        """Per-device mode: disconnect cleanly (no last will: the status stays "online", so the
        collector must notice by staleness), then reconnect and drain the spool."""
        dev.out = out
        if self.opts.use_per_device:
            client = self._client_for(dev)
            if out:
                client.disconnect()
                client.loop_stop()
            else:
                connect_and_wait(client, self.opts.broker, self.opts.keepalive_s, mqtt5=self.opts.mqtt5)
        if not out:
            self._publish(dev, dev.topics.status, dev.status(now), retain=True)
            self._drain(dev)

    def _drain(self, dev: VirtualDevice) -> None:
        for i in range(0, len(dev.spool), self.opts.batch_max):
            batch = dev.spool[i:i + self.opts.batch_max]
            self._publish(dev, dev.topics.telemetry, protocol.dumps(protocol.telemetry(dev.name, batch)))
            self.counters.samples_published += len(batch)
        dev.spool.clear()
        for ev in dev.pending_events:
            self._publish(dev, dev.topics.events, protocol.dumps(ev))
            self.counters.events_published += 1
        dev.pending_events.clear()

    def _step(self, dev: VirtualDevice, t: float, now: float) -> None:
        out = dev.in_outage(t)
        if out != dev.out:
            self._set_outage(dev, out, now)
        s = dev.sample(now)
        if s is None:
            self.counters.samples_dropped += 1
        elif out:
            if len(dev.spool) >= SPOOL_MAX:
                del dev.spool[0]
            dev.spool.append(s)
        else:
            self._publish(dev, dev.topics.telemetry, protocol.dumps(protocol.telemetry(dev.name, [s])))
            self.counters.samples_published += 1
        if not out:
            for ev in dev.pending_events:
                self._publish(dev, dev.topics.events, protocol.dumps(ev))
                self.counters.events_published += 1
            dev.pending_events.clear()
            job = dev.job_update(t, now)
            if job is not None:
                self._publish(dev, dev.topics.job_status("sim-upd-1"), job, retain=True)
                if dev.job_sent and dev.job_sent[0] == "succeeded":
                    self._publish(dev, dev.topics.status, dev.status(now), retain=True)

    def run(self) -> SimCounters:
        o = self.opts
        self._connect()
        try:
            start = time.time()
            for dev in self.devices:
                self._publish(dev, dev.topics.status, dev.status(start), retain=True)
            n = len(self.devices)
            k = 0                                  # step number over all devices
            while not self.stop.is_set():
                i = k % n
                rnd = k // n
                if o.count is not None and rnd >= o.count:
                    break
                due = start + o.interval_s * (rnd + i / n)
                if o.duration_s is not None and due - start >= o.duration_s:
                    break
                wait = due - time.time()
                if self._pumped:
                    if k % 64 == 0:
                        self._pump(0.0)  # behind schedule too: take the acknowledgements in
                    while wait > 0 and not self.stop.is_set():
                        self._pump(min(wait, 0.05))
                        wait = due - time.time()
                    if self.stop.is_set():
                        break
                elif wait > 0 and self.stop.wait(wait):
                    break
                now = time.time()
                self._step(self.devices[i], now - start, now)
                k += 1
            for dev in self.devices:               # a clean stop flushes what outages spooled
                if dev.out:
                    self._set_outage(dev, False, time.time())
            for dev in self.devices:
                offline = protocol.status_offline("shutdown", ts=time.time())
                self._publish(dev, dev.topics.status, protocol.dumps(offline), retain=True)
            self._wait_published()
        finally:
            for c in self.clients:
                c.disconnect()
                c.loop_stop()
            self.counters.acked = sum(self._acked.values())
        return self.counters

    def _wait_published(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        if self._pumped:
            while time.monotonic() < deadline and not all(i.is_published() for i in self._last.values()):
                self._pump(0.05)
            return
        for info in self._last.values():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                info.wait_for_publish(left)
            except (RuntimeError, ValueError) as exc:
                log.warning("a publish did not complete: %s", exc)
