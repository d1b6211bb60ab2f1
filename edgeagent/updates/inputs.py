"""What arrives over MQTT for updates (manifests, chunks, cancels): checked, then handed to decide.py."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import TYPE_CHECKING

from edgeagent.core import audience, protocol
from edgeagent.core.errors import ChunkRejected, ManifestRejected, ProtocolError
from edgeagent.updates import decide as d
from edgeagent.updates import manifest
from edgeagent.updates.jobs import Job, JobFacts
from edgeagent.updates.transfer import Transfer
from edgeagent.updates.writer import ChunkWriter

if TYPE_CHECKING:
    from edgeagent.updates.component import UpdatesComponent

log = logging.getLogger("edgeagent.updates.component")

MAX_MANIFEST_BYTES = 1024 * 1024
# chunks handed to the writer thread and not written yet: past this the receive path waits (the
# router stops reading, the broker holds the rest); the request window keeps a real sender below it
MAX_WRITE_BACKLOG_BYTES = 4 * 1024 * 1024  # MAX_CHUNKS chunk digests (67 bytes each in JSON) fit
# a chunk index in a topic: ASCII digits only (str.isdigit() also takes "²" and "٣", int() then
# fails or reads them), at most 9 of them (no manifest has a billion chunks)
CHUNK_INDEX_RE = re.compile(r"[0-9]{1,9}")


class Inputs:
    """The router's handler for our updates topics (the device's and each group's)."""

    def __init__(self, comp: UpdatesComponent) -> None:
        self.comp = comp
        self.dropped_chunks = 0
        self.rejected_chunks = 0
        # the device topic and each group topic have their own worker: one manifest at a time, so
        # the same job id cannot be accepted twice (or twice differently)
        self._manifest_lock = asyncio.Lock()
        self.writer = ChunkWriter()  # chunk writes, off the loop, in order
        self._flush_timers: dict[str, asyncio.TimerHandle] = {}

    def close(self) -> None:
        for timer in self._flush_timers.values():
            timer.cancel()
        self._flush_timers.clear()
        self.writer.close()

    def refuse(self, key: str, message: str, data: dict[str, object] | None = None) -> None:
        """A refused message that belongs to no job: counted, one event per `key` per window."""
        self.comp.book.rejections.refuse("update", key, message, dict(data or {}))

    def split_topic(self, topic: str) -> tuple[str, str] | None:
        """(job, rest) for a topic under our device's or one of our groups' updates."""
        t = self.comp.live.topics
        groups = self.comp.live.config.device.groups
        bases = [f"{t.base}/updates/"] + [f"{t.prefix}/group/{g}/updates/" for g in groups]
        for base in bases:
            if topic.startswith(base):
                job, _, rest = topic[len(base):].partition("/")
                return job, rest
        return None

    async def on_message(self, topic: str, payload: bytes) -> None:
        try:
            split = self.split_topic(topic)
            if split is None:
                return
            job_id, rest = split
            if rest in ("status", "request"):
                return  # our own publications coming back
            if not manifest.JOB_ID_RE.fullmatch(job_id):
                self.refuse("topic", f"update message with an invalid job id: {topic[:200]!r}")
                return
            if rest == "manifest":
                async with self._manifest_lock:
                    await self.on_manifest(job_id, topic, payload)
            elif rest.startswith("chunk/"):
                await self.on_chunk(job_id, rest[6:], payload)
            elif rest == "cancel":
                await self.on_cancel(job_id, topic, payload)
            else:
                self.refuse("topic", f"update message on an unknown topic: {topic[:200]!r}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("update message handling failed", extra={"kv": {"topic": topic}})

    # ------------------------------------------------------------------ manifest
    def _examine(self, job_id: str, topic: str, payload: bytes,
                 ) -> tuple[d.ManifestReceived, dict[str, object] | None, manifest.Manifest | None]:
        """Parse, verify and check: each stage's problem, for decide.on_manifest to weigh."""
        if len(payload) > MAX_MANIFEST_BYTES:
            problem = f"manifest larger than {MAX_MANIFEST_BYTES} bytes"
            return d.ManifestReceived(parse_problem=problem), None, None
        try:
            msg = protocol.loads_object(topic, payload)
        except ProtocolError as exc:
            return d.ManifestReceived(parse_problem=f"manifest: {exc.reason}"), None, None
        if msg.get("job") != job_id:
            return d.ManifestReceived(parse_problem=f"manifest names job {msg.get('job')!r}, topic says "
                                                    f"{job_id!r}"), None, None
        digest = manifest.digest_of(msg)
        if job_id in self.comp.journal.jobs:  # known: only the digest matters (no need to verify again)
            return d.ManifestReceived(digest=digest), msg, None
        if self.comp.keys_error:
            problem = f"signature: {self.comp.keys_error}"
            return d.ManifestReceived(digest=digest, signature_problem=problem), msg, None
        try:
            m = manifest.verify(msg, self.comp.trusted)
        except ManifestRejected as exc:
            return d.ManifestReceived(digest=digest, signature_problem=exc.reason), msg, None
        device = self.comp.live.config.device
        not_ours = audience.problem(m.audience, device.id, device.groups)
        if not_ours is not None:
            return d.ManifestReceived(digest=digest, audience_problem=not_ours), msg, None
        try:
            manifest.check(m, self.comp.checks(m))
        except ManifestRejected as exc:
            return d.ManifestReceived(digest=digest, check_problem=exc.reason), msg, m
        return d.ManifestReceived(digest=digest), msg, m

    async def on_manifest(self, job_id: str, topic: str, payload: bytes) -> None:
        comp = self.comp
        existing = comp.journal.jobs.get(job_id)
        event, msg, m = self._examine(job_id, topic, payload)
        facts = JobFacts.of(existing) if existing is not None else None
        for decision in d.decide(facts, event):
            if isinstance(decision, d.Refuse):
                comp.book.refuse(job_id, _refusal_key(event, existing), decision.reason, existing)
            elif isinstance(decision, d.Republish) and existing is not None:
                log.info("manifest for known job %s received again: no-op", job_id)
                comp.book.publish(existing)
                ev = comp.chunk_events.get(job_id)
                if ev is not None:
                    ev.set()
            elif isinstance(decision, (d.Reject, d.Accept)) and m is not None and msg is not None:
                job = Job(job=m.job, kind=m.kind, name=m.name, version=m.version, digest=m.digest,
                          manifest=dict(msg))
                if isinstance(decision, d.Reject):
                    # signed by a trusted key: remember it, so a replay of it is recognised as a no-op
                    job.state, job.reason = "rejected", decision.reason
                    await comp.book.add(job)
                else:
                    await comp.book.add(job, (f"{m.kind}/{m.name}", m.issued_at))
                    comp.start(job)

    # ------------------------------------------------------------------ chunks
    def take(self, topic: str, payload: bytes) -> bool:
        """The router's express lane: a chunk goes to the writer thread as paho reads it (no queue,
        no task wake-up per chunk). Declines anything but a chunk, and a chunk while the writer's
        backlog is full: that one waits in the queue and reaches `on_chunk`."""
        parts = self.split_topic(topic)
        if parts is None or not parts[1].startswith("chunk/"):
            return False
        if self._full(len(payload)):
            return False
        transfer = self._transfer_for(parts[0], parts[1][6:])
        if transfer is not None:
            self._submit(parts[0], transfer, int(parts[1][6:]), payload)
        return True

    async def on_chunk(self, job_id: str, index_text: str, data: bytes) -> None:
        """Write a chunk of a running transfer; anything else is dropped and counted. A chunk that
        fails its check never reaches the disk and stays missing, so it is asked for again and the
        genuine one is taken when it comes."""
        transfer = self._transfer_for(job_id, index_text)
        if transfer is None:
            return
        # hand the chunk to the writer thread (validate, pwrite, running sha256) without waiting for
        # it: the next chunk is read meanwhile; only a backlog past the byte bound makes us wait
        while self._full(len(data)):
            await self.writer.progress()
        self._submit(job_id, transfer, int(index_text), data)

    def _transfer_for(self, job_id: str, index_text: str) -> Transfer | None:
        """The running transfer a chunk belongs to; None (counted, maybe refused) for anything else."""
        if not CHUNK_INDEX_RE.fullmatch(index_text):
            self.rejected_chunks += 1
            self.refuse("chunk-topic", f"chunk index {index_text[:40]!r} of job {job_id} is not a number "
                                       f"(1-9 ASCII digits)", {"job": job_id})
            return None
        transfer = self.comp.transfers.get(job_id)
        if transfer is None:
            self.dropped_chunks += 1
            if job_id not in self.comp.journal.jobs:  # a known job's: other devices' requests, late
                self.refuse("orphan-chunk", f"chunk for unknown job {job_id}", {"job": job_id})
        return transfer

    def _full(self, size: int) -> bool:
        """The writer's backlog has no room for `size` more bytes (one chunk always fits)."""
        return self.writer.backlog > 0 and self.writer.backlog_bytes + size > MAX_WRITE_BACKLOG_BYTES

    def _submit(self, job_id: str, transfer: Transfer, index: int, data: bytes) -> None:
        self.writer.submit(functools.partial(transfer.write, index, data), len(data),
                           functools.partial(self._written, job_id))

    def _written(self, job_id: str, new: bool, error: BaseException | None) -> None:
        """On the loop, once the writer thread is done with a chunk."""
        if isinstance(error, ChunkRejected):
            self.rejected_chunks += 1
            self._chunk_problem(job_id, str(error))
            return
        if error is not None:
            log.error("chunk write failed", exc_info=error, extra={"kv": {"job": job_id}})
            return
        if new:
            transfer = self.comp.transfers.get(job_id)
            if transfer is not None and transfer.dirty and job_id not in self._flush_timers:
                # the bitmap of the last chunks of a burst is persisted soon, not at the next chunk
                self._flush_timers[job_id] = asyncio.get_running_loop().call_later(
                    transfer.persist_every_s, self._flush, job_id, transfer)
            ev = self.comp.chunk_events.get(job_id)
            if ev is not None:
                ev.set()

    def _flush(self, job_id: str, transfer: Transfer) -> None:
        self._flush_timers.pop(job_id, None)
        if transfer.dirty:
            self.writer.submit(transfer.flush)

    def _chunk_problem(self, job_id: str, reason: str) -> None:
        job = self.comp.journal.jobs.get(job_id)
        if job is not None:
            self.comp.book.note(job, "bad-chunk", f"chunk dropped: {reason}")
        else:
            self.refuse("bad-chunk", f"chunk dropped: {reason}", {"job": job_id})

    # ------------------------------------------------------------------ cancel
    async def on_cancel(self, job_id: str, topic: str, payload: bytes) -> None:
        comp = self.comp
        problem = ""
        try:
            msg = protocol.loads_object(topic, payload)
            device = comp.live.config.device
            manifest.verify_cancel(msg, job_id, comp.trusted, device.id, device.groups)
        except (ProtocolError, ManifestRejected) as exc:
            problem = str(exc)
        job = comp.journal.jobs.get(job_id)
        facts = JobFacts.of(job) if job is not None else None
        for decision in d.decide(facts, d.CancelRequested(problem)):
            if isinstance(decision, d.Refuse):
                self.refuse("cancel", f"cancel of {job_id} refused: {decision.reason}", {"job": job_id})
            elif isinstance(decision, d.Ignore) and job is not None and not job.final:
                log.warning("cancel of job %s ignored: already %s", job_id, job.state)
                comp.outbox.emit_event("update", "warning", f"cancel of {job_id} too late: {job.state}",
                                       {"job": job_id})
            elif isinstance(decision, d.StopJob):
                await comp.stop_job(job_id)
            elif isinstance(decision, d.Finish) and job is not None:
                await comp.book.transition(job, decision.state, decision.reason)
                await comp.book.cleanup(job)


def _refusal_key(event: d.ManifestReceived, existing: Job | None) -> str:
    """The Rejections reason of a refused manifest: which check it failed (stable, short)."""
    if event.parse_problem:
        return "manifest-malformed"
    if existing is not None:
        return "manifest-reused"
    if event.signature_problem:
        return "manifest-signature"
    if event.audience_problem:
        return "manifest-audience"
    return "manifest"
