"""Manifest parsing and checks with real ed25519 keys (one pair made by the openssl CLI)."""

from __future__ import annotations

import base64
import platform
import time
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import signing
from edgeagent.core.errors import ManifestRejected
from edgeagent.updates import manifest
from tests.updates_helpers import KEY_ID, make_keys, openssl_keys, signed


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    key, pub = make_keys(tmp_path / "keys")
    art = tmp_path / "model.tflite"
    art.write_bytes(b"\x00" * 4 + b"TFL3" + bytes(range(256)) * 700)
    return {"key": key, "trusted": signing.load_trusted_keys({KEY_ID: str(pub)}), "art": art}


def checks(**kw: Any) -> manifest.Checks:
    base: dict[str, Any] = {"now": time.time(), "arch": platform.machine(), "hardware": "rpi4",
                            "agent_version": "0.1.0", "installed_version": "1.0.0", "newest_issued_at": None,
                            "max_size": 10 << 20, "max_chunk": 1 << 20}
    base.update(kw)
    return manifest.Checks(**base)


def reason(fn: Any) -> str:
    with pytest.raises(ManifestRejected) as exc:
        fn()
    return exc.value.reason


def test_good_manifest_verifies_and_passes(env: dict[str, Any]) -> None:
    msg = signed(env["art"], env["key"], arch=[platform.machine()], hardware=["rpi4"], min_agent="0.1.0")
    m = manifest.verify(msg, env["trusted"])
    manifest.check(m, checks())
    assert m.chunks == 3 and m.chunk_len(2) == m.size - 2 * 65536 and m.key_id == KEY_ID


def test_openssl_made_keys_are_accepted(tmp_path: Path, env: dict[str, Any]) -> None:
    key, pub = openssl_keys(tmp_path / "ossl", "ops-openssl")
    trusted = signing.load_trusted_keys({"ops-openssl": str(pub)})
    msg = signed(env["art"], key, key_id="ops-openssl")
    assert manifest.verify(msg, trusted).key_id == "ops-openssl"
    # and a manifest signed with our own key is not accepted under the openssl key's id
    forged = signed(env["art"], env["key"], key_id="ops-openssl")
    assert "bad signature" in reason(lambda: manifest.verify(forged, trusted))


def test_signature_failures(env: dict[str, Any], tmp_path: Path) -> None:
    msg = signed(env["art"], env["key"])
    bad = {**msg, "sig": {**msg["sig"], "value": base64.b64encode(b"\x01" * 64).decode()}}
    assert "bad signature" in reason(lambda: manifest.verify(bad, env["trusted"]))
    unknown = {**msg, "sig": {**msg["sig"], "key_id": "someone-else"}}
    assert "unknown key id" in reason(lambda: manifest.verify(unknown, env["trusted"]))
    other = {**msg, "version": "9.9.9"}  # the signature covers a different manifest
    assert "bad signature" in reason(lambda: manifest.verify(other, env["trusted"]))
    unsigned = {k: v for k, v in msg.items() if k != "sig"}
    assert "not signed" in reason(lambda: manifest.verify(unsigned, env["trusted"]))
    wrong_alg = {**msg, "sig": {**msg["sig"], "alg": "rsa"}}
    assert "sig.alg" in reason(lambda: manifest.verify(wrong_alg, env["trusted"]))


@pytest.mark.parametrize(("kw", "check_kw", "expected"), [
    ({"ttl_s": 1, "issued_at": time.time() - 100}, {}, "expired"),
    ({"arch": ["riscv64"]}, {}, "wrong arch"),
    ({"hardware": ["jetson-orin-nano"]}, {}, "wrong hardware"),
    ({"version": "1.0.0"}, {}, "rollback refused"),
    ({"version": "0.9.3"}, {}, "rollback refused"),
    ({"version": "1.0.0-rc1"}, {}, "rollback refused"),
    ({"min_agent": "9.0.0"}, {}, "needs agent >= 9.0.0"),
    ({}, {"max_size": 1000}, "artifact too large"),
    ({"chunk_size": 4096}, {"max_chunk": 1024}, "chunk_size 4096 > limit"),
    ({"issued_at": time.time() - 50}, {"newest_issued_at": time.time() - 10}, "replay refused"),
])
def test_policy_checks(env: dict[str, Any], kw: dict[str, Any], check_kw: dict[str, Any],
                       expected: str) -> None:
    m = manifest.verify(signed(env["art"], env["key"], **kw), env["trusted"])
    assert expected in reason(lambda: manifest.check(m, checks(**check_kw)))


def field_reason(env: dict[str, Any], **changes: Any) -> str:
    msg = signed(env["art"], env["key"])
    body = {k: v for k, v in msg.items() if k != "sig"}
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    return reason(lambda: manifest.verify(signing.sign(body, env["key"], KEY_ID), env["trusted"]))


def test_strict_fields(env: dict[str, Any]) -> None:
    assert "size mismatch" in field_reason(env, size=10)
    assert "size mismatch" in field_reason(env, chunks=99)
    assert "missing field 'sha256'" in field_reason(env, sha256=None)
    assert "sha256 must be" in field_reason(env, sha256="XYZ")
    assert "kind must be" in field_reason(env, kind="bootloader")
    assert "invalid version" in field_reason(env, version="latest")
    assert "job id" in field_reason(env, job="../../etc")
    assert "size must be an integer" in field_reason(env, size="100")
    assert "size must be an integer" in field_reason(env, size=True)
    assert "chunk_sha256 must list" in field_reason(env, chunk_sha256=["00" * 32])
    assert "expires must be after" in field_reason(env, expires=0)
    assert "targets.arch" in field_reason(env, targets={"arch": "x86_64"})
    assert "unsupported protocol version" in field_reason(env, v=2)
    assert "below 2^53" in field_reason(env, size=10**400)  # no float overflow on the way
    assert "finite times" in field_reason(env, expires=10**400)
    assert "job id" in field_reason(env, job="j1\n")  # "$" would have let a newline through
    assert "invalid version" in field_reason(env, version="1.4.0\n")


def test_version_order() -> None:
    assert manifest.compare_versions("1.10.0", "1.9.9") == 1
    assert manifest.compare_versions("1.4", "1.4.0") == 0
    assert manifest.compare_versions("2.0.0-rc1", "2.0.0") == -1
    assert manifest.compare_versions("2.0.0-rc10", "2.0.0-rc2") == 1  # natural, not string order
    assert manifest.compare_versions("2.0.0-beta.10", "2.0.0-beta.9") == 1
    assert manifest.compare_versions("2.0.0-rc1", "2.0.0-beta") == 1
    with pytest.raises(ValueError):
        manifest.version_key("1.x")
