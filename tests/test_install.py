"""scripts/install.sh into temp prefixes: dry run, real install, idempotence, uninstall, purge."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install.sh"
VENV = Path(sys.prefix)  # the test venv has edgeagent installed: --venv-from keeps pip out of tests
IS_ROOT = os.geteuid() == 0
STATE_DIRS = {"var", "var/lib", "var/lib/edgeagent", "var/lib/edgeagent/installer",
              "var/lib/edgeagent/updates", "var/lib/edgeagent-installer"}


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def user() -> Iterator[str]:
    """A throwaway system user name (created by the script when root); removed whatever happens."""
    name = f"eat{os.getpid() % 100000}"
    yield name
    if IS_ROOT and user_exists(name):
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def install(prefix: Path, *args: str, user: str | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(SCRIPT), "--prefix", str(prefix), "--installer-preset", "script", *args]
    if not any(a in ("--no-venv", "--uninstall") for a in args):
        cmd += ["--venv-from", str(VENV)]
    cmd += ["--user", user] if user and IS_ROOT else ["--no-user"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a re-run could change: type, mode, owner, mtime and content of every path."""
    out: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if path.is_symlink():
            what: object = os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, what)
    return out


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path, user: str) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    proc = install(prefix, "--dry-run", "--board", "raspberry-pi", user=user)
    out = proc.stdout
    assert list(prefix.iterdir()) == [], "a dry run must not touch the prefix"
    assert "dry run: nothing was changed" in out
    assert not user_exists(user) and "useradd" not in out, "a prefix is another system's: no user is made"
    assert f"user step skipped (--prefix: create the system user {user} on the target system)" in out
    for step in ("/var/lib/edgeagent/updates", "/var/lib/edgeagent/installer", "/var/log/edgeagent",
                 "configs/raspberry-pi.toml", "/etc/edgeagent/config.toml", "/etc/edgeagent/installer.toml",
                 "edgeagent.service ", "edgeagent-installer.service ", "edgeagent-installer.path ",
                 "edgeagent.service.d/raspberry-pi.conf", "ln -s", "install-manifest"):
        assert any(step in line for line in out.splitlines() if "[dry-run]" in line), step
    # Every parent is planned once, not once per child.
    assert out.count(f"install -d -m 0755 {prefix}/var\n") == 1
    assert "systemctl steps skipped" in out


def test_install_twice_changes_nothing_and_uninstall_keeps_state(tmp_path: Path, user: str) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    first = install(prefix, "--board", "raspberry-pi", user=user)
    assert "systemctl steps skipped" in first.stdout
    assert f"edgeagent is installed below {prefix}" in first.stdout
    assert f"Edit {prefix}/etc/edgeagent/config.toml" in first.stdout and "edgeagent check" in first.stdout

    for unit in ("edgeagent.service", "edgeagent-installer.service", "edgeagent-installer.path"):
        assert (prefix / "etc/systemd/system" / unit).read_bytes() == (ROOT / "systemd" / unit).read_bytes()
    dropins = prefix / "etc/systemd/system/edgeagent.service.d"
    assert (dropins / "raspberry-pi.conf").exists()
    config = prefix / "etc/edgeagent/config.toml"
    assert config.read_bytes() == (ROOT / "configs/raspberry-pi.toml").read_bytes()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    installer_toml = prefix / "etc/edgeagent/installer.toml"
    assert 'preset = "script"' in installer_toml.read_text()
    assert installer_toml.stat().st_mode & 0o077 == 0
    assert os.readlink(prefix / "opt/edgeagent/venv") == str(VENV.resolve())
    state = prefix / "var/lib/edgeagent"
    assert state.stat().st_mode & 0o777 == 0o750
    assert not user_exists(user)
    assert f"User={user}" in (dropins / "user.conf").read_text()
    if IS_ROOT:  # no such user here: root keeps the files (the target system's user takes them over)
        assert state.stat().st_uid == 0 and config.stat().st_uid == 0 and installer_toml.stat().st_uid == 0

    before = snapshot(prefix)
    second = install(prefix, "--board", "raspberry-pi", user=user)
    assert snapshot(prefix) == before
    assert [ln for ln in second.stdout.splitlines() if ln.startswith("    + ")] == []

    # The agent's data survives an uninstall; an edited config is kept too.
    (state / "spool.sqlite").write_bytes(b"data")
    with config.open("a") as f:
        f.write("\n# edited on the device\n")
    install(prefix, "--uninstall", user=user)
    left = {str(p.relative_to(prefix)) for p in prefix.rglob("*")}
    assert left == STATE_DIRS | {"var/lib/edgeagent/spool.sqlite", "etc", "etc/edgeagent",
                                 "etc/edgeagent/config.toml"}
    assert not user_exists(user)


