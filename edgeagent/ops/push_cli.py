"""`edgeagent push FILE` and `edgeagent push cancel JOB`: the operator's update verbs.

push: check locally what every device would refuse (name, version, a model's TFLite header and
input shape), find the targets from their retained status (an unknown device is said so at once;
a group is every device listing it), compare with what each runs, then sign, send and serve the
update on a persistent session (ops/push_session.py), printing each device's outcome as it happens
and a final table. Exit status 0 only when every device succeeded.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from edgeagent.core import signing
from edgeagent.core.cli_args import positive_duration, positive_int
from edgeagent.core.errors import EdgeAgentError
from edgeagent.core.units import parse_duration_s
from edgeagent.ops.args import add_signing_broker_args
from edgeagent.ops.push import DEFAULT_CHUNK, Pusher, PushResult, _load_key, build_manifest
from edgeagent.ops.push import add_parsers as add_keygen_sign
from edgeagent.ops.push_checks import (
    ModelFacts,
    PushCheckFailed,
    against_device,
    check_job,
    check_name_version,
    model_facts,
)
from edgeagent.ops.push_devices import Roster, UnknownTarget, describe, online
from edgeagent.ops.push_report import Reporter, outcome, table
from edgeagent.ops.push_shadow import shadow_arg

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

USAGE = """%(prog)s (--device D | --group G) --kind KIND --name NAME --version VERSION
                      --key KEY --key-id ID [options] FILE
       %(prog)s cancel JOB (--device D | --group G) --key KEY --key-id ID [--timeout T]"""
DESCRIPTION = """\
push FILE: check the file, find the devices from their retained status, sign, send, report each
device's outcome as it happens (stderr), then a table (stdout).
push cancel JOB: sign and send a cancel, print each device's answer."""
EPILOG = """\
examples:
  edgeagent push --device pi-07 --kind model --name vibration-anomaly --version 1.4.0 \\
      --key ops.key --key-id ops model.tflite
  edgeagent push --group line3 --kind firmware --name rootfs --version 2.1.0 \\
      --key ops.key --key-id ops --timeout 2h rootfs.img
  edgeagent push cancel vibration-anomaly-1.4.0-1a2b3c4d --device pi-07 --key ops.key --key-id ops

exit status: 0 every device succeeded (push) or cancelled the job (cancel); 1 any other outcome,
an unknown device or group, a broker that cannot be reached; 2 usage, or a file every device
would refuse (nothing was sent).
"""


def _usage(message: str) -> int:
    print(f"edgeagent push: {message}", file=sys.stderr)
    return EXIT_USAGE


def _connect(args: argparse.Namespace, role: str, job: str, ttl_s: float) -> Any:
    from edgeagent.ops.fleet.connect import BrokerUrl
    from edgeagent.ops.push_session import job_client_id, open_session

    url = BrokerUrl.parse(args.broker, args.ca_file, args.cert_file, args.key_file)
    return open_session(url, job_client_id(role, job), int(ttl_s) + 60)


