"""The harness of the hostile-publisher suite (tests/test_hostile.py): real agent processes
(`python -m edgeagent.cli run`), one observing client, the operator's keys and messages, and the
three checks every case makes (refused with a reason; nothing written to the state dir except the
aggregated event; telemetry goes on).

Good messages are signed with the operator's own code (`edgeagent.ops.push.build_manifest`,
`edgeagent.core.signing.sign`); forged ones are made here by hand. Timestamps are whole seconds, so
the RFC 8785 form and the older sorted-compact form of every message here are the same bytes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core import signing
from edgeagent.ops.push import build_manifest
from tests.broker import Broker
from tests.transport_util import Observer
from tests.updates_helpers import KEY_ID, MODEL, ROOT, config_toml, make_keys, make_raw
from tests.util import wait_until

# what the agent itself keeps rewriting while it runs: events and telemetry live in the spool,
# health in health.json; everything else in the state dir must stay as it was
# (and the temp files of their atomic writes: `.health.json.XXXX.tmp`)
SNAPSHOT_EXEMPT = re.compile(
    r"^\.?(spool\.sqlite(-wal|-shm|-journal|\.seq\.json)?|health\.json)(\.[^/]*\.tmp)?$")
INSTALLED_FIRMWARE = "5.0.0"
EVIDENCE_TIMEOUT_S = float(os.environ.get("HOSTILE_EVIDENCE_TIMEOUT_S", "15"))


# --------------------------------------------------------------------------- messages


def now_s() -> int:
    return int(time.time())


def raw_sign(message: dict[str, Any], key: Ed25519PrivateKey, key_id: str = KEY_ID) -> dict[str, Any]:
    """A signature made by hand (for forged-but-signed messages the operator's tools refuse to make,
    such as one without `type`): over the sorted, compact JSON, which for these messages (ASCII,
    integers) is also their RFC 8785 form."""
    body = {k: v for k, v in message.items() if k != "sig"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return {**body, "sig": {"alg": "ed25519", "key_id": key_id,
                            "value": base64.b64encode(key.sign(data)).decode()}}


def dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Operator:
    """The operator's key (trusted by every agent) and an attacker's (trusted by none)."""

    key: Ed25519PrivateKey
    pub: Path
    attacker: Ed25519PrivateKey
    attacker_pub: Path
    artifact: Path = MODEL

    @classmethod
    def make(cls, d: Path) -> Operator:
        key, pub = make_keys(d / "ops")
        attacker, attacker_pub = make_keys(d / "attacker", "ops-test")  # same key id, other key
        return cls(key, pub, attacker, attacker_pub)

    def manifest(self, job: str, *, devices: list[str] | None = None, groups: list[str] | None = None,
                 kind: str = "firmware", version: str = "6.0.0", chunk_size: int = 4096,
                 ttl_s: int = 86400, issued_at: int | None = None, **override: Any) -> dict[str, Any]:
        """An unsigned manifest as `edgeagent push` builds it (type and audience included)."""
        t = issued_at if issued_at is not None else now_s()
        # push refuses what every device refuses (tiny chunks): a hostile one is built, then bent
        m = build_manifest(self.artifact, job=job, kind=kind, name="vibration-anomaly" if kind == "model"
                           else "os", version=version, chunk_size=max(chunk_size, 4096), issued_at=t)
        m["chunk_size"] = chunk_size
        m["expires"] = t + ttl_s
        m["type"] = "manifest"
        targets = dict(m.get("targets", {}))
        if devices is not None:
            targets["devices"] = devices
        if groups is not None:
            targets["groups"] = groups
        if targets:
            m["targets"] = targets
        m.update(override)
        return m

    def sign(self, message: dict[str, Any]) -> dict[str, Any]:
        """The operator's signing code, for messages it would sign."""
        return signing.sign(message, self.key, KEY_ID)

    def signed_manifest(self, job: str, **kw: Any) -> dict[str, Any]:
        return self.sign(self.manifest(job, **kw))

    def cancel(self, job: str, devices: list[str] | None = None, **override: Any) -> dict[str, Any]:
        c: dict[str, Any] = {"v": 1, "type": "cancel", "job": job, "issued_at": now_s()}
        if devices is not None:
            c["targets"] = {"devices": devices}
        c.update(override)
        return c

    def desired(self, version: int, config: dict[str, Any], devices: list[str] | None = None,
                **override: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"v": 1, "type": "config", "version": version, "config": config}
        if devices is not None:
            d["targets"] = {"devices": devices}
        d.update(override)
        return d

    def chunks(self, chunk_size: int = 4096) -> list[bytes]:
        data = self.artifact.read_bytes()
        return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]


# --------------------------------------------------------------------------- agents


