"""`edgeagent bench-model MODEL.tflite`: the agent's runner against a bare interpreter loop, same process.

Like TensorFlow's benchmark_model, it feeds random inputs of the model's declared shapes and types.
Rounds alternate (bare, runner, bare, runner, ...) so that CPU frequency changes and neighbours on a
shared board hit both sides alike. Three distributions are printed:
  bare    set_tensor + invoke + get_tensor, in a tight loop on this thread;
  runner  the same work inside the runner's worker (what telemetry's p50_ms/p95_ms/p99_ms report);
  e2e     submit from this thread -> result back (queue and thread hand-off included).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.core.cli_args import positive_int
from edgeagent.core.errors import ModelLoadError, RuntimeUnavailable
from edgeagent.inference.runner import STATS_WINDOW, ModelSlot, Result, Runner
from edgeagent.inference.runtime import LoadedModel, load_interpreter

INPUT_SETS = 16  # distinct random inputs, cycled


def _dist(values_s: list[float]) -> dict[str, float]:
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"n": len(values_s), "mean_ms": round(float(a.mean()), 4),
            "p50_ms": round(float(np.percentile(a, 50)), 4), "p95_ms": round(float(np.percentile(a, 95)), 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4), "min_ms": round(float(a.min()), 4)}


def bare_loop(model: LoadedModel, inputs: list[list[Any]], n: int) -> list[float]:
    """The baseline: what a hand-written loop over the raw interpreter costs per inference."""
    it = model.interpreter
    in_idx = [t.index for t in model.inputs]
    out_idx = [t.index for t in model.outputs]
    clock = time.perf_counter
    out = []
    for i in range(n):
        xs = inputs[i % len(inputs)]
        t0 = clock()
        for idx, x in zip(in_idx, xs, strict=True):
            it.set_tensor(idx, x)
        it.invoke()
        for idx in out_idx:
            it.get_tensor(idx)
        out.append(clock() - t0)
    return out


class _Waiter:
    """The runner's result sink for one-at-a-time benchmarking."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.last: Result | None = None

    def __call__(self, r: Result) -> None:
        self.last = r
        self.event.set()


def runner_loop(runner: Runner, waiter: _Waiter, inputs: list[list[Any]], n: int,
                start_seq: int) -> list[float]:
    """One input at a time through the runner; returns submit -> result latencies."""
    clock = time.perf_counter
    out = []
    for i in range(n):
        waiter.event.clear()
        t0 = clock()
        runner.submit(start_seq + i, 0.0, inputs[i % len(inputs)])
        if not waiter.event.wait(30.0):
            raise RuntimeError("the runner did not answer within 30 s")
        out.append(clock() - t0)
        if waiter.last is not None and waiter.last.error:
            raise RuntimeError(f"invoke failed: {waiter.last.error}")
    return out


def bench(path: Path, runtime: str = "auto", threads: int = 1, count: int = 2000, rounds: int = 4,
          warmup: int = 50, seed: int = 0) -> dict[str, Any]:
    model = load_interpreter(path, runtime, threads)
    rng = np.random.default_rng(seed)
    inputs = [model.random_inputs(rng) for _ in range(INPUT_SETS)]
    waiter = _Waiter()
    runner = Runner(ModelSlot(model, path.name), waiter, queue_max=4)
    bare_loop(model, inputs, warmup)  # warm caches and lazy kernels before anything is timed
    bare: list[float] = []
    e2e: list[float] = []
    per_round = max(1, count // rounds)
    runner.start()
    try:
        runner_loop(runner, waiter, inputs, warmup, 0)
        seq = warmup
        infer: list[float] = []
        for _ in range(rounds):
            # the worker is idle between rounds: the bare loop runs alone, then the runner alone
            bare += bare_loop_on_worker(runner, model, inputs, per_round)
            left = per_round
            while left:  # in batches the runner's latency window (STATS_WINDOW) holds whole
                n = min(left, STATS_WINDOW)
                e2e += runner_loop(runner, waiter, inputs, n, seq)
                seq += n
                left -= n
                infer += runner.latencies()[0][-n:]
    finally:
        runner.stop(drain=False)
    b, r, e = _dist(bare), _dist(infer), _dist(e2e)
    return {
        "model": str(path), "runtime": model.runtime, "threads": threads, "size_bytes": model.size_bytes,
        "inputs": [t.describe() for t in model.inputs], "outputs": [t.describe() for t in model.outputs],
        "bare": b, "runner": r, "e2e": e,
        "ratio_runner_p50": round(r["p50_ms"] / b["p50_ms"], 3) if b["p50_ms"] else None,
        "ratio_e2e_p50": round(e["p50_ms"] / b["p50_ms"], 3) if b["p50_ms"] else None,
    }


def bare_loop_on_worker(runner: Runner, model: LoadedModel, inputs: list[list[Any]], n: int) -> list[float]:
    """The bare loop, run while the runner is idle (it owns the interpreter only while serving)."""
    if not runner.wait_idle(30.0):
        raise RuntimeError("the runner did not go idle")
    return bare_loop(model, inputs, n)


def format_text(res: dict[str, Any]) -> str:
    lines = [f"model    {res['model']} ({res['size_bytes']} bytes) on {res['runtime']}, "
             f"{res['threads']} thread(s)",
             f"inputs   {'; '.join(res['inputs'])}", f"outputs  {'; '.join(res['outputs'])}",
             f"{'':8} {'n':>6} {'mean':>9} {'p50':>9} {'p95':>9} {'p99':>9} {'min':>9}  (ms)"]
    for key, label in (("bare", "bare"), ("runner", "runner"), ("e2e", "e2e")):
        d = res[key]
        lines.append(f"{label:8} {d['n']:>6} {d['mean_ms']:>9.4f} {d['p50_ms']:>9.4f} {d['p95_ms']:>9.4f} "
                     f"{d['p99_ms']:>9.4f} {d['min_ms']:>9.4f}")
    lines.append(f"ratio p50: runner/bare {res['ratio_runner_p50']}  e2e/bare {res['ratio_e2e_p50']}")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    try:
        res = bench(Path(args.model), args.runtime, args.threads, args.count, args.rounds)
    except (ModelLoadError, RuntimeUnavailable) as exc:
        print(f"bench-model: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if args.json else format_text(res))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench-model", help="latency of any .tflite model through the agent's runner vs "
                                           "a bare interpreter loop (random inputs)")
    p.add_argument("model", type=Path, help="a .tflite file")
    p.add_argument("--runtime", default="auto", choices=("auto", "tflite-runtime", "litert"),
                   help="TFLite runtime to load the model with (default auto)")
    p.add_argument("--threads", type=positive_int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--count", type=positive_int, default=2000, help="inferences per side (default 2000)")
    p.add_argument("--rounds", type=positive_int, default=4, help="alternating rounds (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd)
