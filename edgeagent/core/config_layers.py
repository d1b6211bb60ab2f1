"""Config layers (defaults < file < applied remote < runtime overrides) and a small TOML writer.

`load_effective` is how `edgeagent run` starts: the local file plus the applied remote layer
(`<state_dir>/config.applied.toml`, written atomically by the remote config component); what it
read is handed on explicitly (an `EffectiveConfig`), never remembered here. At run time one
`ConfigLayers` per live config rebuilds the effective config whenever a layer changes, validated by
the same `config.build` as `check-config`, and swaps it in live; keys that only take effect at start
(RESTART_KEYS) keep the values the process started with until the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from edgeagent.core import config as cfgmod
from edgeagent.core import protocol
from edgeagent.core.config import Config
from edgeagent.core.errors import ConfigError
from edgeagent.core.fsutil import atomic_write_text
from edgeagent.core.layer_checks import file_errors, local_only_errors
from edgeagent.core.logs import set_level

log = logging.getLogger(__name__)

APPLIED_FILE = "config.applied.toml"
# read once at start by their components: a change is named in the report and applies on next start
RESTART_KEYS = (
    "device", "mqtt", "sensors", "agent", "logging.format", "logging.ring_lines", "logging.ring_kb",
    "busy.topic", "config.enabled",
    "inference.enabled", "inference.runtime", "inference.model", "inference.model_variant",
    "inference.num_threads", "inference.delegate", "inference.queue_max",
)
MAX_LAYER_DEPTH = 12
_INT64 = (-(2**63), 2**63 - 1)


# --------------------------------------------------------------------------- TOML writer


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+\Z")


def toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError("a lone surrogate cannot be written as TOML")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else toml_string(k)


def _inline(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if not _INT64[0] <= v <= _INT64[1]:
            raise ValueError(f"integer {v} does not fit in 64 bits")
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_inline(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_inline(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dumps_toml(table: Mapping[str, Any], note: Callable[[str], str] | None = None) -> str:
    """TOML for our data (tables, arrays of tables, scalars); `note(path)` may add a comment to a
    value line (config show: where the value came from). ValueError for what TOML cannot hold."""
    lines: list[str] = []
    _emit(lines, (), table, note, is_array_item=False)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any],
          note: Callable[[str], str] | None, is_array_item: bool) -> None:
    if path:
        header = ".".join(_key(p) for p in path)
        lines.append("")
        lines.append(f"[[{header}]]" if is_array_item else f"[{header}]")
    dotted = ".".join(path)
    nested: list[tuple[str, Any]] = []
    for k, v in table.items():
        k = str(k)
        if isinstance(v, Mapping) or _is_table_array(v):
            nested.append((k, v))
            continue
        line = f"{_key(k)} = {_inline(v)}"
        comment = note(f"{dotted}.{k}" if dotted else k) if note else ""
        lines.append(f"{line}  # {comment}" if comment else line)
    for k, v in nested:
        if isinstance(v, Mapping):
            _emit(lines, (*path, k), v, note, is_array_item=False)
        else:
            for item in v:
                _emit(lines, (*path, k), item, note, is_array_item=True)


# --------------------------------------------------------------------------- checks and paths


def check_remote_layer(partial: object, path: str = "config") -> list[str]:
    """What the schema cannot see: the layer must be writable as TOML (no null, no NaN, 64-bit
    integers, no lone surrogates), bounded in depth, without ${VAR} (a remote layer must not read
    the device's environment) and without keys that only the local file may set (layer_checks)."""
    errors: list[str] = []
    if not isinstance(partial, Mapping):
        return [f"{path}: expected a table, got {type(partial).__name__}"]
    _check_value(partial, path, 0, errors)
    return errors + local_only_errors(partial)


def _check_value(v: object, path: str, depth: int, errors: list[str]) -> None:
    if len(errors) >= 20:
        return
    if depth > MAX_LAYER_DEPTH:
        errors.append(f"{path}: nested deeper than {MAX_LAYER_DEPTH} levels")
    elif isinstance(v, Mapping):
        _check_table(v, path, depth, errors)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_value(x, f"{path}[{i}]", depth + 1, errors)
    else:
        errors.extend(f"{path}: {problem}" for problem in _scalar_problems(v))


def _check_table(v: Mapping[Any, Any], path: str, depth: int, errors: list[str]) -> None:
    for k, x in v.items():
        if not isinstance(k, str):
            errors.append(f"{path}: keys must be strings")
        elif _has_surrogate(k):
            errors.append(f"{path}: key contains a lone surrogate")
        else:
            _check_value(x, f"{path}.{k}", depth + 1, errors)


def _scalar_problems(v: object) -> list[str]:
    if v is None:
        return ["null is not a config value"]
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [] if _INT64[0] <= v <= _INT64[1] else ["integer does not fit in 64 bits"]
    if isinstance(v, float):
        return [] if math.isfinite(v) else [f"expected a finite number, got {v!r}"]
    if isinstance(v, str):
        return _string_problems(v)
    return [f"{type(v).__name__} is not a config value"]


def _string_problems(v: str) -> list[str]:
    problems = []
    if "${" in v:
        problems.append("${VAR} substitution is for the local file only")
    if _has_surrogate(v):
        problems.append("string contains a lone surrogate")
    return problems


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def changed_paths(a: Config, b: Config) -> list[str]:
    """Dotted paths (down to fields; arrays as a whole) whose values differ."""
    out: list[str] = []
    _diff(cfgmod.to_dict(a), cfgmod.to_dict(b), "", out)
    return out


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k, out)
    elif a != b:
        out.append(path)


