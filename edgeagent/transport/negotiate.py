"""Which MQTT version the session speaks: `mqtt.protocol = "auto"` tries 5, falls back to 3.1.1.

A broker that speaks only 3.1.1 either answers a v5 CONNECT with "unsupported protocol version", or
closes the connection, or ignores it (amqtt: the CONNECT times out). Those three failures make an
"auto" session try 3.1.1 at once, on the same attempt; a broker that cannot be reached at all
(refused, unreachable, DNS) or refuses our TLS or credentials says nothing about its version, so it
never causes a fallback. The version that worked is remembered in `<state_dir>/mqtt_protocol`
("5" or "3.1.1", one line, written atomically), so the next start does not pay the failed probe
again; `edgeagent status` and `edgeagent check` show it. A remembered "3.1.1" older than a week is
probed with 5 again at the next start (the broker may have been upgraded, or the fallback came from
a v5 broker's bad moment). "5" and "3.1.1" force one version.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edgeagent.core.fsutil import atomic_write_text

log = logging.getLogger(__name__)

PROTOCOL_FILE = "mqtt_protocol"
VERSIONS = ("5", "3.1.1")
AUTO = "auto"
REPROBE_AFTER_S = 7 * 86400.0
REFRESH_AFTER_S = 86400.0

# lowercase fragments of a failed connect's reason that mean "this broker does not do MQTT 5"
_VERSION_PROBLEMS = ("unsupported protocol version", "unacceptable protocol version",
                     "timed out", "no connack", "closed before connack", "connection lost",
                     "protocol error", "malformed packet", "connection closed")
# ...and those that say nothing about the version (the broker is down, or refuses who we are)
_NOT_ABOUT_VERSION = ("connection refused", "no route to host", "network is unreachable",
                      "name or service not known", "temporary failure in name resolution",
                      "certificate", "ssl", "tls", "not authorized", "bad user name or password",
                      "bad username or password", "client identifier not valid", "banned")


def remembered(state_dir: Path) -> str | None:
    """The version that worked last time ("5" or "3.1.1"), None when unknown or unreadable."""
    try:
        text = (state_dir / PROTOCOL_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text in VERSIONS else None


def remember(state_dir: Path, version: str, now: float | None = None) -> None:
    """Write `version` to the state dir, atomically, when it changed or was last confirmed more
    than a day ago (its mtime says when; a reconnect does not touch the disk otherwise). A failure
    is logged, never raised: the next start probes again."""
    if version not in VERSIONS:
        raise ValueError(f"unknown MQTT version {version!r}")
    path = state_dir / PROTOCOL_FILE
    if remembered(state_dir) == version and _age_s(path, now) < REFRESH_AFTER_S:
        return
    try:
        atomic_write_text(state_dir / PROTOCOL_FILE, version + "\n")
    except OSError as exc:
        log.warning("cannot remember the negotiated MQTT version: %s", exc)


def is_version_problem(reason: str) -> bool:
    """Whether a failed v5 connect looks like a broker that does not speak MQTT 5."""
    text = reason.lower()
    if any(k in text for k in _NOT_ABOUT_VERSION):
        return False
    return any(k in text for k in _VERSION_PROBLEMS)


def _age_s(path: Path, now: float | None) -> float:
    try:
        return (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return 0.0


class ProtocolChoice:
    """The version to try next, and what to do when it fails or works (no I/O but the file)."""

    def __init__(self, configured: str, state_dir: Path, now: float | None = None) -> None:
        self.configured = configured
        self.state_dir = state_dir
        self.negotiated: str | None = None  # the version of the current (or last) connection
        if configured in VERSIONS:
            self.first = configured
        else:
            self.first = remembered(state_dir) or "5"
            if self.first == "3.1.1" and _age_s(state_dir / PROTOCOL_FILE, now) > REPROBE_AFTER_S:
                self.first = "5"

    @property
    def auto(self) -> bool:
        return self.configured == AUTO

    def fallback(self, tried: str, reason: str) -> str | None:
        """The version to try right away after `tried` failed with `reason` (None: none)."""
        if not self.auto or tried != "5" or not is_version_problem(reason):
            return None
        return "3.1.1"

    def connected(self, version: str) -> None:
        """A connection with `version` worked: log it once per change, remember it (auto)."""
        if version != self.negotiated:
            how = "negotiated" if self.auto else "configured"
            log.info("speaking MQTT %s (%s)", version, how,
                     extra={"kv": {"protocol": version, "mode": self.configured}})
        self.negotiated = version
        if self.auto:
            self.first = version
            remember(self.state_dir, version)
