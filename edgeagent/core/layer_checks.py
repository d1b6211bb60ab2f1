"""What a runtime config layer (a remote desired config, a rule's `set:` override) may never touch,
and the dry run of the files it names, both done before the layer is swapped in.

Local-only keys decide who the device trusts, what runs as root, where and as whom it talks to the
broker, and whether remote config is on at all: a layer that could change them could disarm the
device for good (no later signed message would reach it or be believed). Only the local file sets
them. Why each one is here: docs/security.md, "Remote config".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgeagent.core.config_schema import Config

# key path -> why only the local file may set it (a table covers every key under it)
LOCAL_ONLY: dict[str, str] = {
    "device.id": "who the device is: its topics, its ACL, its manifest targets",
    "device.state_dir": "where the applied layer, the anti-rollback marks and the models live",
    "mqtt.host": "which broker the device believes",
    "mqtt.client_id": "its broker identity: a shared one knocks another device off the broker",
    "mqtt.username": "broker credentials",
    "mqtt.password": "broker credentials",
    "mqtt.topic_prefix": "moves every topic, config/desired too, outside the device's ACL: no repair",
    "mqtt.tls": "who the broker is (CA, client key and cert, insecure_skip_verify)",
    "updates.trusted_keys": "who may sign updates and configs",
    "updates.firmware.installer": "what installs firmware (as root)",
    "updates.firmware.mode": "whether firmware installs go through the privileged helper",
    "updates.firmware.commands": "commands run as root",
    "updates.firmware.health_command": "command whose verdict keeps or rolls back firmware",
    "updates.firmware.version_file": "the installed version anti-rollback compares against",
    "inference.delegate": "a native library loaded into the agent process",
    "config.enabled": "turning remote config off cannot be undone remotely",
}


def local_only_paths(partial: Mapping[str, Any]) -> list[str]:
    """The local-only key paths a partial config table sets (leaf paths under a local-only section)."""
    found: list[str] = []
    for key in LOCAL_ONLY:
        node: Any = partial
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            found.extend(_leaves(node, key) if _is_section(key) else [key])
    return found


def _is_section(key: str) -> bool:
    """A config section (mqtt.tls) is named by the keys set under it; a value (trusted_keys) as is."""
    obj: Any = Config()
    for part in key.split("."):
        obj = getattr(obj, part)
    return dataclasses.is_dataclass(obj)


def _leaves(node: Any, path: str) -> list[str]:
    if isinstance(node, Mapping) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}.{k}")]
    return [path]


def local_only_errors(partial: Mapping[str, Any]) -> list[str]:
    return [f"{path} is local-only" for path in local_only_paths(partial)]


def _sets(partial: Mapping[str, Any], path: str) -> bool:
    node: Any = partial
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


# --------------------------------------------------------------------------- dry run of named files


# each raises OSError saying why not (missing, a directory where a file belongs, no permission)


def _readable_file(value: str) -> None:
    with open(value, "rb") as f:
        f.read(1)


def _directory(value: str) -> None:
    os.listdir(value)


def _parent_directory(value: str) -> None:
    """The busy file comes and goes: only the directory it appears in must be there."""
    os.listdir(Path(value).parent)


def _existing(value: str) -> None:
    os.stat(value)


# key path -> (value in the built config, the check); only paths the layer itself sets are checked
_FILE_KEYS: dict[str, tuple[Callable[[Config], object], Callable[[str], None]]] = {
    "sensors.csv.path": (lambda c: c.sensors.csv.path, _readable_file),
    "monitor.disk_paths": (lambda c: c.monitor.disk_paths, _existing),
    "monitor.thermal_dir": (lambda c: c.monitor.thermal_dir, _directory),
    "monitor.battery_file": (lambda c: c.monitor.battery_file, _readable_file),
    "monitor.power_file": (lambda c: c.monitor.power_file, _readable_file),
    "monitor.jetson_gpu_load_file": (lambda c: c.monitor.jetson_gpu_load_file, _readable_file),
    "busy.file": (lambda c: c.busy.file, _parent_directory),
}
FILE_KEYS = tuple(_FILE_KEYS)


def file_errors(partial: Mapping[str, Any], new: Config) -> list[str]:
    """Every file or directory the layer names must be usable now, as the component will use it:
    `sensors.csv.path: cannot use '/data/typo.csv': [Errno 2] No such file or directory`.
    Blocking (file system): call it from a thread."""
    errors: list[str] = []
    for path, (get, check) in _FILE_KEYS.items():
        if not _sets(partial, path):
            continue
        value = get(new)
        values = list(value) if isinstance(value, tuple) else [value]
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v:
                continue  # empty: the feature is off
            where = f"{path}[{i}]" if isinstance(value, tuple) else path
            try:
                check(v)
            except OSError as exc:
                errors.append(f"{where}: cannot use {v!r}: {exc.strerror or exc}")
    return errors
