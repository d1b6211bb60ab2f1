"""Maintenance windows: day ranges, overnight windows, next opening."""

from __future__ import annotations

from datetime import datetime

import pytest

from edgeagent.core.windows import in_any, next_open, parse_window

MON = datetime(2026, 11, 23)  # a Monday


def at(day: int, hh: int, mm: int = 0) -> datetime:
    return MON.replace(day=23 + day, hour=hh, minute=mm)


def test_weekday_window() -> None:
    w = (parse_window("Mon-Fri 02:00-04:30"),)
    assert in_any(w, at(0, 2)) and in_any(w, at(4, 4, 29))
    assert not in_any(w, at(0, 4, 30)) and not in_any(w, at(0, 1, 59)) and not in_any(w, at(5, 3))


def test_overnight_window_belongs_to_its_start_day() -> None:
    w = (parse_window("Fri 22:00-02:00"),)
    assert in_any(w, at(4, 23)) and in_any(w, at(5, 1, 59))  # Friday night into Saturday
    assert not in_any(w, at(5, 22, 30)) and not in_any(w, at(4, 1))  # not Saturday night, not Friday 1am


def test_wrapping_day_range_and_lists() -> None:
    assert in_any((parse_window("Sat-Mon 10:00-11:00"),), at(6, 10))
    assert in_any((parse_window("Sat,Sun 00:00-24:00"),), at(6, 23, 59))
    assert not in_any((parse_window("Sat,Sun 00:00-24:00"),), at(0, 12))


def test_next_open() -> None:
    w = (parse_window("Mon-Fri 02:00-04:30"),)
    assert next_open(w, at(0, 5)) == at(1, 2)
    assert next_open(w, at(4, 5)) == at(0, 2).replace(day=30)  # Friday after the window -> next Monday
    assert next_open(w, at(0, 3, 0)) == at(0, 3, 0)


@pytest.mark.parametrize("text", ["", "Mon", "Mon 2-4", "Funday 02:00-03:00", "Mon 25:00-26:00",
                                  "Mon 02:00-02:00", "Mon 02:60-03:00"])
def test_bad_windows_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_window(text)
