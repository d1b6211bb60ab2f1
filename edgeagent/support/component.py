"""The support component: serves signed requests on `P/D/support/J/request` (request.py decides).

`bundle`: the bundle is built off the event loop, then its manifest and chunks are published
straight through the MQTT session (not the spool: a bundle is MiBs and must not queue ahead of
telemetry), paced to `support.rate_kbps` and one QoS 1 chunk in flight, so telemetry keeps its rate.
`log_level`: the root log level is raised for a bounded time, then put back.
Every refusal is counted and reported through `Rejections` (one event per reason per minute); only
the first refusal of a reason in a window gets a retained `refused` status, so forged input is
never amplified into a stream of retained messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from edgeagent.core import logs, signing
from edgeagent.core.backoff import backoff_s
from edgeagent.core.errors import ConfigError, EdgeAgentError
from edgeagent.core.live import LiveConfig, Outbox, Router
from edgeagent.core.protocol import dumps
from edgeagent.core.rejections import Rejections
from edgeagent.core.tasks import cancel_and_wait, wait_event
from edgeagent.support import request as rq
from edgeagent.support.bundle import build_bundle

if TYPE_CHECKING:  # cryptography is imported on first use (core/signing.py)
    from edgeagent.core.signing import PublicKey

log = logging.getLogger(__name__)

MB = 1024 * 1024
FLUSH_S = 5.0  # how often the loop sends the counts of refusals whose window has passed
SEND_DEADLINE_S = 600.0  # a transfer that cannot publish for this long (broker away) fails
PROGRESS_EVERY_S = 2.0  # retained `sending` status at most this often
PUBLISH_TIMEOUT_S = 30.0


class DirectPublisher(Protocol):
    """The session's straight publish (transport/session.py `Session.publish_now`)."""

    async def publish_now(self, topic: str, payload: bytes, timeout_s: float = ...) -> None: ...


class SendFailed(EdgeAgentError):
    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"{topic}: {reason}")
        self.topic = topic
        self.reason = reason


class Pacer:
    """Token-bucket pacing of a byte stream: how long to wait before sending `n` more bytes so that
    the average stays at `rate_bps` (the first send goes at once)."""

    def __init__(self, rate_bps: float, now: float) -> None:
        self.rate_bps = rate_bps
        self._next = now

    def delay(self, nbytes: int, now: float) -> float:
        start = max(now, self._next)
        self._next = start + nbytes / self.rate_bps
        return start - now


