"""`edgeagent` as an operator meets it, in real processes: a bad flag value, a missing config file and
output closed early (`| head -1`) each end in one line and a documented exit status, never a traceback."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgeagent.cli import build_parser
from edgeagent.core import cli_args
from edgeagent.ops.fleet.state import Thresholds
from edgeagent.ops.fleet.watch import watch
from edgeagent.ops.push import key_id
from edgeagent.transport.spool import Spool

EDGEAGENT = [sys.executable, "-m", "edgeagent.cli"]
VALIDATED = {cli_args.positive_int: "0", cli_args.non_negative_int: "-1", cli_args.positive_float: "-1",
             cli_args.non_negative_float: "-1", cli_args.positive_duration: "0s",
             cli_args.log_level: "LOUD", cli_args.probability: "2"}


def edgeagent(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEAGENT, *args], capture_output=True, text=True, timeout=timeout_s, check=False)


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                     argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, child in subs[0].choices.items() for leaf in _leaves(child, (*path, name))]


def _bad_flag(parser: argparse.ArgumentParser) -> list[str]:
    """A flag of this verb with a value its validation refuses (an unknown flag when none validates)."""
    for action in parser._actions:
        if action.option_strings and action.type in VALIDATED:
            return [action.option_strings[-1], VALIDATED[action.type]]
    for action in parser._actions:
        if action.option_strings and action.type is key_id:
            return [action.option_strings[-1], "../x"]
    for action in parser._actions:
        if action.option_strings and action.choices:
            return [action.option_strings[-1], "no-such-choice"]
    return ["--no-such-flag", "1"]


VERBS = _leaves(build_parser())


def test_every_verb_has_help_for_every_flag() -> None:
    assert len(VERBS) >= 15
    missing = [f"{' '.join(path)} {a.option_strings or a.dest}" for path, p in VERBS for a in p._actions
               if not a.help and a.help != argparse.SUPPRESS]
    assert not missing


def test_every_verb_refuses_a_bad_flag_value_with_status_2_and_no_traceback() -> None:
    procs = []
    for path, parser in VERBS:
        bad = _bad_flag(parser)
        procs.append((path, bad, subprocess.Popen([*EDGEAGENT, *path, *bad], stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)))
    failures = []
    for path, bad, proc in procs:
        _, err = proc.communicate(timeout=120)
        named = bad[0] in err or "required" in err  # argparse names missing required flags first
        if proc.returncode != 2 or "Traceback" in err or not named:
            failures.append((path, bad, proc.returncode, err[-300:]))
    assert not failures


@pytest.mark.parametrize(("args", "needle"), [
    (("metrics", "-n", "0"), "--count/-n"), (("metrics", "-n", "-1"), "--count/-n"),
    (("run", "--config", "x.toml", "--log-level", "LOUD"), "--log-level"),
    (("spool", "stats", "--count", "0"), "--count/-n"),
    (("push", "--device", "d", "--kind", "model", "--name", "m", "--version", "1", "--key", "k",
      "--key-id", "k", "--expect", "0", "f"), "--expect"),
    (("support", "pull", "--device", "d", "--key", "k", "--key-id", "k", "--timeout", "-5"), "--timeout"),
])
def test_counts_and_levels_are_checked(args: tuple[str, ...], needle: str) -> None:
    r = edgeagent(*args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_log_level_is_case_insensitive() -> None:
    assert cli_args.log_level("debug") == "DEBUG"
    with pytest.raises(argparse.ArgumentTypeError):
        cli_args.log_level("LOUD")


def test_help_documents_the_exit_statuses_and_shows_defaults() -> None:
    r = edgeagent("--help")
    assert r.returncode == 0
    for line in ("0    success", "1    failure", "2    usage or config error", "130  interrupted", "--debug"):
        assert line in r.stdout
    spool = edgeagent("spool", "--help").stdout
    assert "(default 5)" in spool
    assert "(default: 2m)" in edgeagent("support", "log-level", "--help").stdout


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "dev1"\nstate_dir = "{tmp_path / "state"}"\n'
                    '[monitor]\ninterval_s = 0.1\n')
    return path


def _first_line_then_close(*args: str) -> tuple[str, int, str]:
    """Read one line of the command's output and close the pipe, as `| head -1` does."""
    proc = subprocess.Popen([*EDGEAGENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline().decode()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return first, proc.wait(timeout=60), err


def test_output_closed_early_ends_quietly(tmp_path: Path) -> None:
    cfg = str(_config(tmp_path))
    (tmp_path / "state").mkdir()
    health = {"ts": time.time(), "device": "dev1", "pid": 1}
    (tmp_path / "state" / "health.json").write_text(json.dumps(health))
    spool = Spool(tmp_path / "state" / "spool.sqlite", 1_000_000, "dev1")
    spool.open()
    spool.add_sample({"ts": 1.0, "metrics": {}})
    spool.close()
    cases = [("--help",), ("metrics", "-c", cfg, "-n", "3"), ("config", "show", "-c", cfg),
             ("spool", "stats", "-c", cfg), ("status", "--json", "--state-dir", str(tmp_path / "state")),
             ("check-config", cfg), ("check", "--static", "-c", cfg), ("check", "--json", "-c", cfg)]
    for args in cases:
        first, status, err = _first_line_then_close(*args)
        assert first, args
        assert "Traceback" not in err and "Exception ignored" not in err, (args, err)
        assert status in (0, 1, 3, 4), (args, status, err)  # status reports a dead agent as 1/3/4
        if args[0] != "status":
            assert status == 0, (args, err)


def test_a_broken_pipe_on_stdout_after_the_reader_left_is_exit_0(tmp_path: Path) -> None:
    # metrics -n 50 writes long after the reader has gone: the write itself fails with EPIPE
    first, status, err = _first_line_then_close("metrics", "-c", str(_config(tmp_path)), "-n", "50")
    assert first.startswith("{") and status == 0 and err == ""


@pytest.mark.parametrize("args", [
    ("status", "--config", "{missing}"), ("config", "show", "-c", "{missing}"),
    ("config", "diff", "-c", "{missing}"), ("spool", "stats", "-c", "{missing}"),
    ("metrics", "-c", "{missing}"),
    ("check-config", "{missing}"), ("run", "--config", "{missing}"), ("check", "-c", "{missing}")])
def test_a_missing_config_file_is_one_line_and_status_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = str(tmp_path / "nope.toml")
    r = edgeagent(*(a.format(missing=missing) for a in args))
    assert r.returncode == 2 and "Traceback" not in r.stderr and missing in r.stderr
    if args[0] not in ("check-config", "run"):  # those two list every error under a header line
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_our_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = edgeagent("fleet", "devices", "--db", str(tmp_path / "nope.sqlite"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    d = edgeagent("--debug", "fleet", "devices", "--db", str(tmp_path / "nope.sqlite"))
    assert d.returncode == 1 and "Traceback" in d.stderr and "FleetStoreError" in d.stderr


def test_piped_fleet_table_is_plain_and_never_cut() -> None:
    long_id = "device-" + "x" * 120
    now = time.time()
    devices: list[dict[str, Any]] = [{"device": long_id, "state": "online", "last_seen": now,
                                      "groups": ["line3"], "metrics": {"cpu_percent": 12.0}}]
    out = io.StringIO()  # not a terminal, as a pipe or a file is not
    watch(lambda: devices, Thresholds(), None, None, once=True, as_json=False, refresh_s=1.0, out=out)
    text = out.getvalue()
    assert long_id in text and "…" not in text and "\x1b[" not in text
    header = next(line for line in text.splitlines() if line.startswith("device"))
    assert header.split() == ["device", "state", "seen", "cpu%", "mem%", "temp", "model", "p95", "ms",
                              "anom", "gaps", "update", "shadow", "trouble"]
    row = next(line for line in text.splitlines() if line.startswith(long_id))
    assert row.split()[1] == "online" and len(row) > 130


def test_a_verb_whose_extra_is_not_installed_says_which_extra(tmp_path: Path) -> None:
    """The base install has no `fleet` extra: `fleet watch` says what to install, no traceback.
    (sys.modules["rich"] = None makes `import rich` fail as it does where rich is missing.)"""
    code = ("import sys; sys.modules['rich'] = None; from edgeagent.cli import main; "
            f"sys.exit(main(['fleet', 'watch', '--db', {str(tmp_path / 'f.sqlite')!r}, '--once']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "pip install 'edgeagent[fleet]'" in r.stderr and "rich" in r.stderr


def test_the_offline_operator_verbs_end_quietly_when_the_reader_leaves(tmp_path: Path) -> None:
    """`| head -1` on every verb that prints without a broker: no traceback, exit 0. (run prints its
    log on stderr; push, pull, log-level, collect and simulate need a broker: their output is
    line-at-a-time progress, and the bad-flag test above covers their arguments.)"""
    from edgeagent.inference.store import SHIPPED_DIR
    from edgeagent.ops.fleet.store_sqlite import Store

    keys = tmp_path / "keys"
    keys.mkdir()
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"v": 1, "type": "config", "version": 1,
                                   "config": {"telemetry": {"interval_s": 2.0}}}))
    Store(tmp_path / "fleet.sqlite").close()
    db = str(tmp_path / "fleet.sqlite")
    cases = [("keygen", "--key-id", "k1", "--out-dir", str(keys)),
             ("sign", "--key", str(keys / "k1.key"), "--key-id", "k1", "--type", "config", str(desired)),
             ("bench-model", str(SHIPPED_DIR / "vibration-anomaly" / "model.tflite"), "--count", "3",
              "--rounds", "1"),
             ("fleet", "devices", "--db", db), ("fleet", "watch", "--db", db, "--once"),
             ("config", "diff", "-c", str(_config(tmp_path)))]
    for args in cases:
        first, status, err = _first_line_then_close(*args)
        assert first, (args, err)
        assert status == 0 and "Traceback" not in err and "Exception ignored" not in err, (args, status, err)
