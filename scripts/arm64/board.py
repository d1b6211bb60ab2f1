"""The steps scripts/test-arm64 runs inside one emulated root, each returning its summary line.

Everything runs through chroot with a clean environment (roots.chroot_argv) against the venv at
/opt/venv, which holds the dependencies (cached while the wheel's dependency set is unchanged) and
the project's wheel (reinstalled every run, --no-deps). The project's tests, configs and the parity
script are copied to /srv/edgeagent: the source tree never enters the root.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from arm64 import roots, wheelcheck
from arm64.roots import VENV, Recipe, StepFailed, chroot_argv, run

SRV = "/srv/edgeagent"
PYPI = "https://pypi.org/simple"  # the root installs from PyPI only, never the host's mirrors
DEPS_VERSION = 1  # bump to force fresh venvs
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.90"]
# the modules that test what a board runs: inference, its model files, the monitor, the config
TEST_MODULES = ["tests/test_inference_runtime.py", "tests/test_inference_runner.py",
                "tests/test_inference_store.py", "tests/test_preprocess.py", "tests/test_monitor.py",
                "tests/test_config.py"]
RUN_S = 20.0  # how long the agent runs once it is online
PARITY_TOL = 1e-5


@dataclasses.dataclass
class Board:
    recipe: Recipe
    root: Path
    wheel: Path  # on the host
    src: Path  # the checkout: tests, configs, the parity script
    log: Path

    def inside(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def chroot(self, argv: list[str], what: str, env: dict[str, str] | None = None,
               timeout_s: float = 1800.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(chroot_argv(self.root, argv, env), what, self.log, timeout_s=timeout_s, check=check)


def _pip_env() -> dict[str, str]:
    return {"PIP_INDEX_URL": PYPI, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180"}


def deps(b: Board) -> str:
    """The venv with the wheel's dependencies for the recipe's extra, built only when they changed."""
    wanted = wheelcheck.requires(b.wheel, b.recipe.extra)
    stamp = wheelcheck.digest(DEPS_VERSION, b.recipe.key(), b.recipe.extra, wanted, TEST_TOOLS)
    stamp_file = b.inside(VENV) / ".edgeagent-deps"
    if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return f"cached ({len(wanted)} requirements, stamp {stamp})"
    shutil.rmtree(b.inside(VENV), ignore_errors=True)
    b.chroot(["python3", "-m", "venv", VENV], "python3 -m venv")
    wheel_in = _copy_wheel(b)
    b.chroot([f"{VENV}/bin/pip", "install", "--only-binary=:all:", f"{wheel_in}[{b.recipe.extra}]",
              *TEST_TOOLS], f"pip install the [{b.recipe.extra}] dependencies", env=_pip_env())
    stamp_file.write_text(stamp + "\n")
    return f"installed ({len(wanted)} requirements + test tools, stamp {stamp})"


def _copy_wheel(b: Board) -> str:
    dest = b.inside("/srv/wheels")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copy2(b.wheel, dest / b.wheel.name)
    return f"/srv/wheels/{b.wheel.name}"


def install(b: Board) -> str:
    """Reinstall only the project's wheel (same version number, new code), then lay out /srv."""
    wheel_in = _copy_wheel(b)
    b.chroot([f"{VENV}/bin/pip", "install", "--no-deps", "--force-reinstall", "--no-index", wheel_in],
             "pip install --no-deps the wheel")
    srv = b.inside(SRV)
    shutil.rmtree(srv, ignore_errors=True)
    srv.mkdir(parents=True)
    for name in ("tests", "configs"):
        shutil.copytree(b.src / name, srv / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(b.src / "pyproject.toml", srv / "pyproject.toml")  # pytest's settings and markers
    shutil.copy2(Path(__file__).with_name("parity.py"), srv / "parity.py")
    probe = ("import platform, edgeagent, numpy; print(edgeagent.__version__, platform.machine(), "
             "platform.python_version(), numpy.__version__)")
    got = b.chroot([f"{VENV}/bin/python", "-c", probe], "import edgeagent")
    version, machine, python, numpy = got.stdout.split()[-4:]
    if machine != "aarch64":
        raise StepFailed(f"the root runs {machine}, not aarch64: is binfmt emulation on?")
    return f"edgeagent {version} on {machine}, Python {python}, numpy {numpy}"


def check_config(b: Board) -> str:
    """The Pi's config as shipped, with the sensor switched to the simulator through its ${ENV} value.
    `--no-files`: the root is not a provisioned board (no TLS client key, no trusted keys under
    /etc/edgeagent); on a board `edgeagent check` checks those files."""
    env = {"EDGEAGENT_SENSOR_SOURCE": "simulated"}
    argv = [f"{VENV}/bin/edgeagent", "check-config", "--no-files", f"{SRV}/configs/raspberry-pi.toml"]
    got = b.chroot(argv,
                   "edgeagent check-config configs/raspberry-pi.toml", env=env)
    # the summary's sensor line ("sensors" or, with several sources, "sources"): it must say simulated
    lines = [ln.strip() for ln in got.stdout.splitlines() if ln.startswith(("sensors", "sources"))]
    if not any("simulated" in ln for ln in lines):
        raise StepFailed(f"check-config: the sensor is not the simulator: {lines or got.stdout[-300:]}")
    return f"OK; {'; '.join(' '.join(ln.split()) for ln in lines)}"


# ---------------------------------------------------------------- run against the host's broker


class Watch:
    """The host's side: a subscriber on the device's topics, recording what arrives (paho, threaded)."""

    def __init__(self, port: int, device: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.device = device
        self.lock = threading.Lock()
        self.status: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.changed = threading.Condition(self.lock)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"arm64-watch-{device}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edge/{device}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _client: object, _userdata: object, msg: Any) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        with self.changed:
            if msg.topic.endswith("/status"):
                self.status.append(payload)
            elif msg.topic.endswith("/telemetry"):
                self.telemetry.extend(payload.get("samples", []))
            self.changed.notify_all()

    def wait(self, what: str, predicate: Any, timeout_s: float,
             proc: subprocess.Popen[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not predicate():
                if proc is not None and proc.poll() is not None:
                    raise StepFailed(f"the agent exited ({proc.returncode}) before {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StepFailed(f"no {what} within {timeout_s:.0f} s")
                self.changed.wait(min(left, 1.0))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained_status(port: int, device: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """What a new subscriber gets: the broker's retained status of the device."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[dict[str, Any]] = []
    done = threading.Event()

    def on_message(_c: object, _u: object, msg: Any) -> None:
        if msg.retain:
            got.append(json.loads(msg.payload))
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"arm64-retained-{device}")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe(f"edge/{device}/status", qos=1)
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise StepFailed("no retained status on the broker")
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def _last_error(agent_log: Path) -> str:
    """The agent's last ERROR, as its exception's final line (what went wrong, not the traceback)."""
    lines = [ln for ln in agent_log.read_text(errors="replace").splitlines() if "level=ERROR" in ln]
    if not lines:
        return "(no error in the agent's log)"
    last = lines[-1]
    if 'exc="' in last:
        last = last.split('exc="', 1)[1].rstrip('"').split("\\n")[-1]
    return "agent: " + last[-300:]


def run_agent(b: Board, port: int, agent_log: Path) -> str:
    """`edgeagent run` on configs/dev.toml (loopback broker, simulated sensor, inference on) for ~20 s."""
    device = f"arm64-{b.recipe.name}"
    state = "/var/lib/edgeagent-arm64-test"
    shutil.rmtree(b.inside(state), ignore_errors=True)
    env = {"EDGEAGENT_DEVICE_ID": device, "EDGEAGENT_STATE_DIR": state, "EDGEAGENT_MQTT_PORT": str(port)}
    watch = Watch(port, device)
    t0 = time.monotonic()
    with agent_log.open("w") as out:
        argv = [f"{VENV}/bin/edgeagent", "run", "-c", f"{SRV}/configs/dev.toml"]
        proc = roots.start(chroot_argv(b.root, argv, env), stdout=out, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
    try:
        try:
            watch.wait("online status", lambda: any(s.get("state") == "online" for s in watch.status),
                       180.0, proc)
        except StepFailed as exc:
            raise StepFailed(f"{exc}: {_last_error(agent_log)}") from exc
        online_s = time.monotonic() - t0
        status = retained_status(port, device)
        if status.get("state") != "online" or status.get("arch") != "aarch64":
            raise StepFailed(f"retained status is not online on aarch64: {status}")

        def inferred() -> int:
            counts = [s.get("inference", {}).get("count", 0) for s in watch.telemetry]
            return max(counts, default=0)

        try:
            watch.wait("10 inference results in telemetry", lambda: inferred() >= 10, 120.0, proc)
        except StepFailed as exc:
            raise StepFailed(f"{exc}: {_last_error(agent_log)}") from exc
        try:  # inference on for RUN_S more; the agent must not exit meanwhile
            proc.wait(timeout=RUN_S)
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is not None:
            raise StepFailed(f"the agent exited ({proc.returncode}) while running: {_last_error(agent_log)}")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired as exc:
            raise StepFailed("the agent did not stop within 90 s of SIGTERM") from exc
        if code != 0:
            raise StepFailed(f"the agent exited {code} on SIGTERM: {_last_error(agent_log)}")
        watch.wait("offline status after SIGTERM",
                   lambda: bool(watch.status) and watch.status[-1].get("state") == "offline", 30.0)
        offline = watch.status[-1]
        if offline.get("reason") != "shutdown":
            raise StepFailed(f"offline status with reason {offline.get('reason')!r}, not 'shutdown'")
        with watch.lock:
            samples = list(watch.telemetry)
        missing = [k for k in ("cpu_percent", "mem_used_percent")
                   if not any(k in s.get("metrics", {}) for s in samples)]
        if missing:
            raise StepFailed(f"telemetry without {', '.join(missing)} ({len(samples)} samples)")
        # the rate of the last sample before the stop (the final one, while stopping, says 0 Hz)
        running = [s["inference"] for s in samples if s.get("inference", {}).get("rate_hz")]
        if not running:
            raise StepFailed(f"no telemetry sample with an inference rate ({len(samples)} samples)")
        last = max(running, key=lambda i: i.get("count", 0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        roots.forget(proc)
        watch.stop()
    return (f"online after {online_s:.1f} s, retained status arch={status['arch']}; {len(samples)} "
            f"telemetry samples with CPU+memory; {last.get('count')} inferences at {last.get('rate_hz')} Hz, "
            f"p95 {last.get('p95_ms')} ms, dropped {last.get('dropped')}; offline/shutdown on SIGTERM")


# ---------------------------------------------------------------- parity and tests


def parity(b: Board, host: dict[str, Any], windows: Path) -> str:
    from arm64 import parity as paritymod

    shutil.copy2(windows, b.inside(f"{SRV}/windows.npy"))
    got = b.chroot([f"{VENV}/bin/python", f"{SRV}/parity.py", "classify", f"{SRV}/windows.npy"],
                   "parity.py classify in the root")
    board = json.loads(got.stdout.strip().splitlines()[-1])
    problems = paritymod.compare(host, board, PARITY_TOL)
    if problems:
        raise StepFailed(f"{len(problems)} disagreement(s): " + "; ".join(problems[:3]))
    n = len(next(iter(host["models"].values())))
    worst = max(abs(a["score"] - c["score"]) for name, rows in host["models"].items()
                for a, c in zip(rows, board["models"][name], strict=True))
    return (f"{n} windows x {len(host['models'])} models: same classes, scores (max diff {worst:.1e}); "
            f"host {host['runtime']}, "
            f"board {board['runtime']} numpy {board['numpy']}")


def pytest(b: Board) -> str:
    argv = [f"{VENV}/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_MODULES]
    got = b.chroot(["sh", "-c", f'cd {SRV} && exec "$@"', "pytest", *argv], "pytest in the root",
                   timeout_s=2400, check=False)
    tail = [ln for ln in got.stdout.strip().splitlines() if ln.strip()][-1:]
    summary = tail[0].strip("= ") if tail else "no output"
    if got.returncode != 0:
        raise StepFailed(f"pytest: {summary} (log: {roots.CACHE / 'logs' / b.log.name})")
    return summary
