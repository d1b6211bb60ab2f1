"""What keeps the agent lean and its loop quick: loop-lag figures, lazy Ed25519, the settle step."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent.core.errors import ConfigError
from edgeagent.core.live import MemoryOutbox
from edgeagent.core.signing import TrustedKey, generate_keypair, load_trusted_keys, sign, verify
from edgeagent.core.tasks import cancel_and_wait
from edgeagent.looplag import LagTracker, LoopLagComponent, settle
from tests.util import async_wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_tracker_p99_over_the_window_only() -> None:
    t = LagTracker(window_s=60.0)
    assert t.p99_ms() is None
    for i in range(1000):
        t.observe(i * 0.05, 1.0)
    for i in range(5):
        t.observe(50.0 + i * 0.05, 500.0)  # 5 of 1005 late: not enough to move the p99
    assert t.p99_ms() == 1.0
    for i in range(20):
        t.observe(51.0 + i * 0.05, 200.0)
    assert t.p99_ms() == 200.0  # 25 of 1025 late: the 99th percentile is among them
    t.observe(200.0, 2.0)  # a minute later the old samples are gone
    assert t.p99_ms() == 2.0 and t.section()["samples"] == 1 and t.section()["lag_max_ms"] == 500.0


def test_tracker_warns_once_after_the_lag_lasts_and_rearms_after_recovery() -> None:
    t = LagTracker(warn_ms=100.0, warn_for_s=10.0)
    assert t.observe(0.0, 150.0) is None
    assert t.observe(5.0, 150.0) is None
    assert t.observe(6.0, 20.0) is None  # dropped below: the 10 s start over
    verdicts = [t.observe(6.0 + i, 150.0) for i in range(12)]
    assert verdicts.count("warn") == 1 and verdicts.index("warn") == 10
    assert t.observe(20.0, 150.0) is None  # still lagging: no second warning
    assert t.observe(21.0, 10.0) == "recovered"
    assert [t.observe(22.0 + i, 150.0) for i in range(11)].count("warn") == 1


def test_component_reports_a_blocked_loop_as_a_warning_event() -> None:
    async def main() -> None:
        outbox = MemoryOutbox()
        comp = LoopLagComponent(outbox, period_s=0.01, tracker=LagTracker(warn_ms=50.0, warn_for_s=0.3))
        async with comp:
            task = asyncio.create_task(comp.run(), name="loop-lag")
            await async_wait_until(lambda: comp.section()["samples"] >= 3, 10)
            assert comp.section()["lag_p99_ms"] is not None and not outbox.events
            deadline = time.monotonic() + 20
            while not outbox.events and time.monotonic() < deadline:
                time.sleep(0.08)  # the work under test: the loop blocked for 80 ms at a time
                await asyncio.sleep(0)
            await cancel_and_wait(task)
        kind, severity, message, data, _ = outbox.events[0]
        assert (kind, severity) == ("error", "warning") and "event loop lagging" in message
        assert data["lag_p99_ms"] >= 50.0 and comp.section()["lag_max_ms"] >= 50.0

    asyncio.run(main())


def test_settle_runs_anywhere() -> None:
    import gc

    settle()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()


def test_trusted_keys_load_without_cryptography_and_verify(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    code = ("import sys; from edgeagent.core.signing import load_trusted_keys; "
            f"keys = load_trusted_keys({{'ops': {str(tmp_path / 'k.pub.pem')!r}}}); "
            "print(type(keys['ops']).__name__, 'cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["TrustedKey", "False"]
    keys = load_trusted_keys({"ops": str(tmp_path / "k.pub.pem")})
    assert isinstance(keys["ops"], TrustedKey)
    from edgeagent.core.signing import load_private_key

    msg = sign({"v": 1, "type": "cancel", "job": "j"}, load_private_key(tmp_path / "k.pem"), "ops")
    assert verify(msg, keys, "cancel") == "ops"
    from edgeagent.core.errors import SignatureInvalid

    with pytest.raises(SignatureInvalid):
        verify({**msg, "job": "k"}, keys, "cancel")


def test_a_key_that_is_not_ed25519_is_still_refused_with_the_reason(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pem").write_bytes(pem)
    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as info:
        load_trusted_keys({"ec": str(tmp_path / "ec.pem"), "junk": str(tmp_path / "junk.pem")})
    text = " ".join(info.value.errors)
    assert "expected an Ed25519 public key" in text and "updates.trusted_keys.junk" in text
