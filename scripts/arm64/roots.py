"""Emulated arm64 Debian roots for scripts/test-arm64: build once, cache by recipe, mount, chroot.

A root is built into CACHE/NAME-HASH.partial and renamed when complete, so a build that was killed
is never taken for a finished one. HASH covers the recipe (suite, packages, build commands); the
project's dependency set is a second layer, the venv inside the root (/opt/venv), rebuilt only when
that set changes. Mounts (/proc, /sys, /dev, /dev/shm, /dev/pts) are tracked and undone in reverse
order on every exit path, and stale ones from a killed run are undone before anything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("EDGEAGENT_ARM64_CACHE", "/var/cache/edgeagent-arm64"))
MIRROR = "http://deb.debian.org/debian"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
              "debootstrap": "debootstrap", "mmdebstrap": "mmdebstrap"}
PACKAGES = "python3,python3-venv,ca-certificates"
VENV = "/opt/venv"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
QEMU_CPU = "cortex-a72"  # a Pi 4's CPU: the features (HWCAPs) the runtimes pick kernels by are a Pi's
RECIPE_VERSION = 1  # bump when the build below changes in a way the commands do not show


class StepFailed(Exception):
    """A step's failure, with the one line the summary shows."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One board image: Debian suite, the Python it ships, the runtime extra that has wheels for it."""

    name: str
    suite: str
    python: str
    extra: str
    board: str  # what it stands for, in the summary

    def commands(self, root: Path) -> list[list[str]]:
        if self.suite == "bookworm":  # debootstrap: ~25 s on the host, then ~3 min emulated
            return [["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
                     f"--include={PACKAGES}", self.suite, str(root), MIRROR],
                    chroot_argv(root, ["/debootstrap/debootstrap", "--second-stage"])]
        # trixie: debootstrap's second stage crawls under emulation (>15 min); mmdebstrap ~5 min
        return [["mmdebstrap", "--arch=arm64", "--variant=apt", f"--include={PACKAGES}", self.suite,
                 str(root), MIRROR]]

    def key(self) -> str:
        text = json.dumps([RECIPE_VERSION, self.suite, self.commands(Path("ROOT"))])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def path(self) -> Path:
        return CACHE / f"{self.name}-{self.key()}"


RECIPES = {
    "bookworm": Recipe("bookworm", "bookworm", "3.11", "tflite", "Pi OS bookworm (Debian 12), Python 3.11"),
    "trixie": Recipe("trixie", "trixie", "3.13", "litert", "Pi OS trixie (Debian 13), Python 3.13"),
}


