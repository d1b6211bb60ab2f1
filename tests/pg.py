"""A real PostgreSQL server started by the tests: initdb in a temp dir, a free port, a socket dir.

As root it runs as the unprivileged `postgres` user (PostgreSQL refuses to run as root), through
`setpriv`, which execs in place (so signals reach the postmaster itself); the data and socket
directories are handed to that user. One server per test session (the `pg_server` fixture), one
database per test (`pg_url`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.util import free_port

PG_BIN = Path(os.environ.get("EDGEAGENT_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "edgeagent"


def available() -> bool:
    return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or _postgres_user() is not None)


def _postgres_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


@dataclass
class PgServer:
    """One postmaster; `restart()` and `stop()`/`start()` keep the data dir and the port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.workdir / "sock"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]
        return argv

    def init(self, durable: bool = False) -> PgServer:
        """initdb; unless `durable`, without fsync (tests: a crash of the test box loses nothing we keep)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            pg = _postgres_user()
            assert pg is not None, "running as root needs the postgres user (apt-get install postgresql)"
            os.chmod(self.workdir, 0o755)
            for d in (self.workdir, self.socket_dir):
                os.chown(d, pg.pw_uid, pg.pw_gid)
        subprocess.run(self._as_owner([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER,
                                       "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       "max_connections = 100\nshared_buffers = 128MB\n")
            if not durable:
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        return self

    def start(self, timeout_s: float = 30.0) -> PgServer:
        with open(self.workdir / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(self._as_owner([str(PG_BIN / "postgres"), "-D", str(self.data)]),
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.workdir / 'postgres.log').read_text()[-2000:]}")
            ok = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                                check=False).returncode == 0
            if ok:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections on {self.port} within {timeout_s}s")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT): open connections are cut, as when a database server restarts."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def url(self, dbname: str = "postgres", user: str = USER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, command: str, dbname: str = "postgres", user: str = USER) -> str:
        out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url(dbname, user),
                              "-c", command], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def create_db(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
