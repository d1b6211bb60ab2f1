"""Section 4 of scripts/bench-inference: the serving model's latency with and without a shadow candidate.

The shipped int8 model serves real windows at 100 windows/s on one runner; in alternating rounds
(same run, same machine state) a shadow lane runs the float32 model beside it (a run long enough
never to finish). Reported per side: the serving worker's invoke p99 and the submit -> result p99
(queue wait + preprocessing + invoke: what a shadow invoke in progress would delay), plus how many
windows the candidate compared and shed. Goal: serving p99 with shadow within 10% of without.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.core.shadow_spec import ShadowSpec
from edgeagent.inference.preprocess import load_model_meta
from edgeagent.inference.runner import ModelSlot, Result, Runner
from edgeagent.inference.runtime import load_interpreter
from edgeagent.inference.shadow_lane import ShadowLane

GOAL_RATIO = 1.10
RATE_HZ = 100.0


def _pct_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def _round(runner: Runner, windows: list[Any], seconds: float, seq0: int) -> int:
    """Submit windows at RATE_HZ for `seconds` (a bench: paced by the clock), then wait until idle."""
    n = int(seconds * RATE_HZ)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / RATE_HZ - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        runner.submit(seq0 + i, 0.0, windows[(seq0 + i) % len(windows)])
    runner.wait_idle(30.0)
    return n


def shadow_bench(shipped: Path, runtime: str, windows: list[Any], rounds: int,
                 seconds: float) -> dict[str, Any]:
    meta = load_model_meta(shipped / "model.toml")
    serving = ModelSlot(load_interpreter(shipped / "model.tflite", runtime), "serving", meta.preprocessor())
    candidate = ModelSlot(load_interpreter(shipped / "model_float.tflite", runtime), "candidate",
                          meta.preprocessor())
    lock = threading.Lock()
    current: list[Result] = []

    def sink(r: Result) -> None:
        with lock:
            current.append(r)

    runner = Runner(serving, sink, queue_max=1024)
    runner.start()
    lane = ShadowLane(candidate, meta, meta, ShadowSpec(windows=10**6))
    sides: dict[str, dict[str, list[float]]] = {k: {"infer": [], "e2e": []} for k in ("without", "with")}
    seq = 0
    try:
        _round(runner, windows, 1.0, seq)  # warm up
        seq += int(RATE_HZ)
        for _ in range(rounds):
            for side in ("without", "with"):
                runner.attach_lane(lane if side == "with" else None)
                with lock:
                    current.clear()
                seq += _round(runner, windows, seconds, seq)
                with lock:
                    sides[side]["infer"] += [r.infer_s for r in current if r.ok]
                    sides[side]["e2e"] += [r.total_s for r in current]
    finally:
        runner.attach_lane(None)
        runner.stop(drain=False)
    st = runner.stats()
    f = lane.figures()
    out: dict[str, Any] = {"runtime": runtime, "rate_hz": RATE_HZ, "rounds": rounds,
                           "seconds_per_round": seconds,
                           "dropped": st.dropped, "shadow_compared": f["compared"], "shadow_shed": f["shed"],
                           "shadow_agreement": f["agreement"]}
    for side, v in sides.items():
        out[f"serving_infer_p99_ms_{side}"] = round(_pct_ms(v["infer"], 99), 4)
        out[f"serving_e2e_p50_ms_{side}"] = round(_pct_ms(v["e2e"], 50), 4)
        out[f"serving_e2e_p99_ms_{side}"] = round(_pct_ms(v["e2e"], 99), 4)
        out[f"windows_{side}"] = len(v["e2e"])
    out["ratio_infer_p99"] = round(out["serving_infer_p99_ms_with"] / out["serving_infer_p99_ms_without"], 3)
    out["ratio_e2e_p99"] = round(out["serving_e2e_p99_ms_with"] / out["serving_e2e_p99_ms_without"], 3)
    return out


def print_shadow(s: dict[str, Any]) -> None:
    print(f"   serving invoke p99 {s['serving_infer_p99_ms_without']:.4f} ms without shadow, "
          f"{s['serving_infer_p99_ms_with']:.4f} ms with (ratio {s['ratio_infer_p99']})")
    print(f"   serving submit->result p50 {s['serving_e2e_p50_ms_without']:.4f} / "
          f"{s['serving_e2e_p50_ms_with']:.4f} ms, p99 {s['serving_e2e_p99_ms_without']:.4f} ms without, "
          f"{s['serving_e2e_p99_ms_with']:.4f} ms with (ratio {s['ratio_e2e_p99']}); "
          f"{s['windows_with']} windows per side, dropped {s['dropped']}")
    print(f"   shadow compared {s['shadow_compared']}, shed {s['shadow_shed']}, agreement "
          f"{s['shadow_agreement']}")
