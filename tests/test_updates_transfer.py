"""Chunk assembly on real files: validation before write, duplicates, resume from the bitmap, sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core.errors import BundleRejected, ChunkRejected
from edgeagent.updates import bundle, manifest
from edgeagent.updates.jobs import InvalidTransition, Job, Journal
from edgeagent.updates.transfer import Transfer
from tests.updates_helpers import MODEL, make_keys, signed

CHUNK = 4096


def make(tmp: Path, data: bytes) -> tuple[manifest.Manifest, Path]:
    art = tmp / "src.bin"
    art.write_bytes(data)
    key, _ = make_keys(tmp / "keys")
    msg = signed(art, key, chunk_size=CHUNK)
    return manifest.parse(msg), art


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def test_assembles_out_of_order_ignores_duplicates_and_verifies(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 5 + 123)
    m, _ = make(tmp_path, data)
    t = Transfer(tmp_path / "job", m)
    t.open()
    parts = chunks(data)
    for i in (5, 0, 3, 3, 1):
        t.write(i, parts[i])
    assert t.duplicates == 1
    assert t.missing_ranges() == [(2, 2), (4, 4)]
    t.write(2, parts[2])
    t.write(4, parts[4])
    assert t.complete and t.missing_ranges() == []
    assert t.finish() == hashlib.sha256(data).hexdigest()
    assert t.artifact_path.read_bytes() == data and not t.part_path.exists()


@pytest.mark.parametrize(("index", "payload", "expected"), [
    (6, b"x" * CHUNK, "index out of range"),  # more chunks than declared
    (-1, b"x" * CHUNK, "index out of range"),
    (0, b"x" * (CHUNK + 1), "oversized"),
    (0, b"x" * 10, "size mismatch"),
    (5, b"x" * CHUNK, "size mismatch"),  # the last chunk is short
    (1, b"y" * CHUNK, "chunk_sha256 mismatch"),
])
def test_bad_chunks_are_never_written(tmp_path: Path, index: int, payload: bytes, expected: str) -> None:
    data = os.urandom(CHUNK * 5 + 123)
    m, _ = make(tmp_path, data)
    t = Transfer(tmp_path / "job", m)
    t.open()
    with pytest.raises(ChunkRejected) as exc:
        t.write(index, payload)
    assert expected in exc.value.reason
    t.close()
    assert t.received == 0
    assert (tmp_path / "job" / "artifact.part").read_bytes() == b"\x00" * len(data)


def test_sha256_mismatch_of_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 2)
    m, _ = make(tmp_path, data)
    m = dataclasses.replace(m, sha256="0" * 64)  # every chunk passes its own hash, the file does not
    t = Transfer(tmp_path / "job", m)
    t.open()
    for i, part in enumerate(chunks(data)):
        t.write(i, part)
    assert t.finish() != m.sha256
    assert not t.artifact_path.exists()


def test_resume_from_persisted_bitmap(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 8)
    m, _ = make(tmp_path, data)
    parts = chunks(data)
    t = Transfer(tmp_path / "job", m, persist_every_s=3600)
    t.open()
    for i in range(4):
        t.write(i, parts[i])
    t.persist(force=True)
    t.write(4, parts[4])  # written but not yet recorded in the bitmap: must be asked for again
    # a new process (no close: as after kill -9)
    t2 = Transfer(tmp_path / "job", m)
    t2.open()
    assert t2.received == 4 and t2.missing_ranges() == [(4, 7)]
    for i in range(4, 8):
        t2.write(i, parts[i])
    assert t2.finish() == m.sha256


# ------------------------------------------------------------------ bundles


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[Any, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


def test_bundle_good_and_raw(tmp_path: Path) -> None:
    model = MODEL.read_bytes()
    art = tmp_path / "b.tar.gz"
    art.write_bytes(tar_gz([member("model.tflite", model), member("model.toml", b"threshold = 0.5\n")]))
    out = bundle.stage(art, tmp_path / "staged", 10 << 20)
    assert (out / "model.tflite").read_bytes() == model and (out / "model.toml").exists()
    raw = bundle.stage(MODEL, tmp_path / "raw", 10 << 20)
    assert (raw / "model.tflite").read_bytes() == model


@pytest.mark.parametrize(("members", "expected"), [
    ([member("../evil.tflite", b"x")], "'..'"),
    ([member("sub/../../evil", b"x")], "'..'"),
    ([member("/etc/cron.d/evil", b"x")], "absolute path"),
    ([member("model.tflite", kind=tarfile.SYMTYPE, link="/etc/passwd")], "is a link"),
    ([member("model.tflite", kind=tarfile.LNKTYPE, link="x")], "is a link"),
    ([member("dev", kind=tarfile.CHRTYPE)], "not a regular file"),
    ([member("notes.txt", b"hi")], "no model.tflite"),
    ([member("model.tflite", b"not a flatbuffer")], "not a TFLite flatbuffer"),
])
def test_bundle_refusals(tmp_path: Path, members: list[Any], expected: str) -> None:
    art = tmp_path / "b.tar.gz"
    art.write_bytes(tar_gz(members))
    with pytest.raises(BundleRejected) as exc:
        bundle.stage(art, tmp_path / "staged", 10 << 20)
    assert expected in exc.value.reason
    assert not (tmp_path / "staged").exists()
    assert not (tmp_path / "evil.tflite").exists()


def test_decompression_bomb_stops_early(tmp_path: Path) -> None:
    art = tmp_path / "bomb.tar.gz"
    art.write_bytes(tar_gz([member("model.tflite", b"\x00" * (64 << 20))]))  # 64 MiB of zeros
    assert art.stat().st_size < 200_000
    with pytest.raises(BundleRejected) as exc:
        bundle.stage(art, tmp_path / "staged", art.stat().st_size * 20)
    assert "decompression bomb" in exc.value.reason
    assert not (tmp_path / "staged").exists()


def test_header_bomb_is_cut_off_while_decompressing(tmp_path: Path) -> None:
    """A GNU long name is read whole before tarfile yields the member: member sizes bound nothing."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("a" * (8 << 20))  # an 8 MiB file name, 0 bytes of data
        t.addfile(info, io.BytesIO(b""))
    art = tmp_path / "headers.tar.gz"
    art.write_bytes(buf.getvalue())
    with pytest.raises(BundleRejected) as exc:
        bundle.stage(art, tmp_path / "staged", 1 << 20)  # 1 MiB may unpack (+1 MiB for headers)
    assert "decompression bomb" in exc.value.reason
    assert not (tmp_path / "staged").exists()


# ------------------------------------------------------------------ journal


def test_journal_persists_each_transition_atomically(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    job = Job(job="j1", kind="model", name="m", version="1.0.0", digest="d", manifest={"v": 1})
    j.add(job)
    j.transition(job, "downloading", "waiting for chunks")
    j.newest_issued["model/m"] = 123.0
    j.transition(job, "verified", "sha256 ok", progress=1.0)
    again = Journal(tmp_path)
    again.load()
    got = again.jobs["j1"]
    assert got.state == "verified" and got.progress == 1.0 and again.newest_issued == {"model/m": 123.0}
    assert [s for s, _ in got.history] == ["received", "downloading", "verified"]
    with pytest.raises(InvalidTransition):
        again.transition(got, "succeeded")
    assert not list(tmp_path.glob(".journal.json.*.tmp"))
