"""One check's verdict (ok / warn / FAIL / info, with the reason and the fix) and how a list of them
is shown: one line per check for a person, JSON for a machine."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, TextIO

Status = Literal["ok", "warn", "FAIL", "info"]
# journald reads a `<N>` prefix as the line's syslog priority (ExecStartPre output lands there)
_PRIORITY: dict[str, int] = {"FAIL": 3, "warn": 4, "ok": 6, "info": 6}


@dataclass(frozen=True, slots=True)
class Check:
    """What was checked (`name`, a config key where there is one), the verdict, and for a warn or a
    FAIL what to do about it."""

    name: str
    status: Status
    reason: str
    fix: str = ""

    def line(self) -> str:
        fix = f"  (fix: {self.fix})" if self.fix and self.status in ("warn", "FAIL") else ""
        return f"{self.status:<5} {self.name:<26} {self.reason}{fix}"


def ok(name: str, reason: str) -> Check:
    return Check(name, "ok", reason)


def warn(name: str, reason: str, fix: str = "") -> Check:
    return Check(name, "warn", reason, fix)


def fail(name: str, reason: str, fix: str = "") -> Check:
    return Check(name, "FAIL", reason, fix)


def info(name: str, reason: str) -> Check:
    return Check(name, "info", reason)


def failed(checks: Iterable[Check]) -> bool:
    return any(c.status == "FAIL" for c in checks)


def print_lines(checks: Iterable[Check], out: TextIO) -> None:
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    for c in checks:
        print(f"<{_PRIORITY[c.status]}>{c.line()}" if journal else c.line(), file=out)


def summary_line(checks: Sequence[Check], seconds: float) -> str:
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("ok", "warn", "FAIL")}
    verdict = "FAILED" if counts["FAIL"] else "passed"
    return (f"check {verdict}: {counts['ok']} ok, {counts['warn']} warn, {counts['FAIL']} FAIL "
            f"in {seconds:.1f}s")


def as_json(checks: Sequence[Check], config: str, seconds: float) -> str:
    return json.dumps({"v": 1, "ok": not failed(checks), "config": config, "seconds": round(seconds, 3),
                       "checks": [asdict(c) for c in checks]}, indent=2)
