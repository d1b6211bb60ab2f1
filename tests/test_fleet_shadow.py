"""Shadow figures in the fleet tools: the device state keeps them, `fleet watch` shows the agreement
of a device in shadow, and `fleet history` (the job log in the real SQLite store) keeps them."""

from __future__ import annotations

from pathlib import Path

from edgeagent.core import protocol
from edgeagent.ops.fleet.state import FleetState, Thresholds
from edgeagent.ops.fleet.store_sqlite import Store
from edgeagent.ops.fleet.watch import device_row, plain_table, table

T0 = 1_800_000_000.0
FIGURES = {"candidate": "m@2.0.0", "windows": 500, "compared": 120, "agreement": 0.9917, "shed": 3,
           "min_agreement": 0.95, "p99_ratio": 1.02, "score_shift": -0.003, "score_ks": 0.04,
           "note": "x" * 5000, "progress": 0.24}


def job(state: str, reason: str, shadow: dict[str, object] | None, ts: float) -> bytes:
    doc = protocol.job_status("j1", "model", "m", "2.0.0", state, reason, ts=ts, shadow=shadow)
    return protocol.dumps(doc)


def test_watch_shows_a_device_in_shadow_and_history_keeps_its_figures(tmp_path: Path) -> None:
    fs = FleetState("edge")
    fs.ingest("edge/d1/status", protocol.dumps(protocol.status_online({"name": "m", "version": "1.0.0"},
                                                                      None, ts=T0)), T0)
    shadowing = fs.ingest("edge/d1/updates/j1/status", job("shadowing", "comparing", FIGURES, T0), T0 + 1)
    final = dict(FIGURES, compared=500, agreement=0.07)
    rejected = fs.ingest("edge/d1/updates/j1/status",
                         job("rejected", "shadow failed (agreement)", final, T0 + 9), T0 + 9)

    with Store(tmp_path / "fleet.sqlite") as store:
        store.write([], [], shadowing.jobs + rejected.jobs, [], now=T0 + 10)
        history = store.jobs("d1")
    reasons = [h["reason"] for h in history]
    assert any("shadow 120/500 windows, agreement 0.992, p99 ratio 1.02, score shift -0.003, shed 3" in r
               for r in reasons), reasons
    assert any(r.startswith("shadow failed (agreement) | shadow 500/500 windows, agreement 0.070")
               for r in reasons), reasons
    assert all("xxxx" not in r for r in reasons)  # only the numeric figures are kept

    # the watch view, while the job is in shadow
    fs2 = FleetState("edge")
    fs2.ingest("edge/d1/updates/j1/status", job("shadowing", "comparing", FIGURES, T0), T0 + 1)
    row = device_row(fs2.snapshot()[0], T0 + 2, Thresholds())
    assert row["update"]["state"] == "shadowing" and row["update"]["shadow"]["agreement"] == 0.9917
    text = plain_table(table([row]))
    assert "shadow" in text.splitlines()[0] and "120/500 0.992" in text
    done = device_row(fs.snapshot()[0], T0 + 10, Thresholds())
    assert "120/500" not in plain_table(table([done]))  # no longer in shadow: the column is empty
