"""amqtt (a broker that speaks only MQTT 3.1.1, from PyPI) as a subprocess on a free loopback port,
like tests/broker.py starts Mosquitto: what `mqtt.protocol = "auto"` must fall back for."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.util import free_port

AMQTT = shutil.which("amqtt", path=str(Path(sys.executable).parent)) or shutil.which("amqtt")


@dataclass
class Amqtt:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "amqtt.log"

    def start(self, timeout_s: float = 20.0) -> Amqtt:
        if AMQTT is None:
            raise RuntimeError("amqtt is not installed (pip install -e '.[dev]')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "amqtt.yaml"
        conf.write_text("---\nlisteners:\n  default:\n    type: tcp\n"
                        f"    bind: 127.0.0.1:{self.port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                        "    allow_anonymous: true\n")
        with open(self.log_path, "ab") as log:  # the child keeps its own fd
            self.proc = subprocess.Popen([AMQTT, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"amqtt exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"amqtt did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
