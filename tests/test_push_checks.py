"""What `edgeagent push` checks before sending (ops/push_checks.py) and how it words outcomes
(ops/push_report.py): pure functions over real model files."""

from __future__ import annotations

import io
import re
import tarfile
import time
from pathlib import Path

import pytest

from edgeagent.ops.push_checks import (
    PushCheckFailed,
    against_device,
    check_job,
    check_name_version,
    model_facts,
    tflite_input_shape,
)
from edgeagent.ops.push_report import Reporter, detail, outcome, table
from tests.updates_helpers import MODEL, ROOT

BAD_SHAPE = ROOT / "tests" / "models" / "bad_shape.tflite"


def _bundle(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_input_shape_is_read_from_the_flatbuffer(tmp_path: Path) -> None:
    # the same shapes the TFLite interpreter reports for these files (tests/test_inference_runtime.py)
    assert model_facts(MODEL).input_shape == (1, 102)
    assert tflite_input_shape(BAD_SHAPE.read_bytes()) == (1, 50)
    bundle = _bundle(tmp_path / "m.tar.gz", {"model.tflite": MODEL.read_bytes(), "model.toml": b"x = 1\n"})
    facts = model_facts(bundle)
    assert facts.bundle and facts.input_shape == (1, 102)


@pytest.mark.parametrize(("data", "needle"), [
    (b"\x1c\x00\x00\x00TFL2" + bytes(64), "bytes 4-8 are b'TFL2'"),
    (b"TFL3", "not a TFLite model"),
    (MODEL.read_bytes()[:40], "truncated or corrupt"),
])
def test_not_a_model_is_refused(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(data)
    with pytest.raises(PushCheckFailed, match=re.escape(needle)):
        model_facts(path)


def test_a_bundle_without_its_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PushCheckFailed, match=r"must hold model\.tflite"):
        model_facts(_bundle(tmp_path / "b.tar.gz", {"model.toml": b"x = 1\n"}))
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + bytes(30))
    with pytest.raises(PushCheckFailed, match=r"not a readable \.tar\.gz"):
        model_facts(tmp_path / "junk.tar.gz")


def test_names_versions_and_job_ids() -> None:
    check_name_version("vibration-anomaly", "1.4.0-rc1")
    for name, version in (("bad/name", "1.0"), ("", "1.0"), ("ok", "v1"), ("ok", "1.0.0.0.0")):
        with pytest.raises(PushCheckFailed):
            check_name_version(name, version)
    check_job("vibration-anomaly-1.4.0-1a2b3c4d")
    with pytest.raises(PushCheckFailed):
        check_job("x" * 65)


def test_against_what_the_device_runs() -> None:
    facts = model_facts(MODEL)
    status = {"state": "online", "model": {"name": "vibration-anomaly", "version": "1.4.0"}}
    refused, notes = against_device("model", "vibration-anomaly", "1.4.0", status, facts)
    assert refused == ["runs vibration-anomaly 1.4.0: 1.4.0 is not above it (devices refuse a downgrade)"]
    assert notes == ["input shape (1, 102) checked in the file only (the device does not report its own)"]
    assert against_device("model", "vibration-anomaly", "1.5.0", status, facts)[0] == []
    assert against_device("model", "other", "0.1.0", status, facts)[0] == []  # another model: no claim
    shaped = {"model": {"name": "vibration-anomaly", "version": "1.0.0", "input_shape": [1, 50]}}
    refused, notes = against_device("model", "vibration-anomaly", "2.0.0", shaped, facts)
    assert refused == ["its model takes input (1, 50), this one (1, 102)"] and notes == []
    fw = {"firmware": {"version": "3.0.0", "slot": "A"}}
    assert against_device("firmware", "rootfs", "2.0.0", fw, None) == ([], [])  # other name: unknown


def test_outcome_words_never_say_timed_out_for_a_deferred_job() -> None:
    now = time.time()
    deferred = {"state": "deferred", "reason": "battery 8% < 30% (on battery)", "next_try": now + 300}
    assert detail(deferred, now).startswith("battery 8% < 30% (on battery); next try ")
    assert "(in 5m)" in detail(deferred, now)
    state, text = outcome(deferred, {"state": "online"})
    assert state == "deferred" and "not finished" not in text and "timed out" not in text
    assert outcome({"state": "downloading", "progress": 0.4}, None) == ("downloading",
                                                                         "40%; not finished at the deadline")
    assert outcome({"state": "rolled_back", "reason": "NaN outputs"}, None) == ("rolled back", "NaN outputs")
    assert outcome(None, {"state": "offline", "reason": "connection-lost"})[0] == "offline"
    assert outcome(None, {"state": "online"})[0] == "no answer"
    assert table([("devA", "succeeded", ""), ("b", "rejected", "why")]).splitlines() == [
        "DEVICE  STATE      DETAIL", "devA    succeeded", "b       rejected   why"]


def test_reporter_plain_lines_without_a_terminal() -> None:
    out = io.StringIO()
    r = Reporter(out, tty=False)
    r.status("d", {"state": "received"})
    r.status("d", {"state": "received"})  # the same again (a republished status): said once
    for p in (0.0, 0.1, 0.3, 0.35, 0.6, 1.0):
        r.status("d", {"state": "downloading", "progress": p})
    r.status("d", {"state": "succeeded", "reason": "serving"})
    assert out.getvalue().splitlines() == ["d: accepted", "d: downloading 0%", "d: downloading 30%",
                                           "d: downloading 60%", "d: downloading 100%",
                                           "d: succeeded: serving"]
    bar = io.StringIO()
    r = Reporter(bar, tty=True)
    r.status("d", {"state": "downloading", "progress": 0.5})
    r.status("d", {"state": "verified", "reason": "sha256 ok"})
    assert bar.getvalue() == f"\rd: downloading [{'#' * 15:<30}]  50.0%\nd: verified: sha256 ok\n"