def _cmd_push(args: argparse.Namespace) -> int:
    what: list[str] = args.what
    if what[0] == "cancel":
        if len(what) != 2:
            return _usage("usage: edgeagent push cancel JOB (--device D | --group G) --key K --key-id ID")
        return _cmd_cancel(args, what[1])
    if len(what) != 1:
        return _usage(f"one file to push, got {len(what)} arguments ({' '.join(what)})")
    missing = [f"--{k}" for k in ("kind", "name", "version") if getattr(args, k) is None]
    if missing:
        return _usage(f"pushing a file needs {', '.join(missing)}")
    path = Path(what[0])
    if not path.is_file():
        return _usage(f"{path}: no such file")
    # the default job id fits the 64 characters devices accept, however long the name
    job = args.job or f"{args.name}-{args.version}"[:55] + f"-{uuid.uuid4().hex[:8]}"
    try:
        check_name_version(args.name, args.version)
        check_job(job)
        facts = model_facts(path) if args.kind == "model" else None
    except (PushCheckFailed, OSError) as exc:
        return _usage(f"not sent: {exc}")
    key = _load_key(args)
    if key is None:
        return EXIT_USAGE
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
    except (ValueError, OSError) as exc:
        return _usage(f"not sent: {exc}")
    try:
        client = _connect(args, "push", job, ttl)
    except (EdgeAgentError, ConnectionError, OSError) as exc:
        print(f"edgeagent push: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    from edgeagent.ops.push_session import close_session

    try:
        return _push(args, client, path, signed, facts)
    finally:
        close_session(client)


def _push(args: argparse.Namespace, client: Any, path: Path, signed: dict[str, Any],
          facts: ModelFacts | None) -> int:
    from edgeagent.ops.push_session import serve

    roster = Roster(client, args.prefix, args.device)
    roster.load()
    try:
        targets = roster.targets(args.device, args.group)
    except UnknownTarget as exc:
        print(f"edgeagent push: not sent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    reporter = Reporter()
    refused: dict[str, list[str]] = {}
    notes: set[str] = set()
    for device, doc in sorted(targets.items()):
        problems, said = against_device(args.kind, args.name, args.version, doc, facts)
        notes.update(said)
        if problems:
            refused[device] = problems
    if args.device and refused:
        for problem in refused[args.device]:
            print(f"edgeagent push: not sent: {args.device} {problem}", file=sys.stderr)
        return EXIT_FAILURE
    what = f"device {args.device}" if args.device else f"group {args.group} ({len(targets)} devices)"
    reporter.note(f"job {signed['job']}: {args.kind} {args.name} {args.version}, {signed['size']} bytes in "
                  f"{signed['chunks']} chunks -> {what}")
    for note in sorted(notes):
        reporter.note(f"checked: {note}")
    for device, doc in sorted(targets.items()):
        extra = "" if online(doc) else ": the job waits in its broker session until it reconnects"
        reporter.note(f"{device}: {describe(doc)}{extra}")
        for problem in refused.get(device, []):
            reporter.note(f"{device}: will refuse it: {problem}")
    def presence(device: str, doc: dict[str, Any]) -> None:
        if device in targets:  # a group push hears every device's status; only members are news
            reporter.presence(device, doc, describe(doc))

    roster.on_change = presence
    try:
        result = serve(client, lambda: Pusher(client, args.prefix, signed, path, device=args.device,
                                              group=args.group, expect=args.expect, on_status=reporter.status,
                                              devices=targets.keys(), reachable=roster.is_online),
                       parse_duration_s(args.timeout or "1h"))
    finally:
        reporter.close()
    return _report(targets.keys(), roster.snapshot(), result)


def _report(targets: Any, presence: dict[str, dict[str, Any]], result: PushResult) -> int:
    devices = sorted(set(targets) | result.last.keys())
    rows = [(d, *outcome(result.last.get(d), presence.get(d))) for d in devices]
    print(table(rows))
    pending = [d for d in devices if result.last.get(d, {}).get("state") not in
               ("succeeded", "failed", "rolled_back", "rejected", "cancelled")]
    deferred = [d for d in pending if result.last.get(d, {}).get("state") == "deferred"]
    if pending:
        why = (f"; {len(deferred)} deferred: the device keeps the job and installs it when its gates "
               f"open" if deferred else "")
        print(f"deadline reached: {len(pending)} of {len(devices)} device(s) not finished{why}",
              file=sys.stderr)
    print(f"sent {result.chunks_sent} chunks ({result.resent} resent) in {result.seconds:.1f} s",
          file=sys.stderr)
    ok = bool(devices) and all(result.states.get(d) == "succeeded" for d in devices)
    return EXIT_OK if ok else EXIT_FAILURE


def _cmd_cancel(args: argparse.Namespace, job: str) -> int:
    from edgeagent.ops.push_cancel import CancelWatch, cancel_message
    from edgeagent.ops.push_session import close_session

    try:
        check_job(job)
    except PushCheckFailed as exc:
        return _usage(str(exc))
    key = _load_key(args)
    if key is None:
        return EXIT_USAGE
    try:
        client = _connect(args, "cancel", job, 300)
    except (EdgeAgentError, ConnectionError, OSError) as exc:
        print(f"edgeagent push cancel: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        roster = Roster(client, args.prefix, args.device)
        roster.load()
        try:
            targets = roster.targets(args.device, args.group)
        except UnknownTarget as exc:
            print(f"edgeagent push cancel: not sent: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        watch = CancelWatch(client, args.prefix, job, sorted(targets))
        watch.on_answer = lambda device, text: print(f"{device}: {text}", file=sys.stderr, flush=True)
        watch.load()
        watch.send(cancel_message(job, key, args.key_id, args.device, args.group), targets)
        watch.wait(parse_duration_s(args.timeout or "30s"))
        watch.close()
    finally:
        close_session(client)
    answers = list(watch.answers.values())
    print(table([(a.device, "cancelled" if a.ok else "not cancelled", a.text) for a in answers]))
    return EXIT_OK if answers and all(a.ok for a in answers) else EXIT_FAILURE


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`keygen`, `sign` (ops/push.py) and `push` on the CLI's subparsers."""
    add_keygen_sign(sub)
    ps = sub.add_parser("push", help="check, sign and push a model or firmware update and follow each device "
                                     "to the end; or cancel a job (push cancel JOB)",
                        usage=USAGE, description=DESCRIPTION,
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ps.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="the one device it is for (signed as targets.devices)")
    target.add_argument("--group",
                        help="every device whose status lists this group (signed as targets.groups)")
    ps.add_argument("--kind", choices=("model", "firmware"),
                    help="what the file is (required to push a file)")
    ps.add_argument("--name", help="the model's or firmware's name (required to push a file)")
    ps.add_argument("--version", help="its version (required to push a file; devices refuse a downgrade)")
    add_signing_broker_args(ps)
    ps.add_argument("--job", help="job id (default: name-version-random)")
    ps.add_argument("--chunk-kb", type=positive_int, default=DEFAULT_CHUNK // 1024,
                    help="chunk size in KiB (default: %(default)s)")
    ps.add_argument("--expires-in", type=positive_duration, default="1d",
                    help="how long the signed manifest is valid: 30s, 5m, 1h, 1d (default: %(default)s)")
    ps.add_argument("--timeout", type=positive_duration,
                    help="stop following after this long (default: 1h; push cancel: 30s)")
    ps.add_argument("--expect", type=positive_int, default=1,
                    help="at least this many devices must finish (default: %(default)s; a group's members "
                         "come from their retained status)")
    ps.add_argument("--arch", action="append", default=[],
                    help="only devices of this CPU architecture (repeat for more)")
    ps.add_argument("--hardware", action="append", default=[],
                    help="only devices of this hardware (repeat for more)")
    ps.add_argument("--min-agent", metavar="VERSION",
                    help="only devices whose agent is at least this version")
    ps.add_argument("--critical", action="store_true",
                    help="skip the gates the device lists as skippable (updates.gates.skippable)")
    ps.add_argument("--pipeline", metavar="NAME",
                    help="a model for this pipeline (default: the device's pipeline serving --name)")
    ps.add_argument("--shadow", type=shadow_arg, metavar="N[:AGREEMENT]",
                    help="models: run the candidate beside the serving model on N live windows first and "
                         "promote it only if it agrees on at least AGREEMENT of them (default 0.95) and its "
                         "p99 latency is at most 1.5x; the figures are shown as they come")
    ps.add_argument("what", nargs="+", metavar="FILE | cancel JOB",
                    help="the .tflite model (or .tar.gz bundle) or firmware file; or `cancel JOB`")
    ps.set_defaults(func=_cmd_push)
