"""Manifest and cancel parsing and checks with real ed25519 keys (one pair made by the openssl CLI):
type bound to the topic, audience, bounds on every signed number."""

from __future__ import annotations

import base64
import platform
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core import signing
from edgeagent.core.errors import ManifestRejected
from edgeagent.ops.push import build_manifest
from edgeagent.updates import manifest
from tests.updates_helpers import KEY_ID, make_keys, openssl_keys, signed


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    key, pub = make_keys(tmp_path / "keys")
    art = tmp_path / "model.tflite"
    art.write_bytes(b"\x00" * 4 + b"TFL3" + bytes(range(256)) * 700)
    return {"key": key, "trusted": signing.load_trusted_keys({KEY_ID: str(pub)}), "art": art}


def checks(**kw: Any) -> manifest.Checks:
    base: dict[str, Any] = {"now": time.time(), "device_id": "devA", "groups": ("line1", "north"),
                            "arch": platform.machine(), "hardware": "rpi4",
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


def legacy_sign(body: dict[str, Any], key: Ed25519PrivateKey, key_id: str = KEY_ID) -> dict[str, Any]:
    """Signed as the previous release did; also the only way to sign numbers RFC 8785 cannot hold."""
    value = base64.b64encode(key.sign(signing.legacy_canonical(body))).decode()
    return {**body, "sig": {"alg": "ed25519", "key_id": key_id, "value": value}}


def field_reason(env: dict[str, Any], **changes: Any) -> str:
    msg = signed(env["art"], env["key"])
    body = {k: v for k, v in msg.items() if k != "sig"}
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    try:
        again = signing.sign(body, env["key"], KEY_ID)
    except ValueError:  # e.g. 10**400: a trusted signer of the previous release could still sign it
        again = legacy_sign(body, env["key"])
    return reason(lambda: manifest.verify(again, env["trusted"]))


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
    assert "size must be a positive integer up to 2^53-1, got a huge" in field_reason(env, size=10**400)
    assert "finite, non-negative times" in field_reason(env, expires=10**400)  # no float overflow
    assert "finite, non-negative times" in field_reason(env, issued_at=-5)
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


# --------------------------------------------------------------------------- type bound to the topic


def test_manifest_type_is_required_and_must_be_manifest(env: dict[str, Any]) -> None:
    assert field_reason(env, type=None) == "signature: message has no type"
    assert field_reason(env, type="cancel") == "signature: type 'cancel' where 'manifest' is expected"
    # the previous release's signature form still verifies this release, the type rule included
    body = {k: v for k, v in signed(env["art"], env["key"]).items() if k != "sig"}
    assert manifest.verify(legacy_sign(body, env["key"]), env["trusted"]).job == "j1"
    untyped = {k: v for k, v in body.items() if k != "type"}
    assert "message has no type" in reason(lambda: manifest.verify(legacy_sign(untyped, env["key"]),
                                                                   env["trusted"]))


# --------------------------------------------------------------------------- audience


@pytest.mark.parametrize(("targets", "expected"), [
    ({"devices": ["devB"]}, "not for this device: targets.devices [devB] does not name devA"),
    ({"groups": ["line3"]}, "not for this device: targets.groups [line3] holds none of its groups "
                            "(line1,north)"),
    ({"devices": ["devA"], "groups": ["line3"]}, "targets.groups [line3]"),  # every list must match
    ({"devices": ["devB"], "groups": ["line1"]}, "targets.devices [devB]"),
    ({"devices": [f"d{i}" for i in range(9)]}, "targets.devices [d0,d1,d2,d3,d4,... (9 in all)]"),
])
def test_audience_not_matching_is_refused(env: dict[str, Any], targets: dict[str, Any],
                                          expected: str) -> None:
    m = manifest.verify(signed(env["art"], env["key"], devices=targets.get("devices"),
                               groups=targets.get("groups")), env["trusted"])
    assert expected in reason(lambda: manifest.check(m, checks()))
    assert m.audience.devices == (tuple(targets["devices"]) if "devices" in targets else None)


def test_audience_matching_passes(env: dict[str, Any]) -> None:
    for kw in ({"devices": ["devB", "devA"]}, {"groups": ["north"]},
               {"devices": ["devA"], "groups": ["line1"]}, {}):
        manifest.check(manifest.verify(signed(env["art"], env["key"], **kw), env["trusted"]), checks())
    # a device in no group is outside every group audience
    m = manifest.verify(signed(env["art"], env["key"], groups=["line1"]), env["trusted"])
    assert "holds none of its groups ((none))" in reason(lambda: manifest.check(m, checks(groups=())))


def test_malformed_audience_is_refused(env: dict[str, Any]) -> None:
    assert "targets must be an object" in field_reason(env, targets=["devA"])
    assert "targets.devices must be a non-empty list" in field_reason(env, targets={"devices": "devA"})
    assert "targets.devices must be a non-empty list" in field_reason(env, targets={"devices": []})
    assert "'../x' is not a device id" in field_reason(env, targets={"devices": ["../x"]})
    assert "targets.groups: 7 is not" in field_reason(env, targets={"groups": [7]})
    assert "at most 1024 (use a group)" in field_reason(env, targets={"devices": ["d"] * 1025})


# --------------------------------------------------------------------------- signed numbers


def test_bounds_on_signed_numbers(env: dict[str, Any], tmp_path: Path) -> None:
    size = 4096 * 3 - 5
    assert "chunk_size 1024 is below 4096 bytes" in field_reason(
        env, size=size, chunk_size=1024, chunks=12, chunk_sha256=["0" * 64] * 12)
    assert "12289 chunks, at most 12288" in field_reason(env, size=4096 * 12289, chunk_size=4096,
                                                         chunks=12289)
    assert "chunk_size must be a positive integer" in field_reason(env, chunk_size=0)
    assert "chunks must be a positive integer" in field_reason(env, chunks=-1)
    assert "chunk_size must be an integer" in field_reason(env, chunk_size=65536.0)  # exact integers only
    assert "missing field 'chunk_sha256' (the per-chunk sha256 list is required)" in field_reason(
        env, chunk_sha256=None)
    # a single chunk may be smaller than 4 KiB (a small file), and chunk_size may exceed the size
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    for chunk_size in (100, 1000):
        m = manifest.verify(signed(small, env["key"], chunk_size=chunk_size), env["trusted"])
        assert (m.chunks, m.chunk_len(0)) == (1, 100)
    # the configured caps are checked before anything else in check() (before any allocation)
    m = manifest.verify(signed(env["art"], env["key"], ttl_s=1, issued_at=time.time() - 100,
                               devices=["devB"]), env["trusted"])
    assert reason(lambda: manifest.check(m, checks(max_size=1000))).startswith("artifact too large")
    assert reason(lambda: manifest.check(m, checks(max_chunk=4096))).startswith("chunk_size 65536 > limit")


def test_push_builds_what_devices_accept_and_refuses_what_they_would_not(tmp_path: Path) -> None:
    art = tmp_path / "a.bin"
    art.write_bytes(bytes(range(256)) * 100)
    m = build_manifest(art, job="j", kind="model", name="n", version="1.0.0", chunk_size=4096,
                       devices=["devA"], groups=["line1"], arch=["aarch64"])
    assert m["type"] == "manifest" and m["chunks"] == 7 and len(m["chunk_sha256"]) == 7
    assert m["targets"] == {"arch": ["aarch64"], "devices": ["devA"], "groups": ["line1"]}
    with pytest.raises(ValueError, match="at least 4096"):
        build_manifest(art, job="j", kind="model", name="n", version="1.0.0", chunk_size=2048)
    one = build_manifest(art, job="j", kind="model", name="n", version="1.0.0", chunk_size=1 << 20)
    assert one["chunks"] == 1
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(4096 * 12288 + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match="at most 12288"):
        build_manifest(big, job="j", kind="model", name="n", version="1.0.0", chunk_size=4096)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        build_manifest(tmp_path / "empty", job="j", kind="model", name="n", version="1.0.0")


# --------------------------------------------------------------------------- cancel


def cancel(key: Ed25519PrivateKey, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "type": "cancel", "job": "j1", "issued_at": time.time(), **kw}
    return signing.sign({k: v for k, v in body.items() if v is not None}, key, KEY_ID)


def cancel_reason(env: dict[str, Any], msg: dict[str, Any], job: str = "j1") -> str:
    return reason(lambda: manifest.verify_cancel(msg, job, env["trusted"], "devA", ("line1",)))


def test_cancel_accepted(env: dict[str, Any]) -> None:
    for msg in (cancel(env["key"]), cancel(env["key"], targets={"devices": ["devA"], "groups": ["line1"]}),
                legacy_sign({"v": 1, "type": "cancel", "job": "j1", "issued_at": 1e9}, env["key"])):
        manifest.verify_cancel(msg, "j1", env["trusted"], "devA", ("line1",))


def test_cancel_refusals(env: dict[str, Any]) -> None:
    key = env["key"]
    replayed = signed(env["art"], key)  # j1's own manifest, published on j1's cancel topic
    assert cancel_reason(env, replayed) == "cancel signature: type 'manifest' where 'cancel' is expected"
    body = {"v": 1, "job": "j1", "issued_at": 1e9}  # signed in RFC 8785 by hand: `sign` refuses it
    untyped = {**body, "sig": {"alg": "ed25519", "key_id": KEY_ID,
                               "value": base64.b64encode(key.sign(signing.canonical(body))).decode()}}
    assert cancel_reason(env, untyped) == "cancel signature: message has no type"
    untyped = legacy_sign({"v": 1, "job": "j1", "issued_at": 1e9}, key)  # what the old release signed
    assert cancel_reason(env, untyped) == "cancel signature: message has no type"
    assert cancel_reason(env, cancel(key), job="j2") == "cancel names job 'j1', topic says 'j2'"
    assert cancel_reason(env, cancel(key, targets={"devices": ["devB"]})) == (
        "cancel not for this device: targets.devices [devB] does not name devA")
    assert "targets.groups [line9]" in cancel_reason(env, cancel(key, targets={"groups": ["line9"]}))
    assert "targets.devices must be" in cancel_reason(env, cancel(key, targets={"devices": "devA"}))
    for issued_at in (None, "now", True, -1):
        assert "cancel: issued_at must be a time" in cancel_reason(env, cancel(key, issued_at=issued_at))
    forged = {**cancel(key), "job": "j2"}
    assert "bad signature" in cancel_reason(env, forged, job="j2")
