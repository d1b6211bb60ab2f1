"""The trial's processes: one Mosquitto, agent processes (own device id, state dir, config) and the
fleet collector. Every start, stop and kill goes through here so the runner can count them."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.core.config_layers import dumps_toml
from fieldtrial.records import RssSample

ROOT = Path(__file__).resolve().parents[1]
FAKE_AB = Path(__file__).resolve().parent / "fixtures" / "fake_ab_installer.py"


@dataclass
class AgentSpec:
    device: str
    inference: bool
    tmpfs_mb: int = 0  # >0: the state dir is a tmpfs of this size (the disk-full fault)
    clock: bool = False  # LD_PRELOAD clock shim (wall-clock jumps)


class AgentProc:
    """One agent process (`edgeagent run`, as systemd starts it), restarted as often as the trial wants."""

    def __init__(self, spec: AgentSpec, workdir: Path, broker_port: int, pubkey: Path,
                 telemetry_s: float, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.device = spec.device
        self.dir = workdir / spec.device
        self.state = self.dir / "state"
        self.ab = self.dir / "ab"
        self.conf = self.dir / "agent.toml"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0  # kill -9 by the trial
        self.terms = 0  # SIGTERM by the trial (firmware reboots, the final stop)
        self.unexpected: list[str] = []  # exits nobody caused
        self.exit_codes: list[int] = []
        self.rss_mb: list[RssSample] = []  # every read, live or not, in order
        # per process: [samples, max seq] at the first and the latest health.json it wrote
        self._tele: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._given_up: dict[int, int] = {}  # per process: the spool section's `lost` (entries given up)
        self._stopped: set[int] = set()  # processes whose last health.json was written at a clean stop
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        fw = [sys.executable, "-m", "fieldtrial.fwtool", "--ab", str(FAKE_AB), "--root", str(self.ab)]
        commands = {op: [*fw, op] + (["{artifact}"] if op == "install" else [])
                    for op in ("install", "reboot", "mark-good", "mark-bad", "abort", "slot")}
        raw: dict[str, Any] = {
            "device": {"id": spec.device, "state_dir": str(self.state), "hardware": "rpi4",
                       "groups": ["trial"]},
            "agent": {"health_interval_s": 0.5, "shutdown_timeout_s": 8.0},
            "logging": {"level": "INFO"},
            "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5,
                     "reconnect_initial_s": 0.1, "reconnect_max_s": 1.0, "connect_timeout_s": 5.0,
                     "tls": {"enabled": False}},
            "monitor": {"interval_s": 0.5},
            "sensors": {"source": "simulated", "window": {"size": 256, "stride": 128}},
            "inference": {"enabled": spec.inference, "probation_windows": 60},
            "telemetry": {"interval_s": telemetry_s, "batch_wait_s": 0.2},
            "updates": {"trusted_keys": {"trial": str(pubkey)}, "request_interval_s": 1.0,
                        "gates": {"model": {}, "firmware": {}},
                        "firmware": {"mode": "direct", "installer": "script", "commands": commands,
                                     "version_file": str(self.dir / "fw-version"),
                                     "health_timeout_s": 20.0, "max_boot_attempts": 3,
                                     "command_timeout_s": 30.0,
                                     "health_command": [sys.executable, "-m", "fieldtrial.fwtool",
                                                        "--root", str(self.ab), "health"]}},
        }
        self.conf.write_text(dumps_toml(raw))

    @property
    def log_path(self) -> Path:
        return self.dir / "agent.log"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env)
        with open(self.log_path, "ab") as out:
            out.write(f"\n===== start {self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            argv = [sys.executable, "-m", "edgeagent.cli", "run", "--config", str(self.conf)]
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_exit(self) -> None:
        """Record an exit nobody caused (a crash)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected.append(f"exit {self.proc.returncode} at {time.strftime('%H:%M:%S')}")
            self.proc = None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1
        self.proc = None

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code (None: it had to be killed)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        self.terms += 1
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.proc = None
        if rc is not None:
            self.exit_codes.append(rc)
        return rc

    def sample_rss(self) -> RssSample | None:
        """Read VmRSS of the current process and keep the sample, live or not (the report decides
        what counts); None when there is no process to read."""
        proc = self.proc  # one snapshot: a kill and restart may swap it from another thread
        if proc is None:
            return None
        mb: float | None = None
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        mb = int(line.split()[1]) / 1024
                        break
        except OSError:
            pass  # reaped already: not a sample of anything, recorded as missing
        sample = RssSample(time.monotonic(), proc.pid, mb)
        self.rss_mb.append(sample)
        return sample

    def health(self) -> dict[str, Any]:
        try:
            h: dict[str, Any] = json.loads((self.state / "health.json").read_text())
        except (OSError, ValueError):
            return {}
        return h

    def track_telemetry(self) -> None:
        """Note the telemetry component's own counters: `samples` built vs seqs handed out. A
        sample that could not be spooled (e.g. disk full) counts in the first but gets no seq."""
        h = self.health()
        t = h.get("sections", {}).get("telemetry", {})
        pid, samples, seq = h.get("pid"), t.get("samples"), t.get("last_seq")
        lost = h.get("sections", {}).get("spool", {}).get("lost")
        if isinstance(pid, int) and isinstance(lost, int):
            self._given_up[pid] = max(lost, self._given_up.get(pid, 0))
        if isinstance(pid, int) and h.get("state") == "stopped":
            self._stopped.add(pid)
        if not isinstance(pid, int) or not isinstance(samples, int) or not isinstance(seq, int) or seq <= 0:
            return
        first, last = self._tele.get(pid, ((samples, seq), (samples, seq)))
        self._tele[pid] = (first, (max(samples, last[0]), max(seq, last[1])))

    def unrecorded(self) -> int:
        """Samples built but never given a seq (never spooled), over every process that stopped
        cleanly (its last health.json is written after the last sample; a killed one's may be torn
        between the two counters)."""
        return sum(max(0, (b[0] - a[0]) - (b[1] - a[1])) for pid, (a, b) in self._tele.items()
                   if pid in self._stopped)

    def given_up(self) -> int:
        """Entries the outbox gave up on (its `lost` counter), over every process seen."""
        return sum(self._given_up.values())

    def spool_recoveries(self) -> list[Path]:
        return sorted(p for p in self.state.glob("spool.sqlite.corrupt-*")
                      if not p.name.endswith(("-wal", "-shm")))

    def journal(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads((self.state / "journal.json").read_text())
        except (OSError, ValueError):
            return {}
        return {j["job"]: j for j in doc.get("jobs", [])}

    def job_state(self, job: str) -> str | None:
        return self.journal().get(job, {}).get("state")

    def reboots(self) -> int:
        try:
            return int((self.ab / "reboots").read_text().strip())
        except (OSError, ValueError):
            return 0

    def produced(self) -> dict[str, int]:
        """The last seq handed out, from the spool's own counters (read after a clean stop)."""
        out = {"telemetry": 0, "event": 0}
        for metas in [self._meta(self.state / "spool.sqlite"), *self.old_spool_seqs()]:
            for k in out:
                out[k] = max(out[k], metas.get(k, 0))
        return out

    def old_spool_seqs(self) -> list[dict[str, int]]:
        """The last seqs of spools moved aside as corrupt: a fresh spool continues above a reserved
        block, so the seqs right after these were never handed out."""
        return [self._meta(p) for p in self.spool_recoveries()]

    @staticmethod
    def _meta(path: Path) -> dict[str, int]:
        if not path.is_file():
            return {}
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            finally:
                db.close()
        except sqlite3.Error:
            return {}
        return {k: int(meta.get(f"seq_{k}", 0)) for k in ("telemetry", "event")}

    def spool_backlog(self) -> int | None:
        path = self.state / "spool.sqlite"
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error:
            return None


class Collector:
    """`edgeagent fleet collect` as its own process, with a persistent session."""

    def __init__(self, workdir: Path, broker_port: int) -> None:
        self.db = workdir / "fleet.sqlite"
        self.log = workdir / "collector.log"
        self.port = broker_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent.cli", "fleet", "collect",
                 "--broker", f"mqtt://127.0.0.1:{self.port}", "--db", str(self.db), "--plain",
                 "--client-id", "trial-collector", "--session-expiry-s", "3600", "--keepalive-s", "5",
                 "--report-s", "5"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def devices(self) -> list[dict[str, Any]]:
        res = subprocess.run([sys.executable, "-m", "edgeagent.cli", "fleet", "devices", "--db",
                              str(self.db), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"fleet devices failed: {res.stderr.strip()[-500:]}")
        rows: list[dict[str, Any]] = json.loads(res.stdout)
        return rows
