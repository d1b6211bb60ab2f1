"""parse_desired against hostile publishers: the type and the audience are signed (real ed25519 keys)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core import protocol
from edgeagent.core.errors import RemoteConfigRejected
from edgeagent.core.signing import (
    generate_keypair,
    legacy_canonical,
    load_private_key,
    load_trusted_keys,
    sign,
)
from edgeagent.remote_config import config_sha256, parse_desired

PARTIAL = {"telemetry": {"interval_s": 2.0}}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Ed25519PrivateKey, dict[str, Any]]:
    generate_keypair(tmp_path / "ops.key", tmp_path / "ops.pem")
    return load_private_key(tmp_path / "ops.key"), dict(load_trusted_keys({"ops": str(tmp_path / "ops.pem")}))


def desired(key: Ed25519PrivateKey, **kw: Any) -> bytes:
    body = {"v": 1, "type": "config", "version": 7, "config": PARTIAL, **kw}
    return protocol.dumps(sign({k: v for k, v in body.items() if v is not None}, key, "ops"))


def refused(payload: bytes, trusted: dict[str, Any], device: str = "pi-07",
            groups: tuple[str, ...] = ("line3",)) -> RemoteConfigRejected:
    with pytest.raises(RemoteConfigRejected) as err:
        parse_desired("edge/pi-07/config/desired", payload, trusted, device, groups)
    return err.value


def test_accepted_for_this_device(keys: tuple[Ed25519PrivateKey, dict[str, Any]]) -> None:
    key, trusted = keys
    for targets in (None, {"devices": ["pi-07", "pi-08"]}, {"groups": ["line3"]},
                    {"devices": ["pi-07"], "groups": ["line9", "line3"]}):
        got = parse_desired("t", desired(key, targets=targets), trusted, "pi-07", ("line3",))
        assert (got.version, got.sha256, got.key_id) == (7, config_sha256(PARTIAL), "ops")


def test_type_must_be_config(keys: tuple[Ed25519PrivateKey, dict[str, Any]]) -> None:
    key, trusted = keys
    manifest_like = protocol.dumps(sign({"v": 1, "type": "manifest", "version": 7, "config": PARTIAL},
                                        key, "ops"))
    err = refused(manifest_like, trusted)
    assert (err.reason, err.version) == ("signature: type 'manifest' where 'config' is expected", 7)
    body = {"v": 1, "version": 7, "config": PARTIAL}  # what the previous release signed: no type
    old = {**body, "sig": {"alg": "ed25519", "key_id": "ops",
                           "value": base64.b64encode(key.sign(legacy_canonical(body))).decode()}}
    assert refused(protocol.dumps(old), trusted).reason == "signature: message has no type"
    # the legacy form with a type is accepted during this release
    typed = {**body, "type": "config"}
    old = {**typed, "sig": {"alg": "ed25519", "key_id": "ops",
                            "value": base64.b64encode(key.sign(legacy_canonical(typed))).decode()}}
    assert parse_desired("t", protocol.dumps(old), trusted, "pi-07", ()).version == 7


def test_audience_is_checked(keys: tuple[Ed25519PrivateKey, dict[str, Any]]) -> None:
    key, trusted = keys
    err = refused(desired(key, targets={"devices": ["pi-08"]}), trusted)
    assert err.version == 7
    assert err.reason == "not for this device: targets.devices [pi-08] does not name pi-07"
    err = refused(desired(key, targets={"groups": ["line9"]}), trusted)
    assert err.reason == "not for this device: targets.groups [line9] holds none of its groups (line3)"
    err = refused(desired(key, targets={"devices": ["pi-07"], "groups": ["line9"]}), trusted)
    assert err.reason.startswith("not for this device: targets.groups")
    assert refused(desired(key, targets={"devices": "pi-07"}), trusted).reason == (
        "targets.devices must be a non-empty list of names")
    assert refused(desired(key, targets={"groups": ["a/b"]}), trusted).reason.startswith(
        "targets.groups: 'a/b' is not a device id or group name")


def test_version_must_be_an_exact_integer(keys: tuple[Ed25519PrivateKey, dict[str, Any]]) -> None:
    _, trusted = keys
    for version in (2**53, 10**30, 0, 1.0):
        payload = protocol.dumps({"v": 1, "type": "config", "version": version, "config": {}})
        assert refused(payload, trusted).reason.startswith("version: expected a positive integer below 2^53")
