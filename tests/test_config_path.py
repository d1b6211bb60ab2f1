"""One config lookup for every command: --config, then $EDGEAGENT_CONFIG, then /etc/edgeagent/config.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.core.config_path import ENV_VAR, ConfigNotFound, find_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_flag_then_the_environment_then_the_default(tmp_path: Path) -> None:
    flag, env, default = (tmp_path / n for n in ("flag.toml", "env.toml", "etc.toml"))
    for p in (flag, env, default):
        p.write_text("")
    assert find_config(flag, {ENV_VAR: str(env)}, default) == flag
    assert find_config(None, {ENV_VAR: str(env)}, default) == env
    assert find_config(None, {}, default) == default


def test_a_named_file_that_is_missing_is_an_error_not_a_fall_through(tmp_path: Path) -> None:
    default = tmp_path / "etc.toml"
    default.write_text("")
    with pytest.raises(ConfigNotFound, match="no such file"):
        find_config(tmp_path / "nope.toml", {}, default)
    with pytest.raises(ConfigNotFound) as info:
        find_config(None, {ENV_VAR: str(tmp_path / "nope.toml")}, default)
    assert info.value.tried == ("--config (not given)", f"${ENV_VAR}={tmp_path / 'nope.toml'} (no such file)")


def test_nothing_found_lists_every_place_tried(tmp_path: Path) -> None:
    with pytest.raises(ConfigNotFound) as info:
        find_config(None, {}, tmp_path / "etc.toml")
    assert info.value.tried == ("--config (not given)", f"${ENV_VAR} (not set)",
                                f"{tmp_path / 'etc.toml'} (no such file)")


def _cli(env_config: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_config is not None:
        env[ENV_VAR] = env_config
    return subprocess.run([sys.executable, "-m", "edgeagent.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


# each command with what it prints when it has read the config ($EDGEAGENT_CONFIG) it was given
COMMANDS: list[tuple[tuple[str, ...], int, str]] = [
    (("check-config",), 0, "OK"),
    (("status",), 4, ""),                                  # no health.json: it read the state dir
    (("metrics", "-n", "1"), 0, "cpu_percent"),
    (("config", "show"), 0, "envcfg"),
    (("config", "diff"), 0, "remote layer"),
    (("spool", "stats"), 1, ""),                           # no spool yet in the config's state dir
]


@pytest.mark.parametrize(("argv", "code", "out"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_each_command_finds_its_config_through_the_environment(tmp_path: Path, argv: tuple[str, ...],
                                                               code: int, out: str) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nid = "envcfg"\nstate_dir = "{state}"\n[monitor]\ninterval_s = 0.1\n')
    res = _cli(str(cfg), *argv)
    assert res.returncode == code, res.stderr
    assert out in res.stdout
    assert "no config file" not in res.stderr
    if argv[0] in ("status", "spool"):
        assert str(state) in res.stderr  # it looked in the config's state dir


def test_support_bundle_finds_its_config_through_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nid = "envcfg"\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "state").mkdir()
    out = tmp_path / "b.tar.gz"
    res = _cli(str(cfg), "support", "bundle", "-o", str(out), "--no-journal")
    assert res.returncode == 0, res.stderr
    assert out.exists()


def test_run_finds_its_config_through_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[device]\nid = "envcfg"\n[mqtt]\nport = "x"\n')  # invalid: run stops after reading it
    res = _cli(str(cfg), "run")
    assert res.returncode == 2 and "mqtt.port" in res.stderr


ALL = [("run",), ("check-config",), ("status",), ("metrics",), ("config", "show"), ("config", "diff"),
       ("spool", "stats"), ("support", "bundle")]


@pytest.mark.skipif(Path("/etc/edgeagent/config.toml").exists(), reason="this machine has a config")
@pytest.mark.parametrize("argv", ALL, ids=[" ".join(a) for a in ALL])
def test_no_config_anywhere_is_one_line_naming_the_paths_tried(argv: tuple[str, ...]) -> None:
    res = _cli(None, *argv)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    for tried in ("--config (not given)", f"${ENV_VAR} (not set)", "/etc/edgeagent/config.toml"):
        assert tried in lines[0]


def test_a_missing_file_named_by_the_environment_is_named(tmp_path: Path) -> None:
    res = _cli(str(tmp_path / "nope.toml"), "status")
    assert res.returncode == 2 and f"{ENV_VAR}={tmp_path / 'nope.toml'} (no such file)" in res.stderr
