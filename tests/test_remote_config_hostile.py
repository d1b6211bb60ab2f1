"""Remote config that cannot disarm the device: local-only keys (in a desired config and in rules'
`set:`), the dry run of every file and model a layer names, and unverified messages that never
rewrite the retained report (real ed25519 keys, real files, the real component)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import config as cfgmod
from edgeagent.core import protocol
from edgeagent.core.actions import SET_KEYS, is_local_only, parse_action
from edgeagent.core.config_layers import APPLIED_FILE, load_effective, read_applied
from edgeagent.core.errors import ConfigError
from edgeagent.core.layer_checks import FILE_KEYS, LOCAL_ONLY, local_only_paths
from edgeagent.core.signing import generate_keypair, load_private_key, sign
from tests.test_remote_config import Device, run

TELEMETRY = {"telemetry": {"interval_s": 1}}  # rides along: proves that nothing at all is applied

# one desired-config fragment per local-only key, and the key path the rejection must name
LOCAL_ONLY_CASES: list[tuple[dict[str, Any], str]] = [
    ({"updates": {"trusted_keys": {"evil": "/tmp/evil.pem"}}}, "updates.trusted_keys"),
    ({"updates": {"trusted_keys": {}}}, "updates.trusted_keys"),
    ({"updates": {"firmware": {"installer": "script"}}}, "updates.firmware.installer"),
    ({"updates": {"firmware": {"mode": "direct"}}}, "updates.firmware.mode"),
    ({"updates": {"firmware": {"commands": {"install": ["/bin/sh", "-c", "id"]}}}},
     "updates.firmware.commands"),
    ({"updates": {"firmware": {"health_command": ["/bin/true"]}}}, "updates.firmware.health_command"),
    ({"updates": {"firmware": {"version_file": "/tmp/v"}}}, "updates.firmware.version_file"),
    ({"mqtt": {"host": "evil.example"}}, "mqtt.host"),
    ({"mqtt": {"client_id": "other-device"}}, "mqtt.client_id"),
    ({"mqtt": {"username": "u"}}, "mqtt.username"),
    ({"mqtt": {"password": "p"}}, "mqtt.password"),
    ({"mqtt": {"topic_prefix": "elsewhere"}}, "mqtt.topic_prefix"),
    ({"mqtt": {"tls": {"insecure_skip_verify": True}}}, "mqtt.tls.insecure_skip_verify"),
    ({"mqtt": {"tls": {"enabled": False}}}, "mqtt.tls.enabled"),
    ({"mqtt": {"tls": {"ca_file": "/tmp/ca.pem"}}}, "mqtt.tls.ca_file"),
    ({"mqtt": {"tls": {"cert_file": "/tmp/c.pem"}}}, "mqtt.tls.cert_file"),
    ({"mqtt": {"tls": {"key_file": "/tmp/k.pem"}}}, "mqtt.tls.key_file"),
    ({"device": {"id": "dev2"}}, "device.id"),
    ({"device": {"state_dir": "/tmp"}}, "device.state_dir"),
    ({"inference": {"delegate": "/tmp/libevil.so"}}, "inference.delegate"),
    ({"config": {"enabled": False}}, "config.enabled"),
]


@pytest.fixture
def dev(tmp_path: Path) -> Device:
    return Device(tmp_path)


def _with_telemetry(partial: dict[str, Any]) -> dict[str, Any]:
    return {**TELEMETRY, **partial}


@pytest.mark.parametrize(("partial", "path"), LOCAL_ONLY_CASES, ids=[p for _, p in LOCAL_ONLY_CASES])
def test_a_desired_config_setting_a_local_only_key_is_rejected_naming_it(
        tmp_path: Path, partial: dict[str, Any], path: str) -> None:
    dev = Device(tmp_path)
    before = dev.live.config

    async def scenario() -> None:
        await dev.push(dev.desired(3, _with_telemetry(partial)))

    run(dev, scenario)
    rep = dev.reported()
    assert rep is not None and (rep["state"], rep["version"]) == ("rejected", 3)
    assert rep["reason"] == f"{path} is local-only"
    assert [e[2] for e in dev.outbox.events] == [f"desired config rejected: {path} is local-only"]
    assert dev.live.config == before, "nothing applied"
    st = read_applied(tmp_path / "state")
    assert st is not None and (st.version, st.config, st.seen_version) == (0, {}, 3)
    assert load_effective(dev.path)[0] == before


def test_the_local_only_table_names_real_keys_and_the_cases_cover_it() -> None:
    schema = cfgmod.to_dict(cfgmod.Config())
    for key in LOCAL_ONLY:
        node: Any = schema
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not a config key"
            node = node[part]
    covered = {k for partial, _ in LOCAL_ONLY_CASES for k in LOCAL_ONLY if local_only_paths(partial)
               and any(p == k or p.startswith(k + ".") for p in local_only_paths(partial))}
    assert covered == set(LOCAL_ONLY)
    assert local_only_paths({"mqtt": {"port": 1884, "keepalive_s": 9}, **TELEMETRY}) == []


def test_no_rule_may_set_a_local_only_key(tmp_path: Path) -> None:
    assert not [k for k in SET_KEYS if is_local_only(k)]
    for key in [*LOCAL_ONLY, "mqtt.tls.enabled", "updates.firmware"]:
        with pytest.raises(ValueError, match=f"set: {key} is local-only"):
            parse_action(f"set:{key}=x", lambda partial: [])
    # a rule arriving in a remote config is refused with it
    dev = Device(tmp_path)
    rule = {"name": "evil", "when": "temp_c > 0", "then": ["set:updates.trusted_keys=x"]}

    async def scenario() -> None:
        await dev.push(dev.desired(1, {**TELEMETRY, "rules": [rule]}))

    run(dev, scenario)
    rep = dev.reported()
    assert rep is not None and rep["state"] == "rejected"
    assert "rules[0].then[0]: set: updates.trusted_keys is local-only" in rep["reason"]
    assert dev.live.config.telemetry.interval_s == 5.0
    # and the layer itself holds should a future caller get past parse_action
    layers = dev.comp.layers
    with pytest.raises(ConfigError, match=r"mqtt\.host is local-only"):
        layers.set_override("rule:evil", {"mqtt": {"host": "evil.example"}})
    assert layers.overrides == {} and dev.live.config.mqtt.host == "127.0.0.1"


@pytest.mark.parametrize(("partial", "problem"), [
    ({"sensors": {"source": "csv", "csv": {"path": "{tmp}/vibraton.csv"}}},
     "sensors.csv.path: cannot use '{tmp}/vibraton.csv': No such file or directory"),
    ({"busy": {"file": "{tmp}/no-such-dir/busy"}},
     "busy.file: cannot use '{tmp}/no-such-dir/busy': No such file or directory"),
    ({"monitor": {"disk_paths": ["/", "{tmp}/data-typo"]}},
     "monitor.disk_paths[1]: cannot use '{tmp}/data-typo': No such file or directory"),
    ({"monitor": {"battery_file": "{tmp}"}}, "monitor.battery_file: cannot use '{tmp}': Is a directory"),
    ({"inference": {"model": "vibration-anomly"}}, "inference.model: no model 'vibration-anomly' (int8)"),
], ids=["csv", "busy", "disk", "battery", "model"])
def test_a_typo_in_a_file_path_is_rejected_before_apply(tmp_path: Path, partial: dict[str, Any],
                                                         problem: str) -> None:
    dev = Device(tmp_path)
    before = dev.live.config
    layer = json.loads(json.dumps(partial).replace("{tmp}", str(tmp_path)))

    async def scenario() -> None:
        await dev.push(dev.desired(2, _with_telemetry(layer)))

    run(dev, scenario)
    rep = dev.reported()
    assert rep is not None and rep["state"] == "rejected"
    assert problem.replace("{tmp}", str(tmp_path)) in rep["reason"], rep["reason"]
    assert dev.live.config == before and load_effective(dev.path)[0] == before


def test_files_that_exist_pass_the_dry_run(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    csv = tmp_path / "vibration.csv"
    csv.write_text("t,x,y,z\n0,0,0,0\n")
    partial = {"sensors": {"source": "csv", "csv": {"path": str(csv)}},
               "busy": {"file": str(tmp_path / "busy")}, "monitor": {"disk_paths": [str(tmp_path)]},
               "inference": {"model": "vibration-anomaly"}, **TELEMETRY}

    async def scenario() -> None:
        await dev.push(dev.desired(2, partial))

    run(dev, scenario)
    rep = dev.reported()
    assert rep is not None and rep["state"] == "applied", rep
    assert dev.live.config.busy.file == str(tmp_path / "busy")
    assert set(FILE_KEYS) >= {"sensors.csv.path", "busy.file", "monitor.disk_paths"}


def test_a_burst_of_forged_configs_is_one_event_and_leaves_the_report_alone(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    keys = tmp_path / "attacker"
    keys.mkdir()
    generate_keypair(keys / "a.key", keys / "a.pem")
    attacker = load_private_key(keys / "a.key")

    async def scenario() -> None:
        await dev.push(dev.desired(5, {"telemetry": {"interval_s": 2}}))
        truth = dev.reported()
        assert truth is not None and truth["state"] == "applied"
        events = len(dev.outbox.events)
        for i in range(100):
            msg = {"v": 1, "type": "config", "version": 1000 + i,
                   "config": {"telemetry": {"interval_s": 0.01}}}
            # unsigned, or signed by a key the device does not trust under a name it does
            forged = protocol.dumps(sign(msg, attacker, "ops") if i % 2 else msg)
            await dev.push(forged)
        assert dev.reported() is truth, "the retained report still says what runs"
        refused = list(dev.outbox.events)[events:]
        [(kind, _, message, data, _)] = refused  # one event for the burst, whatever it claimed
        assert (kind, data["reason"], data["count"]) == ("config", "config-signature", 1)
        assert message.startswith("desired config refused (not verified): signature")
        assert sum(dev.comp.rejections.totals.values()) == 100
        assert dev.live.config.telemetry.interval_s == 2.0 and dev.comp.state.seen_version == 5
        dev.clock.t += 61
        dev.comp.rejections.flush()
        [summary] = list(dev.outbox.events)[events + 1:]
        assert summary[2].startswith("99 more refused in 60 s like: desired config refused")
        await dev.push(dev.desired(6, {"telemetry": {"interval_s": 3}}))  # the forged 1099 blocks nothing
        assert dev.live.config.telemetry.interval_s == 3.0

    run(dev, scenario)


def test_a_persisted_layer_holding_a_local_only_key_is_given_up_at_start(dev: Device) -> None:
    """Written by an older agent that let it through: the last good layer runs instead."""
    state = dev.dir / "state"
    state.mkdir(exist_ok=True)
    (state / APPLIED_FILE).write_text(
        'version = 3\nsha256 = ""\nconfirmed = true\n[config.telemetry]\ninterval_s = 9\n'
        '[config.mqtt.tls]\ninsecure_skip_verify = true\n'
        '[good]\nversion = 2\n[good.config.telemetry]\ninterval_s = 2\n')
    cfg, _ = load_effective(dev.path, starting=True)
    assert (cfg.telemetry.interval_s, cfg.mqtt.tls.insecure_skip_verify) == (2.0, False)
    st = read_applied(state)
    assert st is not None and st.report["state"] == "rolled_back"
    assert st.report["reason"].startswith("mqtt.tls.insecure_skip_verify is local-only")


def test_dry_run_errors_carry_the_os_error(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    unreadable = tmp_path / "battery"
    unreadable.write_text("80\n")
    unreadable.chmod(0)
    try:
        if os.access(unreadable, os.R_OK):
            pytest.skip("running as root: permissions do not stop reads")
        with pytest.raises(ConfigError, match=r"monitor\.battery_file: cannot use .*: Permission denied"):
            dev.comp.layers.dry_run({"monitor": {"battery_file": str(unreadable)}},
                                    dev.comp.layers.build({"monitor": {"battery_file": str(unreadable)}}))
    finally:
        unreadable.chmod(0o600)
