"""Shared pieces of the update tests: keys, manifests, configs, a status watcher, a model installer.

`FakeModelInstaller` implements updates.seams.ModelInstaller (our own seam) for tests that do not need the
real interpreter; everything else here is real (ed25519, files, Mosquitto, processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.core import config as cfgmod
from edgeagent.core import protocol, signing
from edgeagent.core.config_layers import dumps_toml
from edgeagent.core.errors import ModelRejected, ModelRolledBack
from edgeagent.core.fsutil import atomic_write_json
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.ops.push import build_manifest

ROOT = Path(__file__).resolve().parent.parent
FAKE_AB = ROOT / "fieldtrial" / "fixtures" / "fake_ab_installer.py"
MODEL = ROOT / "edgeagent" / "models" / "vibration-anomaly" / "model.tflite"
KEY_ID = "ops-test"


def make_keys(d: Path, key_id: str = KEY_ID) -> tuple[Ed25519PrivateKey, Path]:
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / f"{key_id}.key", d / f"{key_id}.pem"
    signing.generate_keypair(priv, pub)
    return signing.load_private_key(priv), pub


def openssl_keys(d: Path, key_id: str) -> tuple[Ed25519PrivateKey, Path]:
    """A key pair made by the openssl CLI, as an operator would (`openssl pkey -pubout`)."""
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / f"{key_id}.key", d / f"{key_id}.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(priv)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)], check=True)
    return signing.load_private_key(priv), pub


def signed(path: Path, key: Ed25519PrivateKey, key_id: str = KEY_ID, **kw: Any) -> dict[str, Any]:
    kw.setdefault("job", "j1")
    kw.setdefault("kind", "model")
    kw.setdefault("name", "vibration-anomaly")
    kw.setdefault("version", "2.0.0")
    return signing.sign(build_manifest(path, **kw), key, key_id)


def make_raw(tmp: Path, pub: Path | None, broker_port: int | None = None, device: str = "dev1",
             **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "device": {"id": device, "state_dir": str(tmp / "state"), "hardware": "rpi4", "groups": ["line1"]},
        "mqtt": {"host": "127.0.0.1" if broker_port else "", "port": broker_port or 1883,
                 "reconnect_initial_s": 0.1, "reconnect_max_s": 1.0, "tls": {"enabled": False}},
        "inference": {"enabled": False},
        "updates": {"trusted_keys": {KEY_ID: str(pub)} if pub else {}, "request_interval_s": 0.5,
                    "gates": {"model": {}, "firmware": {}},
                    "firmware": {"mode": "direct", "installer": "script",
                                 "version_file": str(tmp / "fw-version"), "health_timeout_s": 20}},
        "agent": {"shutdown_timeout_s": 5},
    }
    return cfgmod.merge_layers(raw, sections)


def make_config(tmp: Path, pub: Path | None, broker_port: int | None = None, device: str = "dev1",
                **sections: Any) -> cfgmod.Config:
    return cfgmod.build(make_raw(tmp, pub, broker_port, device, **sections))


def fake_ab_commands(ab: Path, **flags: str) -> dict[str, list[str]]:
    """updates.firmware.commands for the fake A/B installer (flags: e.g. install="--fail")."""
    cmds: dict[str, list[str]] = {}
    for op in ("install", "reboot", "mark-good", "mark-bad", "abort", "slot"):
        argv = [sys.executable, str(FAKE_AB), "--root", str(ab)]
        if op in flags:
            argv.append(flags[op])
        argv.append(op)
        if op == "install":
            argv.append("{artifact}")
        cmds[op] = argv
    return cmds


def config_toml(cfg_raw: dict[str, Any]) -> str:
    """The config the process tests write (the same TOML writer as the applied remote layer)."""
    return dumps_toml(cfg_raw)


class StatusWatcher:
    """A paho subscriber recording every job status (and request) a device publishes."""

    def __init__(self, port: int, prefix: str = "edge", device: str = "+") -> None:
        self.states: dict[str, list[str]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.events: dict[str, list[str]] = {}  # job -> every state, in order, from P/D/events
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{prefix}/{device}/updates/+/status", qos=1)
        self.client.subscribe(f"{prefix}/{device}/updates/+/request", qos=1)
        self.client.subscribe(f"{prefix}/{device}/events", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            self._record(msg)
        except Exception as exc:  # a test helper must not kill paho's thread: keep the evidence
            self.errors.append(f"{msg.topic}: {exc!r}")

    def _record(self, msg: Any) -> None:
        doc = json.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/request"):
                self.requests.append(doc)
                return
            if msg.topic.endswith("/events"):
                if doc.get("kind") == "update" and "state" in doc.get("data", {}):
                    self.events.setdefault(doc["data"]["job"], []).append(doc["data"]["state"])
                return
            seq = self.states.setdefault(doc["job"], [])
            if not seq or seq[-1] != doc["state"]:
                seq.append(doc["state"])
            self.last[doc["job"]] = doc

    def state(self, job: str) -> str | None:
        with self.lock:
            return self.last.get(job, {}).get("state")

    def final(self, job: str) -> dict[str, Any] | None:
        with self.lock:
            doc = self.last.get(job)
            return doc if doc and doc["state"] in protocol.FINAL_JOB_STATES else None

    def publish(self, topic: str, payload: bytes | dict[str, Any], qos: int = 1) -> None:
        data = protocol.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class FakeModelInstaller:
    """updates.seams.ModelInstaller without an interpreter: copies into a store, remembers versions."""

    def __init__(self, store: Path, fail: str = "") -> None:
        self.store = store
        self.fail = fail  # "", "reject" or "rollback"
        self.installed: list[tuple[str, str, str]] = []
        self.block = asyncio.Event()
        self.block.set()
        self._versions_file = store / "versions.json"

    def installed_version(self, name: str, pipeline: str | None = None) -> str | None:
        try:
            return str(json.loads(self._versions_file.read_text())[name])
        except (OSError, ValueError, KeyError):
            return None

    async def install(self, staged_dir: Path, name: str, version: str, job: str,
                      pipeline: str | None = None) -> None:
        await self.block.wait()
        if self.fail == "reject":
            raise ModelRejected("input shape (1, 7) does not match the window")
        dest = self.store / name / version
        shutil.copytree(staged_dir, dest, dirs_exist_ok=True)
        if self.fail == "rollback":
            shutil.rmtree(dest)
            raise ModelRolledBack("NaN outputs during probation")
        versions: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            versions = json.loads(self._versions_file.read_text())
        versions[name] = version
        atomic_write_json(self._versions_file, versions)
        self.installed.append((name, version, job))


@contextlib.asynccontextmanager
async def running(*components: Any) -> AsyncIterator[None]:
    """Enter the components in order, run their run() loops, stop them in reverse order."""
    stack = contextlib.AsyncExitStack()
    tasks: list[asyncio.Task[None]] = []
    try:
        for c in components:
            await stack.enter_async_context(c)
        for c in components:
            tasks.append(asyncio.create_task(c.run(), name=f"test:{c.name}"))
        yield
    finally:
        for t in reversed(tasks):
            await cancel_and_wait(t)
        await stack.aclose()


def push_table(stdout: str) -> dict[str, tuple[str, str]]:
    """`edgeagent push`'s final table (DEVICE STATE DETAIL, two spaces apart) as {device: (state, detail)}."""
    rows: dict[str, tuple[str, str]] = {}
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("DEVICE"):
        return rows
    header = lines[0]
    state_at, detail_at = header.index("STATE"), header.index("DETAIL")
    for line in lines[1:]:
        rows[line[:state_at].strip()] = (line[state_at:detail_at].strip(), line[detail_at:].strip())
    return rows
