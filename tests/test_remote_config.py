"""Remote config on the real live objects (ed25519, real files), with a fake clock and a router
whose link state the test sets: verify, validate, apply live, persist, report, ignore replays, roll back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core import config as cfgmod
from edgeagent.core import protocol
from edgeagent.core.config_layers import APPLIED_FILE, ConfigLayers, load_effective, read_applied
from edgeagent.core.errors import RemoteConfigRejected
from edgeagent.core.live import Handler, LiveConfig, MemoryOutbox
from edgeagent.core.signing import generate_keypair, load_private_key, load_trusted_keys, sign
from edgeagent.remote_config import RemoteConfigComponent, config_sha256, parse_desired


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class LinkRouter:
    """A Router whose link state the test sets; it records the subscriptions."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.up = True

    def subscribe(self, topic_filter: str, handler: Handler, express: object = None) -> None:
        self.handlers[topic_filter] = handler

    @property
    def connected(self) -> bool:
        return self.up

    async def wait_connected(self) -> None:  # pragma: no cover - not used here
        raise NotImplementedError


class Device:
    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        self.dir = tmp_path
        keys = tmp_path / "keys"
        keys.mkdir(exist_ok=True)
        generate_keypair(keys / "ops.key", keys / "ops.pem")
        generate_keypair(keys / "other.key", keys / "other.pem")
        self.key = load_private_key(keys / "ops.key")
        self.other = load_private_key(keys / "other.key")
        self.path = tmp_path / "agent.toml"
        self.path.write_text(f"""
[device]
id = "dev1"
state_dir = "{tmp_path / 'state'}"
[mqtt]
host = "127.0.0.1"
[telemetry]
interval_s = 5
[config]
confirm_timeout_s = 30
[updates.trusted_keys]
ops = "{keys / 'ops.pem'}"
{extra}""")
        self.clock = Clock()
        self.restarts: list[str] = []
        self.start()

    def start(self) -> None:
        effective = load_effective(self.path, starting=True)
        cfg, self.layers = effective
        self.live = LiveConfig(cfg)
        self.router = LinkRouter()
        self.outbox = MemoryOutbox()
        layers = ConfigLayers.starting_from(self.live, effective)  # as the agent does
        self.comp = RemoteConfigComponent(self.live, self.outbox, self.router, layers,
                                          request_restart=self.restarts.append, clock=self.clock)

    def reported(self) -> dict[str, Any] | None:
        return self.outbox.states.get("edge/dev1/config/reported")

    def desired(self, version: int, partial: dict[str, Any], key: Ed25519PrivateKey | None = None,
                **extra: Any) -> bytes:
        msg = {"v": 1, "type": "config", "version": version, "config": partial, **extra}
        return protocol.dumps(sign(msg, key or self.key, "ops"))

    async def push(self, payload: bytes) -> None:
        await self.router.handlers["edge/dev1/config/desired"]("edge/dev1/config/desired", payload)
        await self.comp.handle(payload)  # what run() does with the newest payload


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Device]:
    yield Device(tmp_path)


def run(dev: Device, scenario: Any) -> None:
    async def main() -> None:
        async with dev.comp:
            await scenario()

    asyncio.run(main())


def test_parse_desired_verifies_the_signature(dev: Device) -> None:
    trusted = load_trusted_keys(dev.live.config.updates.trusted_keys)
    good = parse_desired("t", dev.desired(3, {"telemetry": {"interval_s": 1}}), dict(trusted), "dev1", ())
    assert (good.version, good.key_id) == (3, "ops")
    assert good.sha256 == config_sha256({"telemetry": {"interval_s": 1}})
    cases = {
        protocol.dumps({"v": 1, "type": "config", "version": 3, "config": {}}):
            "signature: message is not signed (no sig)",
        protocol.dumps({"v": 1, "version": 3, "config": {}}): "signature: message has no type",
        dev.desired(3, {}, key=dev.other): "signature: bad signature for key id 'ops'",
        b"{": "malformed JSON",
        b"[]": "expected a JSON object",
        protocol.dumps({"v": 1, "version": "3", "config": {}}): "version: expected a positive integer",
        protocol.dumps({"v": 1, "version": 3, "config": []}): "config: expected an object",
        b"[" * 100000: "malformed JSON",
    }
    tampered = json.loads(dev.desired(3, {"telemetry": {"interval_s": 1}}))
    tampered["config"]["telemetry"]["interval_s"] = 0.01
    cases[protocol.dumps(tampered)] = "signature: bad signature for key id 'ops'"
    for payload, reason in cases.items():
        with pytest.raises(RemoteConfigRejected) as err:
            parse_desired("t", payload, dict(trusted), "dev1", ())
        assert err.value.reason.startswith(reason), (payload[:40], err.value.reason)


