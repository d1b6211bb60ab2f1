"""Support bundles from a real state dir (real SQLite spool, real files): no secret leaves, the
manifest tells the truth, the cap lists what it left out, the CLI needs no broker."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import threading
from pathlib import Path

import pytest

from edgeagent import health
from edgeagent.cli import main
from edgeagent.core import logs
from edgeagent.core.config_layers import load_effective
from edgeagent.core.logring import LogRing, installed_ring
from edgeagent.support import facts
from edgeagent.support.bundle import MANIFEST, BundleError, build_bundle
from edgeagent.transport import component as transport_component
from edgeagent.transport.spool import Spool
from edgeagent.updates import jobs

PASSWORD = "hunter2"
KEY_PEM = ("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIGsecretkeymaterialdonotleak0123456789\n"
           "-----END PRIVATE KEY-----\n")
KEY_MARK = "secretkeymaterialdonotleak"
ENV_TOKEN = "env-token-value-9f8e7d"


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        out: dict[str, bytes] = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state dir with health, journal, a job, a spool with rows, a model store; a config with a
    literal password, a TLS key file, and a broker user from ${ENV}. Returns the config path."""
    state = tmp_path / "state"
    (state / "models" / "vib" / "1.0.0").mkdir(parents=True)
    (state / "models" / "vib" / "1.0.0" / "model.tflite").write_bytes(b"\x00tflite" * 100)
    (state / "models" / "active.json").write_text('{"vib": "1.0.0"}')
    (state / "updates" / "job-7").mkdir(parents=True)
    (state / "updates" / "job-7" / "status").write_text("installing\n")
    (state / "updates" / "job-7" / "log.txt").write_text("step 1\nstep 2\n")
    (state / "health.json").write_text(json.dumps({"state": "running", "pid": 1, "ts": 1.0}))
    (state / "journal.json").write_text(json.dumps({"jobs": [{"job": "job-7", "state": "installing"}]}))
    spool = Spool(state / "spool.sqlite", 1 << 20, "pi-1")
    spool.open()
    for i in range(5):
        spool.add_sample({"ts": float(i), "cpu": 12.5, "note": "PAYLOAD-MUST-NOT-LEAK"})
    spool.add_event("edge/pi-1/events", "error", "info", "PAYLOAD-MUST-NOT-LEAK")
    spool.close()
    key = tmp_path / "client.key"
    key.write_text(KEY_PEM)
    cert = tmp_path / "client.pem"
    cert.write_text("cert")
    monkeypatch.setenv("SUPPORT_TEST_TOKEN", ENV_TOKEN)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[device]
