"""Log lines on stderr: journald priority prefixes when stderr is the journal, unchanged otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import logging, sys
from edgeagent.core import logs
ring = logs.setup("DEBUG", sys.argv[1])
log = logging.getLogger("edgeagent.test")
log.warning("disk nearly full", extra={"kv": {"free_mb": 12}})
log.info("connected")
log.error("broker refused")
log.debug("detail")
print(ring.recent()[0])
"""


def _run(fmt: str, journal: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal is not None:
        env["JOURNAL_STREAM"] = journal
    return subprocess.run([sys.executable, "-c", SCRIPT, fmt], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_under_journald_each_line_starts_with_its_priority_and_has_no_timestamp() -> None:
    res = _run("kv", "1:1")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<6>", "<3>", "<7>"]
    assert lines[0] == "<4>level=WARNING logger=edgeagent.test msg=\"disk nearly full\" free_mb=12"
    assert not any("ts=" in line for line in lines)
    assert res.stdout.startswith("ts=")  # the support bundle's ring keeps its timestamps


def test_under_journald_json_lines_carry_the_prefix_too() -> None:
    res = _run("json", "8:123")
    lines = res.stderr.splitlines()
    assert lines[0].startswith("<4>{") and lines[1].startswith("<6>{")
    body = json.loads(lines[1][3:])
    assert body["msg"] == "connected" and "ts" not in body


@pytest.mark.parametrize("journal", [None, ""])
def test_outside_journald_lines_are_unchanged(journal: str | None) -> None:
    res = _run("kv", journal)
    lines = res.stderr.splitlines()
    assert lines[0].startswith("ts=") and "level=WARNING" in lines[0]
    assert not any(line.startswith("<") for line in lines)
