"""Prometheus export: what a scrape contains, and that the Grafana dashboard only asks for real series."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from edgeagent.core import protocol
from edgeagent.ops.fleet.metrics import FleetMetrics
from edgeagent.ops.fleet.state import FleetState

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0


def _scrape(now: float = T0 + 2) -> str:
    fs = FleetState("edge")
    fs.ingest("edge/d1/status", protocol.dumps(protocol.status_online({"name": "m", "version": "1"})), T0)
    sample = {"seq": 1, "ts": T0, "metrics": {"cpu_percent": 95.0, "mem_used_percent": 40.0, "temp_c": 80.5},
              "inference": {"p95_ms": 12.0, "anomaly_rate_1m": 0.5}, "spool": {"backlog": 3}}
    fs.ingest("edge/d1/telemetry", protocol.dumps(protocol.telemetry("d1", [sample])), T0)
    fs.ingest("edge/d1/telemetry", protocol.dumps(protocol.telemetry("d1", [dict(sample, seq=4)])), T0 + 1)
    fs.ingest("edge/d1/events", protocol.dumps(protocol.event("d1", 1, "anomaly", "warning", "a", ts=T0)), T0)
    fs.ingest("edge/d1/updates/j1/status", protocol.dumps(
        protocol.job_status("j1", "model", "m", "2", "downloading", progress=0.25)), T0)
    fs.ingest("edge/d2/status", protocol.dumps(protocol.status_offline("connection-lost")), T0)
    fs.stats.roll(T0)
    health = {"messages": dict(fs.stats.messages), "samples": fs.stats.samples, "gaps": fs.stats.gaps,
              "duplicates": 0, "messages_per_s": 10.0, "samples_per_s": 10.0, "lag_s": 0.2, "lag_max_s": 0.4,
              "queue_depth": 0, "history_dropped": 0, "write_errors": 0, "connected": True}
    reg = CollectorRegistry()
    reg.register(FleetMetrics(fs.snapshot, lambda: health, fs.thresholds))
    return generate_latest(reg).decode()


def test_a_scrape_has_per_device_gauges_and_collector_health():
    text = _scrape()
    for line in ('edgeagent_device_online{device="d1"} 1.0', 'edgeagent_device_online{device="d2"} 0.0',
                 'edgeagent_device_temperature_celsius{device="d1"} 80.5',
                 'edgeagent_device_inference_p95_seconds{device="d1"} 0.012',
                 'edgeagent_device_seq_gaps_total{device="d1",stream="telemetry"} 2.0',
                 'edgeagent_device_update_state{device="d1",job="j1",state="downloading"} 1.0',
                 'edgeagent_device_update_progress{device="d1",job="j1"} 0.25',
                 'edgeagent_device_trouble{device="d1",trouble="hot"} 1.0',
                 'edgeagent_device_trouble{device="d2",trouble="offline"} 1.0',
                 'edgeagent_device_anomalies_total{device="d1"} 1.0',
                 'edgeagent_fleet_devices{state="offline"} 1.0', "edgeagent_fleet_lag_seconds 0.2"):
        assert line in text, line
    assert 'edgeagent_device_cpu_percent{device="d2"}' not in text     # absent sensors are not faked


def test_every_series_the_dashboard_queries_is_exported():
    dash = json.loads((ROOT / "configs/grafana/edgeagent-fleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs.append(dash["templating"]["list"][1]["query"]["query"])
    wanted = {m for e in exprs for m in re.findall(r"edgeagent_[a-z0-9_]+", e)}
    assert len(wanted) > 15
    exported = set(re.findall(r"^(edgeagent_[a-z0-9_]+)", _scrape(), re.M))
    assert wanted <= exported, wanted - exported
