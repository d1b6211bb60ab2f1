"""What a support bundle must never carry: secret config values, ${ENV} values, private keys.

Config tables are redacted structurally (by key name, and by where the file used ${ENV}); every
member's text is then scrubbed of the secret values themselves and of PEM private key blocks, so a
secret that reached a log line or a job log does not leave the device either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from edgeagent.core.config_builder import ENV_RE

# the last key of a path names a secret (`mqtt.password`, `api_token`); `key_file` and the trusted
# keys' paths are paths, not contents, and stay
SECRET_KEY_RE = re.compile(r"pass(word|wd|phrase)?|secret|token|credential|api_?key|private_?key",
                           re.IGNORECASE)
PEM_PRIVATE_RE = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL)
REDACTED = "<redacted>"
MIN_SCRUB_CHARS = 4  # shorter values (a port from ${ENV}) would blank unrelated text


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY_RE.search(key))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def env_paths(raw: object, path: str = "") -> dict[str, list[str]]:
    """Dotted path -> the ${VAR} names a raw (file) layer's string there refers to."""
    out: dict[str, list[str]] = {}
    if isinstance(raw, str):
        names = [m.group(1) for m in ENV_RE.finditer(raw)]
        if names:
            out[path] = names
    elif isinstance(raw, Mapping):
        for k, v in raw.items():
            out.update(env_paths(v, _join(path, str(k))))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            out.update(env_paths(v, f"{path}[{i}]"))
    return out


def _from_env(names: Iterable[str]) -> str:
    return f"<redacted: from {', '.join('${' + n + '}' for n in names)}>"


def redact_table(table: Mapping[str, Any], from_env: Mapping[str, list[str]]) -> dict[str, Any]:
    """A copy with every non-empty value under a secret key, and every value that came from
    ${ENV} (`from_env`: paths of the file layer), replaced by a marker naming no value."""
    out = _redact(table, "", False, from_env)
    assert isinstance(out, dict)
    return out


def _redact(v: Any, path: str, secret: bool, from_env: Mapping[str, list[str]]) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _redact(x, _join(path, str(k)), secret or is_secret_key(str(k)), from_env)
                for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_redact(x, f"{path}[{i}]", secret, from_env) for i, x in enumerate(v)]
    if path in from_env:
        return _from_env(from_env[path])
    if isinstance(v, str) and ENV_RE.search(v):  # the raw file: ${VAR:-default} may hold a default
        return _from_env(m.group(1) for m in ENV_RE.finditer(v)) if secret else v
    if secret and v not in ("", None):
        return REDACTED
    return v


def secret_values(table: Mapping[str, Any], from_env: Mapping[str, list[str]]) -> set[str]:
    """The effective values `redact_table` hides, to scrub from free text as well."""
    found: set[str] = set()
    _collect(table, "", False, from_env, found)
    return {s for s in found if len(s) >= MIN_SCRUB_CHARS}


def _collect(v: Any, path: str, secret: bool, from_env: Mapping[str, list[str]], found: set[str]) -> None:
    if isinstance(v, Mapping):
        for k, x in v.items():
            _collect(x, _join(path, str(k)), secret or is_secret_key(str(k)), from_env, found)
    elif isinstance(v, list | tuple):
        for i, x in enumerate(v):
            _collect(x, f"{path}[{i}]", secret, from_env, found)
    elif (secret or path in from_env) and v not in ("", None) and not isinstance(v, bool):
        found.add(str(v))


def scrub(data: bytes, secrets: Iterable[str]) -> bytes:
    """`data` without PEM private key blocks and without any of `secrets` (longest first)."""
    data = PEM_PRIVATE_RE.sub(b"<redacted private key>", data)
    for s in sorted(secrets, key=len, reverse=True):
        forms = {s.encode(), json.dumps(s)[1:-1].encode(), json.dumps(s, ensure_ascii=False)[1:-1].encode()}
        for form in forms:
            if form:
                data = data.replace(form, REDACTED.encode())
    return data
