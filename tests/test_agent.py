"""Agent lifecycle: notify protocol order, watchdog vs a blocked loop, supervision, stop deadline."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from edgeagent.agent import Agent, Component, Wiring
from edgeagent.core import config
from edgeagent.core.live import MemoryOutbox
from edgeagent.core.sdnotify import Notifier
from tests.util import async_wait_until, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Datagrams:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + addr[1:]) if addr.startswith("@") else addr)
        self.sock.settimeout(0.1)
        self.addr = addr
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [line for _, line in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Idle:
    """A component that does nothing until cancelled."""

    def __init__(self, name: str = "idle") -> None:
        self.name = name
        self.entered = self.exited = False

    async def __aenter__(self) -> Idle:
        self.entered = True
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.exited = True

    async def run(self) -> None:
        await asyncio.Event().wait()


def make_config(tmp_path: Path, **agent: Any) -> config.Config:
    return config.build({"device": {"id": "t1", "state_dir": str(tmp_path / "state")},
                         "agent": {"health_interval_s": 0.1, **agent}}, env={})


def factory(*components: Component) -> Any:
    def make(w: Wiring) -> Sequence[Component]:
        return list(components)
    return make


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_ready_watchdog_stopping_in_order(tmp_path: Path, abstract: bool) -> None:
    addr = f"@edgeagent-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    dg = Datagrams(addr)
    try:
        agent = Agent(make_config(tmp_path), factory(Idle()),
                      Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000"}))

        async def main() -> int:
            task = asyncio.create_task(agent.run())
            await async_wait_until(lambda: dg.lines().count("WATCHDOG=1") >= 2, 5,
                                   message="two watchdog pings")
            agent.request_stop("test")
            return await asyncio.wait_for(task, 10)

        assert asyncio.run(main()) == 0
        wait_until(lambda: "STOPPING=1" in dg.lines(), 5)
        seq = [line for line in dg.lines() if line in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
        first_stop = seq.index("STOPPING=1")
        assert seq[0] == "READY=1"
        assert "WATCHDOG=1" in seq[1:first_stop]
        assert any(line.startswith("STATUS=") for line in dg.lines())
    finally:
        dg.close()


def test_notifier_without_socket_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog() and n.watchdog_s is None
    # a watchdog for another pid is not ours
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


class Blocker(Idle):
    """Blocks the event loop (a bug we must survive: systemd restarts us) once `go` is set."""

    def __init__(self, block_s: float) -> None:
        super().__init__("blocker")
        self.block_s = block_s
        self.go = asyncio.Event()
        self.done = asyncio.Event()

    async def run(self) -> None:
        await self.go.wait()
        time.sleep(self.block_s)  # deliberately blocking the loop
        self.done.set()
        await asyncio.Event().wait()


def test_blocked_event_loop_stops_watchdog_pings(tmp_path: Path) -> None:
    addr = str(tmp_path / "notify")
    dg = Datagrams(addr)
    try:
        blocker = Blocker(block_s=1.0)
        agent = Agent(make_config(tmp_path), factory(blocker),
                      Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000"}))

        async def main() -> tuple[float, float]:
            task = asyncio.create_task(agent.run())
            await async_wait_until(lambda: dg.lines().count("WATCHDOG=1") >= 3, 5,
                                   message="three watchdog pings")
            t_block = time.monotonic()
            blocker.go.set()
            await blocker.done.wait()
            t_unblock = time.monotonic()
            n = dg.lines().count("WATCHDOG=1")
            await async_wait_until(lambda: dg.lines().count("WATCHDOG=1") >= n + 3, 5,  # pings resume
                                   message="watchdog pings after the loop was unblocked")
            agent.request_stop("test")
            await asyncio.wait_for(task, 10)
            return t_block, t_unblock

        t_block, t_unblock = asyncio.run(main())
        pings = [t for t, line in dg.received if line == "WATCHDOG=1"]
        during = [t for t in pings if t_block + 0.1 < t < t_unblock - 0.05]
        assert t_unblock - t_block >= 0.95
        assert during == [], f"watchdog pinged while the loop was blocked: {during}"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) >= 0.9
    finally:
        dg.close()


class Crasher(Idle):
    def __init__(self, crashes: int) -> None:
        super().__init__("crasher")
        self.crashes = crashes
        self.runs = 0
        self.steady = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"boom {self.runs}")
        self.steady.set()
        await asyncio.Event().wait()


def test_crashing_component_is_restarted_and_reported(tmp_path: Path) -> None:
    crasher, other = Crasher(crashes=2), Idle("other")
    agent = Agent(make_config(tmp_path, restart_initial_s=0.01, restart_max_s=0.05), factory(other, crasher))

    async def main() -> None:
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(crasher.steady.wait(), 10)
        st = agent.states["crasher"]
        assert st.restarts == 2 and st.last_error == "RuntimeError: boom 2" and st.state == "running"
        assert agent.states["other"].state == "running"  # the others were never disturbed
        path = agent.config.state_dir / "health.json"  # the health writer runs every 0.1 s
        await async_wait_until(
            lambda: path.exists() and json.loads(path.read_text())["components"]["crasher"]["restarts"] == 2,
            5, message="health.json reporting 2 crasher restarts")
        health = json.loads(path.read_text())
        assert health["components"]["crasher"]["restarts"] == 2 and health["state"] == "running"
        agent.request_stop()
        assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())
    outbox = agent.wiring.outbox.target
    assert isinstance(outbox, MemoryOutbox)
    crash_events = [e for e in outbox.events if e[0] == "error" and "crasher" in e[2]]
    assert len(crash_events) == 2 and crash_events[0][3]["error"] == "RuntimeError: boom 1"
    assert other.exited and crasher.exited


def test_crash_loop_is_reported_as_critical(tmp_path: Path) -> None:
    crasher = Crasher(crashes=10**6)
    agent = Agent(make_config(tmp_path, restart_initial_s=0.01, restart_max_s=0.02, crash_loop_restarts=3),
                  factory(crasher))

    async def main() -> None:
        task = asyncio.create_task(agent.run())
        outbox = agent.wiring.outbox.target
        assert isinstance(outbox, MemoryOutbox)
        await async_wait_until(lambda: any(e[1] == "critical" for e in outbox.events), 10,
                               message="a critical crash-loop event")
        assert agent.states["crasher"].crash_loop and agent.states["crasher"].state == "failed"
        agent.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


class SlowExit(Idle):
    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.sleep(3600)


def test_stop_is_bounded_by_shutdown_timeout_and_reverse_order(tmp_path: Path) -> None:
    order: list[str] = []

    class Recorder(Idle):
        async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                            tb: TracebackType | None) -> None:
            order.append(self.name)

    agent = Agent(make_config(tmp_path, shutdown_timeout_s=1.0),
                  factory(Recorder("first"), SlowExit("stuck"), Recorder("last")))

    async def main() -> tuple[int, float]:
        task = asyncio.create_task(agent.run())
        await async_wait_until(lambda: agent.state == "running", 10, message="agent running")
        t0 = time.monotonic()
        agent.request_stop()
        code = await asyncio.wait_for(task, 10)
        return code, time.monotonic() - t0

    code, took = asyncio.run(main())
    assert took < 2.0, took
    assert code == 1  # a component did not stop in time: said so in the exit code
    # reverse order; the stuck one is cancelled at the deadline and the ones before it still close
    assert order == ["last", "first"]


def test_sigterm_stops_the_agent_process_with_exit_0(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[device]
id = "sigterm-test"
state_dir = "{state}"
[agent]
shutdown_timeout_s = 5.0
health_interval_s = 0.2
[inference]
enabled = false
[monitor]
interval_s = 0.2
""")
    proc = subprocess.Popen([sys.executable, "-m", "edgeagent.cli", "run", "--config", str(cfg)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def running() -> bool:
            p = state / "health.json"
            return p.exists() and json.loads(p.read_text()).get("state") == "running"

        wait_until(running, 30, message="agent running")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate()
    assert code == 0, err
    assert took < 5.0
    assert json.loads((state / "health.json").read_text())["state"] == "stopped"
    assert "agent stopped" in err


def test_restart_request_stops_cleanly_with_the_restart_exit_code(tmp_path: Path) -> None:
    from edgeagent.agent import RESTART_EXIT_CODE

    idle = Idle()
    agent = Agent(make_config(tmp_path), factory(idle))

    async def main() -> int:
        task = asyncio.create_task(agent.run())
        await async_wait_until(lambda: agent.state == "running", 10, message="agent running")
        agent.wiring.request_restart("config rollback needs mqtt.port")
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == RESTART_EXIT_CODE
    assert idle.exited