def test_purge_removes_everything_install_added(tmp_path: Path, user: str) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    install(prefix, "--board", "jetson", user=user)
    assert not (prefix / "etc/systemd/system/edgeagent.service.d/raspberry-pi.conf").exists()
    (prefix / "var/lib/edgeagent/health.json").write_text("{}")
    (prefix / "var/log/edgeagent/agent.log").write_text("log")
    proc = install(prefix, "--uninstall", "--purge", user=user)
    assert list(prefix.iterdir()) == [], proc.stdout
    if IS_ROOT:
        assert not user_exists(user)


def test_explicit_config_replaces_and_backs_up(tmp_path: Path, user: str) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    install(prefix, "--board", "default", user=user)
    config = prefix / "etc/edgeagent/config.toml"
    config.write_text("# edited\n")
    install(prefix, "--board", "default", user=user)
    assert config.read_text() == "# edited\n", "a locally edited config is kept by a plain re-run"
    mine = tmp_path / "mine.toml"
    mine.write_text('[device]\nid = "pi-7"\n')
    install(prefix, "--board", "default", "--config", str(mine), user=user)
    assert config.read_text() == mine.read_text()
    assert (prefix / "etc/edgeagent/config.toml.bak").read_text() == "# edited\n"
    install(prefix, "--uninstall", "--purge", user=user)


@pytest.mark.parametrize(
    ("files", "board"),
    [
        ({"proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\0"}, "raspberry-pi"),
        ({"proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\0"}, "jetson"),
        ({"etc/nv_tegra_release": "# R36 (release), REVISION: 3.0\n"}, "jetson"),
        ({}, "default"),
    ],
)
def test_board_detection(tmp_path: Path, files: dict[str, str], board: str) -> None:
    fake = tmp_path / "sys"
    for rel, text in files.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    fake.mkdir(exist_ok=True)
    proc = install(tmp_path / "root", "--dry-run", "--no-venv", env={"EDGEAGENT_DETECT_ROOT": str(fake)})
    assert f"checking the board ({board})" in proc.stdout
    assert f"configs/{board}.toml" in proc.stdout


def test_failed_checks_stop_before_any_change(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    proc = install(prefix, "--min-free-mb", str(10**9), check=False)
    assert proc.returncode == 1 and "board checks failed" in proc.stderr
    assert list(prefix.iterdir()) == []


def test_old_python_is_refused(tmp_path: Path) -> None:
    old_python = tmp_path / "python3.8"
    old_python.write_text("#!/bin/sh\necho 3.8\n")
    old_python.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT), "--prefix", str(tmp_path / "root"), "--no-user", "--python",
                           str(old_python), "--dry-run"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "python 3.8: edgeagent needs 3.10+" in proc.stdout


def test_bad_usage(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--runtime", "onnx"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 1 and "--runtime must be" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--uninstall", "--prefix", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "nothing installed here" in proc.stderr


def test_trusted_keys_are_installed_root_owned_and_trusted_by_the_root_helper(tmp_path: Path) -> None:
    from edgeagent.core import signing
    from edgeagent.updates.privileged import load_config

    pub = tmp_path / "ops-2026.pem"
    signing.generate_keypair(tmp_path / "ops-2026.key", pub)
    prefix = tmp_path / "root"
    prefix.mkdir()
    dry = install(prefix, "--dry-run", "--no-venv", "--trusted-key", f"ops-2026={pub}")
    assert list(prefix.iterdir()) == []
    assert any(f"{pub} {prefix}/etc/edgeagent/keys/ops-2026.pem" in line
               for line in dry.stdout.splitlines() if "[dry-run] install -m 0644" in line), dry.stdout

    install(prefix, "--no-venv", "--trusted-key", f"ops-2026={pub}")
    key = prefix / "etc/edgeagent/keys/ops-2026.pem"
    assert key.read_bytes() == pub.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o644 and (not IS_ROOT or key.stat().st_uid == 0)
    text = (prefix / "etc/edgeagent/installer.toml").read_text()
    assert 'trusted_keys = { "ops-2026" = "/etc/edgeagent/keys/ops-2026.pem" }' in text
    # What the helper would read on the board (the prefix stands in for /).
    board_view = tmp_path / "installer.toml"
    board_view.write_text(text.replace("/etc/edgeagent/keys", str(prefix / "etc/edgeagent/keys")))
    board_view.chmod(0o600)
    assert set(load_config(board_view).trusted_keys) == {"ops-2026"}

    before = snapshot(prefix)
    again = install(prefix, "--no-venv", "--trusted-key", f"ops-2026={pub}")
    assert snapshot(prefix) == before
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("    + ")] == []

    bad = install(prefix, "--no-venv", "--trusted-key", f"ops-2026={tmp_path / 'ops-2026.key'}", check=False)
    assert bad.returncode != 0 and "not a PEM public key" in bad.stderr


