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


def test_amp_with_adaround_writes_the_learned_weights(tmp_path, capsys):
    """--adaround-iterations: the 4-bit candidates run with AdaRound's weights, and NAME.pth holds them (the
    encodings alone would not reproduce the learned rounding)."""
    import copy

    import torch

    import pyquant
    from spec_tiny import build
    out = tmp_path / "amp"
    # a drop of 1.0 in cosine: every layer can go to the cheapest candidate, w4a8
    rc = cli.main(["amp", "spec_tiny:build", "--candidates", "w4a8,w8a8", "--allowed-drop", "1.0", "--metric",
                   "cosine", "--adaround-iterations", "40", "-o", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == cli.EXIT_OK, text
    result = json.loads((out / "build_mixed_precision.json").read_text())
    assert set(result["mix"].values()) == {"w4a8"}
    assert (out / "cache" / "adaround").is_dir()  # AdaRound's layers, for a rerun to resume from
    saved = torch.load(out / "build.pth")
    spec = build()
    ada = pyquant.adaround(spec["model"], spec["dummy_input"], spec["data"], param_bw=4, iterations=40,
                           quant_scheme="tf_enhanced", progress=False)  # the command's default scheme
    folded = copy.deepcopy(spec["model"])
    pyquant.fold_batchnorms(folded, spec["dummy_input"])
    flipped = 0
    for name, enc in ada.encodings.items():
        w = saved[name]
        assert torch.equal(w, ada.model.get_parameter(name).detach())
        codes = w / enc.scale
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the 4-bit grid
        flipped += int((codes.round() != (folded.get_parameter(name).detach() / enc.scale).round()).sum())
    assert flipped > 0  # AdaRound's rounding, not round-to-nearest's


def test_amp_adaround_arguments_are_checked(tmp_path, capsys):
    assert cli.main(["amp", "spec_tiny:build", "--candidates", "w4a8,w8a8", "--adaround-iterations", "5",
                     "--adaround-bits", "3", "-o", str(tmp_path / "a"), "--no-progress"]) == cli.EXIT_USAGE
    assert "--adaround-bits 3" in capsys.readouterr().err
    assert cli.main(["amp", "spec_tiny:build", "--adaround-bits", "4", "-o", str(tmp_path / "b"),
                     "--no-progress"]) == cli.EXIT_USAGE
    assert "--adaround-iterations" in capsys.readouterr().err
