"""Operator tools: `edgeagent keygen`, `edgeagent sign`, `edgeagent push`.

`push` signs a manifest for a file, publishes it, sends the chunks the devices `request` (they pull
a window at a time; chunks are read from disk one at a time, with a bounded number of QoS 1
messages in flight) and follows the retained status until a final state; the exit code says
whether it succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.core import protocol, signing
from edgeagent.core.cli_args import positive_duration, positive_int
from edgeagent.core.errors import ConfigError, EdgeAgentError
from edgeagent.core.shadow_spec import ShadowSpecError, parse_shadow
from edgeagent.core.units import parse_duration_s
from edgeagent.ops.args import add_signing_broker_args
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
    """Publishes one signed update and serves it until every expected device has finished."""

    def __init__(self, client: Any, prefix: str, manifest: dict[str, Any], artifact: Path,
                 device: str | None = None, group: str | None = None, expect: int = 1,
                 on_status: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.client = client
        self.m = manifest
        self.artifact = artifact
        self.job = manifest["job"]
        self.base = f"{prefix}/{device}/updates/{self.job}" if device else \
            f"{prefix}/group/{group}/updates/{self.job}"
        self.watch = f"{prefix}/{device or '+'}/updates/{self.job}/"
        self.expect = expect
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

    def run(self, timeout_s: float, start_wait_s: float = 0.0) -> PushResult:
        """Serve the update until `expect` devices reached a final state or `timeout_s` passed.

        Devices pull: they request a window of chunks at a time (flow control), so chunks are sent
        only as requested. `start_wait_s` is accepted for compatibility and ignored."""
        t0 = time.monotonic()
        self.client.on_message = self._on_message
        self.client.subscribe(self.watch + "status", qos=1)
        self.client.subscribe(self.watch + "request", qos=1)
        self.client.publish(f"{self.base}/manifest", protocol.dumps(self.m), qos=1).wait_for_publish(30)
        deadline = t0 + timeout_s
        last_manifest = time.monotonic()
        sent: set[int] = set()
        with open(self.artifact, "rb") as f:
            while time.monotonic() < deadline:
                if not self._status and time.monotonic() - last_manifest > MANIFEST_REPEAT_S:
                    # nobody answered yet (device offline, or not subscribed yet): the manifest is
                    # idempotent, so say it again; the device then asks for the chunks it lacks
                    last_manifest = time.monotonic()
                    self.client.publish(f"{self.base}/manifest", protocol.dumps(self.m), qos=1)
                with self._cv:
                    if len(self.result.states) >= self.expect:
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


def shadow_arg(text: str) -> dict[str, Any]:
    """argparse type of push's --shadow N[:AGREEMENT] (the manifest's `shadow` object)."""
    windows, sep, agreement = text.partition(":")
    raw: dict[str, Any] = {}
    try:
        raw["windows"] = int(windows)
        if sep:
            raw["min_agreement"] = float(agreement)
        return parse_shadow(raw).as_dict()
    except (ValueError, ShadowSpecError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WINDOWS[:MIN_AGREEMENT], e.g. 500:0.95 "
                                         f"({exc})") from None


def shadow_line(device: str, doc: dict[str, Any]) -> str | None:
    """One line of shadow figures from a job status (None when it carries none)."""
    f = doc.get("shadow")
    if not isinstance(f, dict):
        return None

    def num(key: str, fmt: str) -> str:
        v = f.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    return (f"{device}: shadow {num('compared', 'd')}/{num('windows', 'd')} windows, "
            f"agreement {num('agreement', '.3f')} (min {num('min_agreement', 'g')}), "
            f"p99 ratio {num('p99_ratio', '.2f')}, score shift {num('score_shift', '+.3f')} "
            f"(KS {num('score_ks', '.2f')}), shed {num('shed', 'd')}")


def _progress_printer(device_hint: str) -> Callable[[str, dict[str, Any]], None]:
    tty = sys.stderr.isatty()

    def show(device: str, doc: dict[str, Any]) -> None:
        shadow = shadow_line(device, doc) if doc.get("state") == "shadowing" else None
        if shadow is not None:
            print(("\r" + shadow[:150].ljust(150)) if tty else shadow, end="" if tty else "\n",
                  file=sys.stderr, flush=True)
            return
        p = float(doc.get("progress") or 0.0)
        bar = "#" * int(p * 30)
        line = (f"{device}: [{bar:<30}] {p * 100:5.1f}% {doc.get('state')}"
                f"{'  ' + str(doc.get('reason')) if doc.get('reason') else ''}")
        print(("\r" + line[:150].ljust(150)) if tty else line, end="" if tty else "\n", file=sys.stderr,
              flush=True)

    return show


def _cmd_push(args: argparse.Namespace) -> int:
    from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client

    key = _load_key(args)
    if key is None:
        return 2
    path = Path(args.file)
    if not path.is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    job = args.job or f"{args.name}-{args.version}-{uuid.uuid4().hex[:8]}"
    try:
        ttl = parse_duration_s(args.expires_in)
        m = build_manifest(path, job=job, kind=args.kind, name=args.name, version=args.version,
                           chunk_size=args.chunk_kb * 1024, ttl_s=ttl, arch=args.arch or None,
                           hardware=args.hardware or None, min_agent=args.min_agent, critical=args.critical,
                           devices=[args.device] if args.device else None,
                           groups=[args.group] if args.group else None, pipeline=args.pipeline)
        if args.shadow is not None:
            if args.kind != "model":
                raise ValueError("--shadow applies to model updates only")
            m["shadow"] = args.shadow
        signed = signing.sign(m, key, args.key_id)
        url = BrokerUrl.parse(args.broker, args.ca_file, args.cert_file, args.key_file)
        # a persistent session per job: a broker restart mid-push keeps our subscriptions (status,
        # chunk requests) and the QoS 1 messages queued for us
        client = make_client(url, f"edgeagent-push-{job}"[:64], clean_start=False)
        connect_and_wait(client, url, keepalive_s=30, clean_start=False,
                         session_expiry_s=int(min(ttl, 86400)) + 60)
    except (EdgeAgentError, ConnectionError, ValueError, OSError) as exc:
        print(f"push: {exc}", file=sys.stderr)
        return 2
    print(f"job {job}: {args.kind} {args.name} {args.version}, {m['size']} bytes in {m['chunks']} chunks "
          f"-> {'device ' + args.device if args.device else 'group ' + args.group}", file=sys.stderr)
    pusher = Pusher(client, args.prefix, signed, path, device=args.device, group=args.group,
                    expect=args.expect, on_status=_progress_printer(args.device or args.group))
    try:
        result = pusher.run(parse_duration_s(args.timeout))
    finally:
        client.disconnect()
        client.loop_stop()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    ok = len(result.states) >= args.expect and all(s == "succeeded" for s in result.states.values())
    for device, state in sorted(result.states.items()):
        print(f"{device}: {state} {result.reasons.get(device, '')}".rstrip())
    if len(result.states) < args.expect:
        print(f"timed out: {len(result.states)} of {args.expect} device(s) finished", file=sys.stderr)
    print(f"sent {result.chunks_sent} chunks ({result.resent} resent) in {result.seconds:.1f} s",
          file=sys.stderr)
    return 0 if ok else 1


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

    ps = sub.add_parser("push", help="sign and push a model or firmware update, follow it to the end")
    target = ps.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="the one device it is for (signed as targets.devices)")
    target.add_argument("--group", help="the group it is for (signed as targets.groups)")
    ps.add_argument("--kind", choices=("model", "firmware"), required=True, help="what the file is")
    ps.add_argument("--name", required=True, help="the model's or firmware's name")
    ps.add_argument("--version", required=True, help="its version (devices refuse a downgrade)")
    add_signing_broker_args(ps)
    ps.add_argument("--job", help="job id (default: name-version-random)")
    ps.add_argument("--chunk-kb", type=positive_int, default=DEFAULT_CHUNK // 1024, help="chunk size in KiB")
    ps.add_argument("--expires-in", type=positive_duration, default="1d",
                    help="how long the signed manifest is valid (30s, 5m, 1h, 1d)")
    ps.add_argument("--timeout", type=positive_duration, default="1h",
                    help="give up following the status after this long")
    ps.add_argument("--expect", type=positive_int, default=1, help="devices that must finish (for --group)")
    ps.add_argument("--arch", action="append", default=[],
                    help="only devices of this CPU architecture (repeat for more)")
    ps.add_argument("--hardware", action="append", default=[],
                    help="only devices of this hardware (repeat for more)")
    ps.add_argument("--min-agent", metavar="VERSION",
                    help="only devices whose agent is at least this version")
    ps.add_argument("--pipeline", metavar="NAME",
                    help="a model for this pipeline (default: the device's pipeline serving --name)")
    ps.add_argument("--critical", action="store_true",
                    help="skip the gates the device lists as skippable (updates.gates.skippable)")
    ps.add_argument("--shadow", type=shadow_arg, metavar="N[:AGREEMENT]",
                    help="models: run the candidate beside the serving model on N live windows first and "
                         "promote it only if it agrees on at least AGREEMENT of them (default 0.95) and its "
                         "p99 latency is at most 1.5x; the figures are shown as they come")
    ps.add_argument("file", type=Path, help="the .tflite model or firmware file")
    ps.set_defaults(func=_cmd_push)