def test_an_installer_toml_without_trusted_keys_is_written_commented_and_warned_about(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    prefix.mkdir()
    install(prefix, "--no-venv")
    text = (prefix / "etc/edgeagent/installer.toml").read_text()
    assert "# trusted_keys = {" in text and "every install is refused" in text
    again = install(prefix, "--no-venv")
    assert "has no trusted_keys: the root helper refuses every firmware install" in again.stdout


RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
exit 0
"""
HOST_PATHS = ("/etc/edgeagent", "/opt/edgeagent", "/var/lib/edgeagent", "/var/lib/edgeagent-installer",
              "/var/log/edgeagent", "/etc/systemd/system/edgeagent.service",
              "/etc/systemd/system/edgeagent-installer.service",
              "/etc/systemd/system/edgeagent-installer.path",
              "/etc/systemd/system/edgeagent.service.d")


def _host_state() -> dict[str, object]:
    out: dict[str, object] = {}
    for p in HOST_PATHS:
        path = Path(p)
        out[p] = snapshot(path) if path.exists() else None
    return out


def test_prefix_touches_nothing_outside_it(tmp_path: Path, user: str) -> None:
    """install, re-run and uninstall --purge below a prefix: no user or group made or removed (the
    tools that would do it are replaced by recorders on PATH), no systemctl, none of the target's paths
    on this host created or changed, no temp file left behind, and every path printed is below the
    prefix unless it is an input (the source tree, the venv given)."""
    bin_dir, log, scratch = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "tmp"
    bin_dir.mkdir()
    scratch.mkdir()
    for tool in ("useradd", "usermod", "userdel", "groupadd", "groupdel", "systemctl"):
        (bin_dir / tool).write_text(RECORDER.format(log=log))
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(scratch)}
    prefix = tmp_path / "root"
    prefix.mkdir()
    host_before = _host_state()
    runs = [install(prefix, "--board", "raspberry-pi", user=user, env=env),
            install(prefix, "--board", "raspberry-pi", user=user, env=env),
            install(prefix, "--uninstall", "--purge", user=user, env=env)]
    assert not log.exists(), log.read_text()
    assert not user_exists(user)
    assert _host_state() == host_before
    assert list(scratch.iterdir()) == [], "temp files are removed"
    assert list(prefix.iterdir()) == []
    inputs = (str(prefix), str(ROOT), str(VENV), str(VENV.resolve()), str(scratch))
    printed = [m for r in runs for m in re.findall(r"(?<![\w.])/[\w.+-][\w./+-]*", r.stdout + r.stderr)]
    assert printed and [p for p in printed if not p.startswith(inputs)] == []


@pytest.mark.skipif(not IS_ROOT, reason="making a user needs root")
def test_an_existing_user_owns_the_agent_files_below_a_prefix(tmp_path: Path, user: str) -> None:
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", user], check=True)
    prefix = tmp_path / "root"
    prefix.mkdir()
    install(prefix, "--board", "default", user=user)
    uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
    state = prefix / "var/lib/edgeagent"
    assert state.stat().st_uid == uid and (state / "updates").stat().st_uid == uid
    config = prefix / "etc/edgeagent/config.toml"
    assert config.stat().st_uid == 0 and config.stat().st_gid == gid
    install(prefix, "--uninstall", "--purge", user=user)
    assert user_exists(user), "a prefix uninstall never removes a user"
@pytest.mark.parametrize(("version", "runtime"), [
    ("3.10", "tflite-runtime ([tflite] extra; auto: Python 3.10 <= 3.11)"),
    ("3.11", "tflite-runtime ([tflite] extra; auto: Python 3.11 <= 3.11)"),
    ("3.13", "ai-edge-litert (LiteRT, [litert] extra; auto: Python 3.13 > 3.11)"),
])
def test_the_runtime_follows_the_boards_python_and_the_install_says_which(tmp_path: Path, version: str,
                                                                          runtime: str) -> None:
    """Pi OS bookworm (3.11) gets tflite-runtime, Pi OS trixie (3.13) LiteRT: the only wheels there are."""
    python = tmp_path / f"python{version}"
    python.write_text(f"#!/bin/sh\necho {version}\n")
    python.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT), "--prefix", str(tmp_path / "root"), "--no-user", "--dry-run",
                           "--skip-checks", "--python", str(python), "--board", "raspberry-pi"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: TFLite runtime: {runtime}" in proc.stdout
