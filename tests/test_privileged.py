"""The privileged installer for real: a fake A/B system, the `script` preset, hostile requests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core import signing
from edgeagent.core.errors import InstallerCommandError, InstallerConfigError, RequestRejected
from edgeagent.core.fsutil import atomic_write_json
from edgeagent.updates.installer_presets import OPS, PRESETS, command_for, parse_slot
from edgeagent.updates.privileged import (
    OUTPUT_MAX_BYTES,
    load_config,
    open_artifact,
    parse_request,
    tail,
)
from edgeagent.updates.privileged_checks import check_manifest, load_trusted_keys, verified_copy
from tests.util import wait_until

ROOT = Path(__file__).resolve().parent.parent

# A toy A/B system: two slot dirs, a `booted` flag, a `pending` flag set by install and taken by
# reboot, and a `state` of the trial boot. Written as a shell script like a site's own would be.
FAKE_AB = """#!/bin/sh
set -eu
AB={ab}
echo "$1" >> "$AB/ops.log"
booted=$(cat "$AB/booted")
if [ "$booted" = A ]; then other=B; else other=A; fi
case "$1" in
  install)
    cp "$2" "$AB/slot-$other/rootfs.img"
    echo "$other" > "$AB/pending"
    echo "installed $(basename "$2") into slot $other" ;;
  reboot)
    if [ -f "$AB/pending" ]; then mv "$AB/pending" "$AB/booted"; echo trial > "$AB/state"; fi
    echo "rebooting" ;;
  mark-good) echo good > "$AB/state"; echo "slot $booted marked good" ;;
  mark-bad) echo "$other" > "$AB/booted"; echo bad > "$AB/state"; echo "slot $booted marked bad" ;;
  slot) echo "$booted" ;;
  *) echo "unknown op $1" >&2; exit 64 ;;
esac
"""


KEY_ID = "ops-test"


def make_key(d: Path, key_id: str = KEY_ID) -> tuple[Ed25519PrivateKey, Path]:
    """A real ed25519 key pair; the public PEM root-owned (the tests run as root) and 0644."""
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    priv, pub = d / f"{key_id}.key", d / f"{key_id}.pem"
    signing.generate_keypair(priv, pub)
    pub.chmod(0o644)
    return signing.load_private_key(priv), pub


def firmware_manifest(data: bytes, key: Ed25519PrivateKey, key_id: str = KEY_ID,
                      **fields: Any) -> dict[str, Any]:
    """A signed firmware manifest for `data`, as the operator's push would make it (issue 21: with type)."""
    now = time.time()
    body: dict[str, Any] = {
        "v": 1, "type": "manifest", "job": "j1", "kind": "firmware", "name": "rootfs", "version": "2.0.0",
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunk_size": max(1, len(data)),
        "chunks": 1, "chunk_sha256": [hashlib.sha256(data).hexdigest()], "issued_at": now - 60,
        "expires": now + 3600, **fields}
    return signing.sign(body, key, key_id)


