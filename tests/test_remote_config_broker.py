"""Remote config end to end: the real agent (transport, telemetry, remote config) against a real
Mosquitto, the desired config published retained by an operator client, effects measured on the
broker."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeagent.agent import Agent, Component, Wiring
from edgeagent.core import protocol
from edgeagent.core.config_layers import load_effective
from edgeagent.core.signing import generate_keypair, load_private_key, sign
from edgeagent.remote_config import RemoteConfigComponent
from tests import rig
from tests.broker import Broker
from tests.transport_util import Observer
from tests.util import async_wait_until, free_port

pytestmark = pytest.mark.integration

DESIRED = "edge/dev1/config/desired"
REPORTED = "edge/dev1/config/reported"


def write_config(tmp_path: Path, port: int) -> Path:
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_keypair(keys / "ops.key", keys / "ops.pem")
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "dev1"
state_dir = "{tmp_path / 'state'}"
[mqtt]
host = "127.0.0.1"
port = {port}
keepalive_s = 5
reconnect_initial_s = 0.05
reconnect_max_s = 0.3
connect_timeout_s = 2
tls.enabled = false
[inference]
enabled = false
[telemetry]
interval_s = 0.5
batch_max = 1
batch_wait_s = 0
[config]
confirm_timeout_s = 2
[updates.trusted_keys]
ops = "{keys / 'ops.pem'}"
""")
    return path


def desired(tmp_path: Path, version: int, partial: dict[str, Any]) -> bytes:
    key = load_private_key(tmp_path / "keys" / "ops.key")
    return protocol.dumps(sign({"v": 1, "type": "config", "version": version, "config": partial}, key, "ops"))


class Running:
    """`edgeagent run` in-process: the real Agent with the components under test."""

    def __init__(self, path: Path, restarts: list[str]) -> None:
        effective = load_effective(path, starting=True)  # as `edgeagent run` does

        def components(w: Wiring) -> list[Component]:
            transport = rig.transport(w)
            self.remote = remote = RemoteConfigComponent(w.live, w.outbox, w.router, w.layers,
                                                         request_restart=restarts.append)
            w.crash_listeners.append(remote.on_crash)
            return [transport, rig.telemetry(w, transport), remote]

        self.agent = Agent(effective.config, components, effective=effective)
        self.task: asyncio.Task[int] | None = None
        self.remote: RemoteConfigComponent | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.agent.run(), name="agent-under-test")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.agent.request_stop("test done")
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)


