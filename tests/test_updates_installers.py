"""Firmware install hand-off: real commands without a shell (fail, hang -> killed at the timeout),
and the privileged mode through the real edgeagent.updates.privileged request handler."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgeagent.core import signing
from edgeagent.core.config import FirmwareConfig
from edgeagent.ops.push import build_manifest
from edgeagent.updates import privileged
from edgeagent.updates.installers import MANIFEST_FILE, DirectRunner, PrivilegedRunner
from tests.broker import Broker
from tests.test_privileged import firmware_manifest, make_key
from tests.test_updates_component import Ctx, run
from tests.updates_helpers import FAKE_AB, KEY_ID, fake_ab_commands, signed


def test_direct_runner_argv_output_and_timeout(tmp_path: Path) -> None:
    weird = tmp_path / "a dir; rm -rf x" / "fw $(id).img"
    weird.parent.mkdir()
    weird.write_bytes(b"image")
    ab = tmp_path / "ab"
    log = tmp_path / "log.txt"

    async def main() -> None:
        cfg = FirmwareConfig(installer="script", mode="direct", commands={
            k: tuple(v) for k, v in fake_ab_commands(ab).items()}, command_timeout_s=2)
        ok = await DirectRunner(cfg).run("install", weird, "j", log)
        assert ok.ok and (ab / "slot-B" / "rootfs.img").read_bytes() == b"image"  # one argument, no shell
        hang = FirmwareConfig(installer="script", mode="direct", command_timeout_s=1.0, commands={
            "install": (sys.executable, str(FAKE_AB), "--root", str(ab), "--hang", "install", "{artifact}")})
        t0 = time.monotonic()
        res = await DirectRunner(hang).run("install", weird, "j", log)
        assert not res.ok and res.returncode is None and "timed out after 1 s" in res.output
        assert time.monotonic() - t0 < 8
        missing = FirmwareConfig(installer="script", mode="direct",
                                 commands={"install": ("no-such-tool", "x")})
        res = await DirectRunner(missing).run("install", weird, "j", log)
        assert not res.ok and "command not found" in res.output

    asyncio.run(main())
    text = log.read_text()
    assert "installed fw $(id).img into slot B" in text and "timed out after 1 s" in text
    assert "[install: ok=True rc=0]" in text


def test_privileged_runner_through_the_real_handler(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "installer").mkdir(parents=True)
    art = state / "updates" / "fw1" / "artifact"
    art.parent.mkdir(parents=True)
    art.write_bytes(b"firmware")
    key, pub = make_key(tmp_path / "keys")
    # what FirmwareFlow.install leaves beside the artifact: the job's manifest as received
    (art.parent / MANIFEST_FILE).write_text(json.dumps(firmware_manifest(b"firmware", key, job="fw1")))
    ab = tmp_path / "ab"
    conf = tmp_path / "installer.toml"
    conf.write_text(f'preset = "script"\nscript = "{tmp_path / "fake-ab.sh"}"\ntimeout_s = 10\n'
                    f'trusted_keys = {{ "ops-test" = "{pub}" }}\n')
    script = tmp_path / "fake-ab.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_AB} --root {ab} \"$@\"\n")
    script.chmod(0o755)
    os.chmod(conf, 0o644)
    stop = threading.Event()

    def service() -> None:  # what edgeagent-installer.path + .service do: handle each request
        cfg = privileged.load_config(conf)
        deadline = time.monotonic() + 60  # the test stops us long before; never outlive a hung one
        while not stop.is_set() and time.monotonic() < deadline:
            if (state / "installer" / "request.json").exists():
                privileged.handle_request(state, cfg, tmp_path / "staging")
            stop.wait(0.02)

    svc = threading.Thread(target=service, daemon=True)
    svc.start()
    log = tmp_path / "log.txt"

    async def main() -> None:
        runner = PrivilegedRunner(FirmwareConfig(mode="privileged", command_timeout_s=10), state, poll_s=0.02)
        res = await runner.run("install", art, "fw1", log)
        assert res.ok, res.output
        assert (ab / "slot-B" / "rootfs.img").read_bytes() == b"firmware"
        res = await runner.run("slot", None, "fw1", log)
        assert res.ok and res.output.strip() == "A"
        outside = tmp_path / "elsewhere.img"
        outside.write_bytes(b"x")
        res = await runner.run("install", outside, "fw1", log)
        assert not res.ok and "not below" in res.output
        art.write_bytes(b"firmwar3")  # swapped after signing: the helper hashes it itself
        res = await runner.run("install", art, "fw1", log)
        assert not res.ok and "does not match the manifest" in res.output

    try:
        asyncio.run(main())
    finally:
        stop.set()
        svc.join(5)


def firmware_run(tmp_path: Path, broker: Broker, flag: str, expected: str) -> None:
    ab = tmp_path / "ab"
    (tmp_path / "fw-version").write_text("1.0.0\n")
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(50_000))

    async def body(c: Ctx) -> None:
        msg = signed(image, c.key, job="fw", kind="firmware", name="rootfs", version="1.1.0")
        result = await c.push(msg, image)
        assert result.states == {"dev1": "failed"}
        assert expected in result.reasons["dev1"], result.reasons
        assert not (ab / "slot-B" / "rootfs.img").exists() and not (ab / "reboots").exists()
        log = (c.tmp / "state" / "updates" / "fw" / "log.txt").read_text()
        assert expected in log
        # a rollback attempt to the installed version, and a lower one, are refused before download
        for job, version in (("fw-same", "1.0.0"), ("fw-old", "0.9.0")):
            c.watcher.publish(f"edge/dev1/updates/{job}/manifest", signed(
                image, c.key, job=job, kind="firmware", name="rootfs", version=version))
            doc: Any = await c.final(job)
            assert doc["state"] == "rejected" and "rollback refused" in doc["reason"]
            assert not (c.tmp / "state" / "updates" / job / "artifact.part").exists()

    run(tmp_path, broker, body, updates={"firmware": {
        "commands": fake_ab_commands(ab, install=flag), "command_timeout_s": 1.5}})


def test_firmware_install_command_fails(tmp_path: Path, broker: Broker) -> None:
    firmware_run(tmp_path, broker, "--fail", "install failed (exit 1): install: error: simulated failure")


def test_firmware_install_command_hangs_and_is_killed(tmp_path: Path, broker: Broker) -> None:
    firmware_run(tmp_path, broker, "--hang", "install failed (timed out)")


def test_a_failed_reboot_aborts_the_pending_install_and_keeps_the_running_slot(tmp_path: Path,
                                                                                broker: Broker) -> None:
    """Still booted in the old slot: never mark it bad; drop the untested one instead."""
    ab = tmp_path / "ab"
    (tmp_path / "fw-version").write_text("1.0.0\n")
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(50_000))

    async def body(c: Ctx) -> None:
        result = await c.push(signed(image, c.key, job="fw", kind="firmware", name="rootfs",
                                     version="1.1.0"), image)
        assert result.states == {"dev1": "failed"}
        assert "reboot failed" in result.reasons["dev1"], result.reasons
        ops = (ab / "ops.log").read_text().split("\n")
        assert "abort" in ops and "mark-bad" not in ops
        assert (ab / "booted").read_text().strip() == "A"  # the running slot is untouched
        assert not (ab / "pending").exists()  # the untested slot will not boot at the next power cycle

    run(tmp_path, broker, body, updates={"firmware": {
        "commands": fake_ab_commands(ab, reboot="--fail"), "command_timeout_s": 5.0}})


def test_privileged_mode_end_to_end_the_helper_verifies_what_the_agent_installs(
        tmp_path: Path, broker: Broker) -> None:
    """Agent in privileged mode, the real root helper serving its requests with root's own copy of
    the trusted key: the signed manifest travels with the install request and is verified again."""
    ab = tmp_path / "ab"
    (tmp_path / "fw-version").write_text("1.0.0\n")
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(50_000))
    state = tmp_path / "state"
    (state / "installer").mkdir(parents=True)
    commands = fake_ab_commands(ab, reboot="--fail")  # ends the flow right after the install
    conf = tmp_path / "installer.toml"
    conf.write_text('preset = "script"\ntimeout_s = 10\n'
                    f'trusted_keys = {{ "{KEY_ID}" = "{tmp_path / "keys" / (KEY_ID + ".pem")}" }}\n'
                    "[commands]\n" + "".join(f"{op} = {json.dumps(argv)}\n" for op, argv in commands.items()))
    conf.chmod(0o644)
    stop = threading.Event()
    served: list[dict[str, Any] | None] = []

    def service() -> None:  # edgeagent-installer.path + .service
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            if (state / "installer" / "request.json").exists():
                cfg = privileged.load_config(conf)
                served.append(privileged.handle_request(state, cfg, tmp_path / "staging"))
            stop.wait(0.02)

    async def body(c: Ctx) -> None:
        doc = build_manifest(image, job="fw", kind="firmware", name="rootfs", version="1.1.0")
        msg = signing.sign({**doc, "type": "manifest"}, c.key, KEY_ID)  # issue 21: typed messages
        result = await c.push(msg, image)
        assert result.states == {"dev1": "failed"}
        assert "reboot failed" in result.reasons["dev1"], result.reasons
        assert (ab / "slot-B" / "rootfs.img").read_bytes() == image.read_bytes()
        installs = [r for r in served if r is not None and r["op"] == "install"]
        assert len(installs) == 1 and installs[0]["ok"] is True, served

    svc = threading.Thread(target=service, daemon=True)
    svc.start()
    try:
        run(tmp_path, broker, body, updates={"firmware": {"mode": "privileged", "command_timeout_s": 10.0}})
    finally:
        stop.set()
        svc.join(5)
