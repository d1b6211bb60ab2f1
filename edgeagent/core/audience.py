"""Who a signed message is for: `targets.devices` / `targets.groups`, parsed and matched as pure functions.

The audience lives inside the signed bytes, so a message signed for one device cannot be replayed
on another device's (or group's) topics: the broker's topic is not evidence, the signature is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgeagent.core.config_schema import DEVICE_ID_RE

# a fleet push names devices one by one at most up to this many; a larger audience is a group.
# Bounding it keeps a hostile (if signed) message from making every device scan a huge list.
MAX_AUDIENCE = 1024


@dataclass(frozen=True, slots=True)
class Audience:
    """None: that list was absent and does not restrict."""

    devices: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None


class AudienceError(ValueError):
    """`targets` is malformed; the message says which key and why."""


def _names(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise AudienceError(f"{key} must be a non-empty list of names")
    if len(value) > MAX_AUDIENCE:
        raise AudienceError(f"{key} lists {len(value)} names, at most {MAX_AUDIENCE} (use a group)")
    for v in value:
        if not isinstance(v, str) or not DEVICE_ID_RE.match(v):
            raise AudienceError(f"{key}: {v!r} is not a device id or group name "
                                f"(1-64 of A-Z a-z 0-9 . _ -)")
    return tuple(value)


def parse(targets: object) -> Audience:
    """The audience of a message's `targets` (absent: everyone); AudienceError names the bad key.
    Other keys of `targets` (a manifest's `arch`, `hardware`) are the caller's."""
    if targets is None:
        return Audience()
    if not isinstance(targets, Mapping):
        raise AudienceError("targets must be an object")
    devices = _names(targets["devices"], "targets.devices") if "devices" in targets else None
    groups = _names(targets["groups"], "targets.groups") if "groups" in targets else None
    return Audience(devices, groups)


def problem(audience: Audience, device_id: str, groups: Sequence[str]) -> str | None:
    """Why this device is not in the audience (every given list must match), or None."""
    if audience.devices is not None and device_id not in audience.devices:
        return f"not for this device: targets.devices {_show(audience.devices)} does not name {device_id}"
    if audience.groups is not None and not set(groups).intersection(audience.groups):
        mine = ",".join(groups) or "(none)"
        return (f"not for this device: targets.groups {_show(audience.groups)} holds none of "
                f"its groups ({mine})")
    return None


def _show(names: tuple[str, ...], limit: int = 5) -> str:
    more = f",... ({len(names)} in all)" if len(names) > limit else ""
    return "[" + ",".join(names[:limit]) + more + "]"
