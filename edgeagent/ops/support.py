"""Operator tools: `edgeagent support pull` and `edgeagent support log-level`.

`pull` signs a support request for a device (`P/D/support/J/request`, type "support"), follows the
transfer (manifest, then chunks, with a progress line), checks size and sha256 and writes the file
atomically; `--group G --devices a,b` pulls from each of those devices into a folder. `log-level`
signs a request that raises a device's log level for a while. The device answers on the retained
`P/D/support/J/status`; a refusal there (or none at all) is reported with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
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
from edgeagent.core.units import parse_duration_s
from edgeagent.ops.args import add_signing_broker_args

DEFAULT_LINES = 500
REQUEST_TTL_S = 600.0
MAX_BUFFERED_CHUNKS = 1024  # chunks that arrive before their manifest (should not happen: bounded anyway)
_CHUNK_RE = re.compile(r"chunk/([0-9]{1,9})$")


def build_request(job: str, action: str, *, device: str, group: str | None = None, lines: int | None = None,
                  level: str | None = None, duration_s: float | None = None, ttl_s: float = REQUEST_TTL_S,
                  issued_at: float | None = None) -> dict[str, Any]:
    """An unsigned support request for one device (signed `targets.devices=[device]`)."""
    now = issued_at if issued_at is not None else time.time()
    targets: dict[str, list[str]] = {"devices": [device]}
    if group:
        targets["groups"] = [group]
    m: dict[str, Any] = {"v": 1, "type": "support", "job": job, "action": action, "issued_at": now,
                         "expires": now + ttl_s, "targets": targets}
    if action == "bundle":
        m["lines"] = DEFAULT_LINES if lines is None else lines
    else:
        m["level"] = level
        m["duration_s"] = duration_s
    return m


class PullFailed(EdgeAgentError):
    def __init__(self, device: str, job: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.job = job
        self.reason = reason


@dataclass
class PullResult:
    path: Path
    size: int
    sha256: str
    seconds: float
    omitted: list[str] = field(default_factory=list)


class Follower:
    """Follows one support job of one device on a paho client: status, manifest and chunks."""

    def __init__(self, client: Any, prefix: str, device: str, job: str,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        self.client = client
        self.device = device
        self.job = job
        self.base = f"{prefix}/{device}/support/{job}"
        self.on_progress = on_progress
        self._cv = threading.Condition()
        self.status: dict[str, Any] = {}
        self.manifest: dict[str, Any] | None = None
        self.chunks: dict[int, bytes] = {}
        self.received = 0
        self.last_activity = time.monotonic()
        self.subscribed = threading.Event()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        topic = str(msg.topic)
        if not topic.startswith(self.base + "/"):
            return
        leaf = topic[len(self.base) + 1:]
        with self._cv:
            self.last_activity = time.monotonic()
            if leaf in ("status", "manifest"):
                try:
                    doc = json.loads(msg.payload)
                except ValueError:
                    return
                if isinstance(doc, dict) and doc.get("job") == self.job:
                    if leaf == "status":
                        self.status = doc
                    else:
                        self.manifest = doc
            elif (m := _CHUNK_RE.fullmatch(leaf)) is not None:
                i = int(m.group(1))
                if i not in self.chunks and len(self.chunks) < MAX_BUFFERED_CHUNKS + self._expected():
                    self.chunks[i] = bytes(msg.payload)
                    self.received += len(msg.payload)
            self._cv.notify_all()
        if self.on_progress is not None and self.manifest is not None:
            self.on_progress(self.received, int(self.manifest.get("size", 0)))

    def _expected(self) -> int:
        return int(self.manifest["chunks"]) if self.manifest is not None else 0

    def start(self) -> None:
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.subscribe(f"{self.base}/#", qos=1)
        if not self.subscribed.wait(10):
            raise ConnectionError("the broker did not acknowledge the subscription")

    def wait(self, done: Callable[[], bool], idle_timeout_s: float) -> None:
        """Until `done()` (checked under the lock) or a refusal; PullFailed after `idle_timeout_s`
        without a message from the device."""
        with self._cv:
            while not done():
                state = self.status.get("state")
                if state in ("refused", "failed"):
                    raise PullFailed(self.device, self.job, f"{state}: {self.status.get('reason', '')}")
                idle = time.monotonic() - self.last_activity
                if idle >= idle_timeout_s:
                    said = f" (last status: {state})" if state else " (no answer: offline, or not running?)"
                    raise PullFailed(self.device, self.job, f"nothing from the device for {idle:.0f} s{said}")
                self._cv.wait(min(1.0, idle_timeout_s - idle))

    def complete(self) -> bool:
        return self.manifest is not None and len(self.chunks) >= self._expected() and all(
            i in self.chunks for i in range(self._expected()))


def write_verified(follower: Follower, out: Path) -> tuple[int, str]:
    """Join the chunks, check size and sha256 against the manifest, write `out` atomically."""
    m = follower.manifest
    assert m is not None
    digest = hashlib.sha256()
    size = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for i in range(int(m["chunks"])):
                data = follower.chunks[i]
                digest.update(data)
                size += len(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if size != m.get("size") or digest.hexdigest() != m.get("sha256"):
            raise PullFailed(follower.device, follower.job,
                             f"bundle does not match its manifest: {size} bytes sha256 {digest.hexdigest()}, "
                             f"manifest says {m.get('size')} bytes sha256 {m.get('sha256')}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


def pull(client: Any, prefix: str, signed: dict[str, Any], device: str, out: Path, idle_timeout_s: float,
         on_progress: Callable[[int, int], None] | None = None) -> PullResult:
    """Publish a signed bundle request and follow it to a verified file at `out`."""
    t0 = time.monotonic()
    follower = Follower(client, prefix, device, signed["job"], on_progress)
    follower.start()
    client.publish(f"{follower.base}/request", protocol.dumps(signed), qos=1).wait_for_publish(30)
    follower.last_activity = time.monotonic()
    follower.wait(follower.complete, idle_timeout_s)
    size, sha = write_verified(follower, out)
    omitted = [f"{o.get('name')} ({o.get('reason')})" if isinstance(o, dict) else str(o)
               for o in (follower.manifest or {}).get("omitted") or []]
    return PullResult(out, size, sha, time.monotonic() - t0, omitted)


def request_log_level(client: Any, prefix: str, signed: dict[str, Any], device: str,
                      timeout_s: float) -> dict[str, Any]:
    """Publish a signed log-level request; the device's status once it is final."""
    follower = Follower(client, prefix, device, signed["job"])
    follower.start()
    client.publish(f"{follower.base}/request", protocol.dumps(signed), qos=1).wait_for_publish(30)
    follower.last_activity = time.monotonic()
    follower.wait(lambda: follower.status.get("state") == "done", timeout_s)
    return follower.status