partial_4 = {"telemetry": {"interval_s": 0.5, "batch_max": 3}, "logging": {"level": "DEBUG"}}


def test_a_push_applies_live_persists_and_reports(dev: Device) -> None:
    changes = []
    partial = partial_4

    async def scenario() -> None:
        waiter = asyncio.ensure_future(dev.live.changed.wait())
        await asyncio.sleep(0)
        await dev.push(dev.desired(4, partial))
        await asyncio.wait_for(waiter, 1)  # telemetry sleeping in sleep_or_change wakes at once
        changes.append(dev.live.config.telemetry)
        rep = dev.reported()
        assert rep is not None
        assert (rep["version"], rep["state"], rep["reason"], rep["sha256"]) == (4, "applied", "",
                                                                                 config_sha256(partial))

    run(dev, scenario)
    assert (changes[0].interval_s, changes[0].batch_max) == (0.5, 3)
    assert [e[2] for e in dev.outbox.events] == ["config version 4 applied"]
    text = (dev.dir / "state" / APPLIED_FILE).read_text()
    assert "interval_s = 0.5" in text
    cfg, layers = load_effective(dev.path)  # the next start begins from file + applied layer
    assert (cfg.telemetry.interval_s, cfg.logging.level) == (0.5, "DEBUG")
    assert layers["remote"] == partial_4


def test_a_bad_config_is_rejected_with_its_key_path_and_changes_nothing(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(2, {"telemetry": {"interval_s": -1, "intervall_s": 3},
                                       "rules": [{"name": "x", "when": "temp_c >> 3"}]}))
        rep = dev.reported()
        assert rep is not None and rep["state"] == "rejected" and rep["version"] == 2
        assert "telemetry.interval_s: expected a number 0.01-86400, got -1" in rep["reason"]
        assert "telemetry.intervall_s: unknown key (did you mean 'interval_s'?)" in rep["reason"]
        assert "rules[0].when: unexpected token '>' at column 9" in rep["reason"]
        assert dev.live.config.telemetry.interval_s == 5.0
        for partial, reason in [
            ({"device": {"state_dir": "/"}}, "device.state_dir is local-only"),
            ({"busy": {"topic": "${HOME}"}}, "config.busy.topic: ${VAR} substitution is for the local"),
            ({"telemetry": {"interval_s": None}}, "config.telemetry.interval_s: null is not a config value"),
        ]:
            await dev.push(dev.desired(dev.comp.state.seen_version + 1, partial))
            rep = dev.reported()
            assert rep is not None and rep["state"] == "rejected" and reason in rep["reason"], rep
        before = dev.reported()
        await dev.push(protocol.dumps({"v": 1, "version": 99, "config": {"telemetry": {"interval_s": 1}}}))
        assert dev.reported() is before, "an unsigned message must not rewrite the retained report"
        assert dev.comp.state.seen_version == 5, "an unsigned message must not move the version mark"
        assert dev.outbox.events[-1][2].startswith("desired config refused (not verified): signature")

    run(dev, scenario)
    assert dev.live.config.telemetry.interval_s == 5.0
    assert load_effective(dev.path)[0].telemetry.interval_s == 5.0


def test_versions_must_increase_a_replay_is_ignored(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(5, {"telemetry": {"interval_s": 2}}))
        first = dev.reported()
        await dev.push(dev.desired(3, {"telemetry": {"interval_s": 9}}))  # an old, validly signed one
        await dev.push(dev.desired(5, {"telemetry": {"interval_s": 2}}))  # retained again after reconnect
        assert dev.reported() is first, "no new report"
        assert dev.live.config.telemetry.interval_s == 2.0
        await dev.push(dev.desired(6, {"telemetry": {"interval_s": 3}}))
        assert dev.live.config.telemetry.interval_s == 3.0

    run(dev, scenario)
    # after a restart the mark is still there
    dev.start()

    async def after() -> None:
        await dev.push(dev.desired(6, {"telemetry": {"interval_s": 7}}))
        assert dev.live.config.telemetry.interval_s == 3.0

    run(dev, after)


