"""[[pipelines]] config, thread budget, delegate check, calibration maths, rule names, manifest field:
pure functions, no event loop (the served pipelines are in test_pipelines_serve.py)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edgeagent.core import config, pipelines
from edgeagent.core.errors import ConfigError, ManifestRejected
from edgeagent.inference.heads import (
    Calibration,
    calibration_path,
    load_calibration,
    reconstruction_error,
    save_calibration,
)
from edgeagent.inference.preprocess import parse_model_meta
from edgeagent.rules.component import collect_values
from edgeagent.transport.component import status_payload
from edgeagent.updates import manifest
from tests.updates_helpers import make_keys, signed

ROOT = Path(__file__).resolve().parent.parent
MULTI = ROOT / "configs" / "examples" / "multi.toml"
ABSENT = "libedgeagent-absent-delegate.so.1"


def two(**extra: Any) -> dict[str, Any]:
    return {
        "pipelines": [
            {"name": "vibration", "model": "vibration-anomaly", **extra},
            {"name": "pump", "model": "vibration-autoencoder", "head": "autoencoder"},
        ]
    }


def errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.build(raw, env={})
    return info.value.errors


def test_the_older_form_is_one_pipeline_named_default_in_the_old_store_place() -> None:
    cfg = config.build({"inference": {"model": "m1", "num_threads": 2, "threshold": 0.7}}, env={})
    (spec,) = pipelines.resolve(cfg)
    assert (spec.name, spec.model, spec.num_threads, spec.threshold, spec.legacy) == (
        "default",
        "m1",
        2,
        0.7,
        True,
    )
    assert spec.sensors == cfg.sensors and spec.store_subdir == ""


def test_pipelines_resolve_in_order_with_their_window_and_a_share_of_the_thread_budget() -> None:
    raw = two(window={"size": 128, "stride": 32}, num_threads=1)
    raw["inference"] = {"threads_budget": 4}
    cfg = config.build(raw, env={})
    vib, pump = pipelines.resolve(cfg)
    assert (vib.name, vib.sensors.window.size, vib.sensors.window.stride, vib.num_threads) == (
        "vibration",
        128,
        32,
        1,
    )
    assert (pump.name, pump.head, pump.num_threads, pump.store_subdir) == ("pump", "autoencoder", 3, "pump")
    assert pipelines.names(cfg) == ("vibration", "pump")


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (
            {"pipelines": [{"name": "a", "model": "m"}, {"name": "a", "model": "m"}]},
            "pipelines[1].name: duplicate pipeline name 'a'",
        ),
        ({"pipelines": [{"name": "inference", "model": "m"}]}, "pipelines[0].name: 'inference' is reserved"),
        ({"pipelines": [{"name": "a-b", "model": "m"}]}, "pipelines[0].name: expected 1-32 letters"),
        ({"pipelines": [{"name": "a"}]}, "pipelines[0].model: required key is missing"),
        (
            {"pipelines": [{"name": "a", "model": "m", "window": {"size": 8, "stride": 16}}]},
            "pipelines[0].window.stride: expected at most the window size (8)",
        ),
        (
            {
                "pipelines": [
                    {
                        "name": "a",
                        "model": "m",
                        "window": {"size": 8, "stride": 4},
                        "source": {"window": {"size": 16, "stride": 4}},
                    }
                ]
            },
            "pipelines[0].window: give the window once",
        ),
        (
            {"pipelines": [{"name": "a", "model": "m", "threshold": 0.1, "calibrate_windows": 10}]},
            "pipelines[0].calibrate_windows: a threshold is set",
        ),
        (
            {"pipelines": [{"name": "a", "model": "m", "head": "classes", "calibrate_windows": 10}]},
            "pipelines[0].calibrate_windows: only an autoencoder head",
        ),
        ({"pipelines": [{"name": "a", "model": "m", "headd": "classes"}]}, "pipelines[0].headd: unknown key"),
        (
            {
                "inference": {"threads_budget": 2},
                "pipelines": [{"name": "a", "model": "m", "num_threads": 2}, {"name": "b", "model": "m"}],
            },
            "inference.threads_budget: the pipelines need at least 3 interpreter threads",
        ),
    ],
)
def test_bad_pipelines_are_errors_naming_their_key(raw: dict[str, Any], want: str) -> None:
    assert any(e.startswith(want) for e in errors(raw)), errors(raw)


def test_a_missing_delegate_is_one_clear_error_from_check_config(tmp_path: Path) -> None:
    cfg = config.build({"inference": {"delegate": ABSENT}}, env={})  # valid anywhere: a machine fact
    (problem,) = pipelines.machine_problems(cfg)
    assert problem.startswith(f"inference.delegate: delegate library '{ABSENT}' cannot be loaded")
    assert pipelines.machine_problems(config.build({}, env={})) == []
    path = tmp_path / "c.toml"
    path.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n[inference]\ndelegate = "{ABSENT}"\n')
    for verb in ("check-config", "run"):
        out = subprocess.run(
            [sys.executable, "-m", "edgeagent.cli", verb, "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, (verb, out.stdout, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert lines == [f"{path}: 1 error(s)", f"  {problem}"], (verb, out.stderr)


def test_multi_example_passes_check_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeagent.cli", "check-config", "-c", str(MULTI)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"EDGEAGENT_MQTT_HOST": "", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "pipeline    vibration:" in out.stdout and "pipeline    pump:" in out.stdout


def test_calibration_takes_mean_plus_sigma_std_and_is_kept_per_model(tmp_path: Path) -> None:
    cal = Calibration("ae@1", 4, 3.0)
    assert [cal.add(x, now=5.0) for x in (1.0, 3.0, float("nan"), 1.0)] == [None, None, None, None]
    assert cal.progress == 0.75
    done = cal.add(3.0, now=5.0)
    assert done is not None
    assert (done.mean, done.std, done.threshold, done.clear_threshold, done.windows) == (
        2.0,
        1.0,
        5.0,
        3.5,
        4,
    )
    path = calibration_path(tmp_path, "pump")
    save_calibration(path, done)
    assert load_calibration(path, "ae@1") == done
    assert load_calibration(path, "ae@2") is None  # another version calibrates anew
    path.write_text("{not json")
    assert load_calibration(path, "ae@1") is None


def test_reconstruction_error_is_the_mean_squared_difference() -> None:
    import numpy as np

    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    assert reconstruction_error(x, np.array([1.0, 2.0, 3.0, 6.0], np.float32)).tolist() == [1.0]


def test_model_toml_reads_autoencoder_and_regression_outputs() -> None:
    base = (
        'name = "m"\nversion = "1"\ninput_shape = [1, 4]\n'
        "[window]\nsize = 4\nstride = 1\nchannels = 1\nrate_hz = 10.0\n"
        "[preprocess]\nfft = false\nlog = false\n"
    )
    ae = parse_model_meta(
        'output = "reconstruction"\nthreshold = 12.5\nclear_threshold = 3.0\noutput_shape = [1, 4]\n' + base
    )
    assert (ae.head, ae.threshold, ae.score([0.25])) == ("autoencoder", 12.5, 0.25)
    reg = parse_model_meta(
        'output = "regression"\nunit = "mm/s"\nthreshold = -1.0\noutput_shape = [1, 1]\n' + base
    )
    assert (reg.head, reg.unit, reg.score([7.5])) == ("regression", "mm/s", 7.5)
    with pytest.raises(Exception, match="gives back its 4 input features, not 3"):
        parse_model_meta('output = "reconstruction"\noutput_shape = [1, 3]\n' + base)
    with pytest.raises(Exception, match="threshold"):  # classes keep their [0, 1] rule
        parse_model_meta('output = "score"\nthreshold = 3.0\n' + base)


def test_rules_read_each_pipelines_figures_by_name_and_the_first_ones_flat() -> None:
    section = {
        "model": "a@1",
        "anomaly_rate_1m": 0.1,
        "pipelines": {
            "vibration": {"model": "a@1", "anomaly_rate_1m": 0.1},
            "pump": {"model": "b@1", "anomaly_rate_1m": 0.5, "value": 2.0},
        },
    }
    values = collect_values({"temp_c": 40.0}, {"inference": section}, False, True, datetime(2026, 1, 1))
    assert values["pump.anomaly_rate_1m"] == 0.5 and values["vibration.anomaly_rate_1m"] == 0.1
    assert values["anomaly_rate_1m"] == 0.1 and values["inference.anomaly_rate_1m"] == 0.1
    status = status_payload({"inference": section})
    assert status["model"] == {"name": "a", "version": "1"}
    assert status["pipelines"] == {
        "vibration": {"name": "a", "version": "1"},
        "pump": {"name": "b", "version": "1"},
    }
    assert "pipelines" not in status_payload({"inference": {"model": "a@1"}})


def test_a_manifest_may_name_its_pipeline(tmp_path: Path) -> None:
    key, _pub = make_keys(tmp_path / "keys")
    art = tmp_path / "m.tflite"
    art.write_bytes(b"x" * 100)
    assert manifest.parse(signed(art, key)).pipeline is None
    assert manifest.parse(signed(art, key, pipeline="pump")).pipeline == "pump"
    with pytest.raises(ManifestRejected, match="pipeline"):
        manifest.parse(signed(art, key, pipeline="../etc"))
    with pytest.raises(ManifestRejected, match="pipeline"):
        manifest.parse(signed(art, key, kind="firmware", pipeline="pump"))
