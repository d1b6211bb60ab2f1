"""Config: every shipped file validates; bad files fail with key-path errors, all of them at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from edgeagent.core import config
from edgeagent.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def errors_of(raw: dict[str, typing.Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.build(raw, env=env or {})
    return info.value.errors


def test_shipped_configs_are_valid() -> None:
    names = {p.name for p in CONFIGS}
    assert names >= {"default.toml", "dev.toml", "raspberry-pi.toml", "jetson.toml"}
    for path in CONFIGS:
        cfg = config.load(path, env={})
        assert cfg.device.id, path


def test_empty_config_gives_working_defaults() -> None:
    cfg = config.build({}, env={})
    assert cfg.device.id == config.default_device_id()
    assert cfg.mqtt.host == "" and cfg.agent.shutdown_timeout_s == 10.0
    assert cfg.telemetry.interval_s > 0 and cfg.monitor.interval_s > 0


def _schema_keys(cls: type[typing.Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key", f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys |= _schema_keys(typing.cast(type[typing.Any], tp), f"{prefix}{key}.")
        elif prefix.startswith(("rules", "pipelines")) or key in ("rules", "pipelines"):
            continue
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_default_toml_documents_every_key() -> None:
    """configs/default.toml lists every key of the schema (commented-out optional ones count)."""
    text = (ROOT / "configs" / "default.toml").read_text()
    missing = []
    for key in sorted(_schema_keys(config.Config)):
        section, _, name = key.rpartition(".")
        header = f"[{section}]"
        if section and header not in text:
            missing.append(key)
            continue
        body = text.split(header, 1)[1] if section else text
        body = body.split("\n[", 1)[0]
        if f"\n{name} =" not in body and f"\n# {name} =" not in body:
            missing.append(key)
    assert not missing, f"configs/default.toml lacks: {missing}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"mqtt": {"port": "abc"}}, 'mqtt.port: expected an integer 1-65535, got "abc"'),
        ({"mqtt": {"port": 70000}}, "mqtt.port: expected an integer 1-65535, got 70000"),
        ({"mqtt": {"hots": "x"}}, "mqtt.hots: unknown key (did you mean 'host'?)"),
        ({"telemetri": {}}, "telemetri: unknown key (did you mean 'telemetry'?)"),
        ({"device": {"id": "a/b#"}}, "device.id: expected 1-64 characters"),
        ({"device": {"id": "dev1\n"}}, "device.id: expected 1-64 characters"),
        ({"mqtt": {"protocol": "4"}}, 'mqtt.protocol: expected one of "auto", "5", "3.1.1", got "4"'),
        ({"telemetry": {"interval_s": -1}}, "telemetry.interval_s: expected a number 0.01-86400, got -1"),
        ({"telemetry": {"batch_max": 2.5}}, "telemetry.batch_max: expected an integer"),
        ({"mqtt": {"tls": {"enabled": "yes"}}}, 'mqtt.tls.enabled: expected a boolean, got "yes"'),
        ({"device": {"groups": "line3"}}, 'device.groups: expected an array of strings, got "line3"'),
        ({"device": {"groups": ["ok", 3]}}, "device.groups[1]: expected a string, got 3"),
        ({"rules": [{"name": "hot", "when": "temp_c > 1", "for": "soon"}]},
         "rules[0].for: expected a duration"),
        ({"rules": [{"when": "x > 1"}]}, "rules[0].name: required key is missing"),
        ({"rules": [{"name": "a", "when": "x"}, {"name": "a", "when": "y"}]},
         "rules[1].name: duplicate rule name"),
        ({"updates": {"gates": {"firmware": {"maintenance_windows": ["Funday 02:00-04:00"]}}}},
         "updates.gates.firmware.maintenance_windows[0]: unknown day"),
        ({"updates": {"gates": {"model": {"skippable": ["moon"]}}}},
         "updates.gates.model.skippable[0]: unknown gate 'moon'"),
        ({"sensors": {"window": {"size": 16, "stride": 32}}}, "sensors.window.stride: expected at most"),
        ({"mqtt": {"tls": {"cert_file": "/x.pem"}}}, "mqtt.tls: cert_file and key_file go together"),
        ({"mqtt": {"password": "${NOPE}"}}, "mqtt.password: environment variable NOPE is not set"),
        ({"logging": {"level": "LOUD"}}, "logging.level: expected one of DEBUG"),
        ({"inference": {"runtime": "onnx"}},
         'inference.runtime: expected one of "auto", "tflite-runtime", "litert"'),
        ({"mqtt": "broker"}, 'mqtt: expected a table, got "broker"'),
        ({"telemetry": {"interval_s": float("nan")}}, "telemetry.interval_s: expected a finite number"),
    ],
)
def test_bad_config_is_rejected_with_key_path(raw: dict[str, typing.Any], expected: str) -> None:
    errs = errors_of(raw)
    assert any(e.startswith(expected) for e in errs), errs


def test_every_error_is_reported_not_only_the_first() -> None:
    errs = errors_of({"mqtt": {"port": "x", "keepalive_s": 0}, "monitor": {"interval_s": "fast"},
                      "bogus": 1})
    assert len(errs) == 4, errs


def test_env_substitution_types_and_defaults() -> None:
    cfg = config.build({"mqtt": {"host": "${H}", "port": "${P:-1884}", "password": "${PW}",
                                 "tls": {"enabled": "${TLS:-false}"}}},
                       env={"H": "broker.lan", "PW": "s3cret"})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.password, cfg.mqtt.tls.enabled) == (
        "broker.lan", 1884, "s3cret", False)
    assert errors_of({"mqtt": {"port": "${P}"}}, env={"P": "eighty"}) == [
        'mqtt.port: expected an integer 1-65535, got "eighty"']


def test_durations_and_rules() -> None:
    cfg = config.build({"rules": [{"name": "hot", "when": "temp_c > 75", "for": "30s",
                                   "cooldown": "5m", "then": ["alert:critical", "power_save"]}]}, env={})
    rule = cfg.rules[0]
    assert (rule.for_s, rule.cooldown_s, rule.then) == (30.0, 300.0, ("alert:critical", "power_save"))


def test_merge_layers_replaces_arrays_and_merges_tables() -> None:
    merged = config.merge_layers({"a": {"x": 1, "l": [1, 2]}, "b": 1}, {"a": {"y": 2, "l": [3]}})
    assert merged == {"a": {"x": 1, "y": 2, "l": [3]}, "b": 1}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_check_config_cli_ok_and_errors(tmp_path: Path) -> None:
    ok = run_cli("check-config", "--no-files", str(ROOT / "configs" / "raspberry-pi.toml"))
    assert ok.returncode == 0, ok.stderr
    assert "device" in ok.stdout and "broker" in ok.stdout and len(ok.stdout.splitlines()) <= 24
    # the board's TLS files and signing key are not on this machine: valid, but it would not run here
    here = run_cli("check-config", str(ROOT / "configs" / "raspberry-pi.toml"))
    assert here.returncode == 1 and "FAIL  mqtt.tls.ca_file" in here.stdout, here.stdout
    assert "FAIL  updates.trusted_keys.ops-2026" in here.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "abc"\nhots = "x"\n[telemetry]\ninterval_s = 0\n')
    res = run_cli("check-config", str(bad))
    assert res.returncode == 2
    assert 'mqtt.port: expected an integer 1-65535, got "abc"' in res.stderr
    assert "mqtt.hots: unknown key" in res.stderr and "telemetry.interval_s" in res.stderr

    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[mqtt\nport = 1\n")
    res = run_cli("check-config", str(syntax))
    assert res.returncode == 2 and "TOML syntax error" in res.stderr

    res = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and f"{tmp_path / 'missing.toml'} (no such file)" in res.stderr