# ----------------------------------------------------------------------------- commands


def _progress(device: str) -> Callable[[int, int], None]:
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(received: int, size: int) -> None:
        now = time.monotonic()
        if not tty and now - last[0] < 2.0 and received < size:
            return
        last[0] = now
        p = received / size if size else 0.0
        line = (f"{device}: [{'#' * int(p * 30):<30}] {p * 100:5.1f}% "
                f"{received / 1024:.0f}/{size / 1024:.0f} KiB")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


def _connect(args: argparse.Namespace, job: str) -> Any:
    from edgeagent.ops.fleet.connect import BrokerUrl, connect_and_wait, make_client

    url = BrokerUrl.parse(args.broker, args.ca_file, args.cert_file, args.key_file)
    client = make_client(url, f"edgeagent-support-{job}"[:64])
    connect_and_wait(client, url, keepalive_s=30)
    return client


def _load_key(path: str) -> Any:
    try:
        return signing.load_private_key(Path(path))
    except (OSError, ConfigError) as exc:
        print(f"cannot load key {path}: {exc}", file=sys.stderr)
        return None


def _new_job(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _cmd_pull(args: argparse.Namespace) -> int:
    key = _load_key(args.key)
    if key is None:
        return 2
    if args.group and not args.devices:
        print("--group needs --devices a,b,c (the retained status does not carry a device's groups)",
              file=sys.stderr)
        return 2
    devices = [d for d in (args.devices or "").split(",") if d] if args.group else [args.device]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    folder = Path(args.output or f"support-{args.group}-{stamp}") if args.group else None
    idle_s = parse_duration_s(args.timeout)
    failed = 0
    for device in devices:
        job = _new_job("pull")
        out = (folder / f"{device}.tar.gz" if folder is not None
               else Path(args.output or f"support-{device}-{stamp}.tar.gz"))
        try:
            unsigned = build_request(job, "bundle", device=device, group=args.group, lines=args.lines,
                                     ttl_s=parse_duration_s(args.expires_in))
            signed = signing.sign(unsigned, key, args.key_id)
            client = _connect(args, job)
        except (EdgeAgentError, ConnectionError, ValueError, OSError) as exc:
            print(f"support pull: {exc}", file=sys.stderr)
            return 2
        print(f"job {job}: support bundle from {device}", file=sys.stderr)
        try:
            result = pull(client, args.prefix, signed, device, out, idle_s, _progress(device))
        except (PullFailed, ConnectionError, OSError) as exc:
            if sys.stderr.isatty():
                print(file=sys.stderr)
            print(f"{device}: failed: {exc}", file=sys.stderr)
            failed += 1
            continue
        finally:
            client.disconnect()
            client.loop_stop()
        if sys.stderr.isatty():
            print(file=sys.stderr)
        left = f" (left out: {', '.join(result.omitted)})" if result.omitted else ""
        print(f"{device}: {result.path} {result.size} bytes sha256 {result.sha256} "
              f"in {result.seconds:.1f} s{left}")
    return 1 if failed else 0


def _cmd_log_level(args: argparse.Namespace) -> int:
    key = _load_key(args.key)
    if key is None:
        return 2
    job = _new_job("loglevel")
    try:
        duration_s = parse_duration_s(args.duration)
        signed = signing.sign(build_request(job, "log_level", device=args.device, level=args.level.upper(),
                                            duration_s=duration_s), key, args.key_id)
        client = _connect(args, job)
    except (EdgeAgentError, ConnectionError, ValueError, OSError) as exc:
        print(f"support log-level: {exc}", file=sys.stderr)
        return 2
    try:
        status = request_log_level(client, args.prefix, signed, args.device, parse_duration_s(args.timeout))
    except (PullFailed, ConnectionError) as exc:
        print(f"{args.device}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.disconnect()
        client.loop_stop()
    until = status.get("until")
    when = time.strftime("%H:%M:%S", time.localtime(until)) if isinstance(until, (int, float)) else "?"
    print(f"{args.device}: log level {status.get('level')} until {when} ({status.get('reason', '')})")
    return 0


def _support_subcommands(sub: argparse._SubParsersAction[Any]) -> argparse._SubParsersAction[Any]:
    """The `support` verb's subcommands, shared with the device's own `support bundle` when present."""
    parser: argparse.ArgumentParser | None = sub.choices.get("support")
    if parser is None:
        parser = sub.add_parser("support", help="remote diagnostics: support bundles, log level on request")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    inner = parser.add_subparsers(dest="support_command", metavar="SUBCOMMAND")
    inner.required = True
    return inner


def _broker_args(p: argparse.ArgumentParser) -> None:
    add_signing_broker_args(p)
    p.add_argument("--timeout", type=positive_duration, default="2m",
                   help="give up after this long without a word from the device (30s, 5m, 1h)")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    inner = _support_subcommands(sub)
    pl = inner.add_parser("pull", help="pull a support bundle from a device over MQTT (signed request)")
    target = pl.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="the device to pull from (signed as targets.devices)")
    target.add_argument("--group", help="pull from each of --devices (signed for the group) into a folder")
    pl.add_argument("--devices", help="comma-separated device ids of the group")
    pl.add_argument("--lines", type=positive_int,
                    help=f"recent log lines to include (default {DEFAULT_LINES})")
    pl.add_argument("-o", "--output", help="file (one device) or folder (--group) to write")
    pl.add_argument("--expires-in", type=positive_duration, default="10m",
                    help="how long the signed request is valid")
    _broker_args(pl)
    pl.set_defaults(func=_cmd_pull)

    ll = inner.add_parser("log-level", help="raise a device's log level for a while (signed request)")
    ll.add_argument("--device", required=True, help="the device to ask")
    ll.add_argument("--level", required=True, type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    help="the log level to set (any case)")
    ll.add_argument("--for", dest="duration", type=positive_duration, default="10m",
                    help="how long (the device caps it)")
    _broker_args(ll)
    ll.set_defaults(func=_cmd_log_level)
