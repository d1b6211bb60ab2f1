"""`fleet collect`: subscribe to every device, keep fleet state, write history to SQLite, export metrics.

Threads, not asyncio: paho's network thread parses and ingests each message (cheap, in memory)
and appends rows to a bounded deque; one writer thread drains it every `flush_interval_s` in a
single SQLite transaction, flushes changed device snapshots, and prunes old history.
When the deque is full the oldest history rows are dropped and counted
(`edgeagent_fleet_history_dropped_total`): live state and metrics stay exact, only stored
history loses rows; blocking the network thread instead would stall keepalives and let the
broker's queue (and the lag) grow without bound.
"""

from __future__ import annotations

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

from edgeagent.core.errors import ProtocolError
from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client
from edgeagent.ops.fleet.state import FleetState, Thresholds
from edgeagent.ops.fleet.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    broker: BrokerUrl
    prefix: str = "edge"
    db: Path | None = None
    share_group: str | None = None     # None: plain subscription; else $share/<group>/...
    client_id: str = ""
    session_expiry_s: int = 0          # >0 with a fixed client_id: the broker queues while we are away
    mqtt5: bool = True
    # Off when several collectors share one group: each then sees only part of every stream.
    track_gaps: bool = True
    keepalive_s: int = 30
    qos: int = 1
    flush_interval_s: float = 0.2        # history rows: one transaction this often
    snapshot_interval_s: float = 1.0     # changed device snapshots (JSON) this often: they cost more
    queue_max: int = 200_000
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


class Collector:
    """Context manager: `with Collector(opts) as c: ...`; threads start in __enter__, stop in __exit__."""

    def __init__(self, opts: CollectorOptions) -> None:
        self.opts = opts
        self.state = FleetState(opts.prefix, opts.thresholds, track_gaps=opts.track_gaps)
        self.queue: deque[tuple[str, tuple[Any, ...]]] = deque()
        self.history_dropped = 0
        self.write_errors = 0
        self.ingest_errors = 0
        self.rows_written = 0
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._closing = False
        self._writer: threading.Thread | None = None
        self._store: Store | None = None
        self._client: mqtt.Client | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Collector:
        opts = self.opts
        if opts.db is not None:
            self._store = Store(opts.db)
            self.state.restore(self._store.devices())
        # unique per instance: two collectors with one id would take each other's session over
        client_id = opts.client_id or f"edgeagent-fleet-{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        clean = not (opts.session_expiry_s > 0 and opts.client_id)
        client = make_client(opts.broker, client_id, mqtt5=opts.mqtt5, clean_start=clean)
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name="fleet-writer", daemon=True)
        self._writer.start()
        try:
            connect_and_wait(client, opts.broker, opts.keepalive_s, clean_start=clean,
                             session_expiry_s=opts.session_expiry_s if not clean else 0, mqtt5=opts.mqtt5)
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self._closing = True
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(30.0)
        if self._store is not None:
            self._flush()                # whatever the writer had not taken yet
            self._store.close()
            self._store = None

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
        now = time.time()
        try:
            out = self.state.ingest(msg.topic, bytes(msg.payload), now)
        except ProtocolError as exc:
            log.debug("rejected: %s", exc)
            return
        except Exception as exc:  # a bug must not kill paho's network thread; say so once
            self.ingest_errors += 1
            level = logging.WARNING if self.ingest_errors == 1 else logging.DEBUG
            log.log(level, "could not ingest a message on %s: %r", msg.topic, exc)
            return
        if self._store is None:
            return
        q = self.queue
        free = self.opts.queue_max - len(q)
        rows = [("s", r) for r in out.samples] + [("e", r) for r in out.events] + [("j", r) for r in out.jobs]
        over = len(rows) - free
        for _ in range(max(0, over)):
            if q:
                q.popleft()
                self.history_dropped += 1
        q.extend(rows)

    # ---- writer thread ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        next_prune = next_snapshot = 0.0
        while not self._stop.wait(self.opts.flush_interval_s):
            now = time.time()
            with self.state.lock:
                self.state.stats.roll(now)
            if self._store is None:
                continue
            try:
                snapshots = now >= next_snapshot
                if snapshots:
                    next_snapshot = now + self.opts.snapshot_interval_s
                self._flush(snapshots)
                if now >= next_prune:
                    pruned = self._store.prune(now - self.opts.retention_h * 3600.0)
                    if pruned:
                        log.info("pruned %d history rows older than %.1f h", pruned, self.opts.retention_h)
                    next_prune = now + self.opts.prune_interval_s
            except Exception as exc:  # one place per loop: keep collecting, report once per kind
                self.write_errors += 1
                level = logging.WARNING if self.write_errors == 1 else logging.DEBUG
                log.log(level, "writing the fleet database failed: %s", exc)

    def _flush(self, snapshots: bool = True) -> None:
        store = self._store
        if store is None:
            return
        q = self.queue
        samples: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        jobs: list[tuple[Any, ...]] = []
        for _ in range(len(q)):
            kind, row = q.popleft()
            (samples if kind == "s" else events if kind == "e" else jobs).append(row)
        devices = self.state.take_dirty() if snapshots else []
        if samples or events or jobs or devices:
            store.write(samples, events, jobs, devices, now=time.time())
            self.rows_written += len(samples) + len(events) + len(jobs)

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
        out.update(queue_depth=len(self.queue), history_dropped=self.history_dropped,
                   rows_written=self.rows_written, write_errors=self.write_errors,
                   connected=self.connected.is_set())
        return out
