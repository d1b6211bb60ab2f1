"""The generic half of config loading: walks the schema dataclasses, converts and checks each value.

It collects *every* problem (not only the first), each with its key path, and rejects unknown keys
with a typo hint, so typos cannot silently become defaults. It knows nothing of our schema: field
`metadata` says what to check (`min`/`max`, `check`, `item_check`, `duration`, `required`, `key`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from edgeagent.core.units import parse_duration_s

ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# a field check: an error message (without the key path) or None
Check = Callable[[Any], str | None]
_INVALID: Any = object()  # what a converter returns after recording why the value does not fit


class EnvStr(str):
    """A string that came out of ${ENV} substitution: may stand for a number or boolean
    (`port = "${MQTT_PORT:-1883}"`), since the environment only holds strings."""


def substitute_env(raw: object, env: Mapping[str, str], path: str, errors: list[str]) -> object:
    """Replace ${VAR} and ${VAR:-default} in every string; a missing variable is an error."""
    if isinstance(raw, str) and ENV_RE.search(raw):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path}: environment variable {name} is not set")
            return ""

        return EnvStr(ENV_RE.sub(repl, raw))
    if isinstance(raw, dict):
        return {k: substitute_env(v, env, f"{path}.{k}" if path else k, errors) for k, v in raw.items()}
    if isinstance(raw, list):
        return [substitute_env(v, env, f"{path}[{i}]", errors) for i, v in enumerate(raw)]
    return raw


class Builder:
    """One validation pass; `errors` holds every problem found, `checks` resolves named checks
    (a schema field whose check needs the schema itself names it instead of importing it)."""

    def __init__(self, checks: Mapping[str, Check] | None = None) -> None:
        self.errors: list[str] = []
        self.checks: Mapping[str, Check] = checks or {}

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def build(self, cls: type[Any], raw: object, path: str) -> Any:
        """A dataclass from a table; its defaults (and the errors recorded) when it does not fit."""
        if not isinstance(raw, Mapping):
            self.err(path or "<root>", f"expected a table, got {_describe(raw)}")
            return cls()
        hints = typing.get_type_hints(cls)
        fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
        self._unknown_keys(raw, fields, path)
        kwargs: dict[str, Any] = {}
        for key, f in fields.items():
            where = f"{path}.{key}" if path else key
            if key not in raw:
                if f.metadata.get("required"):
                    self.err(where, "required key is missing")
                continue
            value = self.convert(hints[f.name], raw[key], where, f.metadata)
            if value is not _INVALID:
                kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # pragma: no cover - schema bug, not user input
            self.err(path or "<root>", str(exc))
            return cls()

    def _unknown_keys(self, raw: Mapping[Any, Any], fields: Mapping[str, Any], path: str) -> None:
        for key in raw:
            if key not in fields:
                where = f"{path}.{key}" if path else str(key)
                near = [k for k in fields if _close(str(key), k)]
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.err(where, f"unknown key{hint}; known keys: {', '.join(sorted(fields))}")

    def convert(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        """One value against its annotation, dispatched on the kind of type."""
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            return self._optional(tp, value, path, meta)
        if meta.get("duration"):
            value = self._duration(value, path)
            if value is _INVALID:
                return _INVALID
        if dataclasses.is_dataclass(tp):
            return self.build(typing.cast(type[Any], tp), value, path)
        container = _CONTAINERS.get(origin)
        if container is not None:
            return container(self, tp, value, path, meta)
        return self._scalar(tp, value, path, meta)

    def _optional(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        # `float | None`: None is only ever the default (TOML has no null), so check the other type
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return self.convert(inner[0], value, path, meta)

    def _duration(self, value: object, path: str) -> Any:
        try:
            return parse_duration_s(value)
        except ValueError as exc:
            self.err(path, f"{exc}, got {_describe(value)}")
            return _INVALID

    def _tuple(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        if not isinstance(value, list):
            self.err(path, f"expected {_type_name(tp)}, got {_describe(value)}")
            return _INVALID
        item_tp, item_meta = typing.get_args(tp)[0], {"check": meta.get("item_check")}
        items = [self.convert(item_tp, v, f"{path}[{i}]", item_meta) for i, v in enumerate(value)]
        return _INVALID if any(i is _INVALID for i in items) else tuple(items)

    def _dict(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        if not isinstance(value, Mapping):
            self.err(path, f"expected a table, got {_describe(value)}")
            return _INVALID
        value_tp = typing.get_args(tp)[1]
        out = {str(k): self.convert(value_tp, v, f"{path}.{k}", {}) for k, v in value.items()}
        return _INVALID if any(v is _INVALID for v in out.values()) else out

    def _literal(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            self.err(path, f"expected {_type_name(tp)}, got {_describe(value)}")
            return _INVALID
        return value

    def _scalar(self, tp: Any, value: object, path: str, meta: Mapping[str, Any]) -> Any:
        """bool, int, float and str (anything else in a schema never fits): type, range, check."""
        if isinstance(value, EnvStr):
            value = _from_env_str(tp, value)
        if not _fits(tp, value):
            self.err(path, f"expected {_type_name(tp)}{_range_hint(meta)}, got {_describe(value)}")
            return _INVALID
        if tp is float:
            value = float(typing.cast(float, value))
            if not math.isfinite(value):
                self.err(path, f"expected a finite number, got {value}")
                return _INVALID
        problem = _range_problem(tp, value, meta) or self._check(meta, value)
        if problem:
            self.err(path, problem)
            return _INVALID
        return value

    def _check(self, meta: Mapping[str, Any], value: object) -> str | None:
        check = meta.get("check")
        if isinstance(check, str):
            check = self.checks[check]
        return check(value) if check is not None else None


_Converter = Callable[[Builder, Any, object, str, Mapping[str, Any]], Any]
_CONTAINERS: dict[Any, _Converter] = {
    tuple: Builder._tuple, dict: Builder._dict, Literal: Builder._literal,
}


def _fits(tp: Any, value: object) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never to a config
        return tp is bool
    if tp is int:
        return isinstance(value, int)
    if tp is float:
        return isinstance(value, (int, float))
    return tp is str and isinstance(value, str)


def _range_hint(meta: Mapping[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    return f" {_num(lo)}-{_num(hi)}" if lo is not None and hi is not None else ""


def _range_problem(tp: Any, value: object, meta: Mapping[str, Any]) -> str | None:
    lo, hi = meta.get("min"), meta.get("max")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if (lo is None or value >= lo) and (hi is None or value <= hi):
        return None
    rng = f"{_num(lo)}-{_num(hi)}" if lo is not None and hi is not None else (
        f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}")
    return f"expected {_type_name(tp)} {rng}, got {_describe(value)}"


def _from_env_str(tp: Any, value: EnvStr) -> object:
    """What a substituted string stands for when the field wants a bool or a number; a str field
    gets a plain str. Left as it is when it does not parse, so the type error names it."""
    if tp is str:
        return str(value)
    text = value.strip()
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        return value
    if tp not in (int, float):
        return value
    try:
        return int(text) if tp is int else float(text)
    except ValueError:
        return value


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


_SCALAR_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _SCALAR_NAMES:
        return _SCALAR_NAMES[tp]
    if origin is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in typing.get_args(tp))
    if origin is tuple:
        return f"an array of {_PLURALS.get(typing.get_args(tp)[0], 'values')}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return str(tp)


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _close(a: str, b: str) -> bool:
    """Cheap typo detector: same length +-1 and a close match."""
    if abs(len(a) - len(b)) > 1:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75
