"""Operator tools: `edgeagent keygen`, `edgeagent sign`, and the engine of `edgeagent push`.

`build_manifest` describes a file; `Pusher` publishes the signed manifest, sends the chunks the
devices `request` (they pull a window at a time; chunks are read from disk one at a time, with a
bounded number of QoS 1 messages in flight) and follows the job's retained status until a final
state. The `push` verb itself (checks, targets, reporting, cancel) is ops/push_cli.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.core import protocol, signing
from edgeagent.core.errors import ConfigError
from edgeagent.updates.manifest import MAX_CHUNKS, MIN_CHUNK_SIZE

DEFAULT_CHUNK = 64 * 1024
MAX_INFLIGHT = 64
MANIFEST_REPEAT_S = 5.0


def build_manifest(path: Path, *, job: str, kind: str, name: str, version: str,
                   chunk_size: int = DEFAULT_CHUNK, ttl_s: float = 86400.0,
                   arch: list[str] | None = None, hardware: list[str] | None = None,
                   min_agent: str | None = None, critical: bool = False,
                   issued_at: float | None = None, devices: list[str] | None = None,
                   groups: list[str] | None = None, pipeline: str | None = None) -> dict[str, Any]:
    """An unsigned manifest for `path` (size, sha256 and per-chunk sha256 streamed from disk).
    ValueError for what every device would refuse (empty file, chunk size or count out of bounds),
    before a byte is read."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file")
    chunks = -(-size // chunk_size) if chunk_size > 0 else 0
    if chunk_size <= 0 or (chunks > 1 and chunk_size < MIN_CHUNK_SIZE):
        raise ValueError(f"chunk size {chunk_size} bytes: devices need at least {MIN_CHUNK_SIZE} "
                         f"(only a single-chunk file may be smaller)")
    if chunks > MAX_CHUNKS:
        raise ValueError(f"{size} bytes in chunks of {chunk_size} is {chunks} chunks, devices accept at most "
                         f"{MAX_CHUNKS}: use a larger chunk size")
    whole = hashlib.sha256()
    per_chunk: list[str] = []
    total = 0
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            total += len(block)
            whole.update(block)
            per_chunk.append(hashlib.sha256(block).hexdigest())
    now = issued_at if issued_at is not None else time.time()
    if len(per_chunk) != chunks or total != size:
        raise ValueError(f"{path} changed while it was read")
    m: dict[str, Any] = {"v": 1, "type": "manifest", "job": job, "kind": kind, "name": name,
                         "version": version, "size": size, "sha256": whole.hexdigest(),
                         "chunk_size": chunk_size, "chunks": chunks, "chunk_sha256": per_chunk,
                         "issued_at": now, "expires": now + ttl_s, "critical": critical}
    targets: dict[str, list[str]] = {}
    if arch:
        targets["arch"] = arch
    if hardware:
        targets["hardware"] = hardware
    if devices:
        targets["devices"] = devices
    if groups:
        targets["groups"] = groups
    if targets:
        m["targets"] = targets
    if min_agent:
        m["min_agent"] = min_agent
    if pipeline:
        m["pipeline"] = pipeline
    return m


@dataclass
class PushResult:
    states: dict[str, str] = field(default_factory=dict)  # device -> final state
    reasons: dict[str, str] = field(default_factory=dict)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> its latest job status
    chunks_sent: int = 0
    resent: int = 0
    seconds: float = 0.0


def _settle(info: Any, timeout_s: float) -> bool:
    """True once a publish is acknowledged or can no longer be (the connection dropped: paho raises;
    the device then asks again for what it misses, so nothing is lost by letting go of it)."""
    try:
        if timeout_s > 0:
            info.wait_for_publish(timeout_s)
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return True


class Pusher:
    """Publishes one signed update and serves it until every expected device has finished.

    `devices`: the devices that must reach a final state (a group's members, from their retained
    status); any other device that answers is waited for too. Without it, `expect` devices."""

    def __init__(self, client: Any, prefix: str, manifest: dict[str, Any], artifact: Path,
                 device: str | None = None, group: str | None = None, expect: int = 1,
                 on_status: Callable[[str, dict[str, Any]], None] | None = None,
                 devices: Collection[str] | None = None,
                 reachable: Callable[[str], bool] | None = None) -> None:
        self.client = client
        self.m = manifest
        self.artifact = artifact
        self.job = manifest["job"]
        self.base = f"{prefix}/{device}/updates/{self.job}" if device else \
            f"{prefix}/group/{group}/updates/{self.job}"
        self.watch = f"{prefix}/{device or '+'}/updates/{self.job}/"
        self.expect = expect
        self.devices = set(devices) if devices is not None else None
        # whether a device is online now: the manifest is said again only for those (an offline
        # device's broker session already holds it; repeats would pile up there)
        self.reachable = reachable
        self.on_status = on_status
        self._cv = threading.Condition()
        self._resend: set[int] = set()
        self._status: dict[str, dict[str, Any]] = {}
        self._inflight: list[Any] = []
        self.result = PushResult()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        device = parts[-4] if len(parts) >= 4 else "?"
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(doc, dict) or doc.get("job") != self.job:
            return
        if msg.topic.endswith("/request"):
            with self._cv:
                for rng in doc.get("missing", []):
                    if isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng):
                        lo, hi = max(0, rng[0]), min(self.m["chunks"] - 1, rng[1])
                        self._resend.update(range(lo, hi + 1))
                self._cv.notify_all()
        elif msg.topic.endswith("/status"):
            if doc.get("ts", 0) < self.m["issued_at"] - 1:
                return  # a retained status of an older run of the same job id
            with self._cv:
                self._status[device] = doc
                self.result.last[device] = doc
                if doc.get("state") in protocol.FINAL_JOB_STATES:
                    self.result.states[device] = str(doc["state"])
                    self.result.reasons[device] = str(doc.get("reason", ""))
                self._cv.notify_all()
            if self.on_status:
                self.on_status(device, doc)

    def _publish_chunks(self, indices: list[int], f: Any) -> None:
        """Publish without waiting for the acks of this batch (the next request may come first);
        only the oldest are awaited once MAX_INFLIGHT are outstanding (bounded memory)."""
        for i in indices:
            f.seek(i * self.m["chunk_size"])
            data = f.read(self.m["chunk_size"])
            self._inflight.append(self.client.publish(f"{self.base}/chunk/{i}", data, qos=1))
            self.result.chunks_sent += 1
            if len(self._inflight) >= MAX_INFLIGHT:
                for info in self._inflight[: MAX_INFLIGHT // 2]:
                    _settle(info, 30)
                del self._inflight[: MAX_INFLIGHT // 2]
        self._inflight = [info for info in self._inflight if not _settle(info, 0)]

    def finished(self) -> bool:
        """Every expected device (and every other that answered) reached a final state."""
        enough = len(self.result.states) >= self.expect
        if self.devices is None:
            return enough
        return enough and (self.devices | self._status.keys()) <= self.result.states.keys()

    def _silent(self) -> bool:
        """Someone expected has not answered yet (offline, or not subscribed yet)."""
        if self.devices is None:
            return not self._status
        silent = self.devices - self._status.keys()
        if self.reachable is not None:
            silent = {d for d in silent if self.reachable(d)}
        return bool(silent)

    def run(self, timeout_s: float, start_wait_s: float = 0.0) -> PushResult:
        """Serve the update until the expected devices reached a final state or `timeout_s` passed.

        Devices pull: they request a window of chunks at a time (flow control), so chunks are sent
        only as requested. A broker restart in the middle is survived with a persistent session
        (ops/push_session.py): paho queues what we publish meanwhile and sends it on reconnect.
        `start_wait_s` is accepted for compatibility and ignored."""
        t0 = time.monotonic()
        self.client.on_message = self._on_message
        self.client.subscribe(self.watch + "status", qos=1)
        self.client.subscribe(self.watch + "request", qos=1)
        _settle(self.client.publish(f"{self.base}/manifest", protocol.dumps(self.m), qos=1), 30)
        deadline = t0 + timeout_s
        last_manifest = time.monotonic()
        sent: set[int] = set()
        with open(self.artifact, "rb") as f:
            while time.monotonic() < deadline:
                with self._cv:
                    silent = self._silent()
                if silent and time.monotonic() - last_manifest > MANIFEST_REPEAT_S:
                    # not everyone answered yet (device offline, or not subscribed yet): the manifest
                    # is idempotent, so say it again; a device then asks for the chunks it lacks
                    last_manifest = time.monotonic()
                    self.client.publish(f"{self.base}/manifest", protocol.dumps(self.m), qos=1)
                with self._cv:
                    if self.finished():
                        break
                    if not self._resend:
                        self._cv.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                    todo = sorted(self._resend)
                    self._resend.clear()
                if todo:
                    self.result.resent += len(sent.intersection(todo))
                    sent.update(todo)
                    self._publish_chunks(todo, f)
        self.result.seconds = time.monotonic() - t0
        return self.result


# ----------------------------------------------------------------------------- commands


KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def key_id_problem(key_id: str) -> str | None:
    """Why a key id cannot name the key files (None when it can): it becomes part of a file name
    under --out-dir, so no separators, no `..`, nothing a shell or a TOML key would need to quote."""
    if not KEY_ID_RE.fullmatch(key_id):
        return "expected 1-64 characters of A-Z a-z 0-9 . _ -"
    if key_id in (".", "..") or ".." in key_id:
        return "must not contain '..'"
    return None


def key_id(text: str) -> str:
    """argparse type of keygen's --key-id."""
    problem = key_id_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if not out.is_dir():  # keygen writes into a directory that exists; it creates none
        print(f"keygen: {out}: not an existing directory", file=sys.stderr)
        return 2
    priv, pub = out / f"{args.key_id}.key", out / f"{args.key_id}.pem"
    if priv.exists() and not args.force:
        print(f"{priv} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    signing.generate_keypair(priv, pub)
    print(f"private key {priv} (keep it off the devices)\npublic key  {pub} "
          f"(device config: updates.trusted_keys.{args.key_id} = \"{pub}\")")
    return 0


def _load_key(args: argparse.Namespace) -> Any:
    try:
        return signing.load_private_key(Path(args.key))
    except (OSError, ConfigError) as exc:
        print(f"cannot load key {args.key}: {exc}", file=sys.stderr)
        return None


def desired_config_errors(doc: dict[str, Any]) -> list[str]:
    """What a device would refuse in a desired config before applying it, with key paths: the
    remote layer's own rules (local-only keys, TOML-writable values) and the schema, checked on the
    layer merged over the defaults (the device's file may set more; it cannot make a bad value good)."""
    from edgeagent.core import config as cfgmod
    from edgeagent.core.config_layers import check_remote_layer

    partial = doc.get("config")
    if not isinstance(partial, dict):
        return [f"config: expected an object, got {type(partial).__name__}"]
    errors = check_remote_layer(partial)
    if not errors:
        try:
            cfgmod.build(partial, env={})
        except ConfigError as exc:
            errors = exc.errors
    return [e if e.startswith("config") else f"config.{e}" for e in errors]
    return []


def _cmd_sign(args: argparse.Namespace) -> int:
    key = _load_key(args)
    if key is None:
        return 2
    try:
        doc = json.loads(Path(args.file).read_text() if args.file != "-" else sys.stdin.read())
    except (OSError, ValueError) as exc:
        print(f"cannot read a JSON object from {args.file}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(doc, dict):
        print("expected a JSON object", file=sys.stderr)
        return 2
    if args.type is not None:
        if "type" in doc and doc["type"] != args.type:
            print(f"the message says \"type\": {doc['type']!r} but --type is {args.type!r}", file=sys.stderr)
            return 2
        doc["type"] = args.type
    elif doc.get("type") not in signing.TYPES:
        what = f"has \"type\": {doc['type']!r}" if "type" in doc else "has no \"type\""
        print(f"the message {what}: devices refuse it; add one or pass --type "
              f"({'|'.join(signing.TYPES)})", file=sys.stderr)
        return 2
    if doc["type"] == "config":
        errors = desired_config_errors(doc)
        if errors:
            print(f"not signed: {args.file}: {len(errors)} error(s) a device would refuse:", file=sys.stderr)
            for e in errors:
                print(f"  {e}", file=sys.stderr)
            return 2
    try:
        signed = signing.sign(doc, key, args.key_id)
    except ValueError as exc:  # a number or string RFC 8785 cannot express exactly
        print(f"cannot sign: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(signed, ensure_ascii=False, indent=1))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing updates")
    kg.add_argument("--key-id", required=True, type=key_id,
                    help="the key's name: 1-64 of A-Z a-z 0-9 . _ - (files KEY_ID.key and KEY_ID.pem)")
    kg.add_argument("--out-dir", "--out", default=".", metavar="DIR",
                    help="existing directory to write the two files into")
    kg.add_argument("--force", action="store_true", help="overwrite an existing key of that id")
    kg.set_defaults(func=_cmd_keygen)

    sg = sub.add_parser("sign", help="sign a JSON message (manifest, cancel, desired config)")
    sg.add_argument("--key", required=True, help="PEM private key")
    sg.add_argument("--key-id", required=True, help="the id devices know the public key by")
    sg.add_argument("--type", choices=signing.TYPES,
                    help="the message's purpose, signed with it (required when the JSON has no \"type\"); "
                         "a device refuses a message whose type does not fit the topic; a desired config "
                         "is checked against the schema before signing")
    sg.add_argument("file", help="JSON file, or - for stdin")
    sg.set_defaults(func=_cmd_sign)