def chroot_argv(root: Path, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """chroot with a clean environment: nothing of the host's (SSL_CERT_FILE, PIP_*) leaks in."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return ["env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", f"QEMU_CPU={QEMU_CPU}",
            *extra, "chroot", str(root), *argv]


_CHILDREN: set[subprocess.Popen[str]] = set()
_CHILDREN_LOCK = threading.Lock()


def start(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Popen in its own session, remembered so that stop_children() can end it (and what it forked)."""
    proc: subprocess.Popen[str] = subprocess.Popen(argv, start_new_session=True, text=True, **kwargs)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    return proc


def forget(proc: subprocess.Popen[str]) -> None:
    with _CHILDREN_LOCK:
        _CHILDREN.discard(proc)


def stop_children() -> None:
    """On SIGTERM/SIGINT: kill every running child's process group, so the roots can be unmounted."""
    with _CHILDREN_LOCK:
        for proc in _CHILDREN:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def run(argv: Sequence[str], what: str, log: Path, timeout_s: float = 3600.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, appending its output to `log`; on failure raise StepFailed with its last lines."""
    kept = CACHE / "logs" / log.name
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        proc = start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise StepFailed(f"{what}: timed out after {timeout_s:.0f} s (log: {kept})") from exc
        finally:
            forget(proc)
        f.write(out)
    if check and proc.returncode != 0:
        tail = " | ".join(ln for ln in out.strip().splitlines()[-3:])
        raise StepFailed(f"{what}: exit {proc.returncode}: {tail[-400:]} (log: {kept})")
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, None)


# ---------------------------------------------------------------- the host


def machine_problem() -> str | None:
    """Why this machine cannot run the arm64 job, or None. Installs the host tools when missing."""
    if sys.platform != "linux":
        return f"needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot and mounts)"
    if os.uname().machine != "x86_64":
        return f"expects an x86_64 host, this is {os.uname().machine}"
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        got = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True,
                             text=True, check=False)
        if got.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            got = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True,
                                 text=True, check=False)
        if got.returncode != 0:
            return f"cannot install {', '.join(missing)} with apt-get: {got.stderr.strip()[-200:]}"
    if not (BINFMT / "register").exists():
        got = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                             text=True, check=False)
        if got.returncode != 0:
            return f"cannot mount binfmt_misc (a container without it?): {got.stderr.strip()}"
    subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, check=False)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        return "no qemu-aarch64 binfmt entry after update-binfmts --enable qemu-aarch64"
    text = entry.read_text()
    if not text.startswith("enabled"):
        return "the qemu-aarch64 binfmt entry is disabled"
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags:  # without F the interpreter would have to exist inside every root
        return f"the qemu-aarch64 binfmt entry lacks the F flag (flags: {flags!r})"
    return None


def lock_cache() -> object:
    """One run at a time per cache (a CI run and a developer's share the machine): hold the returned
    file open for the run's life."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    f = (CACHE / ".lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        f.close()
        raise StepFailed(f"another scripts/test-arm64 is using {CACHE}") from exc
    return f


# ---------------------------------------------------------------- mounts


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def kill_inside(path: Path, timeout_s: float = 30.0) -> int:
    """SIGKILL every process chrooted below `path` (a SIGKILLed run's orphans) and wait until they
    are gone (a dying process still holds the mounts); returns how many there were."""
    prefix, killed = str(path).rstrip("/") + "/", []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            root = os.readlink(pid_dir / "root")
        except OSError:  # gone, or a kernel thread
            continue
        if (root + "/").startswith(prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGKILL)
                killed.append(pid_dir)
    deadline = time.monotonic() + timeout_s
    while any(p.exists() for p in killed) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling with a deadline: there is nothing to wait on for a non-child
    return len(killed)


def unmount_all(path: Path) -> list[str]:
    """Unmount everything below `path`, deepest first; lazily if busy. Returns what stayed mounted."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return _mounts_under(path)


def pi4_cpuinfo(cpus: int) -> str:
    """/proc/cpuinfo as a Raspberry Pi 4 (Cortex-A72) shows it, one entry per host CPU.

    qemu-user passes the host's x86 /proc/cpuinfo through, and with the host's /sys beside it the
    cpuinfo library inside LiteRT's XNNPACK (ai-edge-litert 2.3) crashes parsing it (SIGSEGV in
    Interpreter()); a real board's cpuinfo is ARM's, so the root gets one.
    """
    entry = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
             "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
             "CPU revision\t: 3\n\n")
    return "".join(entry.format(i=i) for i in range(cpus)) + "Hardware\t: BCM2835\nRevision\t: c03111\n"


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """/proc (with a Pi 4's cpuinfo), /sys (the monitor reads CPU and memory there), /dev with
    /dev/shm and /dev/pts."""
    fake = root / "run" / "edgeagent-test-cpuinfo"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(pi4_cpuinfo(os.cpu_count() or 1))
    try:
        for target, argv in (("proc", ["-t", "proc", "proc"]), ("proc/cpuinfo", ["--bind", str(fake)]),
                             ("sys", ["-t", "sysfs", "sysfs"]), ("dev", ["--bind", "/dev"]),
                             ("dev/pts", ["-t", "devpts", "devpts"]), ("dev/shm", ["-t", "tmpfs", "tmpfs"])):
            point = root / target
            if not point.exists():
                point.mkdir(parents=True)
            got = subprocess.run(["mount", *argv, str(point)], capture_output=True, text=True, check=False)
            if got.returncode != 0:
                raise StepFailed(f"mount {target}: {got.stderr.strip()}")
        yield root
    finally:
        left = unmount_all(root)
        if left:
            print(f"test-arm64: warning: still mounted: {', '.join(left)}", file=sys.stderr)


# ---------------------------------------------------------------- building and caching


def clean_stale(recipe: Recipe) -> None:
    """Undo what a killed run left of this recipe's roots: mounts, a half-built root, old recipes'."""
    keep = recipe.path()
    for p in CACHE.glob(f"{recipe.name}-*"):
        kill_inside(p)
        unmount_all(p)
        if p != keep and not _mounts_under(p):
            shutil.rmtree(p, ignore_errors=True)


def build_root(recipe: Recipe, log: Path, rebuild: bool) -> tuple[Path, bool]:
    """The cached root for the recipe (built when missing); returns it and whether it was built now."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = recipe.path()
    if rebuild and final.exists():
        unmount_all(final)
        shutil.rmtree(final)
    clean_stale(recipe)
    if (final / ".complete").exists():
        return final, False
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for argv in recipe.commands(partial):
        run(argv, f"building the {recipe.name} root", log, timeout_s=2400)
    unmount_all(partial)  # debootstrap's second stage mounts /proc itself and may leave it
    (partial / ".complete").write_text(json.dumps({"recipe": recipe.key()}) + "\n")
    partial.rename(final)
    return final, True


def refresh_host_files(root: Path) -> None:
    """What the root must trust and resolve like the host: the CA bundle (pip reaches PyPI), DNS."""
    ca = root / "etc/ssl/certs/ca-certificates.crt"
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", ca)
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    shutil.copyfile("/etc/resolv.conf", resolv)
