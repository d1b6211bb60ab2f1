"""Ed25519 signatures over canonical JSON (manifests, cancels, desired configs, support requests),
bound to their purpose.

The signature covers the RFC 8785 (JCS) form of the message without `sig`, so a signer in any
language can reproduce the bytes. Every signed message names its `type` inside those bytes and the
verifier says which type it expects: a manifest can never be replayed as a cancel or a config.
During one release a signature over the older form (`legacy_canonical`) is accepted too, and the
`type` requirement holds for it as well. Trusted public keys come from the device's config (PEM files
as `openssl pkey -pubout` writes them), never from a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import rfc8785

from edgeagent.core.errors import ConfigError, SignatureInvalid
from edgeagent.core.logs import Once

# cryptography costs ~6-8 MiB of RSS: imported on first use (the first signed message, or a key
# file that is not a plain Ed25519 PEM), so an agent that verifies nothing never pays for it
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class PublicKey(Protocol):
    """What `verify` needs of a trusted key (Ed25519PublicKey and TrustedKey both fit)."""

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if `signature` is valid for `data`; raise cryptography's InvalidSignature if not."""


# DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410): this prefix, then the 32 key bytes
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


class TrustedKey:
    """An Ed25519 public key read from PEM without cryptography; the key object (and the library)
    is made on the first `verify`."""

    __slots__ = ("_key", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._key: Ed25519PublicKey | None = None

    def verify(self, signature: bytes, data: bytes) -> None:
        if self._key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            self._key = Ed25519PublicKey.from_public_bytes(self.raw)
        self._key.verify(signature, data)


def _plain_ed25519_pem(data: bytes) -> bytes | None:
    """The 32 key bytes of a one-block `-----BEGIN PUBLIC KEY-----` Ed25519 PEM, else None (then
    cryptography reads the file and says what is wrong with it)."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    lines = text.splitlines()
    if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode("".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_SPKI) + 32 or not der.startswith(_ED25519_SPKI):
        return None
    return der[len(_ED25519_SPKI):]

ALG = "ed25519"
TYPES = ("manifest", "cancel", "config", "support")

log = logging.getLogger(__name__)
_once = Once(log)


def _body(message: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "sig"}


def canonical(message: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: RFC 8785 of the message without `sig`.
    ValueError (rfc8785.CanonicalizationError) for what JCS cannot express exactly: an integer
    beyond +-(2^53-1), NaN or infinity, a lone surrogate."""
    return rfc8785.dumps(_body(message))


def legacy_canonical(message: Mapping[str, Any]) -> bytes:
    """The form signed before RFC 8785 (sorted, compact, UTF-8); accepted by `verify` for one release."""
    return json.dumps(_body(message), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_public_key(path: Path) -> PublicKey:
    data = Path(path).read_bytes()
    raw = _plain_ed25519_pem(data)
    if raw is not None:
        return TrustedKey(raw)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError([f"{path}: not a PEM public key ({exc})"]) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError([f"{path}: expected an Ed25519 public key, got {type(key).__name__}"])
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{path}: not an unencrypted PEM private key ({exc})"]) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError([f"{path}: expected an Ed25519 private key, got {type(key).__name__}"])
    return key


def load_trusted_keys(paths: Mapping[str, str]) -> dict[str, PublicKey]:
    """key_id -> public key; every unreadable key is reported, with its key id."""
    keys: dict[str, PublicKey] = {}
    errors: list[str] = []
    for key_id, path in paths.items():
        try:
            keys[key_id] = load_public_key(Path(path))
        except OSError as exc:
            errors.append(f"updates.trusted_keys.{key_id}: cannot read {path}: {exc.strerror}")
        except ConfigError as exc:
            errors.extend(f"updates.trusted_keys.{key_id}: {e}" for e in exc.errors)
    if errors:
        raise ConfigError(errors)
    return keys


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair as PEM (private key 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeagent.core.fsutil import atomic_write_bytes

    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600)
    atomic_write_bytes(public_path, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def sign(message: Mapping[str, Any], key: Ed25519PrivateKey, key_id: str) -> dict[str, Any]:
    """A copy of `message` with its `sig` over the RFC 8785 form of everything else.
    ValueError when the message has no string `type` (a device would refuse it) or cannot be
    canonicalised."""
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"message has no \"type\" (one of {', '.join(TYPES)}): a device refuses it")
    value = base64.b64encode(key.sign(canonical(message))).decode()
    return {**_body(message), "sig": {"alg": ALG, "key_id": key_id, "value": value}}


def verify(message: Mapping[str, Any], trusted: Mapping[str, PublicKey], expected_type: str) -> str:
    """Check the message's `type`, then `sig`; return the key id that signed it or raise SignatureInvalid.

    The type is looked at first because it is what binds the bytes to the topic they arrived on;
    it is only trusted once the signature over it checks out."""
    kind = message.get("type")
    if kind is None:
        raise SignatureInvalid("message has no type")
    if kind != expected_type:
        shown = repr(kind) if isinstance(kind, str) else f"a {type(kind).__name__}"
        raise SignatureInvalid(f"type {shown[:80]} where {expected_type!r} is expected")
    sig = message.get("sig")
    if sig is None:
        raise SignatureInvalid("message is not signed (no sig)")
    if not isinstance(sig, dict):
        raise SignatureInvalid("sig: expected an object")
    if sig.get("alg") != ALG:
        raise SignatureInvalid(f"sig.alg: expected {ALG!r}, got {sig.get('alg')!r}")
    key_id = sig.get("key_id")
    if not isinstance(key_id, str) or key_id not in trusted:
        raise SignatureInvalid(f"unknown key id {key_id!r}", key_id if isinstance(key_id, str) else None)
    value = sig.get("value")
    if not isinstance(value, str):
        raise SignatureInvalid("sig.value: expected a base64 string", key_id)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureInvalid(f"sig.value: not base64 ({exc})", key_id) from exc
    from cryptography.exceptions import InvalidSignature

    problems: list[str] = []
    for form, make in (("RFC 8785", canonical), ("legacy", legacy_canonical)):
        try:
            body = make(message)
        except (UnicodeEncodeError, TypeError, ValueError, RecursionError) as exc:
            # lone surrogates, integers JCS cannot hold exactly, non-JSON values
            problems.append(f"{form}: {exc}")
            continue
        try:
            trusted[key_id].verify(raw, body)
        except InvalidSignature:
            continue
        if form == "legacy":
            _once.warning(f"legacy:{key_id}", "accepted a signature over the legacy canonical form "
                          "(key id %s, type %s): re-sign with `edgeagent sign`/`push` (RFC 8785); "
                          "the legacy form is accepted for this release only", key_id, kind)
        return key_id
    if len(problems) == 2:
        raise SignatureInvalid(f"message cannot be canonicalised: {problems[0]}", key_id)
    raise SignatureInvalid(f"bad signature for key id {key_id!r}", key_id)