def restart_paths(running: Config, new: Config) -> list[str]:
    return [p for p in changed_paths(running, new) if _under(p, RESTART_KEYS)]


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def graft(new: Config, running: Config) -> Config:
    """`new`, with every restart-only key set back to the running process's value."""
    out = new
    for key in RESTART_KEYS:
        out = _replace_path(out, key.split("."), _get_path(running, key.split(".")))
    return out


def _get_path(obj: Any, parts: list[str]) -> Any:
    for p in parts:
        obj = getattr(obj, p)
    return obj


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    child = getattr(obj, parts[0])
    return dataclasses.replace(obj, **{parts[0]: _replace_path(child, parts[1:], value)})


# --------------------------------------------------------------------------- start: file + applied


@dataclass
class AppliedState:
    """`config.applied.toml`: the applied remote layer, the last confirmed one, the last report."""

    version: int = 0
    sha256: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    confirmed: bool = True
    seen_version: int = 0  # highest verified version ever received (replays at or below it: ignored)
    good_version: int = 0
    good_sha256: str = ""
    good_config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    starts: int = 0  # agent starts with this layer while it is not confirmed (see load_effective)

    def rolled_back(self, why: str) -> AppliedState:
        """The state after giving up this layer: the last good one again, `rolled_back` reported."""
        reason = f"{why}; running version {self.good_version or 'local file'} again"
        report = protocol.config_reported(self.version, self.sha256, "rolled_back", reason)
        return AppliedState(self.good_version, self.good_sha256, self.good_config, confirmed=True,
                            seen_version=self.seen_version, good_version=self.good_version,
                            good_sha256=self.good_sha256, good_config=self.good_config, report=report)

    def to_toml(self) -> str:
        head = ("# written by edgeagent (remote config): the applied layer over the local file; "
                "`edgeagent config show` explains it\n")
        return head + dumps_toml({
            "version": self.version, "sha256": self.sha256, "confirmed": self.confirmed,
            "seen_version": self.seen_version, "starts": self.starts, "config": self.config,
            "good": {"version": self.good_version, "sha256": self.good_sha256, "config": self.good_config},
            "report": self.report,
        })

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> AppliedState:
        """ValueError naming the first malformed field."""
        good = raw.get("good", {})
        st = cls(version=raw.get("version", 0), sha256=raw.get("sha256", ""), config=raw.get("config", {}),
                 confirmed=raw.get("confirmed", True), seen_version=raw.get("seen_version", 0),
                 good_version=good.get("version", 0) if isinstance(good, Mapping) else -1,
                 good_sha256=good.get("sha256", "") if isinstance(good, Mapping) else "",
                 good_config=good.get("config", {}) if isinstance(good, Mapping) else {},
                 report=raw.get("report", {}), starts=raw.get("starts", 0))
        types: dict[str, type[Any]] = {
            "version": int, "seen_version": int, "good_version": int, "starts": int, "sha256": str,
            "good_sha256": str,
            "confirmed": bool, "config": dict, "good_config": dict, "report": dict}
        for name, tp in types.items():
            v: Any = getattr(st, name)
            if not isinstance(v, tp) or (tp is int and (isinstance(v, bool) or v < 0)):
                raise ValueError(f"{name}: malformed")
        return st


