"""`scripts/demo`: the agent on configs/dev.toml against a loopback Mosquitto, printed as it happens.

Starts a throwaway broker on a free loopback port (when the `mosquitto` binary exists; otherwise the
agent runs offline and the demo reads its health file), runs `edgeagent run` as a real process,
subscribes to everything the device publishes and prints one line per message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgeagent.ops.mosquitto import MOSQUITTO, Broker

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the demo runs configs/dev.toml
DEV_CONFIG = ROOT / "configs" / "dev.toml"


def start_broker(workdir: Path) -> Broker | None:
    """A throwaway loopback Mosquitto (the field trial's launcher), or None when there is none."""
    if not os.path.exists(MOSQUITTO):
        return None
    try:
        return Broker(workdir / "broker").start()
    except (OSError, RuntimeError):
        return None


def _fmt_metrics(m: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("cpu_percent", "cpu {:.0f}%"), ("load1", "load {:.2f}"),
                     ("mem_used_percent", "mem {:.0f}%"), ("temp_c", "temp {:.1f}C"),
                     ("disk_free_mb", "disk {:.0f}MB free"), ("net_rx_bps", "rx {:.0f}B/s"),
                     ("agent_rss_mb", "agent {:.1f}MiB"), ("agent_cpu_percent", "agent cpu {:.1f}%")):
        if isinstance(m.get(key), (int, float)):
            parts.append(fmt.format(m[key]))
    return "  ".join(parts)


def describe(topic: str, payload: bytes) -> str:
    kind = topic.split("/", 2)[-1]
    try:
        msg = json.loads(payload)
    except ValueError:
        return f"{kind:<12} {payload[:120]!r}"
    if kind == "telemetry":
        lines = []
        for s in msg.get("samples", []):
            line = f"telemetry    seq={s.get('seq')}  {_fmt_metrics(s.get('metrics', {}))}"
            inf = s.get("inference") or {}
            if inf.get("model"):
                line += (f"\n             inference {inf.get('model')}: {inf.get('rate_hz', 0):.0f} windows/s"
                         f"  p50 {inf.get('p50_ms', 0):.2f} ms  p95 {inf.get('p95_ms', 0):.2f} ms"
                         f"  score {inf.get('last_score')}  dropped {inf.get('dropped', 0)}")
            sp = s.get("spool") or {}
            if sp:
                line += f"\n             spool backlog {sp.get('backlog')}  dropped {sp.get('dropped')}"
            lines.append(line)
        return "\n".join(lines)
    if kind == "status":
        model = msg.get("model") or {}
        model_text = f" model={model.get('name')}@{model.get('version')}" if model else ""
        agent = msg.get("agent", "")
        return f"status       {msg.get('state')} {msg.get('reason', '')} agent={agent}{model_text}"
    if kind == "events":
        return f"event        [{msg.get('severity')}] {msg.get('kind')}: {msg.get('message')}"
    return f"{kind:<12} {json.dumps(msg)[:160]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to run (0: until Ctrl-C)")
    ap.add_argument("--config", type=Path, default=DEV_CONFIG)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="edgeagent-demo-"))
    env = dict(os.environ, EDGEAGENT_STATE_DIR=str(work / "state"), EDGEAGENT_DEVICE_ID="demo-device")
    broker = start_broker(work)
    sub = None
    if broker:
        env.update(EDGEAGENT_MQTT_HOST="127.0.0.1", EDGEAGENT_MQTT_PORT=str(broker.port))
        print(f"demo: Mosquitto on 127.0.0.1:{broker.port}, state in {work}/state", flush=True)
        sub = _subscribe(broker.port)
    else:
        env.update(EDGEAGENT_MQTT_HOST="")
        print(f"demo: no mosquitto binary: the agent runs offline; state in {work}/state", flush=True)
    agent = subprocess.Popen([sys.executable, "-m", "edgeagent.cli", "run", "--config", str(args.config),
                              "--log-level", "WARNING"], env=env)
    print(f"demo: agent pid {agent.pid} on {args.config.name}; Ctrl-C to stop", flush=True)
    try:
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else float("inf")
        last_health = 0.0
        while time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.2)
            if not broker and time.monotonic() - last_health > 2:
                last_health = time.monotonic()
                _print_health(work / "state" / "health.json")
    except KeyboardInterrupt:
        pass
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        time.sleep(0.3)  # let the "offline"/"shutdown" status reach the printer
        if sub:
            sub.loop_stop()
        if broker:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"demo: agent exited with {agent.returncode}")
    return 0 if agent.returncode == 0 else 1


def _print_health(path: Path) -> None:
    try:
        health = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    comps = ", ".join(f"{k}:{v.get('state')}" for k, v in health.get("components", {}).items())
    print(f"health       {health.get('state')}  components {comps}", flush=True)


def _subscribe(port: int) -> Any:
    import paho.mqtt.client as mqtt

    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic.endswith("/ping"):  # the agent's own broker round-trip probe
            return
        with lock:
            print(describe(msg.topic, msg.payload), flush=True)

    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgeagent-demo-viewer")
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe("edge/#", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


if __name__ == "__main__":
    sys.exit(main())
