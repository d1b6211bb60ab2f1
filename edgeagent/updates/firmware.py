"""Firmware A/B flow: install into the other slot, reboot, health check after the reboot, then commit
(mark-good) or mark-bad and reboot into the old slot. Each state is journaled before its side effect,
so the agent that starts after the reboot finds the job and carries on (see jobs.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edgeagent.core.fsutil import atomic_write_json
from edgeagent.core.live import LiveConfig, Router
from edgeagent.updates.installer_presets import parse_slot
from edgeagent.updates.installers import MANIFEST_FILE, FirmwareRunner, make_runner, run_argv
from edgeagent.updates.jobs import Job, Journal

Transition = Callable[..., Awaitable[None]]  # (job, state, reason, **changes), persisted + published


class FirmwareFlow:
    """The firmware half of the installs; `inference_section` tells the health check that
    inference serves again after the reboot (None: nothing to check beyond the config)."""

    def __init__(self, live: LiveConfig, router: Router, journal: Journal, updates_dir: Path,
                 transition: Transition, runner: FirmwareRunner | None = None,
                 inference_section: Callable[[], dict[str, Any]] | None = None) -> None:
        self.live = live
        self.router = router
        self.inference_section = inference_section
        self.journal = journal
        self.updates_dir = updates_dir
        self.transition = transition
        self._runner = runner
        self.booted_slot: str | None = None

    def runner(self) -> FirmwareRunner:
        if self._runner is None:
            cfg = self.live.config
            self._runner = make_runner(cfg.updates.firmware, Path(cfg.device.state_dir))
        return self._runner

    def _log_path(self, job: Job) -> Path:
        return self.updates_dir / job.job / "log.txt"

    async def current_slot(self, job: Job) -> str | None:
        res = await self.runner().run("slot", None, job.job, self._log_path(job))
        if not res.ok:
            return None
        return parse_slot(self.live.config.updates.firmware.installer, res.output)

    async def install(self, job: Job) -> None:
        if job.previous_slot is None:
            job.previous_slot = await self.current_slot(job)
            if job.previous_slot is None:
                # without it a bootloader fallback would be taken for a successful boot
                await self.transition(job, "failed", "cannot read the booted slot before installing")
                return
            await asyncio.to_thread(self.journal.save)
        artifact = self.updates_dir / job.job / "artifact"
        # The root helper installs only what a manifest it verifies itself vouches for: leave it
        # the signed manifest as received (sig included) beside the artifact.
        try:
            await asyncio.to_thread(atomic_write_json, artifact.with_name(MANIFEST_FILE), job.manifest)
        except OSError as exc:
            await self.transition(job, "failed", f"cannot write the manifest for the installer: {exc}")
            return
        res = await self.runner().run("install", artifact, job.job, self._log_path(job))
        if not res.ok:
            await self.transition(job, "failed", res.describe("install"))
            return
        await self.transition(job, "rebooting", "installed; rebooting into the new slot", boot_attempts=0)
        res = await self.runner().run("reboot", None, job.job, self._log_path(job))
        if not res.ok:
            # still booted in the old, good slot: drop the pending install (never mark-bad here:
            # that would condemn the slot we are running from)
            await self.runner().run("abort", None, job.job, self._log_path(job))
            await self.transition(job, "failed", res.describe("reboot"))
            return
        # A real reboot stops us here. If we are still alive long after, the reboot did not happen.
        await asyncio.sleep(self.live.config.updates.firmware.health_timeout_s)
        await self.runner().run("abort", None, job.job, self._log_path(job))
        await self.transition(job, "failed", "reboot requested but did not happen")

    async def after_reboot(self, job: Job) -> None:
        fw = self.live.config.updates.firmware
        attempts = job.boot_attempts + 1
        await self.transition(job, "health_check", f"boot attempt {attempts}", boot_attempts=attempts)
        if attempts > fw.max_boot_attempts:
            await self.rollback(job, f"health check did not pass within {fw.max_boot_attempts} "
                                      f"boot attempts")
            return
        slot = await self.current_slot(job)
        self.booted_slot = slot
        if slot is None:
            await self.rollback(job, "cannot read the booted slot after the reboot")
            return
        if job.previous_slot is not None and slot == job.previous_slot:
            # the bootloader fell back, or we died before the reboot: make sure the untested slot
            # is not left pending for the next power cycle
            await self.runner().run("abort", None, job.job, self._log_path(job))
            await self.transition(job, "rolled_back", f"booted the previous slot {slot} again "
                                                       f"(the bootloader fell back)")
            return
        problem = await self.health_check(job, fw.health_timeout_s)
        if problem:
            await self.rollback(job, f"health check failed: {problem}")
            return
        res = await self.runner().run("mark-good", None, job.job, self._log_path(job))
        if not res.ok:
            await self.rollback(job, res.describe("mark-good"))
            return
        self.journal.firmware = {"version": job.version, "slot": slot or ""}
        await self.transition(job, "succeeded", f"committed slot {slot or '?'}")

    async def health_check(self, job: Job, timeout_s: float) -> str:
        """'' when healthy, else what failed. Broker, inference, then the optional command."""
        deadline = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(self.router.wait_connected(), timeout_s)
        except asyncio.TimeoutError:
            return f"broker not reachable within {timeout_s:g} s"
        if self.live.config.inference.enabled:
            while True:
                section = self._inference()
                if isinstance(section.get("count"), int) and section["count"] > 0:
                    break
                if time.monotonic() > deadline:
                    return "inference is not running"
                await asyncio.sleep(0.2)
        fw = self.live.config.updates.firmware
        if fw.health_command:
            remaining = max(1.0, deadline - time.monotonic())
            res = await run_argv(list(fw.health_command), min(remaining, fw.command_timeout_s),
                                 self._log_path(job), "health")
            if not res.ok:
                return res.describe("health command")
        return ""

    def _inference(self) -> dict[str, Any]:
        if self.inference_section is None:
            return {}
        try:
            return self.inference_section()
        except Exception as exc:  # a failing section reads as "not running",
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def rollback(self, job: Job, reason: str) -> None:
        res = await self.runner().run("mark-bad", None, job.job, self._log_path(job))
        if not res.ok:
            reason += f"; {res.describe('mark-bad')}"
        # persisted (and reported) before the reboot into the old slot, which may stop us any time
        await self.transition(job, "rolled_back", reason)
        await self.runner().run("reboot", None, job.job, self._log_path(job))
