"""`edgeagent keygen`, `sign` and `push` as an operator runs them (real processes, real broker)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from edgeagent.core import signing
from edgeagent.updates import manifest
from tests.broker import Broker
from tests.test_updates_component import Ctx, run
from tests.updates_helpers import KEY_ID, MODEL

CLI = [sys.executable, "-m", "edgeagent.cli"]


def test_keygen_and_sign(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "keygen", "--key-id", "ops-1", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "updates.trusted_keys.ops-1" in out.stdout
    assert (tmp_path / "ops-1.key").stat().st_mode & 0o077 == 0
    again = subprocess.run([*CLI, "keygen", "--key-id", "ops-1", "--out-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr
    (tmp_path / "cancel.json").write_text(json.dumps({"v": 1, "job": "j1"}))
    res = subprocess.run([*CLI, "sign", "--key", str(tmp_path / "ops-1.key"), "--key-id", "ops-1",
                          str(tmp_path / "cancel.json")], capture_output=True, text=True, check=True)
    trusted = signing.load_trusted_keys({"ops-1": str(tmp_path / "ops-1.pem")})
    manifest.verify_cancel(json.loads(res.stdout), "j1", trusted)


def test_push_follows_to_the_end_and_exit_code(tmp_path: Path, broker: Broker) -> None:
    async def body(c: Ctx) -> None:
        key = str(c.tmp / "keys" / f"{KEY_ID}.key")
        base = [*CLI, "push", "--broker", f"mqtt://127.0.0.1:{c.broker.port}", "--device", "dev1",
                "--kind", "model", "--name", "vibration-anomaly", "--key", key, "--key-id", KEY_ID,
                "--timeout", "60s", "--chunk-kb", "4"]

        async def push(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(*base, *args, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 90)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        rc, out, err = await push("--version", "2.0.0", "--job", "cli-1", str(MODEL))
        assert rc == 0, err
        assert "dev1: succeeded" in out and "100.0% succeeded" in err and "chunks" in err
        rc, out, err = await push("--version", "1.9.0", "--job", "cli-2", str(MODEL))
        assert rc == 1 and "dev1: rejected rollback refused" in out
        rc, out, err = await push("--version", "3.0.0", "--arch", "sparc", str(MODEL))
        assert rc == 1 and "wrong arch" in out
        assert [i[1] for i in c.installer.installed] == ["2.0.0"]

    run(tmp_path, broker, body)
