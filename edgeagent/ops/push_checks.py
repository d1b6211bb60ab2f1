"""What `edgeagent push` checks before it sends anything: the name and version a device would
accept, a model's TFLite header and input shape, and the version against what the device runs.

The input shape is read from the flatbuffer itself (no TFLite runtime needed on the operator's
machine): Model.subgraphs[0].tensors[inputs[0]].shape, per the TFLite schema.
"""

from __future__ import annotations

import struct
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.updates.manifest import JOB_ID_RE, NAME_RE, VERSION_RE, compare_versions

TFLITE_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier, bytes 4-8 of every .tflite file
BUNDLE_MODEL = "model.tflite"
MAX_MODEL_BYTES = 512 * 1024 * 1024  # what we read to find the shape in a bundle


class PushCheckFailed(ValueError):
    """Something every device would refuse, found before anything was sent."""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    input_shape: tuple[int, ...]
    bundle: bool  # a .tar.gz with model.tflite (and maybe model.toml) rather than a bare .tflite


def check_job(job: str) -> None:
    if not JOB_ID_RE.match(job):
        raise PushCheckFailed(f"job id {job!r}: devices accept 1-64 of A-Z a-z 0-9 . _ -")


def check_name_version(name: str, version: str) -> None:
    if not NAME_RE.match(name):
        raise PushCheckFailed(f"name {name!r}: devices accept 1-64 of A-Z a-z 0-9 . _ - starting with a "
                              f"letter or digit")
    if not VERSION_RE.match(version):
        raise PushCheckFailed(f"version {version!r}: devices accept N[.N[.N[.N]]][-tag] (e.g. 1.4.0, "
                              f"2.0.0-rc1)")


# ------------------------------------------------------------------ TFLite flatbuffer

def _u32(b: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", b, pos)[0])


def _field(b: bytes, table: int, index: int) -> int | None:
    """Where field `index` of the table at `table` is, None when absent (default value)."""
    vtable = table - int(struct.unpack_from("<i", b, table)[0])
    vtable_size = int(struct.unpack_from("<H", b, vtable)[0])
    if 4 + 2 * index >= vtable_size:
        return None
    offset = int(struct.unpack_from("<H", b, vtable + 4 + 2 * index)[0])
    return table + offset if offset else None


def _vector(b: bytes, pos: int) -> tuple[int, int]:
    """(first element, length) of the vector referenced at `pos`."""
    start = pos + _u32(b, pos)
    return start + 4, _u32(b, start)


def tflite_input_shape(data: bytes) -> tuple[int, ...]:
    """The first input tensor's shape of a TFLite model; PushCheckFailed if it is not one."""
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        found = data[4:8] if len(data) >= 8 else data[:8]
        raise PushCheckFailed(f"not a TFLite model: bytes 4-8 are {found!r}, expected {TFLITE_IDENTIFIER!r}")
    try:
        root = _u32(data, 0)
        subgraphs = _field(data, root, 2)
        if subgraphs is None:
            raise PushCheckFailed("TFLite model without a subgraph")
        first, count = _vector(data, subgraphs)
        if count < 1:
            raise PushCheckFailed("TFLite model without a subgraph")
        graph = first + _u32(data, first)
        tensors, inputs = _field(data, graph, 0), _field(data, graph, 1)
        if tensors is None or inputs is None:
            raise PushCheckFailed("TFLite model whose first subgraph has no input")
        in_first, in_count = _vector(data, inputs)
        t_first, t_count = _vector(data, tensors)
        if in_count < 1:
            raise PushCheckFailed("TFLite model whose first subgraph has no input")
        index = int(struct.unpack_from("<i", data, in_first)[0])
        if not 0 <= index < t_count:
            raise PushCheckFailed(f"TFLite model: input tensor {index} of {t_count}")
        slot = t_first + 4 * index
        tensor = slot + _u32(data, slot)
        shape = _field(data, tensor, 0)
        if shape is None:
            return ()
        s_first, s_count = _vector(data, shape)
        if s_count > 16:
            raise PushCheckFailed(f"TFLite model: input of rank {s_count}")
        return tuple(int(x) for x in struct.unpack_from(f"<{s_count}i", data, s_first))
    except (struct.error, IndexError) as exc:
        raise PushCheckFailed(f"not a valid TFLite model (truncated or corrupt flatbuffer: {exc})") from exc


def model_facts(path: Path) -> ModelFacts:
    """Check a model artifact (.tflite, or a .tar.gz bundle holding model.tflite) and read its shape."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"\x1f\x8b":  # gzip: a bundle
        try:
            with tarfile.open(path, "r:gz") as tar:
                member = tar.getmember(BUNDLE_MODEL)
                if not member.isfile() or member.size > MAX_MODEL_BYTES:
                    raise PushCheckFailed(f"{path}: {BUNDLE_MODEL} in the bundle is not a regular file "
                                          f"of at most {MAX_MODEL_BYTES >> 20} MiB")
                stream = tar.extractfile(member)
                data = stream.read() if stream is not None else b""
        except KeyError:
            raise PushCheckFailed(f"{path}: a bundle must hold {BUNDLE_MODEL}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PushCheckFailed(f"{path}: not a readable .tar.gz bundle: {exc}") from exc
        return ModelFacts(_shape(path, data), bundle=True)
    return ModelFacts(_shape(path, path.read_bytes()), bundle=False)


def _shape(path: Path, data: bytes) -> tuple[int, ...]:
    try:
        shape = tflite_input_shape(data)
    except PushCheckFailed as exc:
        raise PushCheckFailed(f"{path}: {exc}") from None
    if not shape or any(d == 0 or d < -1 for d in shape):
        raise PushCheckFailed(f"{path}: input shape {shape} has no usable dimension")
    return shape


# ------------------------------------------------------------------ against the device

def against_device(kind: str, name: str, version: str, status: Mapping[str, Any],
                   facts: ModelFacts | None) -> tuple[list[str], list[str]]:
    """(refusals, notes) for one device's retained status: a refusal is what the device would
    reject anyway (a downgrade of what it runs, another input shape); notes say what could not be
    checked."""
    refusals: list[str] = []
    notes: list[str] = []
    running = status.get(kind)
    same = isinstance(running, Mapping) and running.get("name") == name
    if same and isinstance(running, Mapping) and isinstance(running.get("version"), str):
        try:
            if compare_versions(version, running["version"]) <= 0:
                refusals.append(f"runs {name} {running['version']}: {version} is not above it "
                                f"(devices refuse a downgrade)")
        except ValueError:
            notes.append(f"reports version {running['version']!r}, which is not a version number")
    if kind == "model" and facts is not None:
        shape = running.get("input_shape") if isinstance(running, Mapping) else None
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
            if tuple(shape) != facts.input_shape:
                refusals.append(f"its model takes input {tuple(shape)}, this one {facts.input_shape}")
        else:
            notes.append(f"input shape {facts.input_shape} checked in the file only (the device does not "
                         f"report its own)")
    return refusals, notes
