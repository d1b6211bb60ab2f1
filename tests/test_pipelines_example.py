"""configs/examples/multi.toml as an operator runs it: `edgeagent run` in its own process against a
real Mosquitto, two pipelines serving, the autoencoder calibrating on the device, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Broker
from tests.inference_helpers import RUNTIMES
from tests.transport_util import Observer
from tests.util import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not RUNTIMES, reason="no TFLite runtime")]

ROOT = Path(__file__).resolve().parent.parent
MULTI = ROOT / "configs" / "examples" / "multi.toml"


def test_multi_example_runs_two_pipelines_and_reports_both(tmp_path: Path, broker: Broker) -> None:
    state = tmp_path / "state"
    env = dict(
        os.environ,
        EDGEAGENT_MQTT_HOST="127.0.0.1",
        EDGEAGENT_MQTT_PORT=str(broker.port),
        EDGEAGENT_STATE_DIR=str(state),
        EDGEAGENT_DEVICE_ID="multi-test",
    )
    observer = Observer(broker.port, ("edge/multi-test/#",), client_id="multi-observer")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.cli", "run", "--config", str(MULTI)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def inference() -> dict[str, Any]:
        p = state / "health.json"
        return json.loads(p.read_text())["sections"].get("inference", {}) if p.exists() else {}

    try:

        def calibrated() -> bool:
            pipes = inference().get("pipelines", {})
            return pipes.get("vibration", {}).get("count", 0) > 0 and "threshold" in pipes.get("pump", {})

        wait_until(calibrated, 60, message="both pipelines serving, the pump's threshold calibrated")
        wait_until(
            lambda: any(
                "pump" in (s.get("inference") or {}).get("pipelines", {})
                for m in observer.on("edge/multi-test/telemetry")
                for s in m["samples"]
            ),
            30,
            message="telemetry with both pipelines",
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate()
        observer.close()
    assert code == 0, err
    section = inference()
    assert section["model"] == "vibration-anomaly@1.0.0"  # flat: the first pipeline's
    assert section["pipelines"]["pump"]["model"] == "vibration-autoencoder@1.0.0"
    saved = json.loads((state / "calibration" / "pump.json").read_text())
    assert saved["windows"] == 400 and saved["threshold"] == section["pipelines"]["pump"]["threshold"]
    status = [m for m in observer.on("edge/multi-test/status") if m.get("state") == "online"]
    assert status and status[-1]["pipelines"]["pump"] == {"name": "vibration-autoencoder", "version": "1.0.0"}
    events = [m for m in observer.on("edge/multi-test/events") if m.get("kind") == "config"]
    assert any(e["data"].get("pipeline") == "pump" for e in events)
