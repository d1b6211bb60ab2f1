"""Which devices a push or a cancel is for, from their retained status (`P/D/status`).

Every agent keeps a retained status on the broker, online or offline (the last will; it carries the
device's groups too), so a device id without one never connected to this broker under this prefix:
it is unknown, and we say so in about a second instead of waiting for the push's deadline. A group
is the devices whose retained status lists it in `groups`. The roster stays subscribed while the
push runs and reports a device going offline or coming back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

SETTLE_S = 0.25  # retained messages come right after the SUBACK: this much quiet means all came
MAX_WAIT_S = 1.0  # ...and this long after the SUBACK we conclude, whatever came
SUBACK_TIMEOUT_S = 10.0

Presence = Callable[[str, dict[str, Any]], None]


def subscribe_acked(client: Any, filters: list[str], handler: Callable[[Any, Any, Any], None]) -> None:
    """Route `filters` to `handler`, subscribe (QoS 1) and wait for the SUBACK: the retained
    messages come right after it."""
    acked = threading.Event()
    previous = client.on_subscribe

    def on_subscribe(*args: Any) -> None:
        acked.set()
        if previous is not None:
            previous(*args)

    for f in filters:
        client.message_callback_add(f, handler)
    client.on_subscribe = on_subscribe
    try:
        _, mid = client.subscribe([(f, 1) for f in filters])
        if mid is None or not acked.wait(SUBACK_TIMEOUT_S):
            raise ConnectionError(f"the broker did not acknowledge our subscription to {', '.join(filters)}")
    finally:
        client.on_subscribe = previous


class UnknownTarget(ValueError):
    """No retained status names the device (or lists the group)."""


def online(doc: dict[str, Any]) -> bool:
    return doc.get("state") == "online"


class Roster:
    """The retained statuses of one device (`device`) or of every device (group pushes)."""

    def __init__(self, client: Any, prefix: str, device: str | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.device = device
        self.filter = f"{prefix}/{device or '+'}/status"
        self.docs: dict[str, dict[str, Any]] = {}
        self.on_change: Presence | None = None
        self._cv = threading.Condition()
        self._last_arrival = 0.0

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 2:
            return
        device = parts[-2]
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        with self._cv:
            before = self.docs.get(device)
            if doc:
                self.docs[device] = doc
            else:  # an empty retained message deletes the status: the device is gone
                self.docs.pop(device, None)
            self._last_arrival = time.monotonic()
            self._cv.notify_all()
        callback = self.on_change
        if callback is not None and before is not None and online(before) != online(doc):
            callback(device, doc)

    def load(self) -> None:
        """Subscribe and wait for the retained statuses (about a second at most)."""
        subscribe_acked(self.client, [self.filter], self._on_message)
        start = time.monotonic()
        with self._cv:
            while True:
                now = time.monotonic()
                if self.device is not None and self.device in self.docs:
                    return
                quiet = self._last_arrival and now - self._last_arrival >= SETTLE_S
                if quiet or now - start >= MAX_WAIT_S:
                    return
                self._cv.wait(SETTLE_S / 5)

    def close(self) -> None:
        self.client.message_callback_remove(self.filter)
        self.client.unsubscribe(self.filter)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._cv:
            return dict(self.docs)

    def is_online(self, device: str) -> bool:
        with self._cv:
            return online(self.docs.get(device, {}))

    def members(self, group: str) -> dict[str, dict[str, Any]]:
        """The devices whose retained status lists `group` (online, or offline with their will)."""
        return {d: doc for d, doc in self.snapshot().items()
                if isinstance(doc.get("groups"), list) and group in doc["groups"]}

    def targets(self, device: str | None, group: str | None) -> dict[str, dict[str, Any]]:
        """The devices to serve, with their retained status; UnknownTarget when there are none."""
        docs = self.snapshot()
        if device is not None:
            if device not in docs:
                raise UnknownTarget(f"unknown device {device}: no retained status on {self.prefix}/{device}/"
                                    f"status (it never connected to this broker, or its topic prefix is "
                                    f"not {self.prefix!r})")
            return {device: docs[device]}
        assert group is not None
        found = self.members(group)
        if not found:
            others = sorted({g for doc in docs.values() for g in doc.get("groups") or []
                             if isinstance(g, str)})
            known = f"groups seen: {', '.join(others)}" if others else "no device reports any group"
            raise UnknownTarget(f"no device of group {group}: none of the {len(docs)} retained statuses "
                                f"under {self.prefix}/+/status lists it ({known})")
        return found


def describe(doc: dict[str, Any]) -> str:
    """One device's presence for a line: online, or offline and why."""
    if online(doc):
        return "online"
    reason = doc.get("reason")
    since = doc.get("ts")
    when = ""
    if isinstance(since, int | float):
        when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
    return f"offline ({reason}{when})" if reason else f"offline{when}"