class AgentProc:
    """`python -m edgeagent.cli run -c CFG` (the production component set, inference off), DEBUG
    logging so that every refusal, also one only counted by the aggregation, is in its log."""

    def __init__(self, root: Path, device: str, groups: list[str], port: int, pub: Path,
                 **sections: Any) -> None:
        self.root = root
        self.device = device
        root.mkdir(parents=True, exist_ok=True)
        (root / "fw-version").write_text(INSTALLED_FIRMWARE + "\n")
        raw = make_raw(root, pub, port, device, **sections)
        raw["device"]["groups"] = groups
        raw["mqtt"]["keepalive_s"] = 5
        raw.setdefault("telemetry", {}).update({"interval_s": 0.2, "batch_wait_s": 0})
        raw.setdefault("monitor", {}).update({"interval_s": 0.2})
        # a job waiting for chunks stays still (no re-request, no journal write) for the whole suite
        raw["updates"]["request_interval_s"] = 3600
        self.conf = root / "agent.toml"
        self.conf.write_text(config_toml(raw))
        self.log_path = root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> AgentProc:
        with open(self.log_path, "ab") as log:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent.cli", "run", "-c", str(self.conf), "--log-level", "DEBUG"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def journal_jobs(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.state_dir / "journal.json").read_text())
        except (OSError, ValueError):
            return {}
        return {j["job"]: j for j in doc.get("jobs", [])}


# --------------------------------------------------------------------------- state dir


Snapshot = dict[str, tuple[int, int]]


def snapshot(state_dir: Path) -> Snapshot:
    """Every file under the state dir but the exempt ones: relative path -> (size, mtime_ns)."""
    out: Snapshot = {}
    for dirpath, _dirs, files in os.walk(state_dir):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(state_dir).as_posix()
            if SNAPSHOT_EXEMPT.match(rel):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def changes(before: Snapshot, after: Snapshot, allow: Iterable[str] = ()) -> list[str]:
    """What differs, except paths matching one of the `allow` regexes."""
    allowed = [re.compile(a) for a in allow]
    out = []
    for rel in sorted(set(before) | set(after)):
        if before.get(rel) == after.get(rel) or any(a.fullmatch(rel) for a in allowed):
            continue
        what = "created" if rel not in before else "deleted" if rel not in after else "rewritten"
        out.append(f"{rel} {what}")
    return out


def applied_config(state_dir: Path) -> dict[str, Any]:
    """What runs from the applied remote layer: its version and config (a verified but rejected
    desired config may move the mark of versions seen, and so create the file; what runs must not
    change)."""
    try:
        doc = tomllib.loads((state_dir / "config.applied.toml").read_text())
    except (OSError, ValueError):
        doc = {}
    return {"version": doc.get("version", 0), "config": doc.get("config", {})}


# --------------------------------------------------------------------------- the suite's world


@dataclass
class Refusal:
    evidence: str
    changed: list[str]


