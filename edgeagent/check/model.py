"""Deep check of the model: it loads in the configured runtime, and the windows the sensor config
makes fit its input (the same `check_io` a hot swap runs before it serves a candidate)."""

from __future__ import annotations

from edgeagent.check.files import model_location
from edgeagent.check.result import Check, fail, info, ok, warn
from edgeagent.core.config import Config
from edgeagent.core.errors import ModelLoadError, ModelMetaError, RuntimeUnavailable


def model_checks(cfg: Config) -> list[Check]:
    if not cfg.inference.enabled:
        return []
    from edgeagent.inference.preprocess import WindowSpec, load_model_meta
    from edgeagent.inference.runtime import load_interpreter
    from edgeagent.inference.store import META_FILE
    from edgeagent.inference.swap import check_io, default_meta

    path, _ = model_location(cfg)
    if path is None:
        return []  # the static check has said so
    inf, sensors = cfg.inference, cfg.sensors
    try:
        model = load_interpreter(path, inf.runtime, inf.num_threads, inf.delegate)
    except RuntimeUnavailable as exc:
        fix = "install the runtime the config names (scripts/install.sh --runtime) or set it to \"auto\""
        return [fail("inference.runtime", str(exc), fix)]
    except ModelLoadError as exc:
        return [fail("inference.model", f"{path} does not load: {exc.reason}",
                     "push a model this runtime can run, or try the other inference.runtime")]
    checks = [ok("inference.runtime", f"{model.describe()}")]
    window = WindowSpec(sensors.window.size, sensors.window.stride, sensors.channels, sensors.rate_hz)
    meta_path = path.parent / META_FILE
    declared = meta_path.is_file()
    try:
        meta = load_model_meta(meta_path) if declared else default_meta(inf.model, "?", model, window)
    except ModelMetaError as exc:
        return [*checks, fail("inference.model", f"{meta_path}: {exc.reason}", "fix or replace model.toml")]
    if meta.window.channels != sensors.channels:
        checks.append(fail("sensors.channels", f"the model wants {meta.window.channels} channels, the "
                                               f"sensor config gives {sensors.channels}",
                           f"set sensors.channels = {meta.window.channels} or use a model made for "
                           f"{sensors.channels}"))
    problems = check_io(model, meta, declared)
    if problems:
        checks.append(fail("sensors.window", "; ".join(problems),
                           "make sensors.window and sensors.channels what the model was trained on"))
    elif meta.window.channels == sensors.channels:
        size = meta.window.size
        checks.append(ok("sensors.window", f"windows of {size}x{sensors.channels} fit the input "
                                           f"{list(model.inputs[0].signature)}"))
        if size != sensors.window.size:
            checks.append(info("sensors.window.size", f"{sensors.window.size} in the config; the model's "
                                                      f"{size} is used"))
    if abs(meta.window.rate_hz - sensors.rate_hz) > 0.01 * meta.window.rate_hz:
        checks.append(warn("sensors.rate_hz", f"the model was trained at {meta.window.rate_hz:g} Hz, the "
                                              f"source runs at {sensors.rate_hz:g} Hz",
                           "sample at the model's rate: its spectrum bands assume it"))
    return checks