def applied_path(state_dir: Path) -> Path:
    return Path(state_dir) / APPLIED_FILE


def read_applied(state_dir: Path) -> AppliedState | None:
    """The applied state, or None when there is none; a damaged file is logged and ignored."""
    path = applied_path(state_dir)
    if not path.exists():
        return None
    try:
        return AppliedState.from_raw(cfgmod.read_toml(path))
    except (ConfigError, ValueError, AttributeError) as exc:
        log.error("ignoring damaged %s: %s", path, exc)
        return None


def write_applied(state_dir: Path, state: AppliedState) -> None:
    atomic_write_text(applied_path(state_dir), state.to_toml())


class EffectiveConfig(NamedTuple):
    """What `load_effective` read: the config and its layers {"defaults", "file", "remote"}.
    A tuple, so `cfg, layers = load_effective(path)` reads as before; `edgeagent run` hands it on
    so that the run-time `ConfigLayers` start from the real file and remote layers."""

    config: Config
    layers: dict[str, dict[str, Any]]

    @property
    def file(self) -> dict[str, Any]:
        return self.layers["file"]

    @property
    def remote(self) -> dict[str, Any]:
        return self.layers["remote"]


MAX_UNCONFIRMED_STARTS = 3  # then a layer that never got confirmed is given up at start


def load_effective(path: Path, *, starting: bool = False) -> EffectiveConfig:
    """The config `edgeagent run` starts with: the file plus the applied remote layer. A layer that
    no longer validates (a newer agent, a changed file), or that the agent started with
    MAX_UNCONFIRMED_STARTS times without confirming it (it cannot even come up with it), is given
    up for the last good one, so a stale or bad layer cannot keep a board down. `starting` (only
    `edgeagent run`) counts the start and persists such a rollback; show/diff only read.
    """
    file_raw = cfgmod.read_toml(Path(path))
    base = cfgmod.build(file_raw, str(path))  # a broken local file is the operator's error: raise
    cfg, remote = base, {}
    state = read_applied(base.state_dir)
    if state is not None:
        problem = None
        if not state.confirmed and state.starts >= MAX_UNCONFIRMED_STARTS:
            problem = f"not confirmed after {state.starts} agent starts"
        elif local_only_errors(state.config):  # written by an older agent that let them through
            problem = "; ".join(local_only_errors(state.config))
        else:
            try:
                cfg = cfgmod.build(cfgmod.merge_layers(file_raw, state.config), str(path))
                remote = state.config
            except ConfigError as exc:
                problem = "no longer validates: " + "; ".join(exc.errors)
        if problem is None and starting and not state.confirmed:
            state.starts += 1
            _write_quietly(base.state_dir, state)
        elif problem is not None:
            log.error("applied remote config version %d given up: %s", state.version, problem)
            try:
                if local_only_errors(state.good_config):
                    raise ConfigError(local_only_errors(state.good_config))
                cfg = cfgmod.build(cfgmod.merge_layers(file_raw, state.good_config), str(path))
                remote = state.good_config
            except ConfigError:
                state.good_version, state.good_sha256, state.good_config = 0, "", {}
            if starting:
                _write_quietly(base.state_dir, state.rolled_back(problem))
    return EffectiveConfig(cfg, {"defaults": cfgmod.to_dict(Config()), "file": file_raw, "remote": remote})


