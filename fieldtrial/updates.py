"""Update cases the trial pushes during the faults, good and bad, and what each must end as.

Manifests are built and signed like `edgeagent push` does (`build_manifest` + `signing.sign`) and
served by its `Pusher` (chunks, re-requests) straight to the broker (the operator is not behind the
flaky link); broken ones are made by editing the manifest before or after signing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.core import signing
from edgeagent.ops.fleet.connect import BrokerUrl
from edgeagent.ops.push import Pusher, build_manifest
from edgeagent.ops.push_session import close_session, open_session, serve
from fieldtrial.fwtool import FAIL_HEALTH, FAIL_INSTALL

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "edgeagent" / "models" / "vibration-anomaly" / "model.tflite"
NAN_MODEL = Path(__file__).resolve().parent / "fixtures" / "nan.tflite"
KEY_ID = "trial"
log = logging.getLogger(__name__)

# case -> the final states that are right for it
EXPECTED: dict[str, frozenset[str]] = {
    "model-good": frozenset({"succeeded"}),
    "model-nan": frozenset({"rolled_back", "failed", "rejected"}),  # never active: validation or probation
    "bad-signature": frozenset({"rejected"}),
    "version-rollback": frozenset({"rejected"}),
    "sha-mismatch": frozenset({"rejected"}),
    "fw-good": frozenset({"succeeded"}),
    "fw-fail-install": frozenset({"failed"}),
    "fw-fail-health": frozenset({"rolled_back"}),
}
MODEL_CASES = ("model-good", "model-nan", "sha-mismatch", "version-rollback", "bad-signature")
FIRMWARE_CASES = ("fw-good", "fw-fail-install", "fw-fail-health")


@dataclass
class UpdateCase:
    case: str
    device: str
    job: str
    kind: str
    version: str
    kill: str = ""  # "", "mid-download" or "mid-install": kill -9 the agent at that moment
    final: str = ""  # what the device reported last (retained status)
    reason: str = ""
    started_at: float = 0.0
    finished_s: float | None = None
    journal: str = ""  # the device's own journal, for a cross-check with what it reported

    @property
    def ok(self) -> bool:
        return self.final in EXPECTED[self.case]


class Artifacts:
    """Keys and files for every case, made once in the trial's work dir."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "artifacts"
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        signing.generate_keypair(keys / f"{KEY_ID}.key", keys / f"{KEY_ID}.pem")
        self.pubkey = keys / f"{KEY_ID}.pem"
        self.key: Ed25519PrivateKey = signing.load_private_key(keys / f"{KEY_ID}.key")
        self.rogue = Ed25519PrivateKey.generate()  # signs the bad-signature case under our key id
        self.model = self.dir / "model.tflite"
        shutil.copyfile(SHIPPED_MODEL, self.model)
        self.nan = self.dir / "nan.tflite"
        shutil.copyfile(NAN_MODEL, self.nan)
        rng_bytes = os.urandom(200_000)
        self.fw_good = self.dir / "rootfs-good.img"
        self.fw_good.write_bytes(b"GOOD-IMAGE" + rng_bytes)
        self.fw_fail_install = self.dir / "rootfs-fail-install.img"
        self.fw_fail_install.write_bytes(FAIL_INSTALL + rng_bytes[:50_000])
        self.fw_fail_health = self.dir / "rootfs-fail-health.img"
        self.fw_fail_health.write_bytes(FAIL_HEALTH + rng_bytes[:80_000])

    def build(self, u: UpdateCase) -> tuple[dict[str, Any], Path]:
        """The signed (or deliberately broken) manifest and the file whose chunks are served."""
        path = {"model-good": self.model, "model-nan": self.nan, "bad-signature": self.model,
                "version-rollback": self.model, "sha-mismatch": self.model, "fw-good": self.fw_good,
                "fw-fail-install": self.fw_fail_install, "fw-fail-health": self.fw_fail_health}[u.case]
        name = "vibration-anomaly" if u.kind == "model" else "rootfs"
        # the smallest chunks devices accept (updates.manifest.MIN_CHUNK_SIZE): most messages per model
        chunk = 4 * 1024 if u.kind == "model" else 16 * 1024
        m = build_manifest(path, job=u.job, kind=u.kind, name=name, version=u.version, chunk_size=chunk)
        if u.case == "sha-mismatch":
            m["sha256"] = hashlib.sha256(b"not the artifact" + u.job.encode()).hexdigest()
            # only the whole-file hash is wrong: every chunk passes its own (required) sha256
        key = self.rogue if u.case == "bad-signature" else self.key
        return signing.sign(m, key, KEY_ID), path


class SlowPusher(Pusher):
    """`edgeagent push`'s Pusher, pacing chunks so a download lasts long enough to be interrupted."""

    def __init__(self, *args: Any, chunk_delay_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.chunk_delay_s = chunk_delay_s

    def _publish_chunks(self, indices: list[int], f: Any) -> None:
        if not self.chunk_delay_s:
            super()._publish_chunks(indices, f)
            return
        for i in indices:
            super()._publish_chunks([i], f)
            time.sleep(self.chunk_delay_s)


def push(port: int, manifest: dict[str, Any], artifact: Path, device: str, timeout_s: float,
         chunk_delay_s: float = 0.0, stop: threading.Event | None = None) -> None:
    """Publish and serve one update until the device finishes it (or the timeout), as `edgeagent
    push` does (ops/push_session.py): a persistent session per job survives a broker restart in the
    middle; the first connect is retried while the broker is down."""
    url = BrokerUrl.parse(f"mqtt://127.0.0.1:{port}")
    client = open_session(url, f"trial-push-{manifest['job']}", 3600, retry_s=60.0, keepalive_s=10)
    try:
        serve(client, lambda: SlowPusher(client, "edge", manifest, artifact, device=device,
                                         chunk_delay_s=chunk_delay_s), timeout_s)
    finally:
        close_session(client)
