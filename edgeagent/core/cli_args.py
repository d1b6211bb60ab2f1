"""Argument types shared by every `edgeagent` verb: argparse rejects a bad value with exit status 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from edgeagent.core.units import parse_duration_s

T = TypeVar("T", int, float)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _checked(text: str, cast: Callable[[str], T], within: Callable[[T], bool], want: str) -> T:
    """`cast(text)` if it parses and lies `within` its range; otherwise argparse's error naming `want`."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if not within(value):
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count: 1 or more."""
    return _checked(text, int, lambda v: v >= 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    """A count where 0 means none / off / automatic (the flag's help says which)."""
    return _checked(text, int, lambda v: v >= 0, "a whole number >= 0")


def positive_float(text: str) -> float:
    """A length of time or a threshold in the flag's unit: above 0, finite."""
    return _checked(text, float, lambda v: 0 < v < math.inf, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A number where 0 means off / until stopped (the flag's help says which)."""
    return _checked(text, float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def positive_duration(text: str) -> float:
    """A duration like 30, 30s, 5m, 1h, in seconds; above 0."""
    try:
        value = parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration above 0, got {text!r}")
    return value


def log_level(text: str) -> str:
    """A logging level name, any case: the upper-case name."""
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)} (any case), got {text!r}")
    return level


LOG_LEVEL_HELP = f"log level: {', '.join(LOG_LEVELS)} (any case)"


def probability(text: str) -> float:
    """A probability: 0 to 1."""
    return _checked(text, float, lambda v: 0 <= v <= 1, "a number 0-1")
