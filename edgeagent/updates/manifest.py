"""Update manifests: strict parsing and every acceptance check, as pure functions.

Order matters: the signature is verified before anything else is trusted (and it must be over a
`type` that fits the topic), and every check runs before a single byte of the artifact is written to
disk or a buffer is sized from the manifest's numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeagent.core import audience, signing
from edgeagent.core.audience import Audience
from edgeagent.core.errors import ManifestRejected, SignatureInvalid
from edgeagent.core.shadow_spec import ShadowSpec, ShadowSpecError, parse_shadow

if TYPE_CHECKING:  # cryptography is imported on first use (core/signing.py)
    from edgeagent.core.signing import PublicKey

KINDS = ("model", "firmware")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
VERSION_RE = re.compile(r"^(\d{1,9})(?:\.(\d{1,9})){0,3}(?:-([A-Za-z0-9.]{1,32}))?\Z")
PIPELINE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}\Z")  # core.config_schema.PIPELINE_NAME_RE
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
# JSON integers every signer's language reads exactly (and RFC 8785 can sign): beyond this a size or
# a count could mean different numbers to the signer and to us
MAX_EXACT_INT = 2**53 - 1
# Below this a hostile manifest turns one artifact into a flood of tiny messages and per-chunk state;
# a single chunk (a small file) may be shorter.
MIN_CHUNK_SIZE = 4 * 1024
# Per-chunk state (received map, digests, request ranges) is held for every chunk of a job, and the
# manifest lists one sha256 per chunk: 12,288 chunks of the default 64 KiB carry 768 MiB (above the
# default 512 MiB artifact cap) in a manifest of about 830 KB, under updates.inputs.MAX_MANIFEST_BYTES.
# A larger count only serves a manifest built to make us allocate: use larger chunks instead.
MAX_CHUNKS = 12_288


@dataclass(frozen=True, slots=True)
class Manifest:
    job: str
    kind: str
    name: str
    version: str
    size: int
    sha256: str
    chunk_size: int
    chunks: int
    arch: tuple[str, ...] | None
    hardware: tuple[str, ...] | None
    audience: Audience
    chunk_sha256: tuple[str, ...]
    min_agent: str | None
    issued_at: float
    expires: float
    critical: bool
    key_id: str
    pipeline: str | None  # which pipeline's model (a model update); None: the one serving `name`
    digest: str  # sha256 of the signed body (legacy form): identifies "the same manifest"
    shadow: ShadowSpec | None = None  # judge the candidate on live windows before it serves

    def chunk_len(self, index: int) -> int:
        """The exact byte length of chunk `index` (only the last one may be short)."""
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunks - 1)


@dataclass(frozen=True, slots=True)
class Checks:
    """What the device knows when deciding whether a manifest applies to it."""

    now: float
    device_id: str
    groups: tuple[str, ...]
    arch: str
    hardware: str
    agent_version: str
    installed_version: str | None
    newest_issued_at: float | None  # of accepted manifests of this kind/name
    max_size: int
    max_chunk: int


VersionKey = tuple[tuple[int, ...], int, tuple[tuple[int, int, str], ...]]


def version_key(text: str) -> VersionKey:
    """A sortable key for "1.4.0", "1.4.0-rc1" (pre-releases sort below the release); ValueError else.
    Pre-release tags compare naturally, digit runs as numbers: rc2 < rc10, beta.2 < beta.10."""
    m = VERSION_RE.match(text)
    if not m:
        raise ValueError(f"invalid version {text!r} (expected digits and dots, e.g. 1.4.0)")
    main, _, pre = text.partition("-")
    nums = [int(x) for x in main.split(".")]
    nums += [0] * (4 - len(nums))
    tag = tuple((0, int(run), "") if run.isdigit() else (1, 0, run) for run in re.findall(r"\d+|\D+", pre))
    return tuple(nums), (0 if pre else 1), tag


def compare_versions(a: str, b: str) -> int:
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def digest_of(message: Mapping[str, Any]) -> str:
    """Identifies "the same manifest" in the journal. Deliberately the legacy form's bytes, so jobs
    journaled by the previous release keep their identity; surrogatepass, so any parsed JSON has one."""
    body = {k: v for k, v in message.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _get(msg: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in msg:
        raise ManifestRejected(f"manifest: missing field {key!r}")
    value = msg[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestRejected(f"manifest: {key} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise ManifestRejected(f"manifest: {key} must be {what}, got {type(value).__name__}")
    return value


def _str_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ManifestRejected(f"manifest: {key} must be a non-empty list of strings")
    return tuple(value)


def parse(msg: Mapping[str, Any]) -> Manifest:
    """The typed manifest; ManifestRejected naming the first field that is missing or wrong."""
    if msg.get("v") != 1:
        raise ManifestRejected(f"manifest: unsupported protocol version v={msg.get('v')!r}")
    job = _get(msg, "job", str, "a string")
    if not JOB_ID_RE.match(job):
        raise ManifestRejected(f"manifest: job id {job!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    kind = _get(msg, "kind", str, "a string")
    if kind not in KINDS:
        raise ManifestRejected(f"manifest: kind must be one of {', '.join(KINDS)}, got {kind!r}", job)
    name = _get(msg, "name", str, "a string")
    if not NAME_RE.match(name):
        raise ManifestRejected(f"manifest: invalid name {name!r}", job)
    version = _get(msg, "version", str, "a string")
    try:
        version_key(version)
    except ValueError as exc:
        raise ManifestRejected(f"manifest: {exc}", job) from None
    size, chunk_size, chunks = _sizes(msg, job)
    sha = _get(msg, "sha256", str, "a string")
    if not SHA256_RE.match(sha):
        raise ManifestRejected("manifest: sha256 must be 64 lowercase hex digits", job)
    arch = hardware = None
    targets = msg.get("targets")
    try:
        who = audience.parse(targets)
    except audience.AudienceError as exc:
        raise ManifestRejected(f"manifest: {exc}", job) from None
    if isinstance(targets, dict):
        if "arch" in targets:
            arch = _str_list(targets["arch"], "targets.arch")
        if "hardware" in targets:
            hardware = _str_list(targets["hardware"], "targets.hardware")
    if "chunk_sha256" not in msg:
        # each chunk is checked before it is written: without the list a forged chunk is only found
        # once the whole artifact has been stored (`edgeagent push` always fills it)
        raise ManifestRejected("manifest: missing field 'chunk_sha256' (the per-chunk sha256 list is "
                               "required)", job)
    raw = msg["chunk_sha256"]
    if not isinstance(raw, list) or len(raw) != chunks or not all(
            isinstance(h, str) and SHA256_RE.match(h) for h in raw):
        raise ManifestRejected(f"manifest: chunk_sha256 must list {chunks} sha256 hex digests", job)
    chunk_sha = tuple(raw)
    min_agent = None
    if "min_agent" in msg:
        min_agent = _get(msg, "min_agent", str, "a string")
        try:
            version_key(min_agent)
        except ValueError as exc:
            raise ManifestRejected(f"manifest: min_agent: {exc}", job) from None
    try:
        issued_at = float(_get(msg, "issued_at", (int, float), "a number"))
        expires = float(_get(msg, "expires", (int, float), "a number"))
    except OverflowError:
        raise ManifestRejected("manifest: issued_at and expires must be finite, non-negative times",
                               job) from None
    if not (math.isfinite(issued_at) and math.isfinite(expires) and issued_at >= 0):
        raise ManifestRejected("manifest: issued_at and expires must be finite, non-negative times", job)
    if expires <= issued_at:
        raise ManifestRejected("manifest: expires must be after issued_at", job)
    critical = msg.get("critical", False)
    if not isinstance(critical, bool):
        raise ManifestRejected("manifest: critical must be true or false", job)
    pipeline = None
    if "pipeline" in msg:
        pipeline = _get(msg, "pipeline", str, "a string")
        if not PIPELINE_RE.match(pipeline) or kind != "model":
            raise ManifestRejected(f"manifest: pipeline {pipeline[:80]!r} must be a pipeline name (letters, "
                                   "digits, '_') on a model update", job)
    shadow = None
    if "shadow" in msg:
        if kind != "model":
            raise ManifestRejected("manifest: shadow applies to model updates only", job)
        try:
            shadow = parse_shadow(msg["shadow"])
        except ShadowSpecError as exc:
            raise ManifestRejected(f"manifest: {exc}", job) from None
    sig = msg.get("sig")
    key_id = sig.get("key_id") if isinstance(sig, dict) else None
    return Manifest(job=job, kind=kind, name=name, version=version, size=size, sha256=sha,
                    chunk_size=chunk_size, chunks=chunks, arch=arch, hardware=hardware,
                    audience=who, chunk_sha256=chunk_sha, min_agent=min_agent, issued_at=issued_at,
                    expires=expires, critical=critical, key_id=key_id if isinstance(key_id, str) else "",
                    pipeline=pipeline, digest=digest_of(msg), shadow=shadow)


def _sizes(msg: Mapping[str, Any], job: str) -> tuple[int, int, int]:
    """size, chunk_size, chunks: exact integers, consistent, within what a device can hold."""
    size = _get(msg, "size", int, "an integer")
    chunk_size = _get(msg, "chunk_size", int, "an integer")
    chunks = _get(msg, "chunks", int, "an integer")
    for key, value in (("size", size), ("chunk_size", chunk_size), ("chunks", chunks)):
        if not 0 < value <= MAX_EXACT_INT:
            shown = str(value) if value < 10**20 else "a huge integer"
            raise ManifestRejected(f"manifest: {key} must be a positive integer up to 2^53-1, got {shown}",
                                   job)
    if chunks > MAX_CHUNKS:
        raise ManifestRejected(f"manifest: {chunks} chunks, at most {MAX_CHUNKS}", job)
    expected_chunks = -(-size // chunk_size)  # exact integer ceil: no float rounding
    if chunks != expected_chunks:
        raise ManifestRejected(f"manifest: size mismatch: {size} bytes in chunks of {chunk_size} is "
                               f"{expected_chunks} chunks, manifest says {chunks}", job)
    if chunks > 1 and chunk_size < MIN_CHUNK_SIZE:
        raise ManifestRejected(f"manifest: chunk_size {chunk_size} is below {MIN_CHUNK_SIZE} bytes "
                               f"(only a single-chunk artifact may be smaller)", job)
    return size, chunk_size, chunks


def verify(msg: Mapping[str, Any], trusted: Mapping[str, PublicKey]) -> Manifest:
    """Signature (over `"type": "manifest"`) first: nothing unsigned is even parsed further."""
    job = msg.get("job") if isinstance(msg.get("job"), str) else None
    try:
        signing.verify(msg, trusted, "manifest")
    except SignatureInvalid as exc:
        raise ManifestRejected(f"signature: {exc.reason}", job) from None
    return parse(msg)


def check(m: Manifest, c: Checks) -> None:
    """Every policy check on a verified manifest; ManifestRejected with the measured facts.
    The limits come first: nothing sized from the manifest is allocated before check() passes."""
    if m.size > c.max_size:
        raise ManifestRejected(f"artifact too large: {m.size} bytes > limit {c.max_size}", m.job)
    if m.chunk_size > c.max_chunk:
        raise ManifestRejected(f"chunk_size {m.chunk_size} > limit {c.max_chunk}", m.job)
    not_ours = audience.problem(m.audience, c.device_id, c.groups)
    if not_ours is not None:
        raise ManifestRejected(not_ours, m.job)
    if c.now >= m.expires:
        raise ManifestRejected(f"expired: expires {m.expires:.0f} <= now {c.now:.0f}", m.job)
    if m.issued_at > c.now + 300:
        raise ManifestRejected(f"issued_at {m.issued_at:.0f} is in the future (now {c.now:.0f})", m.job)
    if m.arch is not None and c.arch not in m.arch:
        raise ManifestRejected(f"wrong arch: device is {c.arch}, targets {','.join(m.arch)}", m.job)
    if m.hardware is not None and c.hardware not in m.hardware:
        raise ManifestRejected(f"wrong hardware: device is {c.hardware or '(unset)'}, "
                               f"targets {','.join(m.hardware)}", m.job)
    if m.min_agent is not None and compare_versions(m.min_agent, c.agent_version) > 0:
        raise ManifestRejected(f"needs agent >= {m.min_agent}, running {c.agent_version}", m.job)
    if c.installed_version is not None and compare_versions(m.version, c.installed_version) <= 0:
        raise ManifestRejected(f"rollback refused: version {m.version} is not above installed "
                               f"{c.installed_version}", m.job)
    if c.newest_issued_at is not None and m.issued_at < c.newest_issued_at:
        raise ManifestRejected(f"replay refused: issued_at {m.issued_at:.0f} is older than the newest "
                               f"accepted {m.kind} {m.name} manifest ({c.newest_issued_at:.0f})", m.job)


def verify_cancel(msg: Mapping[str, Any], job: str, trusted: Mapping[str, PublicKey],
                  device_id: str, groups: Sequence[str]) -> None:
    """A cancel must be signed over `"type": "cancel"` (a replayed manifest is not one), name the job
    of its topic, be meant for this device and say when it was issued."""
    try:
        signing.verify(msg, trusted, "cancel")
    except SignatureInvalid as exc:
        raise ManifestRejected(f"cancel signature: {exc.reason}", job) from None
    if msg.get("job") != job:
        named = msg.get("job")
        raise ManifestRejected(f"cancel names job {str(named)[:80]!r}, topic says {job!r}", job)
    try:
        not_ours = audience.problem(audience.parse(msg.get("targets")), device_id, groups)
    except audience.AudienceError as exc:
        raise ManifestRejected(f"cancel: {exc}", job) from None
    if not_ours is not None:
        raise ManifestRejected(f"cancel {not_ours}", job)
    issued_at = msg.get("issued_at")
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)) or not (
            0 <= issued_at <= MAX_EXACT_INT):
        raise ManifestRejected(f"cancel: issued_at must be a time in Unix seconds, got {issued_at!r}"[:160],
                               job)
