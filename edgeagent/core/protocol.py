"""The wire protocol of DESIGN.md in one place: topic names, payload builders and strict parsers.

Operators drive devices with plain mosquitto_pub/sub, so every topic and field here is a contract.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgeagent import __version__
from edgeagent.core.errors import ProtocolError

PROTOCOL_VERSION = 1
EVENT_KINDS = ("anomaly", "rule", "update", "config", "error", "support", "sensor")
SEVERITIES = ("info", "warning", "critical")
JOB_STATES = (
    "received", "rejected", "downloading", "verified", "deferred", "installing", "rebooting",
    "health_check", "succeeded", "failed", "rolled_back", "cancelled", "shadowing",
)
FINAL_JOB_STATES = frozenset({"rejected", "succeeded", "failed", "rolled_back", "cancelled"})
CONFIG_STATES = ("applied", "rejected", "rolled_back")


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one device under one prefix (`P/D/...`)."""

    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def job_status(self, job: str) -> str:
        return f"{self.base}/updates/{job}/status"

    def job_request(self, job: str) -> str:
        return f"{self.base}/updates/{job}/request"

    @property
    def config_desired(self) -> str:
        return f"{self.base}/config/desired"

    @property
    def config_reported(self) -> str:
        return f"{self.base}/config/reported"

    @property
    def updates_filter(self) -> str:
        """Manifests, chunks and cancels addressed to this device."""
        return f"{self.base}/updates/+/#"

    def support(self, job: str, leaf: str) -> str:
        """`P/D/support/J/<leaf>`: request (in), status, manifest, chunk/N (out)."""
        return f"{self.base}/support/{job}/{leaf}"

    @property
    def support_filter(self) -> str:
        """Support requests addressed to this device (only requests: our own chunks never come back)."""
        return f"{self.base}/support/+/request"

    def group_updates_filter(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/updates/+/#"


def dumps(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the encoding of every payload we publish."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def canonical(message: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the message without `sig`, sorted, compact, UTF-8."""
    body = {k: v for k, v in message.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def loads_object(topic: str, payload: bytes) -> dict[str, Any]:
    """Parse a JSON object payload with `"v": 1`; raise ProtocolError with the reason otherwise."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of 4300+ digits
        raise ProtocolError(topic, f"malformed JSON: {exc}") from exc
    except RecursionError as exc:  # a hostile payload nested thousands deep
        raise ProtocolError(topic, "malformed JSON: nested too deeply") from exc
    if not isinstance(value, dict):
        raise ProtocolError(topic, f"expected a JSON object, got {type(value).__name__}")
    if value.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(topic, f"unsupported or missing protocol version v={value.get('v')!r}")
    return value


def status_online(model: dict[str, str] | None = None, firmware: dict[str, str] | None = None,
                  ts: float | None = None, *, groups: Sequence[str] = (),
                  hardware: str = "") -> dict[str, Any]:
    """The retained "online" status; `groups` and `hardware` (from `[device]`) let fleet tools
    filter and label devices without asking them; `arch` is the CPU the agent really runs on
    (`platform.machine()`, what a manifest's `targets.arch` is matched against)."""
    payload: dict[str, Any] = {"v": 1, "state": "online", "agent": __version__, "ts": ts or time.time(),
                               "groups": list(groups), "hardware": hardware, "arch": platform.machine()}
    if model:
        payload["model"] = model
    if firmware:
        payload["firmware"] = firmware
    return payload


def status_offline(reason: str, ts: float | None = None, *, groups: Sequence[str] = (),
                   hardware: str = "") -> dict[str, Any]:
    """reason: "connection-lost" (the last will) or "shutdown" (clean stop). `groups` and
    `hardware` too, so an offline device still counts in its groups (`edgeagent push --group`)."""
    payload: dict[str, Any] = {"v": 1, "state": "offline", "reason": reason}
    if ts is not None:
        payload["ts"] = ts
    if groups:
        payload["groups"] = list(groups)
    if hardware:
        payload["hardware"] = hardware
    return payload


def telemetry(device: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """samples: [{"seq","ts","metrics",("inference","spool",...)}]"""
    return {"v": 1, "device": device, "samples": samples}


def event(device: str, seq: int, kind: str, severity: str, message: str,
          data: dict[str, Any] | None = None, ts: float | None = None) -> dict[str, Any]:
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")
    return {"v": 1, "device": device, "seq": seq, "ts": ts if ts is not None else time.time(),
            "kind": kind, "severity": severity, "message": message, "data": data or {}}


def job_status(job: str, kind: str, name: str, version: str, state: str, reason: str = "",
               progress: float = 0.0, next_try: float | None = None,
               ts: float | None = None, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}")
    payload: dict[str, Any] = {"v": 1, "job": job, "kind": kind, "name": name, "version": version,
                               "state": state, "reason": reason, "progress": progress,
                               "ts": ts if ts is not None else time.time()}
    if next_try is not None:
        payload["next_try"] = next_try
    if shadow is not None:  # the figures of a shadow evaluation (running or finished)
        payload["shadow"] = shadow
    return payload


def job_request(job: str, missing: list[tuple[int, int]]) -> dict[str, Any]:
    return {"v": 1, "job": job, "missing": [[a, b] for a, b in missing]}


def config_reported(version: int, sha256: str, state: str, reason: str = "",
                    ts: float | None = None) -> dict[str, Any]:
    if state not in CONFIG_STATES:
        raise ValueError(f"unknown config state {state!r}")
    return {"v": 1, "version": version, "sha256": sha256, "state": state, "reason": reason,
            "ts": ts if ts is not None else time.time()}
