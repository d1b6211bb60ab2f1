"""`keygen` writes only where it is told, under a safe name; `sign` refuses a desired config a device
would refuse (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.core import signing
from edgeagent.ops.push import desired_config_errors, key_id_problem

CLI = [sys.executable, "-m", "edgeagent.cli"]


def edgeagent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


@pytest.mark.parametrize("key_id", ["../x", "a/b", "/abs", "..", ".", "a..b", "", "x" * 65, "sp ace", "é"])
def test_keygen_refuses_key_ids_outside_the_safe_set(tmp_path: Path, key_id: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = edgeagent("keygen", "--key-id", key_id, "--out", str(work), cwd=work)
    assert r.returncode == 2 and "--key-id" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["work"]  # nothing written, nothing created


def test_key_id_rule() -> None:
    for good in ("ops-1", "A.b_c-9", "x" * 64):
        assert key_id_problem(good) is None
    for bad in ("../x", "a/b", "..", "a..b", "x" * 65, "", "a\\b", "a\nb"):
        assert key_id_problem(bad) is not None


def test_keygen_writes_into_the_out_dir_or_the_current_one_and_creates_no_directory(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    out.mkdir()
    r = edgeagent("keygen", "--key-id", "ops-1", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ops-1.key", "ops-1.pem"]
    assert os.stat(out / "ops-1.key").st_mode & 0o077 == 0
    here = edgeagent("keygen", "--key-id", "ops-2", cwd=out)
    assert here.returncode == 0 and (out / "ops-2.pem").exists()
    missing = edgeagent("keygen", "--key-id", "ops-3", "--out", str(tmp_path / "no" / "such"), cwd=tmp_path)
    assert missing.returncode == 2 and "not an existing directory" in missing.stderr
    assert not (tmp_path / "no").exists()


@pytest.fixture
def key(tmp_path: Path) -> Path:
    assert edgeagent("keygen", "--key-id", "ops-1", "--out", str(tmp_path)).returncode == 0
    return tmp_path / "ops-1.key"


def _sign_config(tmp_path: Path, key: Path, config: object) -> subprocess.CompletedProcess[str]:
    doc = tmp_path / "desired.json"
    doc.write_text(json.dumps({"v": 1, "version": 3, "config": config}))
    return edgeagent("sign", "--key", str(key), "--key-id", "ops-1", "--type", "config", str(doc))


@pytest.mark.parametrize(("config", "path"), [
    ({"updates": {"trusted_keys": {"evil": "/tmp/evil.pem"}}}, "updates.trusted_keys"),
    ({"telemetry": {"interval_s": -1}}, "config.telemetry.interval_s"),
    ({"telemetry": {"intervall_s": 5}}, "config.telemetry.intervall_s"),
    ({"mqtt": {"tls": {"ca_file": "/etc/ca.pem"}}}, "mqtt.tls.ca_file"),
    ({"telemetry": {"interval_s": "${HOME}"}}, "config.telemetry.interval_s"),
    ([1, 2], "config"),
])
def test_sign_refuses_a_desired_config_a_device_would_refuse(tmp_path: Path, key: Path, config: object,
                                                             path: str) -> None:
    r = _sign_config(tmp_path, key, config)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert path in r.stderr and "not signed" in r.stderr


def test_sign_signs_a_valid_desired_config(tmp_path: Path, key: Path) -> None:
    r = _sign_config(tmp_path, key, {"telemetry": {"interval_s": 2}, "logging": {"level": "DEBUG"}})
    assert r.returncode == 0, r.stderr
    trusted = {"ops-1": signing.load_public_key(tmp_path / "ops-1.pem")}
    assert signing.verify(json.loads(r.stdout), trusted, "config") == "ops-1"


def test_desired_config_errors_name_every_bad_key() -> None:
    errors = desired_config_errors({"config": {"telemetry": {"interval_s": -1, "batch_max": 0}}})
    assert any("telemetry.interval_s" in e for e in errors)
    assert any("telemetry.batch_max" in e for e in errors)
    assert desired_config_errors({"config": {}}) == []
