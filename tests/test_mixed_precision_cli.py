"""`pyquant amp SPEC`: the mix, its files and the report on the tiny SPEC of tests/spec_tiny.py, exit codes for
a met and a missed target, and a candidate the config cannot run as a usage error."""
from __future__ import annotations

import json

import pytest

from pyquant import cli
from pyquant.sim.config import load_config
from helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_amp_writes_the_mix_its_files_and_the_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "amp"
    rc = cli.main(["amp", "spec_tiny:build", "--candidates", "w4a8,w8a8,w8a16", "--allowed-drop", "0.5",
                   "-o", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == cli.EXIT_OK, text
    assert "Pareto front" in text and "target" in text
    result = json.loads((out / "build_mixed_precision.json").read_text())
    assert result["target_met"] and result["metric"] == "top1_agreement"
    assert set(result["mix"].values()) <= {"w4a8", "w8a8", "w8a16"}
    page = (out / "report.html").read_text()
    assert "Mixed precision" in page and "data:image/png;base64," in page
    assert (out / "figures" / "pareto.png").exists()
    assert load_config(str(out / "build_config.json")) == load_config("default")
    # the cache makes a rerun evaluate nothing again
    rc = cli.main(["amp", "spec_tiny:build", "--candidates", "w4a8,w8a8,w8a16", "--allowed-drop", "0.5",
                   "-o", str(out), "--no-progress"])
    capsys.readouterr()
    again = json.loads((out / "build_mixed_precision.json").read_text())
    assert rc == cli.EXIT_OK and again["evaluations"] == 0 and again["mix"] == result["mix"]


def test_amp_exit_codes(tmp_path, capsys):
    # no drop allowed at 2/4 bits: the target is missed -> 4, with the distance printed
    rc = cli.main(["amp", "spec_tiny:build", "--candidates", "w2a4,w3a4", "--allowed-drop", "0", "--metric", "cosine",
                   "-o", str(tmp_path / "a"), "--no-progress"])
    assert rc == cli.EXIT_TARGET_MISSED
    assert "NOT met" in capsys.readouterr().out
    cfg = load_config("default").to_dict()
    cfg["defaults"]["supported_kernels"] = [{"activation": {"bitwidth": 8, "dtype": "int"},
                                             "param": {"bitwidth": 8, "dtype": "int"}}]
    path = tmp_path / "w8a8_only.json"
    path.write_text(json.dumps(cfg))
    rc = cli.main(["amp", "spec_tiny:build", "--candidates", "w4a8,w8a8", "--config", str(path),
                   "-o", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "w4a8" in err and "W8A8" in err
    assert cli.main(["amp", "spec_tiny:build", "--candidates", "w4x8"]) == cli.EXIT_USAGE
    assert cli.main(["amp", "spec_tiny:build", "--allowed-drop", "-1"]) == cli.EXIT_USAGE