@dataclass
class World:
    """One broker, one observer, the operator, and the module's agents (by device id)."""

    broker: Broker
    observer: Observer
    op: Operator
    agents: dict[str, AgentProc] = field(default_factory=dict)
    live_manifest: dict[str, Any] = field(default_factory=dict)  # the signed job every case aims at
    _version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes | dict[str, Any] | list[Any], retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else dumps(payload)
        self.observer.publish(topic, data, retain=retain)

    def next_version(self) -> int:
        """A desired-config version above every one sent before (a verified one is never retried)."""
        with self.lock:
            self._version = max(self._version + 1, now_s())
            return self._version

    def seq(self, device: str) -> int:
        seqs = self.observer.seqs(device)
        return max(seqs) if seqs else -1

    def wait_telemetry(self, device: str, after: int, timeout_s: float = 20.0) -> int:
        wait_until(lambda: self.seq(device) > after, timeout_s,
                   message=f"telemetry of {device} after seq {after}")
        return self.seq(device)

    def wait_ready(self, agent: AgentProc, timeout_s: float = 30.0) -> None:
        """Telemetry flows and the agent subscribed to its updates and desired-config topics."""
        self.wait_telemetry(agent.device, -1, timeout_s)
        wait_until(lambda: f"edge/{agent.device}/config/desired" in self.broker.log()
                   and f"edge/{agent.device}/updates/" in self.broker.log(), timeout_s,
                   message=f"{agent.device} subscribed")

    def texts_since(self, mark: int, device: str) -> list[str]:
        """What the device published since `mark` that can carry a reason: events, job statuses,
        config reports (as raw JSON text)."""
        with self.observer.lock:
            msgs = self.observer.messages[mark:]
        prefix = f"edge/{device}/"
        return [p.decode(errors="replace") for t, p, _ in msgs
                if t.startswith(prefix) and not t.endswith("/telemetry")]

    def reported_since(self, mark: int, device: str) -> list[bytes]:
        with self.observer.lock:
            msgs = self.observer.messages[mark:]
        return [p for t, p, _ in msgs if t == f"edge/{device}/config/reported"]

    def events_since(self, mark: int, device: str) -> list[dict[str, Any]]:
        with self.observer.lock:
            msgs = self.observer.messages[mark:]
        return [json.loads(p) for t, p, _ in msgs if t == f"edge/{device}/events"]

    def mark(self) -> int:
        with self.observer.lock:
            return len(self.observer.messages)

    def refused(self, device: str, act: Callable[[], None], reason: str, *, job: str | None = None,
                allow: Iterable[str] = (), broker_log: bool = False, no_report: bool = False,
                signed_reject: bool = False, timeout_s: float = EVIDENCE_TIMEOUT_S) -> Refusal:
        """Run `act` (the hostile publications) against `device` and check the three promises:

        (a) a refusal whose text matches `reason` (a regex naming the cause) shows up in what the
            device published (events, job status, config report), in its log, or (`broker_log`: a
            message the broker itself drops for the agent's Maximum Packet Size) in the broker's log;
        (b) the state dir is as it was, but for the spool and health.json (the aggregated event lives
            there) and the `allow` paths; `job`: no `updates/<job>/` and no journal entry for it;
            `no_report`: no new `config/reported` (unsigned input never rewrites retained truth);
            `signed_reject`: the manifest verified and failed a policy check (expired, downgrade,
            size cap): the journal may remember it as `rejected` (so a replay is a no-op), with its
            log, and nothing else (no artifact, no transfer state);
        (c) a new telemetry sample arrives afterwards, the process is alive, no traceback was logged.
        """
        agent = self.agents[device]
        before = snapshot(agent.state_dir)
        applied = applied_config(agent.state_dir)
        mark, log_off = self.mark(), agent.log_size()
        broker_off = len(self.broker.log()) if broker_log else 0
        seq0 = self.seq(device)
        pattern = re.compile(reason, re.IGNORECASE)

        act()

        def evidence() -> str | None:
            sources = [*self.texts_since(mark, device), agent.log_since(log_off)]
            if broker_log:
                sources.append(self.broker.log()[broker_off:])
            for text in sources:
                for line in text.splitlines():
                    if pattern.search(line) and _is_refusal(line):
                        return line
            return None

        try:
            found = wait_until(evidence, timeout_s, message=f"a refusal matching /{reason}/")
        except AssertionError:
            tail = agent.log_since(log_off)[-3000:]
            published = "\n".join(self.texts_since(mark, device))[-3000:]
            raise AssertionError(f"{device}: no refusal matching /{reason}/ within {timeout_s}s\n"
                                 f"--- published:\n{published}\n--- agent log tail:\n{tail}") from None
        # (c) after the refusal: two fresh samples (the second also gives late writes time to land)
        seq1 = self.wait_telemetry(device, seq0)
        self.wait_telemetry(device, seq1)
        assert agent.alive(), f"{device} exited with {agent.proc and agent.proc.returncode}"
        new_log = agent.log_since(log_off)
        assert "Traceback" not in new_log, f"{device} logged a traceback:\n{new_log[-4000:]}"
        # (b)
        allow = [*allow, r"config\.applied\.toml"]
        if signed_reject and job is not None:
            allow += [r"journal\.json", rf"updates/{re.escape(job)}/log\.txt"]
        changed = changes(before, snapshot(agent.state_dir), allow)
        assert not changed, f"{device}: state dir changed: {changed}"
        assert applied_config(agent.state_dir) == applied, f"{device}: the applied config changed"
        if job is not None and signed_reject:
            state = agent.journal_jobs().get(job, {}).get("state", "rejected")
            assert state == "rejected", f"job {job} is {state} in the journal"
            files = [p.name for p in (agent.state_dir / "updates" / job).glob("*")]
            assert set(files) <= {"log.txt"}, f"updates/{job}/ holds {files}"
        elif job is not None:
            assert not (agent.state_dir / "updates" / job).exists(), f"updates/{job}/ was created"
            assert job not in agent.journal_jobs(), f"job {job} is in the journal"
        if no_report:
            reports = self.reported_since(mark, device)
            assert not reports, f"{device}: config/reported rewritten by unverified input: {reports}"
        return Refusal(str(found), changed)


_REFUSAL_WORDS = re.compile(
    r"refus|reject|drop|invalid|not |no |bad|malformed|too |must|unknown|expired|mismatch|forbid|"
    r"local-only|cannot|exceed|larger|above|below|at most|missing|expected|wrong", re.IGNORECASE)


def _is_refusal(line: str) -> bool:
    """A line that says something was refused (not one merely echoing the job id or a key path)."""
    return bool(_REFUSAL_WORDS.search(line))


def start_agents(world: World, root: Path, specs: dict[str, list[str]]) -> None:
    for device, groups in specs.items():
        world.agents[device] = AgentProc(root / device, device, groups, world.broker.port,
                                         world.op.pub).start()
    for agent in world.agents.values():
        world.wait_ready(agent)
