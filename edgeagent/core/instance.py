"""One agent per state dir: an exclusive `flock` on `STATE_DIR/agent.lock`, held for the process' life.

Two agents on one state dir would fight over the MQTT client id and write the same spool. The kernel
drops the lock when the process ends however it ends (kill -9 included), so a stale file never
blocks a restart; the pid written in it only tells the second agent whom to name. Read-only
commands (status, spool, config show, support bundle) never take it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from edgeagent.core.errors import EdgeAgentError

LOCK_FILE = "agent.lock"
PID_READ_TRIES = 20       # the holder writes its pid just after it locks: give it a moment
PID_READ_PAUSE_S = 0.05


class AlreadyRunning(EdgeAgentError):
    """Another process holds the state dir's instance lock; `pid` is None when it has not said."""

    def __init__(self, lock_path: Path, pid: int | None) -> None:
        self.lock_path = lock_path
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "another process (pid not known)"
        super().__init__(f"another agent is already running on this state dir: {who} holds {lock_path}")


class InstanceLock:
    """`with InstanceLock(state_dir):` holds the lock (raises AlreadyRunning if taken)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a child (installer helper, journalctl) must not inherit and outlive the lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # the file is never deleted: unlinking it would let a third process lock a new inode
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder_pid(fd: int) -> int | None:
    for _ in range(PID_READ_TRIES):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(PID_READ_PAUSE_S)
    return None
