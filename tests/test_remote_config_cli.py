"""`edgeagent config show|diff` as operators run it on a device (a real process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgeagent.core.config_layers import AppliedState, write_applied

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def edgeagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeagent.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def setup(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "dev1"
state_dir = "{tmp_path / 'state'}"
[mqtt]
host = "broker.example"
password = "s3cret"
[telemetry]
interval_s = 5
[[rules]]
name = "hot"
when = "temp_c > 75"
then = ["alert:critical"]
""")
    write_applied(tmp_path / "state", AppliedState(
        version=4, sha256="ab" * 32, confirmed=False, seen_version=4,
        config={"telemetry": {"interval_s": 0.5}, "mqtt": {"keepalive_s": 60},
                "rules": [{"name": "cold", "when": "temp_c < 0", "then": ["alert:info"]}]}))
    return path


def test_show_prints_the_effective_config_with_the_layer_of_each_value(tmp_path: Path) -> None:
    path = setup(tmp_path)
    out = edgeagent("config", "show", "--config", str(path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "# remote layer: version 4, on probation (not confirmed yet)" in text
    assert "interval_s = 0.5  # remote" in text
    assert 'host = "broker.example"  # file' in text
    assert "batch_max = 50  # default" in text
    assert 'name = "cold"  # remote' in text and '"hot"' not in text
    assert "s3cret" not in text and 'password = "***"  # file' in text
    parsed = tomllib.loads(text)  # the output is TOML itself
    assert parsed["telemetry"]["interval_s"] == 0.5 and parsed["mqtt"]["keepalive_s"] == 60

    layer = edgeagent("config", "show", "--config", str(path), "--layer", "remote")
    assert layer.returncode == 0, layer.stderr
    assert tomllib.loads(layer.stdout)["telemetry"] == {"interval_s": 0.5}


def test_diff_lists_what_the_remote_layer_changes(tmp_path: Path) -> None:
    path = setup(tmp_path)
    out = edgeagent("config", "diff", "--config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "mqtt.keepalive_s: 30 -> 60  (needs a restart)" in lines
    assert "telemetry.interval_s: 5.0 -> 0.5" in lines
    assert any(line.startswith("rules: [{") for line in lines)


def test_a_broken_file_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[[rules]]\nname = "x"\nwhen = "temp_c >"\n')
    out = edgeagent("config", "show", "--config", str(path))
    assert out.returncode == 2
    assert "rules[0].when: unexpected end of expression at column 9" in out.stderr