def _write_quietly(state_dir: Path, state: AppliedState) -> None:
    try:
        write_applied(state_dir, state)
    except (OSError, ValueError) as exc:  # a read-only state dir must not stop the agent
        log.error("cannot write %s: %s", applied_path(state_dir), exc)


# --------------------------------------------------------------------------- run time


class Live(Protocol):
    """Where the effective config lives while the agent runs (core.live.LiveConfig)."""

    @property
    def config(self) -> Config: ...

    def replace(self, config: Config) -> None: ...


class ConfigLayers:
    """A live config's layers; the one place a new effective config is built and swapped in.
    `file` and `remote` come from `load_effective` (EffectiveConfig.file/.remote)."""

    def __init__(self, live: Live, file: dict[str, Any], remote: dict[str, Any] | None = None) -> None:
        self.live = live
        self.file = file
        self.remote = dict(remote or {})
        self.boot = live.config  # what the process started with (restart-only keys stay at this)
        self.overrides: dict[str, dict[str, Any]] = {}  # source -> partial (rules' `set:` actions)

    @classmethod
    def starting_from(cls, live: Live, effective: EffectiveConfig) -> ConfigLayers:
        return cls(live, effective.file, effective.remote)

    def build(self, remote: dict[str, Any] | None = None) -> Config:
        """Validate file + remote + overrides (ConfigError lists every problem, nothing changes)."""
        layer = self.remote if remote is None else remote
        return cfgmod.build(cfgmod.merge_layers(self.file, layer, *self.overrides.values()), "remote config")

    def apply(self, new: Config, *, keep_restart_keys: bool = True) -> list[str]:
        """Swap `new` in live; returns the restart-only keys that differ from the running process.
        `keep_restart_keys=False` (a rollback, which restarts) hands them over too, so that what
        reads them live (the MQTT session on its next connect) gets the good values at once."""
        old = self.live.config
        pending = restart_paths(self.boot, new)
        live = graft(new, self.boot) if keep_restart_keys else new
        if not keep_restart_keys:
            self.boot = new
        if live != old:
            self.live.replace(live)
        if live.logging.level.upper() != old.logging.level.upper():
            set_level(live.logging.level)
        return pending

    def dry_run(self, layer: dict[str, Any], new: Config) -> None:
        """The last look before `layer` (built into `new`) is swapped in: no local-only key, and every
        file it names usable now. ConfigError lists the problems. Blocking only when the layer names
        files (a remote layer: call it from a thread)."""
        errors = local_only_errors(layer) or file_errors(layer, new)
        if errors:
            raise ConfigError(errors, "runtime layer")

    def set_remote(self, remote: dict[str, Any], *, keep_restart_keys: bool = True) -> list[str]:
        new = self.build(remote)
        if local_only_errors(remote):  # files were dry-run by the caller, off the loop
            raise ConfigError(local_only_errors(remote), "remote config")
        self.remote = remote
        return self.apply(new, keep_restart_keys=keep_restart_keys)

    def set_override(self, source: str, partial: dict[str, Any] | None) -> None:
        """Add/replace (or with None drop) a runtime layer; ConfigError leaves everything as it was."""
        overrides = dict(self.overrides)
        if partial is None:
            overrides.pop(source, None)
        else:
            overrides[source] = partial
        saved, self.overrides = self.overrides, overrides
        try:
            new = self.build()
            if partial is not None:
                self.dry_run(partial, new)
        except ConfigError:
            self.overrides = saved
            raise
        self.apply(new)
