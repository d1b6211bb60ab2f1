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
from tests.pg import PgServer  # noqa: E402


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain (no TLS, anonymous) Mosquitto on a free loopback port."""
    b = Broker(workdir=tmp_path / "broker").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL for the session (initdb in /tmp: the postgres user must reach it)."""
    import tempfile

    server = PgServer(Path(tempfile.mkdtemp(prefix="edgeagent-pg-"))).init().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(pg_server: PgServer, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's server, named for the test."""
    import re

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50] + f"_{id(request) % 10_000}"
    return pg_server.create_db(name)


@pytest.fixture(autouse=True)
def _root_log_level() -> Iterator[None]:
    """A pushed logging.level changes the root logger live: give other tests theirs back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)
