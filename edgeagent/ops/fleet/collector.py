"""`fleet collect`: subscribe to every device, keep fleet state, write history to the store, export metrics.

Threads, not asyncio: paho's network thread parses and ingests each message (cheap, in memory)
and queues its rows; one writer thread writes what is queued in one transaction (one round trip
on PostgreSQL) as soon as the previous write is done, after at most `linger_s` of gathering or
`batch_max` messages, and never later than `flush_interval_s`.
A QoS 1 message is acknowledged to the broker only once its rows are committed (paho manual ack):
a collector killed mid-batch, or one whose database is away, leaves its messages with the broker,
which redelivers them to the persistent session; the writes are idempotent on (device, seq), so a
redelivery is never a double row. The queue is therefore bounded by the broker's in-flight window
(MQTT 5 Receive Maximum, Mosquitto's max_inflight_messages): when it is full the broker keeps the
rest rather than anybody dropping them. Mosquitto 2.0 does not keep to Receive Maximum after the
first acknowledgement (measured: a collector behind by a minute held 300,000 messages), so the
collector bounds itself too: at `queue_max` held messages paho's thread waits for the writer, the
socket stops being read, and the backlog stays with the broker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeagent.core import paho_io
from edgeagent.core.backoff import backoff_s
from edgeagent.core.errors import ProtocolError
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.fleet.state import FleetState, Ingested, Thresholds
from edgeagent.ops.fleet.store import FleetStore, open_store

log = logging.getLogger(__name__)
RECEIVE_MAXIMUM = 10_000          # un-acknowledged messages we let the broker send us


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    broker: BrokerUrl
    prefix: str = "edge"
    store: str | Path | None = None    # sqlite:///PATH, a bare path, or postgresql://...; None: memory only
    share_group: str | None = None     # None: plain subscription; else $share/<group>/...
    client_id: str = ""                # default: stable from host, store and group (see client_id())
    clean_session: bool = False        # True: start afresh, nothing queued for us while away
    session_expiry_s: int = 3600       # how long the broker keeps our session (and queues) while away
    mqtt5: bool = True
    # In memory only, for one collector with its own store: with a shared store the store counts gaps.
    track_gaps: bool = True
    keepalive_s: int = 30
    qos: int = 1
    flush_interval_s: float = 0.25       # a batch is written at the latest this long after its first row
    linger_s: float = 0.02               # ... or once nothing arrived for this long
    batch_max: int = 5000                # ... or at this many messages
    queue_max: int = 50_000              # held (unwritten) messages: then stop reading from the broker
    # changed device snapshots (JSON) and the heartbeat this often; None: 1 s, 5 s on a shared store
    # (its liveness comes with every batch; a snapshot costs ~30 us of CPU per device)
    snapshot_interval_s: float | None = None
    gap_scan_interval_s: float = 5.0     # shared store: record gap events this often,
    gap_settle_s: float = 5.0            # for gaps older than this (other collectors' rows landed)
    retention_h: float = 24.0
    prune_interval_s: float = 60.0
    thresholds: Thresholds = field(default_factory=Thresholds)

    def filters(self) -> list[str]:
        """Status and job status are idempotent last values: every collector reads all of them
        (plainly, so it also gets the retained ones, which shared subscriptions do not deliver).
        Telemetry and events are the volume: split with a shared subscription when asked."""
        p = self.prefix
        volume = [f"{p}/+/telemetry", f"{p}/+/events"]
        if self.share_group:
            volume = [f"$share/{self.share_group}/{f}" for f in volume]
        return [f"{p}/+/status", f"{p}/+/updates/+/status", f"{p}/+/config/reported", *volume]

    @property
    def persistent(self) -> bool:
        return self.store is not None and not self.clean_session and self.session_expiry_s > 0

    def stable_client_id(self) -> str:
        """The same on every restart of this collector (host, store, group), so its session survives."""
        if self.client_id:
            return self.client_id
        key = f"{self.store}|{self.share_group}|{self.prefix}".encode()
        return f"edgeagent-fleet-{socket.gethostname()}-{hashlib.sha256(key).hexdigest()[:10]}"


class LagHistogram:
    """Seconds from a sample's device timestamp to its row being committed, in 10 ms buckets up to
    a minute (the last bucket holds the rest): cheap to add to, quantiles without sorting."""

    BUCKET_S = 0.01
    BUCKETS = 6000

    def __init__(self) -> None:
        self.counts = [0] * (self.BUCKETS + 1)
        self.total = 0

    def add(self, lag_s: float) -> None:
        self.counts[min(self.BUCKETS, max(0, int(lag_s / self.BUCKET_S)))] += 1
        self.total += 1

    def quantile(self, q: float) -> float | None:
        if not self.total:
            return None
        want, seen = q * self.total, 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= want:
                return (i + 1) * self.BUCKET_S
        return self.BUCKETS * self.BUCKET_S


@dataclass(slots=True)
class Pending:
    """One message's rows and the packet id to acknowledge once they are committed."""

    rows: Ingested
    mid: int
    qos: int


