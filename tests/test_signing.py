"""Ed25519 over canonical JSON bound to a type: real keys (ours and openssl's), every way a signature
can be wrong, RFC 8785 and the one-release legacy form."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core.errors import ConfigError, SignatureInvalid
from edgeagent.core.signing import (
    canonical,
    generate_keypair,
    legacy_canonical,
    load_private_key,
    load_trusted_keys,
    sign,
    verify,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    return tmp_path / "k.pem", tmp_path / "k.pub.pem"


def test_sign_and_verify_roundtrip_and_tampering(keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = keys
    trusted = load_trusted_keys({"ops": str(pub)})
    msg = sign({"v": 1, "type": "manifest", "job": "j1", "version": "1.2.0", "note": "ünïcode"},
               load_private_key(priv), "ops")
    assert verify(msg, trusted, "manifest") == "ops"
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify({**msg, "version": "9.9.9"}, trusted, "manifest")
    with pytest.raises(SignatureInvalid, match="not signed"):
        verify({k: v for k, v in msg.items() if k != "sig"}, trusted, "manifest")
    with pytest.raises(SignatureInvalid, match="unknown key id"):
        verify({**msg, "sig": {**msg["sig"], "key_id": "other"}}, trusted, "manifest")
    with pytest.raises(SignatureInvalid, match="not base64"):
        verify({**msg, "sig": {**msg["sig"], "value": "***"}}, trusted, "manifest")
    with pytest.raises(SignatureInvalid, match=r"sig\.alg"):
        verify({**msg, "sig": {**msg["sig"], "alg": "rsa"}}, trusted, "manifest")
    with pytest.raises(SignatureInvalid, match="canonicalised"):
        verify({**msg, "note": "\ud800"}, trusted, "manifest")  # a lone surrogate from a hostile JSON payload
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    forged = sign(dict(msg), load_private_key(tmp_path / "other.pem"), "ops")
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify(forged, trusted, "manifest")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_keys_are_accepted(tmp_path: Path) -> None:
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "o.pem")],
                   check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "o.pem"), "-pubout", "-out",
                    str(tmp_path / "o.pub.pem")], check=True)
    msg = sign({"v": 1, "type": "config", "x": 1}, load_private_key(tmp_path / "o.pem"), "ops-2026")
    assert verify(msg, load_trusted_keys({"ops-2026": str(tmp_path / "o.pub.pem")}), "config") == "ops-2026"


def test_bad_trusted_keys_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError) as info:
        load_trusted_keys({"a": str(tmp_path / "missing.pem"), "b": str(tmp_path / "junk.pem")})
    paths = [e.split(":")[0] for e in info.value.errors]
    assert paths == ["updates.trusted_keys.a", "updates.trusted_keys.b"]


def legacy_signed(message: dict[str, Any], key: Ed25519PrivateKey, key_id: str = "ops") -> dict[str, Any]:
    """What the previous release's `edgeagent sign` produced (sorted, compact json.dumps)."""
    value = base64.b64encode(key.sign(legacy_canonical(message))).decode()
    return {**message, "sig": {"alg": "ed25519", "key_id": key_id, "value": value}}


def test_canonical_is_rfc8785_and_differs_from_the_legacy_form() -> None:
    msg = {"b": 1, "a": "é", "n": 1.0, "big": 1e21, "sig": {"x": 1}, "\uff21": 0, "\U0001f600": 0}
    # RFC 8785: numbers as ECMAScript writes them, keys sorted by UTF-16 code units, sig left out
    assert canonical(msg) == '{"a":"é","b":1,"big":1e+21,"n":1,"\U0001f600":0,"\uff21":0}'.encode()
    assert legacy_canonical(msg) == '{"a":"é","b":1,"big":1e+21,"n":1.0,"\uff21":0,"\U0001f600":0}'.encode()


def test_sign_refuses_a_message_without_type_or_with_inexact_numbers(keys: tuple[Path, Path]) -> None:
    key = load_private_key(keys[0])
    for bad in ({"v": 1}, {"v": 1, "type": ""}, {"v": 1, "type": 3}):
        with pytest.raises(ValueError, match="no \"type\""):
            sign(bad, key, "ops")
    with pytest.raises(ValueError):  # RFC 8785 has no exact form for it: refused, not rounded
        sign({"v": 1, "type": "config", "version": 2**60}, key, "ops")


def test_type_is_required_and_must_fit_the_purpose(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    trusted = load_trusted_keys({"ops": str(pub)})
    manifest = sign({"v": 1, "type": "manifest", "job": "j1"}, load_private_key(priv), "ops")
    with pytest.raises(SignatureInvalid, match="type 'manifest' where 'cancel' is expected") as err:
        verify(manifest, trusted, "cancel")  # a manifest replayed on a cancel topic
    assert err.value.reason == "type 'manifest' where 'cancel' is expected"
    with pytest.raises(SignatureInvalid, match="type 'manifest' where 'config' is expected"):
        verify(manifest, trusted, "config")
    with pytest.raises(SignatureInvalid, match="where 'cancel' is expected"):
        verify({**manifest, "type": ["cancel"]}, trusted, "cancel")
    untyped = {k: v for k, v in manifest.items() if k != "type"}
    with pytest.raises(SignatureInvalid) as err:
        verify(untyped, trusted, "manifest")
    assert err.value.reason == "message has no type"
    # the type is inside the signed bytes: changing it breaks the signature
    with pytest.raises(SignatureInvalid, match="bad signature for key id 'ops'") as err:
        verify({**manifest, "type": "cancel"}, trusted, "cancel")
    assert err.value.key_id == "ops"


def test_legacy_form_is_accepted_for_one_release_with_a_type_only(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    key, trusted = load_private_key(priv), load_trusted_keys({"ops": str(pub)})
    body = {"v": 1, "type": "cancel", "job": "j1", "issued_at": 1700000000.0, "note": "ünï"}
    old = legacy_signed(body, key)
    assert legacy_canonical(body) != canonical(body)  # "1700000000.0" there, "1700000000" in RFC 8785
    assert verify(old, trusted, "cancel") == "ops"
    with pytest.raises(SignatureInvalid, match="where 'manifest' is expected"):
        verify(old, trusted, "manifest")
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify({**old, "job": "j2"}, trusted, "cancel")
    # an old message without a type, validly signed in the legacy form, is never accepted
    untyped = legacy_signed({"v": 1, "job": "j1", "issued_at": 1700000000.0}, key)
    with pytest.raises(SignatureInvalid, match="message has no type"):
        verify(untyped, trusted, "cancel")
    # and a legacy signature with an integer RFC 8785 cannot hold: still verifiable this release
    big = legacy_signed({"v": 1, "type": "config", "version": 2**60}, key)
    assert verify(big, trusted, "config") == "ops"
