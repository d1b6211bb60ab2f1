"""Shared fixtures: a real Mosquitto per test that asks for one."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.broker import Broker  # noqa: E402


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain (no TLS, anonymous) Mosquitto on a free loopback port."""
    b = Broker(workdir=tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(autouse=True)
def _root_log_level() -> Iterator[None]:
    """A pushed logging.level changes the root logger live: give other tests theirs back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)
