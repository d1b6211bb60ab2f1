"""Model store on disk: versions, atomic active.json, keep N, rollback, seeding from the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent.inference.store import ActiveRecord, ModelStore
from tests.inference_helpers import SHIPPED

NAME = "vibration-anomaly"


def staged(tmp: Path, tag: str, meta: bool = True) -> Path:
    d = tmp / f"staged-{tag}"
    d.mkdir()
    (d / "model.tflite").write_bytes(f"model {tag}".encode())
    if meta:
        (d / "model.toml").write_text(f"# {tag}\n")
    return d


def test_seed_installs_the_shipped_model_once(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    rec = store.seed(NAME, "int8")
    assert rec == ActiveRecord(NAME, "1.0.0", ())
    vdir = tmp_path / "models" / NAME / "1.0.0"
    assert (vdir / "model.tflite").read_bytes() == (SHIPPED / "model.tflite").read_bytes()
    assert (vdir / "model.toml").read_bytes() == (SHIPPED / "model.toml").read_bytes()
    assert json.loads((tmp_path / "models" / NAME / "active.json").read_text()) == \
        {"name": NAME, "version": "1.0.0", "previous": []}
    store.add(NAME, "1.1.0", staged(tmp_path, "b"))
    store.activate(NAME, "1.1.0")
    assert store.seed(NAME, "int8") == ActiveRecord(NAME, "1.1.0", ("1.0.0",))  # not re-seeded
    assert store.seed("unknown-model") is None


def test_float_variant_seeds_the_float_file(tmp_path: Path) -> None:
    ModelStore(tmp_path).seed(NAME, "float")
    assert (tmp_path / NAME / "1.0.0" / "model.tflite").read_bytes() == \
        (SHIPPED / "model_float.tflite").read_bytes()


def test_activate_keeps_n_versions_newest_first_and_prunes_the_rest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", keep=3)
    for v in ("1", "2", "3", "4", "5"):
        store.add(NAME, v, staged(tmp_path, v))
        rec = store.activate(NAME, v)
    assert rec == ActiveRecord(NAME, "5", ("4", "3"))
    assert store.versions(NAME) == ["3", "4", "5"]
    assert store.active(NAME) == rec


def test_rollback_restores_the_previous_version_and_deletes_the_failed_one(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=3)
    for v in ("1", "2", "3"):
        store.add(NAME, v, staged(tmp_path, v))
        store.activate(NAME, v)
    assert store.rollback(NAME, "3") == ActiveRecord(NAME, "2", ("1",))
    assert store.versions(NAME) == ["1", "2"]
    assert store.rollback(NAME, "2") == ActiveRecord(NAME, "1", ())
    assert store.rollback(NAME, "1") is None  # nothing left to go back to: unchanged
    assert store.active(NAME) == ActiveRecord(NAME, "1", ())


def test_add_copies_a_bundle_whole_and_never_replaces_the_active_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.add(NAME, "1", staged(tmp_path, "a"))
    store.activate(NAME, "1")
    with pytest.raises(ValueError, match="active"):
        store.add(NAME, "1", staged(tmp_path, "b"))
    with pytest.raises(ValueError, match="active"):
        store.remove(NAME, "1")
    bare = staged(tmp_path, "bare", meta=False)
    d = store.add(NAME, "2", bare, meta_fallback=store.version_dir(NAME, "1") / "model.toml")
    assert (d / "model.toml").read_text() == "# a\n"  # a bare .tflite keeps how it is read
    d = store.add(NAME, "2", staged(tmp_path, "c"))  # a leftover (not active) version is replaced
    assert (d / "model.tflite").read_bytes() == b"model c"
    with pytest.raises(FileNotFoundError):
        store.add(NAME, "3", tmp_path / "empty-dir-that-does-not-exist")
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "models" / NAME).iterdir())
    assert store.active(NAME) == ActiveRecord(NAME, "1", ())


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", ".hidden", "x" * 200])
def test_names_and_versions_cannot_escape_the_store(tmp_path: Path, bad: str) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ValueError):
        store.version_dir(NAME, bad)
    with pytest.raises(ValueError):
        store.model_dir(bad)


def test_unreadable_active_json_reads_as_not_installed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "active.json").write_text("{torn")
    assert store.active(NAME) is None
    (tmp_path / NAME / "active.json").write_text(json.dumps({"name": NAME, "version": "../../etc"}))
    assert store.active(NAME) is None


def test_prune_removes_staging_leftovers_of_a_crash(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.seed(NAME)
    leftover = tmp_path / NAME / ".staging-2.0.0-abc"
    leftover.mkdir()
    (leftover / "model.tflite").write_bytes(b"half")
    assert store.prune(NAME) == [".staging-2.0.0-abc"]
    assert store.versions(NAME) == ["1.0.0"]
