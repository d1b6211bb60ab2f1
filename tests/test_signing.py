"""Ed25519 over canonical JSON: real keys (ours and openssl's), every way a signature can be wrong."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgeagent.core.errors import ConfigError, SignatureInvalid
from edgeagent.core.signing import generate_keypair, load_private_key, load_trusted_keys, sign, verify


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    return tmp_path / "k.pem", tmp_path / "k.pub.pem"


def test_sign_and_verify_roundtrip_and_tampering(keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = keys
    trusted = load_trusted_keys({"ops": str(pub)})
    msg = sign({"v": 1, "job": "j1", "version": "1.2.0", "note": "ünïcode"}, load_private_key(priv), "ops")
    assert verify(msg, trusted) == "ops"
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify({**msg, "version": "9.9.9"}, trusted)
    with pytest.raises(SignatureInvalid, match="not signed"):
        verify({k: v for k, v in msg.items() if k != "sig"}, trusted)
    with pytest.raises(SignatureInvalid, match="unknown key id"):
        verify({**msg, "sig": {**msg["sig"], "key_id": "other"}}, trusted)
    with pytest.raises(SignatureInvalid, match="not base64"):
        verify({**msg, "sig": {**msg["sig"], "value": "***"}}, trusted)
    with pytest.raises(SignatureInvalid, match=r"sig\.alg"):
        verify({**msg, "sig": {**msg["sig"], "alg": "rsa"}}, trusted)
    with pytest.raises(SignatureInvalid, match="canonicalised"):
        verify({**msg, "note": "\ud800"}, trusted)  # a lone surrogate from a hostile JSON payload
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    forged = sign(dict(msg), load_private_key(tmp_path / "other.pem"), "ops")
    with pytest.raises(SignatureInvalid, match="bad signature"):
        verify(forged, trusted)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_keys_are_accepted(tmp_path: Path) -> None:
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "o.pem")],
                   check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "o.pem"), "-pubout", "-out",
                    str(tmp_path / "o.pub.pem")], check=True)
    msg = sign({"v": 1, "x": 1}, load_private_key(tmp_path / "o.pem"), "ops-2026")
    assert verify(msg, load_trusted_keys({"ops-2026": str(tmp_path / "o.pub.pem")})) == "ops-2026"


def test_bad_trusted_keys_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError) as info:
        load_trusted_keys({"a": str(tmp_path / "missing.pem"), "b": str(tmp_path / "junk.pem")})
    paths = [e.split(":")[0] for e in info.value.errors]
    assert paths == ["updates.trusted_keys.a", "updates.trusted_keys.b"]
