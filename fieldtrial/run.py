"""`scripts/field-trial`: a small fleet of real agent processes under a seeded fault schedule, then a
table of figures and a verdict (exit 1 when a promise is broken).

Faults: broker restarts (SIGTERM, persistence on), agent kill -9 (also mid-download and mid-install),
a flaky link through the fault-injecting proxy (latency, resets, stalls, outages), a state dir on a
small tmpfs that fills up, wall-clock jumps (LD_PRELOAD shim), firmware "reboots" (the trial restarts
the process), and model/firmware updates, good and bad, pushed all along. Every fault is printed with
its time as it happens.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgeagent.ops.mosquitto import Broker, wait_for
from fieldtrial import report
from fieldtrial.clock import ClockControl, build_shim
from fieldtrial.fleet import AgentProc, AgentSpec, Collector
from fieldtrial.proxy import FaultProxy
from fieldtrial.recorder import Recorder
from fieldtrial.records import FaultRecord
from fieldtrial.schedule import CYCLE_S, Step, make_schedule
from fieldtrial.updates import Artifacts, UpdateCase, push

TMPFS_MB = 24
FINAL = ("rejected", "succeeded", "failed", "rolled_back", "cancelled")
RSS_EVERY_S = 2.0


class Trial:
    def __init__(self, workdir: Path, seed: int, n_agents: int, cycles: int, telemetry_s: float) -> None:
        self.workdir = workdir
        self.seed = seed
        self.cycles = cycles
        self.telemetry_s = telemetry_s
        self.rng = random.Random(seed ^ 0x5EED)
        self.t0 = time.monotonic()
        self.faults: list[FaultRecord] = []
        self.cases: list[UpdateCase] = []
        self.notes: list[str] = []
        self.print_lock = threading.Lock()
        self.stop = threading.Event()
        self.names = [f"trial-{i:02d}" for i in range(n_agents)]
        self.broker = Broker(workdir / "broker")
        self.proxy: FaultProxy | None = None
        self.recorder: Recorder | None = None
        self.collector: Collector | None = None
        self.agents: dict[str, AgentProc] = {}
        self.locks: dict[str, threading.RLock] = {n: threading.RLock() for n in self.names}
        self.reboots_seen: dict[str, int] = {n: 0 for n in self.names}
        # an update case tests the update path, a disk-full fault the spool: one at a time per device
        self.exclusive: dict[str, threading.Lock] = {n: threading.Lock() for n in self.names}
        self.clock: ClockControl | None = None
        self.tmpfs: Path | None = None
        self.queues: dict[str, queue.Queue[UpdateCase | None]] = {n: queue.Queue() for n in self.names}
        self.threads: list[threading.Thread] = []
        self.artifacts: Artifacts | None = None
        self.link_method = "fault-injecting TCP proxy (fieldtrial.proxy)"

    # ------------------------------------------------------------------ output
    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        with self.print_lock:
            print(f"[+{self.now():7.2f}s {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def fault(self, name: str, target: str, detail: str, start: float, end: float | None = None,
              skipped: bool = False) -> FaultRecord:
        wall = time.time() - (time.monotonic() - start)
        rec = FaultRecord(name, target, start, end if end is not None else start, detail, skipped, wall)
        self.faults.append(rec)
        return rec

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.say(f"field trial: seed {self.seed}, {len(self.names)} agents, {self.cycles} cycle(s) of "
                 f"{CYCLE_S:.0f} s, telemetry every {self.telemetry_s} s, work dir {self.workdir}")
        self.artifacts = Artifacts(self.workdir)
        netem = probe_netem()
        self.link_method += f"; tc netem not used: {netem}"
        self.broker.start()
        self.proxy = FaultProxy("127.0.0.1", self.broker.port, seed=self.seed).start()
        self.say(f"mosquitto on :{self.broker.port}; agents connect through the proxy on :{self.proxy.port}; "
                 f"link faults: {self.link_method}")
        self.recorder = Recorder(self.broker.port).start()
        self.collector = Collector(self.workdir, self.broker.port)
        self.collector.start()
        shim = build_shim(self.workdir)
        victim = self.names[2]
        env: dict[str, str] = {}
        if shim is not None:
            self.clock = ClockControl(self.workdir / "clock-offset")
            env = self.clock.env(shim)
        else:
            self.say("NOTE no C compiler: wall-clock jumps are SKIPPED")
            self.notes.append("wall-clock jumps skipped: no gcc to build the clock shim")
        for i, name in enumerate(self.names):
            spec = AgentSpec(name, inference=(i == 0), tmpfs_mb=TMPFS_MB if i == 2 else 0, clock=(i == 2))
            agent = AgentProc(spec, self.workdir, self.proxy.port, self.artifacts.pubkey, self.telemetry_s,
                              env if name == victim else None)
            self.agents[name] = agent
        self.tmpfs = self._mount_tmpfs(self.agents[victim].state)
        for agent in self.agents.values():
            agent.start()
        ok = wait_for(lambda: all(self.recorder is not None and self.recorder.last_arrival(n) > 0
                                  for n in self.names), 90)
        if not ok:
            raise RuntimeError("the fleet did not come online within 90 s (see the agent logs)")
        self.say(f"fleet online: {', '.join(self.names)} (setup took {self.now():.1f} s)")

    def _mount_tmpfs(self, path: Path) -> Path | None:
        if shutil.which("mount") is None:
            msg = "disk-full faults SKIPPED: no mount command; filling a directory is not equivalent"
            self.say("NOTE " + msg)
            self.notes.append(msg)
            return None
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            why = res.stderr.strip() or "not permitted"
            msg = (f"disk-full faults SKIPPED: cannot mount a {TMPFS_MB} MB tmpfs ({why}); filling a "
                   f"directory is not equivalent")
            self.say("NOTE " + msg)
            self.notes.append(msg)
            return None
        self.say(f"{path.parent.name}: state dir on a {TMPFS_MB} MB tmpfs")
        return path

    # ------------------------------------------------------------------ background work
    def supervise(self) -> None:
        """Crash detection, firmware reboots (restart the process) and RSS samples."""
        last_rss = 0.0
        while not self.stop.wait(0.2):
            for name, agent in self.agents.items():
                with self.locks[name]:
                    if agent.proc is not None and agent.proc.poll() is not None:
                        self.say(f"UNEXPECTED {name} exited with {agent.proc.returncode}; restarting it")
                        agent.check_exit()
                        agent.start()
                    n = agent.reboots()
                    if n > self.reboots_seen[name]:
                        self.reboots_seen[name] = n
                        t = time.monotonic()
                        self.say(f"FAULT firmware-reboot {name}: installer asked for reboot #{n}; "
                                 f"SIGTERM and restart (the reboot)")
                        agent.terminate()
                        agent.start()
                        self.fault("firmware-reboot", name, f"reboot #{n} requested by the installer", t,
                                   time.monotonic())
            if time.monotonic() - last_rss >= RSS_EVERY_S:
                last_rss = time.monotonic()
                for agent in self.agents.values():
                    agent.sample_rss()
            for agent in self.agents.values():
                agent.track_telemetry()

    def update_worker(self, device: str) -> None:
        q = self.queues[device]
        while True:
            u = q.get()
            if u is None:
                return
            try:
                with self.exclusive[device]:
                    self.run_update(u)
            except Exception as exc:  # one broken case must not stop the others
                u.reason = f"trial error: {type(exc).__name__}: {exc}"
                self.say(f"ERROR update {u.job}: {u.reason}")

    def run_update(self, u: UpdateCase) -> None:
        assert self.artifacts is not None and self.recorder is not None
        agent = self.agents[u.device]
        msg, path = self.artifacts.build(u)
        u.started_at = time.monotonic()
        self.say(f"UPDATE push {u.job}: {u.case} ({u.kind} {u.version}) -> {u.device}"
                 f"{' [kill -9 ' + u.kill + ']' if u.kill else ''}")
        # paced so the download lasts a few seconds (the bitmap is persisted about once a second)
        delay = (0.15 if u.kind == "model" else 0.3) if u.kill == "mid-download" else 0.0

        def serve() -> None:
            try:
                push(self.broker.port, msg, path, u.device, 120.0, delay)
            except Exception as exc:  # the device's final state still decides; say what happened
                self.say(f"ERROR operator push of {u.job}: {type(exc).__name__}: {exc}")

        pusher = threading.Thread(target=serve, name=f"push-{u.job}", daemon=True)
        pusher.start()
        if u.kill == "mid-download":
            bitmap = agent.state / "updates" / u.job / "bitmap"

            def partly() -> bool:
                try:
                    return sum(bitmap.read_bytes()) >= 2
                except OSError:
                    return False

            wait_for(lambda: partly() or agent.job_state(u.job) in FINAL, 60, 0.02)
            if agent.job_state(u.job) == "downloading" and partly():
                self._kill9(u.device, 1.0, f"mid-download of {u.job}")
            else:
                self.say(f"NOTE {u.job}: never saw a partial download (state {agent.job_state(u.job)}); "
                         f"no kill")
        elif u.kill == "mid-install":
            wait_for(lambda: agent.job_state(u.job) in ("installing", *FINAL), 90, 0.02)
            if agent.job_state(u.job) == "installing":
                self._kill9(u.device, 1.0, f"mid-install of {u.job}")
            else:
                self.say(f"NOTE {u.job}: never saw it installing (state {agent.job_state(u.job)}); no kill")

        def final() -> bool:
            doc = self.recorder.job(u.device, u.job) if self.recorder else {}
            return doc.get("state") in FINAL

        wait_for(final, 150, 0.1)
        doc = self.recorder.job(u.device, u.job)
        u.final, u.reason = str(doc.get("state", "")), str(doc.get("reason", ""))
        u.finished_s = time.monotonic() - u.started_at
        u.journal = str(agent.job_state(u.job) or "")
        verdict = "as expected" if u.ok else "WRONG"
        self.say(f"UPDATE {u.job}: {u.final or 'no final state'} after {u.finished_s:.1f} s ({verdict}) "
                 f"{u.reason[:120]}")
        pusher.join(5)

    # ------------------------------------------------------------------ faults
    def _kill9(self, name: str, down_s: float, why: str) -> None:
        agent = self.agents[name]
        with self.locks[name]:
            t = time.monotonic()
            self.say(f"FAULT kill -9 {name} (pid {agent.pid}) {why}; restart in {down_s:.1f} s")
            agent.kill9()
            time.sleep(down_s)  # the power stays off this long
            agent.start()
            self.fault("kill-9", name, why, t, time.monotonic())

    def apply(self, step: Step) -> None:
        p = step.params
        if step.action == "update":
            case = str(p["case"])
            kind = "model" if case in ("model-good", "model-nan", "bad-signature", "version-rollback",
                                       "sha-mismatch") else "firmware"
            job = f"{case}-{step.target}-{len(self.cases):02d}"
            u = UpdateCase(case, step.target, job, kind, str(p["version"]), str(p.get("kill", "")))
            self.cases.append(u)
            self.queues[step.target].put(u)
        elif step.action == "kill9":
            self._kill9(step.target, float(p["down_s"]), "at a random moment")
        elif step.action == "broker-restart":
            t = time.monotonic()
            down = float(p["down_s"])
            self.say(f"FAULT broker-restart: mosquitto stopped (SIGTERM), down for {down:.1f} s")
            self.broker.stop()
            time.sleep(down)
            self.broker.start()
            self.fault("broker-restart", "mosquitto", f"down {down:.1f} s", t, time.monotonic())
            self.say("broker back")
        elif step.action == "link":
            self._link(step)
        elif step.action == "disk-full":
            self._disk_full(step.target, float(p["duration_s"]))
        elif step.action == "clock-jump":
            self._clock(step.target, p["delta_s"])

    def _link(self, step: Step) -> None:
        assert self.proxy is not None
        p = step.params
        dur = float(p["duration_s"])
        t = time.monotonic()
        if p["mode"] == "flaky":
            detail = (f"latency {p['latency_ms']}+-{p['jitter_ms']} ms, reset probability "
                      f"{p['reset_prob']} per chunk, for {dur:.1f} s")
            self.say(f"FAULT link-flaky (all agents): {detail}")
            self.proxy.set_faults(latency_ms=float(p["latency_ms"]), jitter_ms=float(p["jitter_ms"]),
                                  reset_prob=float(p["reset_prob"]))
        elif p["mode"] == "stall":
            detail = f"black hole (TCP open, nothing moves) for {dur:.1f} s"
            self.say(f"FAULT link-stall (all agents): {detail}")
            self.proxy.set_faults(stall=True)
        else:
            detail = f"connections cut and refused for {dur:.1f} s"
            self.say(f"FAULT link-down (all agents): {detail}")
            self.proxy.set_faults(down=True)
        time.sleep(dur)
        self.proxy.set_faults(latency_ms=0.0, jitter_ms=0.0, reset_prob=0.0, stall=False, down=False)
        self.fault(f"link-{p['mode']}", "all agents", detail, t, time.monotonic())
        self.say(f"link clear (proxy resets so far: {self.proxy.resets})")

    def _disk_full(self, name: str, dur: float) -> None:
        t = time.monotonic()
        if self.tmpfs is None:
            self.say(f"FAULT disk-full {name}: SKIPPED (no tmpfs)")
            self.fault("disk-full", name, "skipped: no tmpfs", t, skipped=True)
            return
        filler = self.tmpfs / "trial-filler.bin"
        if not self.exclusive[name].acquire(blocking=False):
            self.say(f"disk-full {name}: waiting for its update job to finish first")
            if not self.exclusive[name].acquire(timeout=300):
                self.say(f"FAULT disk-full {name}: SKIPPED (its update job did not finish)")
                self.fault("disk-full", name, "skipped: update job still running", t, skipped=True)
                return
            t = time.monotonic()
        written = 0
        block = b"\0" * (256 * 1024)
        try:
            with open(filler, "wb", buffering=0) as f:
                while True:
                    try:
                        n = f.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
                    if not n:
                        break
                    written += n
            # the last partial block: fill to the last byte
            with open(filler, "ab", buffering=0) as f:
                for size in (65536, 4096, 512, 1):
                    with contextlib.suppress(OSError):
                        while f.write(b"\0" * size):
                            written += size
            free = shutil.disk_usage(self.tmpfs).free
            self.say(f"FAULT disk-full {name}: state dir filesystem full ({written // 1024} KB filler, "
                     f"{free} bytes free) for {dur:.1f} s")
            time.sleep(dur)
        finally:
            with contextlib.suppress(OSError):
                filler.unlink()
            self.exclusive[name].release()
        self.fault("disk-full", name, f"{TMPFS_MB} MB tmpfs full for {dur:.1f} s", t, time.monotonic())
        self.say(f"disk space back on {name}")

    def _clock(self, name: str, delta: Any) -> None:
        t = time.monotonic()
        if self.clock is None:
            self.say(f"FAULT clock-jump {name}: SKIPPED (no shim)")
            self.fault("clock-jump", name, "skipped: no shim", t, skipped=True)
            return
        d = -self.clock.offset_s if delta == "back" else float(delta)
        self.clock.jump(d)
        word = "forwards" if d > 0 else "backwards"
        self.say(f"FAULT clock-jump {name}: wall clock {word} by {abs(d):.0f} s (offset now "
                 f"{self.clock.offset_s:+.0f} s)")
        self.fault("clock-jump", name, f"{d:+.0f} s", t)

    # ------------------------------------------------------------------ the run
    def run(self, steps: list[Step]) -> int:
        sup = threading.Thread(target=self.supervise, name="supervise", daemon=True)
        sup.start()
        for name in self.names:
            th = threading.Thread(target=self.update_worker, args=(name,), name=f"updates-{name}",
                                  daemon=True)
            th.start()
            self.threads.append(th)
        base = time.monotonic()
        self.run_started = base
        # faults that take time (link, disk) run in their own thread so the schedule keeps its times
        running: list[threading.Thread] = []
        for step in steps:
            delay = base + step.at_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if step.action in ("link", "disk-full", "broker-restart", "kill9"):
                th = threading.Thread(target=self.apply, args=(step,), name=f"fault-{step.action}",
                                      daemon=True)
                th.start()
                running.append(th)
            else:
                self.apply(step)
        for th in running:
            th.join(120)
        self.say("fault schedule done; waiting for every update job to finish")
        for name in self.names:
            self.queues[name].put(None)
        for th in self.threads:
            th.join(300)
        return self.finish()

    def finish(self) -> int:
        assert self.recorder is not None
        # the fleet must drain its spools while still running, then stop cleanly (SIGTERM)
        self.stop.set()
        self.say("draining: waiting for every spool to be empty")
        for name, agent in self.agents.items():
            def drained(a: AgentProc = agent) -> bool:
                h = a.health()
                sp = h.get("sections", {}).get("spool", {})
                return h.get("pid") == a.pid and sp.get("backlog") == 0 and sp.get("states_pending") == 0

            if not wait_for(drained, 90, 0.2):
                spool = agent.health().get("sections", {}).get("spool")
                self.say(f"NOTE {name}: spool not empty after 90 s ({spool})")
        for a in self.agents.values():
            a.sample_rss()  # the end of the last process's RSS record, taken after the drain
        exit_codes: dict[str, int | None] = {}
        for name, agent in self.agents.items():
            with self.locks[name]:
                for _attempt in range(3):
                    rc = agent.terminate()
                    exit_codes[name] = rc
                    backlog = agent.spool_backlog()
                    if not backlog:
                        break
                    self.say(f"{name}: {backlog} rows still spooled after stop; starting it once more "
                             f"to drain")
                    agent.start()
                    wait_for(lambda a=agent: a.health().get("pid") == a.pid and a.health().get(
                        "sections", {}).get("spool", {}).get("backlog") == 0, 60, 0.2)
        self.say("agents stopped (SIGTERM); waiting for the recorder to see every seq")
        produced = {n: a.produced() for n, a in self.agents.items()}
        for a in self.agents.values():
            a.track_telemetry()  # the health.json written at stop

        def all_seen() -> bool:
            assert self.recorder is not None
            for n, p in produced.items():
                tele, ev = self.recorder.received(n)
                if not set(range(1, p["telemetry"] + 1)) <= tele or not set(range(1, p["event"] + 1)) <= ev:
                    return False
            return True

        wait_for(all_seen, 30, 0.2)
        time.sleep(6)  # let the collector's batch writer catch up before reading its database
        collector_rows: list[dict[str, Any]] = []
        try:
            assert self.collector is not None
            self.collector.stop()
            collector_rows = self.collector.devices()
        except Exception as exc:
            self.notes.append(f"collector figures unavailable: {exc}")
        data = report.TrialData(
            seed=self.seed, cycles=self.cycles, names=self.names, recorder=self.recorder, agents=self.agents,
            produced=produced, exit_codes=exit_codes, faults=self.faults, cases=self.cases,
            collector=collector_rows, t0=self.t0, notes=self.notes, link_method=self.link_method,
            proxy_resets=self.proxy.resets if self.proxy else 0, broker_starts=self.broker.starts)
        verdict = report.evaluate(data)
        print(report.render(data, verdict), flush=True)
        return 0 if verdict.ok else 1

    def cleanup(self) -> None:
        self.stop.set()
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                if agent.alive():
                    agent.kill9()
        with contextlib.suppress(Exception):
            if self.collector:
                self.collector.stop()
        with contextlib.suppress(Exception):
            if self.recorder:
                self.recorder.stop()
        with contextlib.suppress(Exception):
            if self.proxy:
                self.proxy.stop()
        with contextlib.suppress(Exception):
            self.broker.stop()
        if self.tmpfs is not None:
            with contextlib.suppress(OSError):  # keep the small disk's contents for a post-mortem
                shutil.copytree(self.tmpfs, self.tmpfs.with_name("state-from-tmpfs"), dirs_exist_ok=True)
            subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)


def probe_netem() -> str:
    """Whether `tc netem` works here (it needs the sch_netem module); the proxy is used either way."""
    if shutil.which("tc") is None or shutil.which("ip") is None:
        return "no tc/ip tools"
    dev = f"ftprobe{os.getpid() % 10000}"
    add = subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p"],
                         capture_output=True, text=True)
    if add.returncode != 0:
        return f"cannot create a veth pair ({add.stderr.strip() or 'not permitted'})"
    try:
        res = subprocess.run(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "10ms"],
                             capture_output=True, text=True)
        return "available, but the proxy keeps runs comparable across machines" if res.returncode == 0 \
            else f"unavailable on this kernel ({res.stderr.strip()})"
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/field-trial", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one cycle (~2 minutes, for CI)")
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random, printed)")
    p.add_argument("--agents", type=int, default=3, help="agent processes (at least 3)")
    p.add_argument("--minutes", type=float, default=20.0, help="length of the full run's schedule")
    p.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temp dir, removed "
                                                "when the trial passes)")
    a = p.parse_args(argv)
    if a.agents < 3:
        p.error("--agents must be at least 3")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    cycles = 1 if a.quick else max(1, int(a.minutes * 60 // CYCLE_S))
    keep = a.workdir is not None
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="field-trial-"))
    workdir.mkdir(parents=True, exist_ok=True)
    trial = Trial(workdir.resolve(), seed, a.agents, cycles, telemetry_s=0.3 if a.quick else 0.5)
    rc = 1

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (a CI timeout) cleans up like Ctrl-C: no stray processes

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started in the background (SIGINT ignored)
    try:
        trial.setup()
        steps = make_schedule(seed, trial.names, cycles)
        rc = trial.run(steps)
    except KeyboardInterrupt:
        rc = 130
    finally:
        trial.cleanup()
        if rc == 0 and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and state kept in {workdir} (repeat with --seed {seed})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
    os._exit(1)