id = "pi-1"
state_dir = "{state}"
[mqtt]
username = "${{SUPPORT_TEST_TOKEN}}"
password = "{PASSWORD}"
[mqtt.tls]
cert_file = "{cert}"
key_file = "{key}"
""")
    return cfg


def test_state_file_names_match_the_runtime() -> None:
    assert facts.SPOOL_FILE == transport_component.SPOOL_FILE
    assert facts.JOURNAL_FILE == jobs.JOURNAL
    assert facts.HEALTH_FILE == health.HEALTH_FILE


def test_no_secret_anywhere_and_the_manifest_tells_the_truth(device: Path, tmp_path: Path) -> None:
    cfg = load_effective(device).config
    lines = ["level=INFO msg=connected", f"level=DEBUG msg=\"auth with {PASSWORD}\"", KEY_PEM]
    out = tmp_path / "b.tar.gz"
    result = build_bundle(cfg, out, max_bytes=5 << 20, log_lines=lines, config_path=device, journal=False)

    data = out.read_bytes()
    assert result.size == len(data) and result.sha256 == hashlib.sha256(data).hexdigest()
    members = _members(out)
    for name, body in members.items():
        for secret in (PASSWORD, KEY_MARK, ENV_TOKEN, "PAYLOAD-MUST-NOT-LEAK"):
            assert secret.encode() not in body, (secret, name)
    manifest = json.loads(members[MANIFEST])
    assert {f["name"]: f["size"] for f in manifest["files"]} == {n: len(b) for n, b in members.items()}
    assert result.files == [(f["name"], f["size"]) for f in manifest["files"]]
    assert [(o["name"], o["reason"]) for o in manifest["omitted"]] == result.omitted

    assert "key_file" in members["config/effective.toml"].decode()  # the path stays
    assert "${SUPPORT_TEST_TOKEN}" in members["config/file.toml"].decode()  # names no value
    assert "<redacted" in members["config/effective.toml"].decode()
    spool = json.loads(members["spool.json"])
    kinds = spool["backlog_by_kind"]
    assert kinds["samples"]["rows"] == 5 and kinds["events"]["rows"] == 1
    models = json.loads(members["models.json"])
    tfl = next(f for f in models["files"] if f["path"].endswith("model.tflite"))
    assert tfl["sha256"] == hashlib.sha256(b"\x00tflite" * 100).hexdigest()
    assert members["updates/job-7/status"] == b"installing\n"
    assert b"step 2" in members["updates/job-7/log.tail.txt"]
    assert b"connected" in members["logs/agent.log"]
    assert set(members) >= {"check-config.txt", "health.json", "journal.json", "board.json"}
    assert json.loads(members["board.json"])["python"]


def test_a_cap_smaller_than_the_content_lists_what_it_left_out(device: Path, tmp_path: Path) -> None:
    cfg = load_effective(device).config
    noise = [hashlib.sha256(str(i).encode()).hexdigest() * 4 for i in range(4000)]  # ~1 MB, incompressible
    out = tmp_path / "small.tar.gz"
    result = build_bundle(cfg, out, max_bytes=64 * 1024, log_lines=noise, config_path=device, journal=False)
    assert out.stat().st_size == result.size <= 64 * 1024
    omitted = dict(result.omitted)
    assert "logs/agent.log" in omitted and "does not fit" in omitted["logs/agent.log"]
    members = _members(out)
    assert "logs/agent.log" not in members and "check-config.txt" in members
    assert json.loads(members[MANIFEST])["omitted"] == [{"name": n, "reason": r} for n, r in result.omitted]
    with pytest.raises(BundleError):
        build_bundle(cfg, tmp_path / "x.tar.gz", max_bytes=100, log_lines=[], journal=False)
    assert not (tmp_path / "x.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_works_offline_without_a_broker(device: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.tar.gz"
    assert main(["support", "bundle", "-c", str(device), "-o", str(out), "--no-journal"]) == 0
    assert str(out) in capsys.readouterr().out
    members = _members(out)
    omitted = {o["name"]: o["reason"] for o in json.loads(members[MANIFEST])["omitted"]}
    assert "in-process" in omitted["logs/agent.log"]
    assert PASSWORD.encode() not in b"".join(members.values())
    assert b"none (offline" in members["check-config.txt"]

    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 0\n")
    assert main(["support", "bundle", "-c", str(bad), "-o", str(tmp_path / "y.tar.gz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mqtt.port" in err
    assert main(["support", "bundle", "-c", str(device), "-o", str(tmp_path / "no" / "z.tar.gz")]) == 2


def test_cli_without_journalctl_lists_it_as_omitted(device: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    out = tmp_path / "j.tar.gz"
    assert main(["support", "bundle", "-c", str(device), "-o", str(out)]) == 0
    omitted = {o["name"]: o["reason"] for o in json.loads(_members(out)[MANIFEST])["omitted"]}
    assert "journalctl is not installed" in omitted["logs/journal.txt"]


# --------------------------------------------------------------------------- the log ring


def test_ring_keeps_only_the_last_lines_and_bytes() -> None:
    ring = LogRing(max_lines=3, max_bytes=1000)
    for i in range(10):
        ring.append(f"line {i}")
    assert ring.recent() == ["line 7", "line 8", "line 9"] and ring.recent(2) == ["line 8", "line 9"]
    assert ring.recent(0) == [] and ring.dropped == 7

    ring = LogRing(max_lines=100, max_bytes=25)
    for i in range(10):
        ring.append(f"line-{i:04d}")  # 9 bytes each
    assert ring.recent() == ["line-0008", "line-0009"] and ring.bytes == 18
    ring.append("x" * 100)
    assert len(ring) == 1 and ring.bytes <= 25 and ring.recent()[0].endswith("[cut]")


def test_ring_is_thread_safe() -> None:
    ring = LogRing(max_lines=500, max_bytes=1 << 20)

    def write(t: int) -> None:
        for i in range(2000):
            ring.append(f"{t}:{i}")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ring) == 500 and ring.dropped == 8000 - 500
    assert ring.bytes == sum(len(x) for x in ring.recent())


def test_logs_setup_installs_the_ring_with_the_agent_formatter() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        ring = logs.setup("INFO", "kv", ring_lines=5, ring_kb=1)
        assert installed_ring() is ring
        log = logging.getLogger("edgeagent.test")
        for i in range(8):
            log.info("hello %d", i, extra={"kv": {"n": i}})
        recent = ring.recent()
        assert len(recent) == 5 and "msg=\"hello 7\"" in recent[-1] and "n=7" in recent[-1]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