def test_restart_keys_are_named_and_wait_for_the_next_start(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(1, {"mqtt": {"keepalive_s": 60}, "telemetry": {"interval_s": 1},
                                       "inference": {"num_threads": 2, "threshold": 0.7}}))
        rep = dev.reported()
        assert rep is not None and rep["state"] == "applied"
        assert rep["reason"] == ("restart needed for: inference.num_threads, mqtt.keepalive_s "
                                 "(applied on next start)")
        cfg = dev.live.config
        assert (cfg.mqtt.keepalive_s, cfg.inference.num_threads) == (30, 1)  # as the process started
        assert (cfg.telemetry.interval_s, cfg.inference.threshold) == (1.0, 0.7)  # live

    run(dev, scenario)
    cfg, _ = load_effective(dev.path)
    assert (cfg.mqtt.keepalive_s, cfg.inference.num_threads) == (60, 2)


def test_probation_confirms_when_the_broker_stays_reachable(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(1, {"telemetry": {"interval_s": 1}}))
        dev.clock.t += 29
        await dev.comp.check_probation()
        assert dev.comp.probation is not None
        dev.clock.t += 1
        await dev.comp.check_probation()
        assert dev.comp.probation is None and dev.comp.state.confirmed

    run(dev, scenario)
    st = read_applied(dev.dir / "state")
    assert st is not None and (st.confirmed, st.good_version, st.version) == (True, 1, 1)


def test_broker_unreachable_after_applying_rolls_back_and_reports_once_reconnected(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(1, {"telemetry": {"interval_s": 1}}))
        dev.clock.t += 31
        await dev.comp.check_probation()  # confirmed: version 1 is the last good one
        await dev.push(dev.desired(2, {"telemetry": {"interval_s": 2}}))
        assert dev.live.config.telemetry.interval_s == 2.0
        dev.router.up = False  # the link breaks
        dev.clock.t += 1
        await dev.comp.check_probation()
        dev.clock.t += 20
        dev.router.up = True  # a short blip is forgiven ...
        await dev.comp.check_probation()
        dev.router.up = False
        dev.clock.t += 1
        await dev.comp.check_probation()
        dev.clock.t += 29.9
        await dev.comp.check_probation()
        assert dev.live.config.telemetry.interval_s == 2.0
        dev.clock.t += 0.2  # ... 30 s in a row is not
        await dev.comp.check_probation()
        assert dev.live.config.telemetry.interval_s == 1.0
        rep = dev.reported()
        assert rep is not None and (rep["version"], rep["state"]) == (2, "rolled_back")
        assert rep["reason"] == "broker unreachable for 30s after applying; running version 1 again"

    run(dev, scenario)
    assert dev.restarts == []
    cfg, _ = load_effective(dev.path)
    assert cfg.telemetry.interval_s == 1.0
    dev.start()  # the rolled-back version is not applied again from the retained message

    async def after() -> None:
        assert dev.reported() is not None and dev.reported()["state"] == "rolled_back"  # type: ignore[index]
        await dev.push(dev.desired(2, {"telemetry": {"interval_s": 2}}))
        assert dev.live.config.telemetry.interval_s == 1.0

    run(dev, after)


def test_a_component_crash_on_probation_rolls_back(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(1, {"telemetry": {"interval_s": 0.25}}))
        dev.comp.on_crash("telemetry", "ValueError: boom")
        await dev.comp.check_probation()
        assert dev.live.config.telemetry.interval_s == 5.0
        rep = dev.reported()
        assert rep is not None and rep["state"] == "rolled_back"
        assert rep["reason"] == ("component telemetry failed: ValueError: boom; running version local file "
                                 "again")

    run(dev, scenario)