class Device:
    """A state dir as the agent leaves it, a root-owned installer.toml with root-owned trusted keys,
    and the fake A/B system."""

    def __init__(self, tmp: Path, extra_config: str = "", keys: str | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        (self.state / "installer").mkdir(parents=True)
        (self.state / "updates").mkdir()
        self.ab = tmp / "ab"
        for slot in ("A", "B"):
            (self.ab / f"slot-{slot}").mkdir(parents=True)
        (self.ab / "booted").write_text("A\n")
        self.script = tmp / "fake-ab"
        self.script.write_text(FAKE_AB.format(ab=self.ab))
        self.script.chmod(0o755)
        self.staging = tmp / "staging"
        self.key, self.pub = make_key(tmp / "keys")
        if keys is None:
            keys = f'trusted_keys = {{ "{KEY_ID}" = "{self.pub}" }}\n'
        self.config = tmp / "installer.toml"
        self.config.write_text(f'preset = "script"\nscript = "{self.script}"\ntimeout_s = 20\n{keys}'
                               f'{extra_config}')
        self.config.chmod(0o644)

    def artifact(self, job: str = "j1", name: str = "fw.img", data: bytes = b"firmware 2.0\n",
                 manifest: dict[str, Any] | None = None) -> Path:
        """The artifact and, beside it, the job's signed manifest (for `data` unless given)."""
        path = self.state / "updates" / job / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.write_manifest(path, manifest or firmware_manifest(data, self.key, job=job))
        return path

    def write_manifest(self, artifact: Path, manifest: dict[str, Any]) -> None:
        atomic_write_json(artifact.with_name("manifest.json"), manifest)

    @property
    def ops(self) -> list[str]:
        """The ops the fake A/B tool was run for: proof that a refused request ran nothing."""
        log = self.ab / "ops.log"
        return log.read_text().split() if log.exists() else []

    def request(self, op: str, artifact: Path | str | None = None, **extra: Any) -> str:
        """Like PrivilegedRunner: an install names the manifest beside the artifact (unless given)."""
        if op == "install" and artifact is not None and "manifest" not in extra:
            extra["manifest"] = str(Path(artifact).with_name("manifest.json"))
        rid = str(uuid.uuid4())
        body = {"v": 1, "id": rid, "job": "j1", "op": op,
                "artifact": str(artifact) if artifact is not None else None, "ts": 1.0, **extra}
        atomic_write_json(self.state / "installer" / "request.json", body)
        return rid

    def run(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeagent.updates.privileged", "--state-dir", str(self.state),
             "--config", str(self.config), "--staging-dir", str(self.staging)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )

    def result(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "installer" / "result.json").read_text()))

    @property
    def request_pending(self) -> bool:
        return (self.state / "installer" / "request.json").exists()


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_full_ab_cycle_install_reboot_mark_good(device: Device) -> None:
    art = device.artifact(data=b"firmware 2.0\n")

    rid = device.request("slot")
    assert device.run().returncode == 0
    res = device.result()
    assert (res["id"], res["op"], res["ok"], res["returncode"]) == (rid, "slot", True, 0)
    assert parse_slot("script", res["output"]) == "A"

    rid = device.request("install", art)
    proc = device.run()
    assert proc.returncode == 0, proc.stderr
    res = device.result()
    assert res["id"] == rid and res["ok"] is True and res["returncode"] == 0
    assert "into slot B" in res["output"]
    assert set(res) == {"v", "id", "op", "ok", "returncode", "output", "ts"}
    assert (device.ab / "slot-B" / "rootfs.img").read_bytes() == b"firmware 2.0\n"
    assert not device.request_pending
    assert list(device.staging.iterdir()) == [], "the staged hard link is removed after the command"
    assert art.stat().st_nlink == 1

    rid = device.request("reboot")
    assert device.run().returncode == 0
    res = device.result()
    assert (res["id"], res["op"], res["ok"], res["returncode"]) == (rid, "reboot", True, None)
    assert (device.ab / "booted").read_text().strip() == "B"
    assert (device.ab / "state").read_text().strip() == "trial"

    device.request("mark-good")
    assert device.run().returncode == 0
    assert device.result()["ok"] is True
    assert (device.ab / "state").read_text().strip() == "good"

    device.request("slot")
    device.run()
    assert parse_slot("script", device.result()["output"]) == "B"


def test_mark_bad_falls_back_to_the_other_slot(device: Device) -> None:
    (device.ab / "booted").write_text("B\n")
    device.request("mark-bad")
    assert device.run().returncode == 0
    assert device.result()["ok"] is True
    assert (device.ab / "booted").read_text().strip() == "A"


def test_no_request_means_nothing_happens(device: Device) -> None:
    proc = device.run()
    assert proc.returncode == 0
    assert not (device.state / "installer" / "result.json").exists()
    assert "no pending request" in proc.stderr