def _read_chunk(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


class SupportComponent:
    """`session()` gives the connected session (None offline); `log_lines(n)` the last n log lines."""

    name = "support"

    def __init__(self, live: LiveConfig, outbox: Outbox, router: Router,
                 session: Callable[[], DirectPublisher | None],
                 log_lines: Callable[[int], Sequence[str]] = lambda n: [], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.live = live
        self.outbox = outbox
        self.router = router
        self.session = session
        self.log_lines = log_lines
        self.clock = clock
        self.dir = Path(live.config.device.state_dir) / "support"
        self.seen = rq.Seen(self.dir / "seen.json")
        self.rejections = Rejections(outbox)
        self.trusted: dict[str, PublicKey] = {}
        self._job: asyncio.Task[None] | None = None
        self._job_id = ""
        self._level_task: asyncio.Task[None] | None = None
        self._restore_level: str | None = None
        self._level_until: float | None = None
        self._wake = asyncio.Event()
        self._save_lock = asyncio.Lock()  # seen.json writes land in the order they were made
        self.served = 0
        self.sent_bytes = 0

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> SupportComponent:
        cfg = self.live.config
        if not cfg.support.enabled:
            log.info("support requests disabled (support.enabled = false): not subscribing")
            return self
        try:
            self.trusted = signing.load_trusted_keys(cfg.updates.trusted_keys)
        except ConfigError as exc:
            log.error("support: trusted keys unusable, every request will be refused: %s",
                      "; ".join(exc.errors))
        await asyncio.to_thread(self._prepare_dir)
        self.router.subscribe(self.live.topics.support_filter, self.on_message)
        return self

    def _prepare_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tar.gz"):  # a transfer cut short by a stop or a crash
            stale.unlink(missing_ok=True)
        self.seen.load()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await cancel_and_wait([t for t in (self._job, self._level_task) if t is not None])
        self._restore()
        self.rejections.flush()

    async def run(self) -> None:
        if not self.live.config.support.enabled:
            return
        while True:
            self._wake.clear()
            job = self._job
            if job is not None and job.done():
                self._job = None
                if not job.cancelled() and job.exception() is not None:
                    log.error("support job %s crashed", self._job_id, exc_info=job.exception())
            self.rejections.flush()
            await wait_event(self._wake, FLUSH_S)

    def section(self) -> dict[str, Any]:
        """The `support` section of telemetry and health.json."""
        level = ({"level": logging.getLevelName(logging.getLogger().level), "until": self._level_until}
                 if self._level_until is not None else None)
        return {"sending": self._job_id if self._job is not None else None, "served": self.served,
                "sent_bytes": self.sent_bytes, "refused": dict(self.rejections.totals), "log_level": level}

    # ------------------------------------------------------------------ requests
    async def on_message(self, topic: str, payload: bytes) -> None:
        cfg = self.live.config
        limits = rq.Limits(cfg.support.max_lines, cfg.support.max_log_level_s, cfg.support.max_request_ttl_s)
        try:
            req = rq.check(topic, payload, base=self.live.topics.base, trusted=self.trusted,
                           device_id=cfg.device.id, groups=cfg.device.groups, seen=self.seen,
                           limits=limits, now=self.clock())
            if req.action == "bundle" and self._job is not None and not self._job.done():
                raise rq.Refused("busy", f"bundle {self._job_id} is still being sent")
        except rq.Refused as exc:
            self._refuse(rq.job_of(topic, self.live.topics.base), exc)
            return
        # taken with no await since the checks, so a second request cannot slip in between
        self.seen.add(req.job, req.expires, self.clock())
        log.info("support request %s accepted: %s", req.job, req.action,
                 extra={"kv": {"job": req.job, "key_id": req.key_id}})
        if req.action == "log_level":
            await self._remember()
            await self._raise_level(req)
            return
        self._job_id = req.job
        self._job = asyncio.create_task(self._serve(req), name=f"support-job:{req.job}")
        self._job.add_done_callback(lambda _t: self._wake.set())

    async def _remember(self) -> None:
        """Persist the seen job ids before acting: a crash mid-way must not make a request replayable."""
        async with self._save_lock:
            await asyncio.to_thread(self.seen.write, self.seen.dump())

    def _refuse(self, job: str | None, exc: rq.Refused) -> None:
        reported = self.rejections.refuse("support", exc.reason, f"support request {job}: {exc.message}",
                                          {"job": job})
        # a replayed job already has its retained status, which keeps saying what happened to it;
        # the replay itself is in the event
        if reported and job is not None and exc.reason != "replay":
            self._status(job, "refused", exc.message)

    def _status(self, job: str, state: str, reason: str = "", progress: float = 0.0, **extra: Any) -> None:
        self.outbox.put_state(self.live.topics.support(job, "status"),
                              rq.status(job, state, reason, progress, ts=self.clock(), **extra))

    # ------------------------------------------------------------------ log level
    async def _raise_level(self, req: rq.SupportRequest) -> None:
        if self._level_task is not None:
            await cancel_and_wait(self._level_task)
        if self._restore_level is None:
            self._restore_level = logging.getLevelName(logging.getLogger().level)
        logs.set_level(req.level)
        self._level_until = self.clock() + req.duration_s
        log.warning("log level %s for %g s on request %s (then back to %s)", req.level, req.duration_s,
                    req.job, self._restore_level, extra={"kv": {"job": req.job}})
        self._level_task = asyncio.create_task(self._restore_after(req.duration_s), name="support-log-level")
        self._status(req.job, "done", f"log level {req.level} for {req.duration_s:g} s", 1.0,
                     level=req.level, until=self._level_until)

    async def _restore_after(self, duration_s: float) -> None:
        await asyncio.sleep(duration_s)
        self._restore()

    def _restore(self) -> None:
        if self._restore_level is None:
            return
        logs.set_level(self._restore_level)
        log.warning("log level back to %s", self._restore_level)
        self._restore_level = None
        self._level_until = None

    # ------------------------------------------------------------------ bundle
    async def _serve(self, req: rq.SupportRequest) -> None:
        cfg = self.live.config
        job = req.job
        out = self.dir / f"{job}.tar.gz"
        await self._remember()
        self._status(job, "building")
        try:
            lines = list(self.log_lines(req.lines)) if req.lines else []
            result = await asyncio.to_thread(build_bundle, cfg, out, log_lines=lines,
                                             max_bytes=int(cfg.support.max_bundle_mb * MB))
        except Exception as exc:  # the builder reads many files; any failure is this job's, reported
            log.exception("support bundle %s could not be built", job)
            self._status(job, "failed", f"bundle: {type(exc).__name__}: {exc}")
            await asyncio.to_thread(out.unlink, True)
            return
        try:
            await self._send(job, result.path, result.size, result.sha256, result.files, result.omitted)
        except SendFailed as exc:
            log.warning("support bundle %s not sent: %s", job, exc)
            self._status(job, "failed", f"send: {exc.reason}")
        else:
            self.served += 1
            self._status(job, "done", "", 1.0, size=result.size, sha256=result.sha256)
        finally:
            await asyncio.to_thread(out.unlink, True)

    async def _send(self, job: str, path: Path, size: int, sha256: str, files: Sequence[tuple[str, int]],
                    omitted: Sequence[tuple[str, str]]) -> None:
        cfg = self.live.config.support
        chunk_size = int(cfg.chunk_kb * 1024)
        m = rq.manifest(job, size, sha256, chunk_size, files, omitted)
        deadline = time.monotonic() + SEND_DEADLINE_S
        await self._publish(self.live.topics.support(job, "manifest"), dumps(m), deadline)
        self._status(job, "sending", "", 0.0, size=size, chunks=m["chunks"])
        pacer = Pacer(cfg.rate_kbps * 1024, time.monotonic())
        shown = time.monotonic()
        f = await asyncio.to_thread(open, path, "rb")
        try:
            for i in range(m["chunks"]):
                data = await asyncio.to_thread(_read_chunk, f, i * chunk_size, chunk_size)
                delay = pacer.delay(len(data), time.monotonic())
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._publish(self.live.topics.support(job, f"chunk/{i}"), data, deadline)
                self.sent_bytes += len(data)
                if time.monotonic() - shown >= PROGRESS_EVERY_S:
                    shown = time.monotonic()
                    self._status(job, "sending", "", (i + 1) / m["chunks"], size=size, chunks=m["chunks"])
        finally:
            await asyncio.to_thread(f.close)

    async def _publish(self, topic: str, payload: bytes, deadline: float) -> None:
        """Publish one message straight through the session; retry while the link is down."""
        attempt = 0
        while True:
            session = self.session()
            if session is None:
                raise SendFailed(topic, "no broker configured (mqtt.host is empty)")
            try:
                await session.publish_now(topic, payload, PUBLISH_TIMEOUT_S)
                return
            except ConnectionError as exc:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise SendFailed(topic, f"gave up after {SEND_DEADLINE_S:g} s: {exc}") from exc
                # the session reconnects by itself; this only spaces out our retries
                await asyncio.sleep(min(backoff_s(attempt, 0.5, 10.0), max(0.0, deadline - time.monotonic())))
