"""The pipelines a config declares, resolved: `[[pipelines]]`, or the older `[sensors]` + `[inference]`
read as one pipeline named "default". Pure functions of the config, and one probe of the machine
(can the accelerator delegate be loaded).

Everything per pipeline that the inference side needs is settled here once (its window, its share of
the thread budget, its thresholds), so the runtime never has to know which form the file used.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

from edgeagent.core.config_schema import Config, PipelineConfig, SensorsConfig, WindowConfig

DEFAULT_PIPELINE = "default"  # the name of the pipeline the older single-pipeline form makes


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """One pipeline as the runtime serves it (all defaults and shares already applied)."""

    name: str
    sensors: SensorsConfig  # its source, with the effective window
    model: str
    model_variant: str
    head: str  # auto | classes | autoencoder | regression
    num_threads: int
    threshold: float | None
    clear_threshold: float | None
    calibrate_windows: int = 0
    calibrate_sigma: float = 4.0
    unit: str = ""
    legacy: bool = False  # the [sensors] + [inference] form: models/<model>/, flat telemetry section

    @property
    def store_subdir(self) -> str:
        """Below `<state_dir>/models/`: "" for the older form (where its models always were), else the
        pipeline's name, so pipelines keep their models side by side even when they share a name."""
        return "" if self.legacy else self.name


def resolve(cfg: Config) -> tuple[PipelineSpec, ...]:
    """Every pipeline of `cfg`, in config order; the first is the default one (manifests without a
    `pipeline`, the flat figures rules and fleet tools read)."""
    i = cfg.inference
    if not cfg.pipelines:
        return (PipelineSpec(DEFAULT_PIPELINE, cfg.sensors, i.model, i.model_variant, "auto",
                             i.num_threads, i.threshold, i.clear_threshold, legacy=True),)
    threads = _thread_shares(cfg)
    return tuple(PipelineSpec(p.name, _sensors(p), p.model, p.model_variant, p.head, n, p.threshold,
                              p.clear_threshold, p.calibrate_windows, p.calibrate_sigma, p.unit)
                 for p, n in zip(cfg.pipelines, threads, strict=True))


def names(cfg: Config) -> tuple[str, ...]:
    return tuple(p.name for p in cfg.pipelines) or (DEFAULT_PIPELINE,)


def _sensors(p: PipelineConfig) -> SensorsConfig:
    return p.source if p.window is None else dataclasses.replace(p.source, window=p.window)


def _thread_shares(cfg: Config) -> list[int]:
    """Explicit `num_threads` as given; the others share what is left of the budget (at least one
    each), or take `inference.num_threads` when there is no budget."""
    budget = cfg.inference.threads_budget
    explicit = sum(p.num_threads for p in cfg.pipelines)
    unset = sum(1 for p in cfg.pipelines if not p.num_threads)
    share = max(1, (budget - explicit) // unset) if budget and unset else cfg.inference.num_threads
    return [p.num_threads or share for p in cfg.pipelines]


def problems(cfg: Config) -> list[str]:
    """Rules across pipeline fields, each naming its key path (config._cross_checks runs these)."""
    out: list[str] = []
    seen: set[str] = set()
    for k, p in enumerate(cfg.pipelines):
        where = f"pipelines[{k}]"
        if p.name in seen:
            out.append(f"{where}.name: duplicate pipeline name {p.name!r}")
        seen.add(p.name)
        if p.window is not None and p.source.window != WindowConfig():
            out.append(f"{where}.window: give the window once (here or in source.window, not both)")
        w = _sensors(p).window
        if w.stride > w.size:
            out.append(f"{where}.window.stride: expected at most the window size ({w.size}), got {w.stride}")
        if p.calibrate_windows and p.threshold is not None:
            out.append(f"{where}.calibrate_windows: a threshold is set, so there is nothing to calibrate "
                       "(drop one of them)")
        if p.calibrate_windows and p.head not in ("autoencoder", "auto"):
            out.append(f"{where}.calibrate_windows: only an autoencoder head calibrates its threshold")
        if p.threshold is not None and p.clear_threshold is not None and p.clear_threshold > p.threshold:
            out.append(f"{where}.clear_threshold: expected at most threshold ({p.threshold})")
    budget = cfg.inference.threads_budget
    if budget:
        need = (sum(p.num_threads or 1 for p in cfg.pipelines) if cfg.pipelines
                else cfg.inference.num_threads)
        if need > budget:
            out.append(f"inference.threads_budget: the pipelines need at least {need} interpreter threads "
                       f"(num_threads, at least 1 each), the budget is {budget}")
    return out


def machine_problems(cfg: Config) -> list[str]:
    """What this machine lacks for `cfg` (check-config and `run` ask before starting anything; a
    config itself stays valid anywhere, so a fleet tool can build one for another board)."""
    if cfg.inference.enabled and cfg.inference.delegate:
        problem = delegate_problem(cfg.inference.delegate)
        if problem:
            return [f"inference.delegate: {problem}"]
    return []


def delegate_problem(library: str) -> str | None:
    """Why the accelerator delegate library cannot be loaded on this machine, or None. The same words
    as at start-up (inference/runtime.py), so check-config and the agent say one thing."""
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        return (f"delegate library {library!r} cannot be loaded ({exc}); install it (Coral: "
                "libedgetpu1-std) or set inference.delegate = \"\"")
    return None
