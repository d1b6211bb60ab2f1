"""`edgeagent push --shadow N[:AGREEMENT]`: the flag's parsing and the progress line it prints."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from edgeagent.ops.push_shadow import shadow_arg, shadow_line


def test_the_flag_becomes_the_manifest_shadow_object() -> None:
    want = {"windows": 500, "min_agreement": 0.95, "max_p99_ratio": 1.5, "tolerance": 0.1}
    assert shadow_arg("500") == want
    assert shadow_arg("200:0.9")["min_agreement"] == 0.9
    for bad in ("0", "-5", "x", "10:1.5", "10:abc", "10:", ":0.9", "2000000"):
        with pytest.raises(argparse.ArgumentTypeError, match="WINDOWS"):
            shadow_arg(bad)


def test_the_cli_refuses_a_bad_shadow_before_connecting() -> None:
    out = subprocess.run([sys.executable, "-m", "edgeagent.cli", "push", "--device", "d", "--kind", "model",
                          "--name", "m", "--version", "2.0.0", "--key", "k", "--key-id", "k",
                          "--shadow", "10:7", "f.tflite"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--shadow" in out.stderr and "min_agreement" in out.stderr


def test_progress_line_shows_the_figures() -> None:
    figures = {"windows": 500, "compared": 120, "agreement": 0.99167, "min_agreement": 0.95,
               "p99_ratio": 1.0234, "score_shift": -0.0031, "score_ks": 0.04, "shed": 3}
    assert shadow_line("d1", {"state": "shadowing", "shadow": figures}) == (
        "d1: shadow 120/500 windows, agreement 0.992 (min 0.95), p99 ratio 1.02, score shift -0.003 "
        "(KS 0.04), shed 3")
    early = {"state": "shadowing", "shadow": {"windows": 500, "compared": 0, "agreement": None}}
    assert "agreement - " in str(shadow_line("d1", early))
    assert shadow_line("d1", {"state": "installing"}) is None
