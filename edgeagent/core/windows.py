"""Maintenance windows in local time: "Mon-Fri 02:00-04:30", "Sat,Sun 00:00-24:00", "Mon-Sun 22:00-02:00".

A window whose end is not after its start runs overnight: it opens on the listed day and closes on
the next one. Pure functions, so gates can be tested with any clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RE = re.compile(r"^\s*(?P<days>[A-Za-z,\-]+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


@dataclass(frozen=True, slots=True)
class Window:
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start_min: int  # minutes after local midnight
    end_min: int  # may be <= start_min: overnight

    def contains(self, now: datetime) -> bool:
        minute = now.hour * 60 + now.minute
        today, yesterday = now.weekday(), (now.weekday() - 1) % 7
        if self.start_min < self.end_min:
            return today in self.days and self.start_min <= minute < self.end_min
        return (today in self.days and minute >= self.start_min) or (
            yesterday in self.days and minute < self.end_min)


def _minutes(text: str, *, allow_24: bool) -> int:
    h, m = (int(x) for x in text.split(":"))
    if m > 59 or h > 24 or (h == 24 and (m or not allow_24)):
        raise ValueError(f"invalid time {text!r}")
    return h * 60 + m


def _days(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.lower().split(","):
        if part in ("daily", "every", "*"):
            return frozenset(range(7))
        if "-" in part:
            a, b = part.split("-", 1)
            if a[:3] not in DAYS or b[:3] not in DAYS:
                raise ValueError(f"unknown day in {part!r} (use Mon..Sun)")
            i, j = DAYS.index(a[:3]), DAYS.index(b[:3])
            k = i
            while True:
                out.add(k)
                if k == j:
                    break
                k = (k + 1) % 7
        else:
            if part[:3] not in DAYS:
                raise ValueError(f"unknown day {part!r} (use Mon..Sun)")
            out.add(DAYS.index(part[:3]))
    return frozenset(out)


def parse_window(text: str) -> Window:
    """ValueError with the reason for anything that is not `DAYS HH:MM-HH:MM`."""
    m = _RE.match(text)
    if not m:
        raise ValueError(f'expected a window like "Mon-Fri 02:00-04:30", got "{text}"')
    start = _minutes(m.group("start"), allow_24=False)
    end = _minutes(m.group("end"), allow_24=True)
    if start == end:
        raise ValueError(f'window "{text}" is empty (start equals end)')
    return Window(_days(m.group("days")), start, end)


def in_any(windows: tuple[Window, ...], now: datetime) -> bool:
    return any(w.contains(now) for w in windows)


def next_open(windows: tuple[Window, ...], now: datetime) -> datetime | None:
    """The next minute at which some window is open (now if one is), within a week."""
    t = now.replace(second=0, microsecond=0)
    for _ in range(7 * 24 * 60 + 1):
        if in_any(windows, t):
            return max(t, now)
        t += timedelta(minutes=1)
    return None