class Collector:
    """Context manager: `with Collector(opts) as c: ...`; threads start in __enter__, stop in __exit__."""

    def __init__(self, opts: CollectorOptions) -> None:
        self.opts = opts
        self.store: FleetStore | None = None
        self.state = FleetState(opts.prefix, opts.thresholds, track_gaps=opts.track_gaps)
        self.queue: deque[Pending] = deque()
        self.history_dropped = 0           # kept for the metric: nothing is dropped any more
        self.write_errors = 0
        self.ingest_errors = 0
        self.rows_written = 0
        self.batches = 0
        self.gap_events = 0
        self.held = 0                       # messages the writer took and has not committed yet
        self.visible_lag = LagHistogram()   # device ts -> row committed, over this process' life
        self.arrival_lag = LagHistogram()   # device ts -> message received (the MQTT path's share)
        self.connected = threading.Event()
        self.client_id = ""
        self._wake = threading.Event()
        self._space = threading.Event()     # the writer took messages: the queue has room again
        self._stop = threading.Event()
        self._closing = False
        self._started = time.time()
        self._writer: threading.Thread | None = None
        self._client: mqtt.Client | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Collector:
        opts = self.opts
        if opts.store is not None:
            self.store = open_store(opts.store)
            if self.store.shared:       # gaps are counted in the store, across collectors
                self.state.track_gaps = False
            self.state.restore(self.store.devices())
        persistent = opts.persistent
        # a clean collector gets a unique id: two with one id would take each other's session over
        self.client_id = opts.stable_client_id() if persistent or opts.client_id else \
            f"edgeagent-fleet-{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        client = make_client(opts.broker, self.client_id, mqtt5=opts.mqtt5, clean_start=not persistent,
                             manual_ack=self.store is not None)
        client.max_inflight_messages_set(1000)
        paho_io.buffer_reads(client)  # one recv for many small messages, not several per message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name="fleet-writer", daemon=True)
        self._writer.start()
        try:
            connect_and_wait(client, opts.broker, opts.keepalive_s, clean_start=not persistent,
                             session_expiry_s=opts.session_expiry_s if persistent else 0, mqtt5=opts.mqtt5,
                             receive_maximum=RECEIVE_MAXIMUM)
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self._closing = True
        self._stop.set()
        self._wake.set()
        self._space.set()
        if self._writer is not None:
            self._writer.join(30.0)      # its last flush acknowledges what it wrote
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        if self.store is not None:
            self.store.close()
            self.store = None

    # ---- MQTT thread --------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    props: object = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection: %s", reason)
            return
        client.subscribe([(f, self.opts.qos) for f in self.opts.filters()])
        self.connected.set()
        log.info("connected; subscribed to %s", ", ".join(self.opts.filters()))

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                       props: object = None) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("disconnected from the broker (%s); paho reconnects", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._closing and self.store is not None:
            return          # not acknowledged: the broker redelivers it to our next session
        now = time.time()
        try:
            out = self.state.ingest(msg.topic, bytes(msg.payload), now)
        except ProtocolError as exc:
            log.debug("rejected: %s", exc)
            self._ack(msg.mid, msg.qos)
            return
        except Exception as exc:  # a bug must not kill paho's network thread; say so once
            self.ingest_errors += 1
            level = logging.WARNING if self.ingest_errors == 1 else logging.DEBUG
            log.log(level, "could not ingest a message on %s: %r", msg.topic, exc)
            self._ack(msg.mid, msg.qos)
            return
        if self.store is None or not (out.samples or out.events or out.jobs):
            self._ack(msg.mid, msg.qos)     # state only (status, config): retained, or rebuilt
            return
        q = self.queue
        q.append(Pending(out, msg.mid, msg.qos))
        if len(q) == 1 or len(q) >= self.opts.batch_max:
            self._wake.set()
        while len(q) >= self.opts.queue_max and not self._closing:
            # full: stop reading (TCP backpressure); the broker keeps the rest. A wait longer than
            # the keepalive costs a reconnect, never a message (nothing past here is acknowledged).
            self._space.clear()
            if len(q) < self.opts.queue_max:
                break
            self._space.wait(1.0)

    def _ack(self, mid: int, qos: int) -> None:
        if self.store is not None and qos > 0 and self._client is not None:
            self._client.ack(mid, qos)

    # ---- writer thread ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        """Gather, write, acknowledge; on a store error keep the batch, back off and retry it."""
        opts = self.opts
        next_prune = next_snapshot = next_gaps = 0.0
        batch: list[Pending] = []
        attempt = 0
        while True:
            stopping = self._stop.is_set()
            if not batch and not stopping:
                self._wake.wait(opts.flush_interval_s)
                self._wake.clear()
                first = time.monotonic()
                # gather: until the batch is full, nothing came for linger_s, or flush_interval_s passed
                while len(self.queue) < opts.batch_max and not self._stop.is_set():
                    n = len(self.queue)
                    if self._stop.wait(opts.linger_s) or len(self.queue) == n \
                            or time.monotonic() - first >= opts.flush_interval_s:
                        break
            now = time.time()
            with self.state.lock:
                self.state.stats.roll(now)
            q = self.queue
            while q and len(batch) < opts.batch_max:
                batch.append(q.popleft())
            self._space.set()
            self.held = len(batch)
            store = self.store
            if store is None:
                batch.clear()
                if stopping:
                    return
                continue
            try:
                snapshots = now >= next_snapshot or stopping
                self.commit(store, batch, now, snapshots)
                if snapshots:
                    next_snapshot = now + (opts.snapshot_interval_s or (5.0 if store.shared else 1.0))
                batch = []
                self.held = 0
                if attempt:
                    log.warning("writing the fleet store again after %d failed attempts", attempt)
                attempt = 0
                if now >= next_gaps and store.shared:
                    self.gap_events += store.scan_gaps(now, opts.gap_settle_s)
                    next_gaps = now + opts.gap_scan_interval_s
                if now >= next_prune:
                    pruned = store.prune(now - opts.retention_h * 3600.0)
                    if pruned:
                        log.info("pruned history older than %.1f h (%d)", opts.retention_h, pruned)
                    next_prune = now + opts.prune_interval_s
            except Exception as exc:  # one place per loop: keep collecting, report once per kind
                self.write_errors += 1
                attempt += 1
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(level, "writing the fleet store failed (%d messages held, not acknowledged; "
                        "retrying): %s", len(batch) + len(self.queue), exc)
                if stopping or self._stop.wait(backoff_s(attempt, 0.2, 10.0)):
                    return     # unacknowledged: the broker redelivers them to our next session
                continue
            if stopping and not self.queue:
                return

    def commit(self, store: FleetStore, batch: list[Pending], now: float, snapshots: bool) -> None:
        """Write a batch (with the changed device snapshots and the heartbeat when `snapshots`) in one
        transaction, then acknowledge its messages; on failure nothing is acknowledged."""
        devices = self.state.take_dirty() if snapshots else []
        try:
            self._write(store, batch, devices, now, snapshots)
        except BaseException:
            if devices:      # written with the next snapshot instead
                with self.state.lock:
                    self.state.dirty.update(d["device"] for d in devices)
            raise
        committed = time.time()
        lag, arrival = self.visible_lag, self.arrival_lag
        for p in batch:
            self._ack(p.mid, p.qos)
            for row in p.rows.samples:
                lag.add(committed - row[2])
                arrival.add(row[3] - row[2])

    def _write(self, store: FleetStore, batch: list[Pending], devices: list[dict[str, Any]], now: float,
               heartbeat: bool) -> None:
        samples = [r for p in batch for r in p.rows.samples]
        events = [r for p in batch for r in p.rows.events]
        jobs = [r for p in batch for r in p.rows.jobs]
        if samples or events or jobs or devices or heartbeat:
            store.write(samples, events, jobs, devices, now=now,
                        heartbeat=self.heartbeat(now) if heartbeat else None)
            self.rows_written += len(samples) + len(events) + len(jobs)
            self.batches += 1

    def heartbeat(self, now: float) -> dict[str, Any]:
        """This collector's row in the store's `collectors` table (fleet stats)."""
        h = self.health()
        return {"id": self.client_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self._started, "share_group": self.opts.share_group,
                "messages_per_s": h["messages_per_s"], "samples_per_s": h["samples_per_s"],
                "lag_s": h["lag_s"], "lag_max_s": h["lag_max_s"], "rows_written": self.rows_written,
                "batches": self.batches, "queue_depth": h["queue_depth"], "write_errors": self.write_errors,
                "samples": h["samples"], "visible_lag_p50_s": self.visible_lag.quantile(0.5),
                "visible_lag_p99_s": self.visible_lag.quantile(0.99),
                "arrival_lag_p50_s": self.arrival_lag.quantile(0.5),
                "arrival_lag_p99_s": self.arrival_lag.quantile(0.99),
                "visible_samples": self.visible_lag.total}

    # ---- reading ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Collector health as plain numbers (metrics and the periodic log line read this)."""
        st = self.state.stats
        with self.state.lock:
            devices = len(self.state.devices)
            messages = dict(st.messages)
            out = {"devices": devices, "messages": messages, "samples": st.samples, "gaps": st.gaps,
                   "duplicates": st.duplicates, "messages_per_s": st.messages_per_s,
                   "samples_per_s": st.samples_per_s, "lag_s": st.lag_s, "lag_max_s": st.lag_max_s}
        out.update(queue_depth=len(self.queue) + self.held, history_dropped=self.history_dropped,
                   rows_written=self.rows_written, write_errors=self.write_errors,
                   connected=self.connected.is_set())
        return out