def test_failing_command_reports_returncode_and_output(tmp_path: Path) -> None:
    device = Device(tmp_path, '[commands]\nmark-good = ["/bin/sh", "-c", "echo nope >&2; exit 3"]\n')
    rid = device.request("mark-good")
    assert device.run().returncode == 0
    res = device.result()
    assert (res["id"], res["ok"], res["returncode"]) == (rid, False, 3)
    assert "nope" in res["output"]
    assert not device.request_pending


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    cmd = f'["/bin/sh", "-c", "sleep 300 & echo $! > {pidfile}; wait"]'
    device = Device(tmp_path, f"[commands]\nslot = {cmd}\n")
    device.config.write_text(device.config.read_text().replace("timeout_s = 20", "timeout_s = 1"))
    device.request("slot")
    assert device.run().returncode == 0
    res = device.result()
    assert res["ok"] is False and res["returncode"] is None
    assert "timed out after 1 s" in res["output"]
    grandchild = int(pidfile.read_text())
    # The orphaned sleep is reparented and reaped by init; until then it is a zombie at most.
    wait_until(lambda: not _alive(grandchild), timeout_s=10, message="grandchild killed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_reboot_that_fails_is_reported_after_the_fact(tmp_path: Path) -> None:
    device = Device(tmp_path, '[commands]\nreboot = ["/bin/false"]\n')
    rid = device.request("reboot")
    device.run()
    res = device.result()
    assert (res["id"], res["ok"], res["returncode"]) == (rid, False, 1)


def test_artifact_with_shell_characters_is_one_argument(device: Device) -> None:
    art = device.artifact(name="fw $(touch pwned); rm -rf x.img")
    device.request("install", art)
    device.run()
    res = device.result()
    assert res["ok"] is True, res
    assert (device.ab / "slot-B" / "rootfs.img").exists()
    assert not list(device.tmp.rglob("pwned"))


def test_the_request_cannot_name_a_command(device: Device) -> None:
    marker = device.tmp / "pwned"
    device.request("slot", command=["/usr/bin/touch", str(marker)], argv=["/usr/bin/touch", str(marker)])
    device.run()
    assert device.result()["ok"] is True
    assert not marker.exists()


def _rejected(device: Device, op: str, artifact: Path | str | None, *, why: str, returncode: int = 0,
              **extra: Any) -> None:
    before = sorted(p.name for p in (device.ab / "slot-B").iterdir())
    ops = device.ops
    rid = device.request(op, artifact, **extra)
    proc = device.run()
    assert proc.returncode == returncode, proc.stderr
    res = device.result()
    assert res["id"] == rid and res["ok"] is False and res["returncode"] is None
    assert why in res["output"], res["output"]
    assert not device.request_pending, "a rejected request must not re-trigger the path unit"
    assert sorted(p.name for p in (device.ab / "slot-B").iterdir()) == before
    assert device.ops == ops, "a rejected request runs nothing"
    if device.staging.exists():
        assert list(device.staging.iterdir()) == [], "no copy is left behind"


def test_rejects_artifacts_outside_updates(device: Device) -> None:
    _rejected(device, "install", "/etc/passwd", why="not below")
    _rejected(device, "install", device.state / "installer" / "x", why="not below")
    _rejected(device, "install", device.state / "updates", why="strictly below")
    _rejected(device, "install", f"{device.state}/updates/j1/../../installer/x", why="normalised")
    _rejected(device, "install", "updates/j1/fw.img", why="normalised absolute")
    _rejected(device, "install", device.state / "updates" / "missing.img", why="No such file")
    (device.state / "updates" / "dir.img").mkdir()
    _rejected(device, "install", device.state / "updates" / "dir.img", why="not a regular file")


def test_rejects_symlinks_anywhere_on_the_path(device: Device) -> None:
    secret = device.tmp / "secret"
    secret.write_text("root only\n")
    link = device.state / "updates" / "link.img"
    link.symlink_to(secret)
    _rejected(device, "install", link, why="symlinks are refused")
    (device.state / "updates" / "jobdir").symlink_to(device.tmp)
    _rejected(device, "install", device.state / "updates" / "jobdir" / "secret", why="symlinks are refused")


def test_rejects_hard_links_and_foreign_files(device: Device) -> None:
    art = device.artifact()
    os.link(art, device.state / "updates" / "second-name.img")
    _rejected(device, "install", art, why="hard links")
    if os.geteuid() == 0:
        other = device.artifact(job="j2")
        os.chown(other, 65534, 65534)
        _rejected(device, "install", other, why="not owned by the agent")


def test_the_command_gets_the_checked_bytes_even_if_the_agent_rewrites_or_swaps_the_file(
        device: Device) -> None:
    secret = device.tmp / "secret"
    secret.write_text("root only\n")
    art = device.artifact(data=b"signed image\n")
    m = check_manifest(json.loads(art.with_name("manifest.json").read_text()),
                       load_trusted_keys({KEY_ID: str(device.pub)}, "installer.toml"), time.time())
    fd = open_artifact(device.state, str(art), os.stat(device.state).st_uid)
    try:
        with verified_copy(fd, art.name, m, device.staging) as staged:
            with open(art, "r+b") as f:  # the agent owns the inode: it can rewrite it in place...
                f.write(b"EVIL")
            art.unlink()
            art.symlink_to(secret)  # ...or swap the path right after the checks
            assert Path(staged).read_bytes() == b"signed image\n"
            assert Path(staged).parent.stat().st_mode & 0o077 == 0
            assert Path(staged).stat().st_mode & 0o077 == 0
            assert not Path(staged).is_relative_to(device.state)
    finally:
        os.close(fd)
    assert list(device.staging.iterdir()) == []


def test_rejects_malformed_requests(device: Device) -> None:
    _rejected(device, "format-disk", None, why="unknown op")
    _rejected(device, "install", None, why="needs an artifact")
    (device.state / "installer" / "request.json").write_text("{not json")
    device.run()
    assert device.result()["ok"] is False and device.result()["id"] is None
    assert not device.request_pending


def test_installer_dir_symlink_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    device = Device(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "request.json").write_text(json.dumps({"v": 1, "id": "x", "op": "slot", "ts": 1}))
    (device.state / "installer").rmdir()
    (device.state / "installer").symlink_to(elsewhere)
    proc = device.run()
    assert proc.returncode == 1
    assert sorted(p.name for p in elsewhere.iterdir()) == ["request.json"]


def test_broken_installer_config_still_answers_the_agent(device: Device) -> None:
    device.config.write_text('preset = "yolo"\n')
    rid = device.request("slot")
    proc = device.run()
    assert proc.returncode == 2
    res = device.result()
    assert res["id"] == rid and res["ok"] is False and "preset must be one of" in res["output"]


def test_load_config_refuses_writable_or_bad_files(tmp_path: Path) -> None:
    cfg = tmp_path / "installer.toml"
    cfg.write_text('preset = "rauc"\n')
    cfg.chmod(0o664)
    with pytest.raises(InstallerConfigError, match="group/world-writable"):
        load_config(cfg)
    cfg.chmod(0o644)
    assert load_config(cfg).preset == "rauc"
    for text, why in [
        ('preset = "rauc"\ncolour = 1\n', "unknown keys"),
        ('preset = "rauc"\ntimeout_s = -1\n', "timeout_s"),
        ('preset = "rauc"\nscript = "/x"\n', "script"),
        ('preset = "script"\nscript = "relative"\n', "absolute"),
        ('preset = "rauc"\n[commands]\nflash = ["/x"]\n', "unknown op"),
        ('preset = "rauc"\n[commands]\ninstall = "rauc install {artifact}"\n', "list"),
        ('preset = "rauc"\n[commands]\ninstall = ["{artifact}"]\n', "program cannot be the artifact"),
        ("preset = ", "invalid TOML"),
    ]:
        cfg.write_text(text)
        with pytest.raises(InstallerConfigError, match=why):
            load_config(cfg)
    with pytest.raises(InstallerConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_parse_request_rules() -> None:
    ok = {"v": 1, "id": "a-1", "job": "J", "op": "install", "artifact": "/x/y", "manifest": "/x/m", "ts": 2}
    assert parse_request(json.dumps(ok).encode()).artifact == "/x/y"
    assert parse_request(json.dumps(ok).encode()).manifest == "/x/m"
    # Only install takes an artifact; elsewhere it is dropped, never substituted.
    assert parse_request(json.dumps({**ok, "op": "slot"}).encode()).artifact is None
    assert parse_request(json.dumps({**ok, "op": "slot"}).encode()).manifest is None
    for bad, why in [
        ({**ok, "v": 2}, "version"),
        ({**ok, "id": "a b;rm"}, "needs an id"),
        ({**ok, "artifact": 5}, "artifact must be"),
        ({**ok, "ts": "now"}, "ts must be"),
        ({**ok, "job": 1}, "job must be"),
        ({**ok, "manifest": None}, "signed manifest"),
        ({**ok, "manifest": 3}, "signed manifest"),
        ([ok], "JSON object"),
    ]:
        with pytest.raises(RequestRejected, match=why):
            parse_request(json.dumps(bad).encode())


def test_output_tail_is_bounded_in_bytes() -> None:
    data = ("é" * 5000).encode() + b"END"
    text = tail(data)
    assert len(text.encode()) <= OUTPUT_MAX_BYTES and text.endswith("END")


def test_presets_cover_every_op_and_keep_the_artifact_one_argument() -> None:
    for preset in PRESETS:
        assert set(PRESETS[preset]) == set(OPS)
        argv = command_for(preset, "install", "/var/lib/edgeagent/updates/j/a b;c.img", {})
        assert "/var/lib/edgeagent/updates/j/a b;c.img" in argv
        if preset != "script":  # the site script reboots its own way
            assert command_for(preset, "reboot", None, {}) == ["systemctl", "reboot"]
    assert command_for("rauc", "install", "/u/b.raucb", {}) == ["rauc", "install", "/u/b.raucb"]
    assert command_for("mender", "mark-good", None, {}) == ["mender-update", "commit"]
    over = {"install": ["/opt/flash", "--image={artifact}"]}
    assert command_for("swupdate", "install", "/u/x", over) == ["/opt/flash", "--image=/u/x"]
    with pytest.raises(InstallerCommandError, match="needs an artifact"):
        command_for("rauc", "install", None, {})
    with pytest.raises(InstallerCommandError, match="unknown installer preset"):
        command_for("ota-magic", "install", "/x", {})
    with pytest.raises(InstallerCommandError, match="unknown op"):
        command_for("rauc", "erase", None, {})


def test_parse_slot() -> None:
    rauc = "RAUC_SYSTEM_COMPATIBLE='pi4'\nRAUC_SYSTEM_BOOTED_BOOTNAME='B'\nRAUC_BOOT_PRIMARY='rootfs.1'\n"
    assert parse_slot("rauc", rauc) == "B"
    assert parse_slot("rauc", "garbage") is None
    assert parse_slot("mender", "2\n") == "2"
    assert parse_slot("script", "") is None


def test_agent_side_runner_and_root_helper_speak_the_same_contract(device: Device) -> None:
    """The agent's PrivilegedRunner writes the request; a stand-in for edgeagent-installer.path runs
    the helper when request.json appears; the runner reads the answer with its id."""
    import asyncio
    import threading

    from edgeagent.core.config import FirmwareConfig
    from edgeagent.updates.installers import PrivilegedRunner

    art = device.artifact(data=b"firmware 3.0\n")
    served: list[int] = []

    def path_unit() -> None:
        for _ in range(2):
            wait_until(lambda: device.request_pending, timeout_s=30, message="request.json")
            served.append(device.run().returncode)

    unit = threading.Thread(target=path_unit, daemon=True)
    unit.start()
    runner = PrivilegedRunner(FirmwareConfig(installer="script", mode="privileged", command_timeout_s=30),
                              device.state, poll_s=0.02)
    log = device.tmp / "job.log"
    installed = asyncio.run(runner.run("install", art, "j1", log))
    slot = asyncio.run(runner.run("slot", None, "j1", log))
    unit.join(timeout=30)
    assert served == [0, 0]
    assert installed.ok and installed.returncode == 0 and "into slot B" in installed.output
    assert slot.ok and parse_slot("script", slot.output) == "A"
    assert (device.ab / "slot-B" / "rootfs.img").read_bytes() == b"firmware 3.0\n"


@pytest.mark.parametrize("payload", [
    b"[" * 100_000,
    b'{"v": 1, "id": "a", "op": "slot", "ts": 1' + b"0" * 400 + b"}",
    b'{"v": 1, "id": "a", "op": "slot", "ts": 1' + b"0" * 5000 + b"}",
])
def test_hostile_requests_are_answered_not_crashed_on(device: Device, payload: bytes) -> None:
    """The agent waits for a result: a request that breaks the parser must still get one."""
    (device.state / "installer" / "request.json").write_bytes(payload)
    assert device.run().returncode == 0
    assert device.result()["ok"] is False
    assert not device.request_pending


def test_a_command_that_cannot_be_executed_is_reported(tmp_path: Path) -> None:
    script = tmp_path / "noshebang"
    script.write_bytes(b"\x00\x01 not a program")
    script.chmod(0o755)
    device = Device(tmp_path, f'[commands]\nmark-good = ["{script}"]\n')
    rid = device.request("mark-good")
    assert device.run().returncode == 0
    res = device.result()
    assert (res["id"], res["ok"], res["returncode"]) == (rid, False, 126)
    assert "cannot run" in res["output"]


# --------------------------------------------------------------- issue 21: root checks what it installs


def test_a_good_manifest_installs_and_the_staged_copy_is_removed(device: Device) -> None:
    art = device.artifact(data=os.urandom(3 * 1024 * 1024 + 17))  # more than one copy block
    rid = device.request("install", art)
    proc = device.run()
    assert proc.returncode == 0, proc.stderr
    res = device.result()
    assert (res["id"], res["ok"], res["returncode"]) == (rid, True, 0), res
    assert (device.ab / "slot-B" / "rootfs.img").read_bytes() == art.read_bytes()
    assert "verified, artifact sha256 matches" in proc.stderr
    assert device.ops == ["install"]
    assert list(device.staging.iterdir()) == []


def test_manifest_signed_with_another_key_is_refused(device: Device) -> None:
    data = b"firmware 2.0\n"
    impostor, _ = make_key(device.tmp / "impostor")  # same key id, different key
    art = device.artifact(data=data, manifest=firmware_manifest(data, impostor))
    _rejected(device, "install", art, why="bad signature for key id 'ops-test'")
    unknown, _ = make_key(device.tmp / "impostor", "ops-unknown")
    device.write_manifest(art, firmware_manifest(data, unknown, "ops-unknown"))
    _rejected(device, "install", art, why="unknown key id 'ops-unknown'")
    unsigned = {k: v for k, v in firmware_manifest(data, device.key).items() if k != "sig"}
    device.write_manifest(art, unsigned)
    _rejected(device, "install", art, why="not signed")
    # a signed manifest edited afterwards (bigger image, new hash) no longer verifies
    device.write_manifest(art, {**firmware_manifest(data, device.key), "version": "9.0.0"})
    _rejected(device, "install", art, why="bad signature")


@pytest.mark.parametrize("make_unsafe, why", [
    (lambda d: d.pub.chmod(0o666), "writable by group/others (mode 0666)"),
    (lambda d: d.pub.chmod(0o620), "writable by group/others (mode 0620)"),
    (lambda d: d.pub.parent.chmod(0o777), "directory"),  # the key could be replaced
    (lambda d: os.chown(d.pub, 65534, 65534), "owned by uid 65534, not root"),
    (lambda d: os.chown(d.pub.parent, 65534, 65534), "owned by uid 65534, not root"),
])
def test_a_key_file_others_could_write_stops_the_helper_from_serving(
        device: Device, make_unsafe: Any, why: str) -> None:
    if os.geteuid() != 0 and "uid 65534" in why:
        pytest.skip("chown needs root")
    art = device.artifact()
    make_unsafe(device)
    _rejected(device, "install", art, why=why, returncode=2)
    assert "trusted_keys.ops-test" in device.result()["output"]
    # It refuses to serve at all (like a broken installer.toml), not only installs.
    _rejected(device, "reboot", None, why=why, returncode=2)


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    device = Device(tmp_path)
    link = device.pub.with_name("link.pem")
    link.symlink_to(device.pub)
    device.config.write_text(device.config.read_text().replace(str(device.pub), str(link)))
    _rejected(device, "install", device.artifact(), why="symlinks are refused", returncode=2)


def test_manifest_of_another_kind_or_type_is_refused(device: Device) -> None:
    data = b"firmware 2.0\n"
    art = device.artifact(data=data, manifest=firmware_manifest(data, device.key, kind="model"))
    _rejected(device, "install", art, why="kind is 'model'")
    for other in ("cancel", "config"):  # a message without type cannot even be signed (test_signing)
        device.write_manifest(art, firmware_manifest(data, device.key, type=other))
        _rejected(device, "install", art, why=f"type '{other}' where 'manifest' is expected")
    device.write_manifest(art, firmware_manifest(data, device.key, sha256="nope"))
    _rejected(device, "install", art, why="sha256 must be 64 lowercase hex digits")


def test_artifact_swapped_after_signing_is_refused(device: Device) -> None:
    signed_data = b"firmware 2.0\n"
    art = device.artifact(data=signed_data)
    art.write_bytes(b"firmware 6.6\n")  # same size, other bytes
    _rejected(device, "install", art, why="does not match the manifest's")
    art.write_bytes(signed_data + b"backdoor")
    n = len(signed_data)
    _rejected(device, "install", art, why=f"is {n + 8} bytes, the manifest says {n}")


def test_expired_manifest_is_refused(device: Device) -> None:
    data = b"firmware 2.0\n"
    now = time.time()
    old = firmware_manifest(data, device.key, issued_at=now - 7200, expires=now - 60)
    _rejected(device, "install", device.artifact(data=data, manifest=old), why="manifest: expired")


def test_missing_or_misplaced_manifest_is_refused(device: Device) -> None:
    art = device.artifact()
    _rejected(device, "install", art, why="needs the job's signed manifest", manifest=None)
    art.with_name("manifest.json").unlink()
    _rejected(device, "install", art, why=f"manifest {art.with_name('manifest.json')}: No such file")
    _rejected(device, "install", art, why="manifest is not below", manifest="/etc/edgeagent/manifest.json")
    outside = device.tmp / "manifest.json"  # e.g. a root file the agent would like root to read
    outside.write_text(json.dumps(firmware_manifest(b"firmware 2.0\n", device.key)))
    art.with_name("manifest.json").symlink_to(outside)
    _rejected(device, "install", art, why="symlinks are refused")
    art.with_name("manifest.json").unlink()
    art.with_name("manifest.json").write_text("{not json")
    _rejected(device, "install", art, why="is not JSON")


def test_without_trusted_keys_installs_are_refused_but_other_ops_run(tmp_path: Path) -> None:
    device = Device(tmp_path, keys="")
    _rejected(device, "install", device.artifact(), why="no trusted_keys")
    device.request("slot")
    assert device.run().returncode == 0
    assert device.result()["ok"] is True and device.ops == ["slot"]


def test_load_config_reports_every_bad_trusted_key(tmp_path: Path) -> None:
    _, pub = make_key(tmp_path / "keys")
    not_a_key = tmp_path / "keys" / "junk.pem"
    not_a_key.write_text("hello\n")
    cfg = tmp_path / "installer.toml"
    cfg.write_text(f'preset = "rauc"\ntrusted_keys = {{ good = "{pub}", junk = "{not_a_key}", '
                   f'gone = "{tmp_path}/missing.pem", rel = "keys/x.pem", num = 3 }}\n')
    cfg.chmod(0o644)
    with pytest.raises(InstallerConfigError) as info:
        load_config(cfg)
    reason = info.value.reason
    assert "trusted_keys.good" not in reason
    for expected in ("trusted_keys.junk: " + str(not_a_key) + ": not a PEM public key",
                     "trusted_keys.gone: cannot read",
                     "trusted_keys.rel: 'keys/x.pem' must be a normalised absolute",
                     "trusted_keys.num: expected a path string"):
        assert expected in reason, reason
    cfg.write_text(f'preset = "rauc"\ntrusted_keys = {{ good = "{pub}" }}\n')
    assert set(load_config(cfg).trusted_keys) == {"good"}
    cfg.write_text('preset = "rauc"\ntrusted_keys = "/etc/edgeagent/keys"\n')
    with pytest.raises(InstallerConfigError, match="trusted_keys must be a table"):
        load_config(cfg)
