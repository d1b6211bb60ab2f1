"""Model store on disk: `<state_dir>/models/<name>/<version>/` plus an atomically written `active.json`.

`active.json` is `{"name", "version", "previous": [newest first]}`; versions named in it are kept
(at most `keep` in all) so a failed model can be rolled back without a download. A version directory
appears whole or not at all (filled under a hidden staging name, fsynced, renamed). On first start the
store is seeded from the model shipped in the package (`edgeagent/models/<name>/`).
All methods block (file I/O): call them from a thread.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeagent.core.fsutil import atomic_write_json, fsync_dir, read_json

log = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
MODEL_FILE = "model.tflite"
META_FILE = "model.toml"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED_FILES = {"int8": "model.tflite", "float": "model_float.tflite"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")


def check_name(kind: str, value: str) -> str:
    """A model name or version usable as one path component; ValueError otherwise."""
    if not _NAME_RE.match(value) or value in (".", "..") or ".." in value:
        raise ValueError(f"model {kind} {value!r} must be 1-128 letters, digits, '.', '_', '+' or '-'")
    return value


@dataclass(frozen=True, slots=True)
class ActiveRecord:
    name: str
    version: str
    previous: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "previous": list(self.previous)}


class ModelStore:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def model_dir(self, name: str) -> Path:
        return self.root / check_name("name", name)

    def version_dir(self, name: str, version: str) -> Path:
        return self.model_dir(name) / check_name("version", version)

    def model_path(self, name: str, version: str) -> Path:
        return self.version_dir(name, version) / MODEL_FILE

    def versions(self, name: str) -> list[str]:
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / MODEL_FILE).is_file())

    def active(self, name: str) -> ActiveRecord | None:
        """What active.json says, or None (no file, or unreadable: then logged)."""
        path = self.model_dir(name) / ACTIVE_FILE
        try:
            raw = read_json(path)
            rec = ActiveRecord(str(raw["name"]), check_name("version", str(raw["version"])),
                               tuple(check_name("version", str(v)) for v in raw.get("previous", [])))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("model store: %s is unreadable (%s); treating the model as not installed", path, exc)
            return None
        return rec

    # ------------------------------------------------------------------ changes
    def add(self, name: str, version: str, src_dir: Path, meta_fallback: Path | None = None) -> Path:
        """Copy model.tflite (+ model.toml, else `meta_fallback` if given) into a new version directory.
        Replaces a leftover directory of the same version unless it is the active one."""
        src_dir = Path(src_dir)
        dest = self.version_dir(name, version)
        active = self.active(name)
        if active is not None and active.version == version:
            raise ValueError(f"{name}@{version} is the active model; it cannot be replaced")
        model = src_dir / MODEL_FILE
        if not model.is_file():
            raise FileNotFoundError(f"{model}: missing (a model bundle holds model.tflite)")
        meta = src_dir / META_FILE if (src_dir / META_FILE).is_file() else meta_fallback
        files = {MODEL_FILE: model, **({META_FILE: meta} if meta is not None else {})}
        self._install_dir(dest, files)
        return dest

    def _install_dir(self, dest: Path, files: dict[str, Path]) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".staging-{dest.name}-"))
        try:
            for target, src in files.items():
                with open(src, "rb") as fin, open(staging / target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                    fout.flush()
                    os.fsync(fout.fileno())
            fsync_dir(staging)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(dest.parent)

    def activate(self, name: str, version: str) -> ActiveRecord:
        """Make `version` active (atomically); the old one heads `previous`; prune beyond `keep`."""
        if not self.model_path(name, version).is_file():
            raise FileNotFoundError(f"{name}@{version} is not in the model store")
        old = self.active(name)
        previous: list[str] = []
        if old is not None:
            previous = [v for v in (old.version, *old.previous) if v != version]
        previous = [v for v in previous if self.model_path(name, v).is_file()][: self.keep - 1]
        rec = ActiveRecord(name, version, tuple(previous))
        self._write(rec)
        self.prune(name)
        return rec

    def rollback(self, name: str, failed: str) -> ActiveRecord | None:
        """`failed` is bad: make the newest loadable previous version active and delete `failed`.
        Returns the new record, or None when there is nothing to roll back to."""
        cur = self.active(name)
        if cur is None:
            return None
        chain = [v for v in (cur.version, *cur.previous) if v != failed]
        chain = [v for v in chain if self.model_path(name, v).is_file()]
        if not chain:
            return None
        rec = ActiveRecord(name, chain[0], tuple(chain[1:]))
        self._write(rec)
        self.remove(name, failed)
        return rec

    def remove(self, name: str, version: str) -> None:
        """Delete a version that is not active (a rejected or rolled-back candidate)."""
        cur = self.active(name)
        if cur is not None and cur.version == version:
            raise ValueError(f"{name}@{version} is active; it cannot be removed")
        d = self.version_dir(name, version)
        if d.exists():
            shutil.rmtree(d)
            fsync_dir(d.parent)

    def prune(self, name: str) -> list[str]:
        """Delete versions active.json does not name, and leftover staging directories."""
        cur = self.active(name)
        keep = {cur.version, *cur.previous} if cur is not None else set()
        removed: list[str] = []
        d = self.model_dir(name)
        if not d.is_dir():
            return removed
        for p in d.iterdir():
            if p.is_dir() and (p.name.startswith(".staging-") or (keep and p.name not in keep)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        if removed:
            fsync_dir(d)
        return removed

    def _write(self, rec: ActiveRecord) -> None:
        atomic_write_json(self.model_dir(rec.name) / ACTIVE_FILE, rec.as_json())

    # ------------------------------------------------------------------ first start
    def seed(self, name: str, variant: str = "int8", shipped_root: Path = SHIPPED_DIR) -> ActiveRecord | None:
        """Install and activate the shipped model when the store has no active version of `name`.
        Returns the active record (existing or seeded), None if nothing is shipped under `name`."""
        from edgeagent.inference.preprocess import load_model_meta

        cur = self.active(name)
        if cur is not None and self.model_path(name, cur.version).is_file():
            return cur
        src = shipped_root / name
        model = src / SHIPPED_FILES.get(variant, SHIPPED_FILES["int8"])
        if not model.is_file():
            return None
        files = {MODEL_FILE: model}
        version = "0.0.0"
        if (src / META_FILE).is_file():
            version = check_name("version", load_model_meta(src / META_FILE).version)
            files[META_FILE] = src / META_FILE
        self._install_dir(self.version_dir(name, version), files)
        rec = ActiveRecord(name, version, ())
        self._write(rec)
        log.info("model store seeded from the shipped model",
                 extra={"kv": {"model": rec.tag, "variant": variant, "store": str(self.root)}})
        return rec
