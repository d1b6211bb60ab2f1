"""Classify fixed windows with the installed edgeagent and print the results as JSON.

scripts/test-arm64 runs this file twice on the same windows file: on the host, and inside the
emulated arm64 root (against the wheel installed there, not the source tree). The two JSON outputs
must agree: same class per window, scores within the tolerance.

    python parity.py make WINDOWS.npy          # the fixed windows (host side, once per run)
    python parity.py classify WINDOWS.npy      # JSON on stdout
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

SEEDS = 3  # simulated machines
FAULTS = ("healthy", "imbalance", "bearing", "spikes")


def make(path: Path) -> None:
    """Windows of every class, from the agent's own simulator (so they look like what a board sees)."""
    from edgeagent.sensors.sources import VibrationSimulator

    windows = []
    for seed in range(SEEDS):
        for fault in FAULTS:
            sim = VibrationSimulator(1600.0, 7_000 + seed)
            if fault != "healthy":
                sim.set_fault(fault, 1.0)
            windows.append(sim.generate(256))
    np.save(path, np.stack(windows).astype(np.float32))


def classify(path: Path) -> dict[str, Any]:
    """Per model (the shipped int8 one and its float twin): label, score, output, features per window."""
    import edgeagent
    from edgeagent.inference.preprocess import load_model_meta
    from edgeagent.inference.runtime import available_runtimes, load_interpreter

    windows = np.load(path)
    model_dir = Path(edgeagent.__file__).parent / "models" / "vibration-anomaly"
    meta = load_model_meta(model_dir / "model.toml")
    pre = meta.preprocessor()
    runtimes = available_runtimes()
    out: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                           "numpy": np.__version__, "runtime": runtimes[0] if runtimes else None,
                           "models": {}}
    for name in ("model.tflite", "model_float.tflite"):
        model = load_interpreter(model_dir / name, "auto")
        rows = []
        for w in windows:
            feats = pre(w)
            y = np.asarray(model.infer(feats)[0], dtype=np.float64).reshape(-1)
            rows.append({"label": meta.label_of(y), "score": meta.score(y), "output": y.tolist(),
                         "features": feats.astype(np.float64).tolist()})
        out["models"][name] = rows
    return out


def compare(host: dict[str, Any], board: dict[str, Any], tol: float) -> list[str]:
    """Every disagreement, as a line naming the model and the window; [] when they agree."""
    problems = []
    for name, rows in host["models"].items():
        theirs = board["models"].get(name)
        if theirs is None or len(theirs) != len(rows):
            problems.append(f"{name}: {len(rows)} results on the host, {len(theirs or [])} on the board")
            continue
        for i, (a, b) in enumerate(zip(rows, theirs, strict=True)):
            if a["label"] != b["label"]:
                problems.append(f"{name} window {i}: class {a['label']} on the host, "
                                f"{b['label']} on the board")
            if abs(a["score"] - b["score"]) > tol:
                problems.append(f"{name} window {i}: score {a['score']:.6f} on the host, {b['score']:.6f} "
                                f"on the board (tolerance {tol})")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("make", "classify"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "make":
        make(Path(argv[1]))
    else:
        json.dump(classify(Path(argv[1])), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