def test_restart_keys_that_break_the_link_roll_back_at_the_next_start_and_restart(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(1, {"mqtt": {"port": 1}}))
        assert dev.live.config.mqtt.port == 8883

    run(dev, scenario)
    dev.start()  # the restart the report asked for: the bad port is in effect now
    assert dev.live.config.mqtt.port == 1
    dev.router.up = False

    async def after() -> None:
        assert dev.comp.probation is not None, "an unconfirmed layer is on probation at start"
        dev.clock.t += 30
        await dev.comp.check_probation()
        assert dev.live.config.mqtt.port == 8883, "the session's next connect uses the good port"

    run(dev, after)
    assert dev.restarts == ["config rollback needs a restart for mqtt.port"]
    assert load_effective(dev.path)[0].mqtt.port == 8883


def test_a_damaged_or_stale_applied_layer_does_not_keep_the_board_down(dev: Device) -> None:
    state = dev.dir / "state"
    state.mkdir(exist_ok=True)
    (state / APPLIED_FILE).write_text("version = [\n")
    assert load_effective(dev.path)[0].telemetry.interval_s == 5.0
    (state / APPLIED_FILE).write_text('version = 3\nsha256 = ""\n[config.telemetry]\nno_such_key = 1\n'
                                      '[good]\nversion = 2\n[good.config.telemetry]\ninterval_s = 2\n')
    cfg, layers = load_effective(dev.path)
    assert cfg.telemetry.interval_s == 2.0 and layers["remote"] == {"telemetry": {"interval_s": 2}}
    st = read_applied(state)
    assert st is not None and st.version == 3, "show/diff (not starting) change nothing"
    load_effective(dev.path, starting=True)
    st = read_applied(state)
    assert st is not None and (st.version, st.report["state"], st.report["version"]) == (2, "rolled_back", 3)
    assert st.report["reason"].startswith("no longer validates: telemetry.no_such_key: unknown key")


def test_a_layer_the_agent_cannot_start_with_is_given_up_after_three_starts(dev: Device) -> None:
    async def scenario() -> None:
        await dev.push(dev.desired(1, {"telemetry": {"interval_s": 1}}))
        dev.clock.t += 30
        await dev.comp.check_probation()  # version 1 confirmed: the good one
        await dev.push(dev.desired(2, {"telemetry": {"interval_s": 2}, "mqtt": {"keepalive_s": 7}}))

    run(dev, scenario)
    # imagine the agent dies at start with version 2 (before its probation can end) again and again
    for _ in range(3):
        cfg, _ = load_effective(dev.path, starting=True)
        assert cfg.mqtt.keepalive_s == 7
    cfg, _ = load_effective(dev.path, starting=True)
    assert (cfg.mqtt.keepalive_s, cfg.telemetry.interval_s) == (30, 1.0)
    dev.start()

    async def after() -> None:
        rep = dev.reported()
        assert rep is not None and (rep["version"], rep["state"]) == (2, "rolled_back")
        assert rep["reason"] == "not confirmed after 3 agent starts; running version 1 again"
        assert dev.comp.probation is None

    run(dev, after)


def test_run_loop_applies_the_newest_retained_message(dev: Device) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(dev.comp.run(), name="remote-config-test")
        try:
            handler = dev.router.handlers["edge/dev1/config/desired"]
            await handler("edge/dev1/config/desired", dev.desired(1, {"telemetry": {"interval_s": 4}}))
            await handler("edge/dev1/config/desired", dev.desired(2, {"telemetry": {"interval_s": 3}}))
            await handler("edge/dev1/config/desired", b"")  # a cleared retained message is nothing
            for _ in range(200):
                if dev.live.config.telemetry.interval_s == 3.0:
                    break
                await asyncio.wait_for(dev.live.changed.wait(), 5)
            assert dev.live.config.telemetry.interval_s == 3.0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(dev, scenario)


def test_build_from_to_dict_reproduces_the_config() -> None:
    # layers built without load_effective takes its start config as the file layer
    cfg = cfgmod.build({"device": {"id": "d"}, "rules": [{"name": "r", "when": "busy", "for": "5s"}],
                        "updates": {"gates": {"model": {"maintenance_windows": ["Mon 01:00-02:00"]}}}})
    assert cfgmod.build(cfgmod.to_dict(cfg)) == cfg