def reports(obs: Observer, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    return [r for r in obs.on(REPORTED) if pred(r)]


def gaps_after(obs: Observer, t0: float) -> list[float]:
    ts = [s["ts"] for m in obs.on("edge/dev1/telemetry") for s in m["samples"] if s["ts"] > t0]
    return [b - a for a, b in itertools.pairwise(ts)]


def test_a_push_changes_the_telemetry_interval_live_and_old_versions_are_ignored(
        tmp_path: Path, broker: Broker) -> None:
    path = write_config(tmp_path, broker.port)
    obs = Observer(broker.port, client_id="operator")
    restarts: list[str] = []

    async def main() -> None:
        async with Running(path, restarts):
            await async_wait_until(lambda: len(gaps_after(obs, 0)) >= 4, 20, message="samples at 0.5 s")
            before = statistics.median(gaps_after(obs, 0))
            obs.publish(DESIRED, desired(tmp_path, 2, {"telemetry": {"interval_s": 0.05}}), retain=True)
            [applied] = await async_wait_until(
                lambda: reports(obs, lambda r: r["version"] == 2 and r["state"] == "applied"), 20,
                message="applied report")
            await async_wait_until(lambda: len(gaps_after(obs, applied["ts"])) >= 20, 20,
                                   message="samples at the new rate")
            after = statistics.median(gaps_after(obs, applied["ts"]))
            assert 0.4 <= before <= 0.6, before
            assert after <= 0.1, after
            # a replay of an older, validly signed version, then a newer one as a marker
            obs.publish(DESIRED, desired(tmp_path, 1, {"telemetry": {"interval_s": 5}}), retain=True)
            obs.publish(DESIRED, desired(tmp_path, 3, {"telemetry": {"interval_s": 0.1}}), retain=True)
            await async_wait_until(lambda: reports(obs, lambda r: r["version"] == 3), 20, message="v3")
            assert [r["version"] for r in obs.on(REPORTED)] == [2, 3], "no report at all for version 1"
            events = obs.on("edge/dev1/events")
            await async_wait_until(lambda: any(e["message"] == "config version 3 confirmed"
                                               for e in obs.on("edge/dev1/events")), 20,
                                   message="probation over: confirmed")
            assert not any("version 1" in e["message"] for e in events)

    try:
        asyncio.run(main())
    finally:
        obs.close()
    assert restarts == []
    cfg, layers = load_effective(path)
    assert cfg.telemetry.interval_s == 0.1 and layers["remote"] == {"telemetry": {"interval_s": 0.1}}


def test_a_config_that_breaks_the_broker_connection_is_rolled_back_after_the_timeout(
        tmp_path: Path, broker: Broker) -> None:
    path = write_config(tmp_path, broker.port)
    obs = Observer(broker.port, client_id="operator")
    restarts: list[str] = []
    dead_port = free_port()

    async def main() -> None:
        async with Running(path, restarts):
            obs.publish(DESIRED, desired(tmp_path, 7, {"mqtt": {"port": dead_port}}), retain=True)
            [applied] = await async_wait_until(lambda: reports(obs, lambda r: r["version"] == 7), 20,
                                               message="applied report")
            assert applied["state"] == "applied"
            assert applied["reason"] == "restart needed for: mqtt.port (applied on next start)"
        # the restart the report asks for: the agent now points at a port where nothing listens
        async with Running(path, restarts) as run:
            assert run.agent.live.config.mqtt.port == dead_port
            [rolled] = await async_wait_until(
                lambda: reports(obs, lambda r: r["state"] == "rolled_back"), 30,
                message="rolled_back report, delivered once the good port is used again")
            assert rolled["version"] == 7
            assert rolled["reason"] == ("broker unreachable for 2s after applying; "
                                        "running version local file again")
            assert run.agent.live.config.mqtt.port == broker.port

    try:
        asyncio.run(main())
    finally:
        obs.close()
    assert restarts == ["config rollback needs a restart for mqtt.port"]
    assert load_effective(path)[0].mqtt.port == broker.port


def refusals(obs: Observer) -> list[dict[str, Any]]:
    return [e for e in obs.on("edge/dev1/events") if "refused (not verified)" in e["message"]]


def test_a_hostile_publisher_cannot_rewrite_the_report_and_local_only_keys_are_refused(
        tmp_path: Path, broker: Broker) -> None:
    path = write_config(tmp_path, broker.port)
    obs = Observer(broker.port, client_id="operator")
    restarts: list[str] = []

    async def main() -> None:
        async with Running(path, restarts) as run:
            obs.publish(DESIRED, desired(tmp_path, 2, {"telemetry": {"interval_s": 0.25}}), retain=True)
            await async_wait_until(lambda: reports(obs, lambda r: r["version"] == 2), 20,
                                   message="applied report")
            # anyone can publish: a burst of unsigned configs claiming ever higher versions
            for i in range(100):
                forged = {"v": 1, "version": 10_000 + i, "config": {"telemetry": {"interval_s": 0.01}}}
                obs.publish(DESIRED, protocol.dumps(forged), retain=True)
            await async_wait_until(lambda: refusals(obs), 20, message="a refusal event")
            # the operator's own mistake, validly signed: reported, naming the key
            obs.publish(DESIRED, desired(tmp_path, 3, {"updates": {"trusted_keys": {"x": "/tmp/x.pem"}},
                                                       "telemetry": {"interval_s": 1}}), retain=True)
            [rejected] = await async_wait_until(lambda: reports(obs, lambda r: r["version"] == 3), 20,
                                                message="rejected report")
            assert (rejected["state"], rejected["reason"]) == (
                "rejected", "updates.trusted_keys is local-only (still running version 2)")
            assert [r["version"] for r in obs.on(REPORTED)] == [2, 3], "no forged version was reported"
            [event] = refusals(obs)
            assert event["kind"] == "config" and event["data"]["reason"] == "config-signature"
            assert run.remote is not None and 1 <= run.remote.rejections.totals["config-signature"] <= 100
            assert run.agent.live.config.telemetry.interval_s == 0.25

    try:
        asyncio.run(main())
    finally:
        obs.close()
    cfg, layers = load_effective(path)
    assert cfg.telemetry.interval_s == 0.25 and layers["remote"] == {"telemetry": {"interval_s": 0.25}}
