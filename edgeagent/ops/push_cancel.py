"""`edgeagent push cancel JOB --device D | --group G`: sign a cancel, send it, print each answer.

A device drops a job that is still received, downloading, verified or deferred (its state becomes
`cancelled`). A job already installing goes on: the device says "too late" (an `update` event)
and the job then ends as it would have (succeeded, failed or rolled back), which is what we print.
A job the device does not know (no retained status) or that already ended is not sent a cancel.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgeagent.core import signing
from edgeagent.core.protocol import FINAL_JOB_STATES, dumps
from edgeagent.ops.push_devices import SETTLE_S, describe, online, subscribe_acked
from edgeagent.ops.push_report import word

RETAINED_WAIT_S = 1.0


@dataclass
class Answer:
    device: str
    before: dict[str, Any] | None = None  # the job's retained status when we looked
    text: str = ""  # the final answer, once there is one
    ok: bool = False
    too_late: str = ""  # the state the device was in when it said "too late"
    notes: list[str] = field(default_factory=list)


class CancelWatch:
    """Follows one job on the target devices: its retained status and the devices' update events."""

    def __init__(self, client: Any, prefix: str, job: str, devices: list[str]) -> None:
        self.client = client
        self.prefix = prefix
        self.job = job
        self.answers = {d: Answer(d) for d in devices}
        self.status: dict[str, dict[str, Any]] = {}
        self.sent: set[str] = set()
        self.on_answer: Any = None
        self._cv = threading.Condition()
        self._filters = [f for d in devices
                         for f in (f"{prefix}/{d}/updates/{job}/status", f"{prefix}/{d}/events")]

    def load(self) -> None:
        """Subscribe, then give the retained job statuses a moment to arrive."""
        subscribe_acked(self.client, self._filters, self._on_message)
        deadline = time.monotonic() + RETAINED_WAIT_S
        with self._cv:
            while len(self.status) < len(self.answers) and time.monotonic() < deadline:
                self._cv.wait(SETTLE_S / 5)

    def close(self) -> None:
        for f in self._filters:
            self.client.message_callback_remove(f)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if msg.topic.endswith("/status") and len(parts) >= 4:
            self._job_status(parts[-4], doc)
        elif msg.topic.endswith("/events") and len(parts) >= 2:
            self._event(parts[-2], doc)

    def _job_status(self, device: str, doc: dict[str, Any]) -> None:
        if doc.get("job") != self.job or device not in self.answers:
            return
        with self._cv:
            self.status[device] = doc
            a = self.answers[device]
            state = str(doc.get("state"))
            if device in self.sent and not a.text and state in FINAL_JOB_STATES:
                reason = f": {doc['reason']}" if doc.get("reason") else ""
                if state == "cancelled":
                    was = f" (it was {word(str(a.before.get('state')))})" if a.before else ""
                    self._answer(a, f"cancelled{was}", ok=True)
                elif a.too_late:
                    self._answer(a, f"too late (it was {word(a.too_late)}): it ended {word(state)}{reason}")
                else:
                    self._answer(a, f"it ended {word(state)}{reason} before the cancel arrived")
            self._cv.notify_all()

    def _event(self, device: str, doc: dict[str, Any]) -> None:
        data = doc.get("data")
        message = str(doc.get("message") or "")
        if device not in self.sent or not isinstance(data, dict) or data.get("job") != self.job:
            return
        prefix = f"cancel of {self.job} "
        if not message.startswith(prefix):
            return
        with self._cv:
            a = self.answers[device]
            rest = message[len(prefix):]
            if rest.startswith("too late"):
                a.too_late = rest.partition(":")[2].strip() or "installing"
                self._note(a, f"too late: it is {word(a.too_late)}; it finishes or rolls back, waiting")
            elif rest.startswith("refused") and not a.text:
                self._answer(a, f"cancel refused: {rest.partition(':')[2].strip()}")
            self._cv.notify_all()

    def _answer(self, a: Answer, text: str, ok: bool = False) -> None:
        a.text, a.ok = text, ok
        if self.on_answer is not None:
            self.on_answer(a.device, text)

    def _note(self, a: Answer, text: str) -> None:
        a.notes.append(text)
        if self.on_answer is not None:
            self.on_answer(a.device, text)

    def send(self, message: dict[str, Any], presence: dict[str, dict[str, Any]]) -> None:
        """Publish the signed cancel to every device whose job can still be cancelled; answer at once
        for the others (unknown job, already ended, offline: the broker keeps it for it)."""
        payload = dumps(message)
        with self._cv:
            for device, a in self.answers.items():
                a.before = self.status.get(device)
                state = a.before.get("state") if a.before else None
                if a.before is None:
                    self._answer(a, f"unknown job {self.job} (no status from this device): nothing to cancel")
                    continue
                if state in FINAL_JOB_STATES:
                    self._answer(a, f"already {word(str(state))}: nothing to cancel", ok=state == "cancelled")
                    continue
                self.sent.add(device)
                self.client.publish(f"{self.prefix}/{device}/updates/{self.job}/cancel", payload, qos=1)
                doc = presence.get(device)
                if doc is not None and not online(doc):
                    self._answer(a, f"{describe(doc)}: the cancel waits in its broker session; "
                                    f"the job stays {word(str(state))} until it reconnects")

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while any(not a.text for a in self.answers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.5))
            for a in self.answers.values():
                if not a.text:
                    current = self.status.get(a.device, a.before or {})
                    self._answer(a, f"no answer before the deadline (job {word(str(current.get('state')))})")


def cancel_message(job: str, key: Any, key_id: str, device: str | None, group: str | None,
                   now: float | None = None) -> dict[str, Any]:
    """The signed cancel, for the device (`targets.devices`) or the group (`targets.groups`)."""
    targets = {"devices": [device]} if device else {"groups": [group]}
    body = {"v": 1, "type": "cancel", "job": job, "issued_at": time.time() if now is None else now,
            "targets": targets}
    return signing.sign(body, key, key_id)
