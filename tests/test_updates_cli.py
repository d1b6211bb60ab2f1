"""`edgeagent keygen`, `sign` and `push` as an operator runs them (real processes, real broker)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

from edgeagent.core import signing
from edgeagent.updates import manifest
from tests.broker import Broker
from tests.test_updates_component import Ctx, run
from tests.updates_helpers import KEY_ID, MODEL, push_table

CLI = [sys.executable, "-m", "edgeagent.cli"]


def test_keygen_and_sign(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "keygen", "--key-id", "ops-1", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "updates.trusted_keys.ops-1" in out.stdout
    assert (tmp_path / "ops-1.key").stat().st_mode & 0o077 == 0
    again = subprocess.run([*CLI, "keygen", "--key-id", "ops-1", "--out-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr
    sign = [*CLI, "sign", "--key", str(tmp_path / "ops-1.key"), "--key-id", "ops-1"]
    trusted = signing.load_trusted_keys({"ops-1": str(tmp_path / "ops-1.pem")})
    (tmp_path / "cancel.json").write_text(json.dumps({"v": 1, "job": "j1", "issued_at": 1.7e9}))
    # no type: a device would refuse it, so sign refuses it, saying how to fix it
    res = subprocess.run([*sign, str(tmp_path / "cancel.json")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert ('has no "type": devices refuse it; add one or pass --type (manifest|cancel|config|support)'
            in res.stderr)
    res = subprocess.run([*sign, "--type", "cancel", str(tmp_path / "cancel.json")], capture_output=True,
                         text=True, check=True)
    signed_cancel = json.loads(res.stdout)
    assert signed_cancel["type"] == "cancel"
    assert signing.verify(signed_cancel, trusted, "cancel") == "ops-1"
    manifest.verify_cancel(signed_cancel, "j1", trusted, "dev1", ())
    # the signature is over RFC 8785 (1.7e9 is "1700000000" there, "1700000000.0" in the legacy form)
    body = {k: v for k, v in signed_cancel.items() if k != "sig"}
    trusted["ops-1"].verify(base64.b64decode(signed_cancel["sig"]["value"]), signing.canonical(body))
    # a type in the file that --type contradicts, or an unknown one, is an error, and nothing is printed
    (tmp_path / "config.json").write_text(json.dumps({"v": 1, "type": "config", "version": 2, "config": {}}))
    res = subprocess.run([*sign, "--type", "cancel", str(tmp_path / "config.json")], capture_output=True,
                         text=True)
    assert res.returncode == 2 and res.stdout == "" and "but --type is 'cancel'" in res.stderr
    res = subprocess.run([*sign, str(tmp_path / "config.json")], capture_output=True, text=True, check=True)
    assert signing.verify(json.loads(res.stdout), trusted, "config") == "ops-1"
    (tmp_path / "odd.json").write_text(json.dumps({"v": 1, "type": "firmware"}))
    res = subprocess.run([*sign, str(tmp_path / "odd.json")], capture_output=True, text=True)
    assert res.returncode == 2 and "has \"type\": 'firmware'" in res.stderr


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
        assert push_table(out)["dev1"][0] == "succeeded"
        assert "dev1: accepted" in err and "dev1: succeeded" in err and "chunks" in err
        rc, out, err = await push("--version", "1.9.0", "--job", "cli-2", str(MODEL))
        state, detail = push_table(out)["dev1"]
        assert rc == 1 and state == "rejected" and "rollback refused" in detail
        assert "dev1: rejected: rollback refused" in err  # as it happened, then in the table
        rc, out, err = await push("--version", "3.0.0", "--arch", "sparc", str(MODEL))
        assert rc == 1 and "wrong arch" in push_table(out)["dev1"][1]
        assert [i[1] for i in c.installer.installed] == ["2.0.0"]

    run(tmp_path, broker, body)
