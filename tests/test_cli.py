"""The `pyquant` command in a subprocess (python -m pyquant.cli, as the console script runs it), on the
tiny SPEC in tests/spec_tiny.py: outputs, files and exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyquant import cli
from helpers import one_thread  # noqa: F401  (fixture)

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args: str, cwd: Path = HERE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model; see helpers.one_thread
    return subprocess.run([sys.executable, "-m", "pyquant.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_explains_spec_and_exit_codes():
    r = run("--help")
    assert r.returncode == 0
    for words in ("pyquant analyze", "package.module:function", "dummy_input", "Exit codes", "2 usage"):
        assert words in r.stdout
    r = run()
    assert r.returncode == cli.EXIT_USAGE and "give a command" in r.stderr


def test_analyze_writes_report_json_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    r = run("analyze", "spec_tiny:build", "-o", str(tmp_path / "out"), "--eval-samples", "16", "--no-progress",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "out" / "analysis.json").read_text())
    top3 = a["sensitivity"]["ranking"][:3]
    assert f"most sensitive layers: {', '.join(top3)}" in r.stdout
    assert a["sensitivity"]["samples"] == 16
    page = (tmp_path / "out" / "report.html").read_text()
    assert "pyquant analysis: build (TinyNet)" in page and page.count("data:image/png;base64,") == 5
    assert len(list((tmp_path / "out" / "figures").glob("*.png"))) == 5
    assert "\r" not in r.stderr  # no progress bar with --no-progress


def test_usage_errors_exit_2(capsys):
    r = run("analyze", "spec_tiny:build", "--param-bw", "40")
    assert r.returncode == 2 and "bit width must be in 2..16" in r.stderr
    r = run("export", "no_such_module:build")
    assert r.returncode == 2 and "cannot import 'no_such_module'" in r.stderr and "PYTHONPATH" in r.stderr
    # the rest in-process: same code path, no interpreter start-up
    cases = [(["analyze", "spec_tiny"], "must look like package.module:function"),
             (["analyze", "spec_tiny:nope"], "has no function 'nope'"),
             (["analyze", "spec_tiny:build_broken"], "without 'dummy_input', 'data'"),
             (["analyze", "spec_tiny:tiny_data"], "returned Tensor"),
             (["analyze", "spec_tiny:build", "--metric", "spec"], "returned no 'metric'"),
             (["export", "spec_tiny:build", "--config", "no_such_profile"], "named profile"),
             (["export", "spec_tiny:build", "--name", "../up"], "plain file name"),
             (["demo", "--per-image", "0"], "must be >= 1"),
             (["analyze", "spec_tiny:build", "--threads", "0"], "must be in 1..4096")]
    for argv, msg in cases:
        assert cli.main(argv) == cli.EXIT_USAGE, argv
        assert msg in capsys.readouterr().err, argv


def test_usage_messages(capsys):
    assert cli.main(["export", "spec_tiny:build_broken"]) == 2
    assert "without 'dummy_input', 'data'" in capsys.readouterr().err
    assert cli.main(["analyze", "spec_tiny:tiny_model"]) == 2
    assert "returned TinyNet" in capsys.readouterr().err


def test_a_failing_model_exits_1_with_a_hint():
    r = run("export", "spec_tiny:build_failing", "-o", "/nonexistent-never-written")
    assert r.returncode == cli.EXIT_FAILURE, r.stderr
    assert "this model fails on purpose" in r.stderr and "--traceback" in r.stderr and "Traceback" not in r.stderr


def test_export_writes_onnx_encodings_and_weights(tmp_path):
    pytest.importorskip("onnx")
    r = run("export", "spec_tiny:build_tuple", "-o", str(tmp_path), "--name", "tiny", "--encoding-version", "2.0.0",
            "--quant-scheme", "min_max")
    assert r.returncode == 0, r.stderr
    for ext in ("onnx", "encodings", "pth"):
        assert (tmp_path / f"tiny.{ext}").stat().st_size > 0
        assert str(tmp_path / f"tiny.{ext}") in r.stdout
    enc = json.loads((tmp_path / "tiny.encodings").read_text())
    assert enc["version"] == "2.0.0"


def test_autoquant_exit_codes(tmp_path, capsys):
    pytest.importorskip("pyquant.autoquant")
    # 2-bit everything, no drop allowed, no time: the target cannot be met -> 4; no metric in the SPEC ->
    # agreement with FP32
    r = run("autoquant", "spec_tiny:build", "-o", str(tmp_path / "a"), "--param-bw", "2", "--output-bw", "2",
            "--allowed-drop", "0", "--time-budget", "0.001", "--no-progress")
    assert r.returncode == cli.EXIT_TARGET_MISSED, r.stderr
    assert "target NOT met" in r.stdout and "top-1 agreement with the FP32 model" in r.stdout
    assert "warning: AutoQuant: the time budget" in r.stderr
    assert (tmp_path / "a" / "build_autoquant.encodings").exists()
    # the SPEC's metric, a loose target -> 0 (in-process)
    rc = cli.main(["autoquant", "spec_tiny:build_with_metric", "-o", str(tmp_path / "b"), "--no-adaround",
                   "--allowed-drop", "0.5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_OK and "target met" in out
    report = tmp_path / "b" / "build_with_metric_autoquant_report.html"
    assert str(report) in out and report.exists()
    assert cli.main(["autoquant", "spec_tiny:build", "--allowed-drop", "1.5"]) == cli.EXIT_USAGE
