"""Prometheus export of the fleet state: per-device gauges and collector health, built at scrape time.

A custom collector reads one snapshot per scrape instead of updating labelled gauges per message,
so ingestion stays cheap and devices that vanish from the state vanish from the export.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector

from edgeagent.core.protocol import JOB_STATES
from edgeagent.ops.fleet.state import Thresholds, active_job, is_stale, recent_anomalies, troubles

DEVICE_GAUGES: tuple[tuple[str, str, str, str, float], ...] = (
    # (metric name, help, snapshot section, field, scale)
    ("edgeagent_device_cpu_percent", "CPU use in percent", "metrics", "cpu_percent", 1.0),
    ("edgeagent_device_memory_used_percent", "Memory use in percent", "metrics", "mem_used_percent", 1.0),
    ("edgeagent_device_temperature_celsius", "SoC temperature", "metrics", "temp_c", 1.0),
    ("edgeagent_device_load1", "1-minute load average", "metrics", "load1", 1.0),
    ("edgeagent_device_disk_free_bytes", "Free disk on the state volume", "metrics", "disk_free_mb", 1e6),
    ("edgeagent_device_inference_p95_seconds", "Inference latency p95", "inference", "p95_ms", 1e-3),
    ("edgeagent_device_inference_rate_hz", "Inferences per second", "inference", "rate_hz", 1.0),
    ("edgeagent_device_anomaly_rate_1m", "Anomaly rate over the last minute, as the device reports it",
     "inference", "anomaly_rate_1m", 1.0),
    ("edgeagent_device_spool_backlog", "Samples waiting in the device's spool", "spool", "backlog", 1.0),
)


class FleetMetrics(PromCollector):
    """Yields metric families from `snapshot()` and `health()` at each scrape."""

    def __init__(self, snapshot: Callable[[], list[dict[str, Any]]], health: Callable[[], dict[str, Any]],
                 thresholds: Thresholds) -> None:
        self.snapshot = snapshot
        self.health = health
        self.thresholds = thresholds

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        devs = self.snapshot()
        yield from self._device_families(devs, now)
        yield from self._health_families(self.health(), devs, now)

    def _device_families(self, devs: list[dict[str, Any]], now: float
                         ) -> Iterator[Metric]:
        th = self.thresholds
        online = GaugeMetricFamily("edgeagent_device_online", "1 if the device's status is online",
                                   labels=["device"])
        stale = GaugeMetricFamily("edgeagent_device_stale", "1 if online but silent for N intervals",
                                  labels=["device"])
        seen = GaugeMetricFamily("edgeagent_device_last_seen_timestamp_seconds",
                                 "When the collector last heard from the device", labels=["device"])
        trouble = GaugeMetricFamily("edgeagent_device_trouble", "1 per current trouble",
                                    labels=["device", "trouble"])
        info = GaugeMetricFamily("edgeagent_device_info", "Model, agent and firmware versions",
                                 labels=["device", "model", "agent", "firmware", "groups"])
        gauges = {name: GaugeMetricFamily(name, help_, labels=["device"])
                  for name, help_, _, _, _ in DEVICE_GAUGES}
        anomalies = CounterMetricFamily("edgeagent_device_anomalies", "Anomaly events received",
                                        labels=["device"])
        recent = GaugeMetricFamily("edgeagent_device_anomalies_recent",
                                   "Anomaly events in the trouble window", labels=["device"])
        gaps = CounterMetricFamily("edgeagent_device_seq_gaps", "Missing seq numbers (data loss)",
                                   labels=["device", "stream"])
        received = CounterMetricFamily("edgeagent_device_received", "Samples/events received",
                                       labels=["device", "stream"])
        upd_state = GaugeMetricFamily("edgeagent_device_update_state",
                                      "1 for the state of the device's current update job",
                                      labels=["device", "job", "state"])
        upd_progress = GaugeMetricFamily("edgeagent_device_update_progress", "Update job progress 0..1",
                                         labels=["device", "job"])
        for d in devs:
            name = str(d["device"])
            online.add_metric([name], 1.0 if d.get("state") == "online" else 0.0)
            stale.add_metric([name], 1.0 if is_stale(d, now, th) else 0.0)
            seen.add_metric([name], float(d.get("last_seen") or 0.0))
            for t in troubles(d, now, th):
                trouble.add_metric([name, t], 1.0)
            info.add_metric([name, d.get("model") or "", d.get("agent") or "", d.get("firmware") or "",
                             ",".join(d.get("groups") or [])], 1.0)
            for metric, _, section, key, scale in DEVICE_GAUGES:
                value = (d.get(section) or {}).get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    gauges[metric].add_metric([name], float(value) * scale)
            anomalies.add_metric([name], float(d.get("anomalies_total") or 0))
            recent.add_metric([name], float(recent_anomalies(d, now, th)))
            for stream in ("telemetry", "events"):
                tracker = d.get(stream) or {}
                gaps.add_metric([name, stream], float(tracker.get("gaps") or 0))
                received.add_metric([name, stream], float(tracker.get("received") or 0))
            job = active_job(d)
            if job:
                for s in JOB_STATES:
                    upd_state.add_metric([name, str(job["job"]), s], 1.0 if job.get("state") == s else 0.0)
                upd_progress.add_metric([name, str(job["job"])], float(job.get("progress") or 0.0))
        yield from (online, stale, seen, trouble, info, *gauges.values(), anomalies, recent, gaps,
                    received, upd_state, upd_progress)

    def _health_families(self, h: dict[str, Any], devs: list[dict[str, Any]], now: float
                         ) -> Iterator[Metric]:
        msgs = CounterMetricFamily("edgeagent_fleet_messages", "MQTT messages ingested", labels=["kind"])
        for kind, n in sorted(h["messages"].items()):
            msgs.add_metric([kind], float(n))
        yield msgs
        yield CounterMetricFamily("edgeagent_fleet_samples", "Telemetry samples ingested", value=h["samples"])
        yield GaugeMetricFamily("edgeagent_fleet_messages_per_second", "Ingest rate over the last second",
                                value=h["messages_per_s"])
        yield GaugeMetricFamily("edgeagent_fleet_samples_per_second", "Samples per second, last second",
                                value=h["samples_per_s"])
        yield GaugeMetricFamily("edgeagent_fleet_lag_seconds",
                                "Max (receive time - newest sample ts) over the last second",
                                value=h["lag_s"])
        yield GaugeMetricFamily("edgeagent_fleet_lag_max_seconds", "Max window lag since start",
                                value=h["lag_max_s"])
        yield CounterMetricFamily("edgeagent_fleet_seq_gaps", "Missing seq numbers over all devices",
                                  value=h["gaps"])
        yield CounterMetricFamily("edgeagent_fleet_duplicates", "Redelivered samples/events ignored",
                                  value=h["duplicates"])
        yield GaugeMetricFamily("edgeagent_fleet_queue_depth", "History rows waiting for the writer",
                                value=h["queue_depth"])
        yield CounterMetricFamily("edgeagent_fleet_history_dropped", "History rows dropped (queue full)",
                                  value=h["history_dropped"])
        yield CounterMetricFamily("edgeagent_fleet_write_errors", "Failed database writes",
                                  value=h["write_errors"])
        yield GaugeMetricFamily("edgeagent_fleet_connected", "1 while connected to the broker",
                                value=1.0 if h["connected"] else 0.0)
        by_state = GaugeMetricFamily("edgeagent_fleet_devices", "Devices by state", labels=["state"])
        counts = {"online": 0, "offline": 0, "unknown": 0, "stale": 0}
        for d in devs:
            counts[str(d.get("state"))] = counts.get(str(d.get("state")), 0) + 1
            if is_stale(d, now, self.thresholds):
                counts["stale"] += 1
        for s, n in sorted(counts.items()):
            by_state.add_metric([s], float(n))
        yield by_state


def serve(listen: str, metrics: FleetMetrics) -> CollectorRegistry:
    """Start the /metrics HTTP server on "host:port" or ":port" (daemon thread)."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(metrics)
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    return registry
