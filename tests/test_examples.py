"""Every script in examples/ runs in its quick mode, in a subprocess, exits 0 and prints what its docstring
promises: numbers within sane ranges, relations the technique guarantees, and files that parse.

An example added without a check here fails `test_every_example_is_checked`. The whole file takes about
three minutes on two cores (each example a few seconds to half a minute)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HELPERS = {"common.py"}  # shared by the examples, not one itself

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def run_example(name: str, out: Path, **env: str) -> str:
    """Runs examples/<name>.py --quick --out <out> and returns its stdout; fails with its output otherwise."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYQUANT_EXAMPLES_QUICK="1", **env)
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
                          cwd=EXAMPLES, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def numbers(pattern: str, text: str) -> list[float]:
    """Every float captured by `pattern`'s first group in `text`; at least one must be there."""
    found = [float(m) for m in re.findall(pattern, text)]
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return found


def number(pattern: str, text: str) -> float:
    found = numbers(pattern, text)
    assert len(found) == 1, f"{pattern!r} matched {len(found)} times in:\n{text}"
    return found[0]


def sane_db(v: float) -> bool:
    return math.isfinite(v) and -5.0 < v < 150.0


def onnx_model(path: Path):
    import onnx

    assert path.is_file(), path
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


def encodings(path: Path) -> dict:
    assert path.is_file(), path
    data = json.loads(path.read_text())
    assert data["param_encodings"] and data["activation_encodings"], path
    return data


# ---- one check per example -----------------------------------------------------------------------------------
def check_quickstart(out: str, d: Path) -> None:
    agreement = number(r"top-1 agreement with FP32: ([\d.]+)%", out)
    assert 0.0 <= agreement <= 100.0
    confident = [float(v) for v in re.findall(r"FP32 is confident about: ([\d.]+)%", out)]  # none: no sure image
    assert len(confident) <= 1 and all(0.0 <= v <= 100.0 for v in confident)
    assert number(r"\.\.\. (\d+) quantizers", out) > 0
    model = onnx_model(d / "quickstart.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    enc = encodings(d / "quickstart.encodings")
    assert all(e["bw"] == 8 for e in enc["param_encodings"])


def check_calibration_schemes(out: str, d: Path) -> None:
    scores = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+): SQNR (-?[\d.]+) dB, KL ([\d.]+)", out, re.M)}
    assert set(scores) == {"min_max", "tf_enhanced", "percentile", "mse", "entropy"}, out
    assert all(sane_db(v) for v in scores.values()), scores
    best = re.search(r"best scheme by output SQNR: (\w+)", out).group(1)
    assert scores[best] == max(scores.values())


def check_hardware_config(out: str, d: Path) -> None:
    per_channel = {m.group(1): int(m.group(3)) for m in re.finditer(r"^(\w+): (\d+) quantizers, (\d+) per channel", out, re.M)}
    assert per_channel["per_tensor"] == 0 and per_channel["default"] > 0, per_channel
    assert re.search(r"custom: \d+ quantizers, W8A16 default bit widths: 8/16, Add outputs symmetric: True", out), out
    cfg = json.loads((d / "custom_config.json").read_text())
    assert cfg["op_type"]["Add"]["is_symmetric"] == "True"


def check_per_block_lpbq(out: str, d: Path) -> None:
    per_channel = number(r"per channel: SQNR (-?[\d.]+) dB", out)
    per_block = number(r"per block of 32: SQNR (-?[\d.]+) dB", out)
    lpbq = number(r"LPBQ \(block 32, 8-bit decompressed\): SQNR (-?[\d.]+) dB", out)
    assert all(sane_db(v) for v in (per_channel, per_block, lpbq))
    assert per_block > per_channel                       # a scale per block of 32 fits 4-bit weights better
    assert abs(lpbq - per_block) < 1.0                    # LPBQ's integer block scales cost little
    assert re.search(r"integer block scales \(64, 4\)", out)   # 128 inputs / blocks of 32
    assert number(r"\(opset (\d+)\)", out) == 21
    onnx_model(d / "decoder_w4a16_lpbq.onnx")
    enc = encodings(d / "decoder_w4a16_lpbq.encodings")
    lpbq_entries = [e for e in enc["param_encodings"] if e["enc_type"] == "LPBQ"]
    assert lpbq_entries and all(e["compressed_bw"] == 4 and e["bw"] == 8 for e in lpbq_entries)
    assert number(r"(\d+) LPBQ weight encodings", out) == len(lpbq_entries)


def check_export_and_compare(out: str, d: Path) -> None:
    model = onnx_model(d / "model_w8a8.onnx")
    qdq = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert number(r"(\d+) QuantizeLinear nodes", out) == qdq > 0
    assert re.search(r"^lockstep: agrees: True, first tensor > 1 step off: none", out, re.M), out
    assert number(r"lockstep: .*?, ([\d.]+)% of \d+ tensors", out) == 0.0
    encodings(d / "model_w8a8.encodings")
    assert (d / "model_w8a8.pth").is_file()


def check_batchnorm_folding(out: str, d: Path) -> None:
    assert number(r"max relative change: ([\d.e+-]+)", out) < 1e-4     # folding is exact in FP32
    folded = number(r"(\d+) batch norms folded, max", out)
    assert folded > 0
    assert number(r"fold_batchnorms_to_scale: (\d+) batch norms", out) == folded


def check_cle_hba(out: str, d: Path) -> None:
    before = number(r"before CLE: SQNR (-?[\d.]+) dB", out)
    after = number(r"after CLE: SQNR (-?[\d.]+) dB", out)
    assert sane_db(before) and sane_db(after)
    m = re.search(r"(\d+) pairs equalized; largest channel-range spread ([\d.]+) -> ([\d.]+)", out)
    assert m and int(m.group(1)) > 0, out
    if out.startswith("MobileNetV2"):   # its depthwise stem spans 2207x; per-tensor weights need CLE there
        assert float(m.group(3)) < float(m.group(2)) / 5 and after > before + 1.0, out


def check_bias_correction(out: str, d: Path) -> None:
    base = number(r"per-tensor W8A8: SQNR (-?[\d.]+) dB", out)
    empirical = number(r"empirical bias correction \(\d+ layers\): SQNR (-?[\d.]+) dB", out)
    analytical = number(r"analytical bias correction \(\d+ layers\): SQNR (-?[\d.]+) dB", out)
    assert all(sane_db(v) for v in (base, empirical, analytical))
    assert number(r"empirical bias correction \((\d+) layers\)", out) > 0
    assert any(p.name.startswith(".pyquant") or p.is_file() for p in (d / "bias_correction_ckpt").iterdir())


def check_adaround(out: str, d: Path) -> None:
    nearest = number(r"nearest rounding W4A8: SQNR (-?[\d.]+) dB", out)
    learned = number(r"AdaRound W4A8 \(\d+ iterations per layer\): SQNR (-?[\d.]+) dB", out)
    assert sane_db(nearest) and sane_db(learned)
    assert learned > nearest                              # even a few iterations beat nearest rounding at 4 bits
    assert (d / "adaround_ckpt").is_dir()


def check_seqmse_gptq(out: str, d: Path) -> None:
    rtn = number(r"round to nearest: SQNR (-?[\d.]+) dB", out)
    seq = number(r"SeqMSE \(\d+ layers\): SQNR (-?[\d.]+) dB", out)
    gptq = number(r"GPTQ \(\d+ layers\): SQNR (-?[\d.]+) dB", out)
    assert all(sane_db(v) for v in (rtn, seq, gptq))
    assert seq > rtn and gptq > rtn                       # both reduce the layers' output error
    assert number(r"SeqMSE \((\d+) layers\)", out) == 15  # 2 decoder layers x 7 Linear + the head


def check_transformer_smoothing(out: str, d: Path) -> None:
    plain = number(r"decoder W8A8 \(Linear inputs\): SQNR (-?[\d.]+) dB", out)
    smoothed = number(r"\+ smoothing: SQNR (-?[\d.]+) dB", out)
    assert smoothed > plain                               # the outlier channels sit in the Linear inputs
    assert number(r"smooth_activations: (\d+) pairs smoothed", out) > 0
    m = re.search(r"activation range search \(cosine\): loss ([\d.e+-]+) -> ([\d.e+-]+)", out)
    assert m and float(m.group(2)) <= float(m.group(1)), out   # the search never raises its loss
    before = number(r"W8A8: cosine ([\d.]+)", out)
    after = number(r"\+ range search: cosine ([\d.]+)", out)
    assert 0.0 < before <= 1.0 and 0.0 < after <= 1.0


def check_qat(out: str, d: Path) -> None:
    kls = numbers(r"KL to FP32 ([\d.]+)", out)
    assert len(kls) == 3 and all(math.isfinite(v) and v >= 0 for v in kls)
    assert re.search(r"checkpoint qat_learned.pt reloaded at step \d+", out)
    assert (d / "qat_fixed.pt").is_file() and (d / "qat_learned.pt").is_file()


def check_qat_ddp(out: str, d: Path) -> None:
    assert re.search(r"DDP step equals single-process step: True", out), out


def check_autoquant(out: str, d: Path) -> None:
    accuracy = number(r"best step: [\w+/]+, accuracy ([\d.]+)", out)
    assert 0.0 <= accuracy <= 1.0
    report = Path(re.search(r"^report: (.+)$", out, re.M).group(1))
    assert report.is_file() and "<html" in report.read_text()[:500].lower()
    encodings(Path(re.search(r"^encodings: (.+)$", out, re.M).group(1)))
    assert (d / "aq_cache").is_dir()


def check_analysis_report(out: str, d: Path) -> None:
    assert len(re.findall(r"^sensitive #\d: ", out, re.M)) == 5
    data = json.loads((d / "analysis" / "analysis.json").read_text())
    assert {"sensitivity", "layer_sqnr", "histograms", "weight_ranges"} <= set(data)
    page = d / "analysis" / "report.html"
    assert page.is_file() and "<html" in page.read_text()[:500].lower()


def check_cli_spec(out: str, d: Path) -> None:
    assert re.search(r"pyquant export: exit 0", out) and re.search(r"pyquant compare: exit 0", out), out
    onnx_model(d / "cli" / "my_model.onnx")
    encodings(d / "cli" / "my_model.encodings")
    report = json.loads((d / "cli" / "compare" / "compare.json").read_text())
    assert report


def check_llm(out: str, d: Path) -> None:
    fp32 = number(r"FP32 perplexity ([\d.]+)", out)
    ratio = number(r"\(([\d.]+)x FP32\)", out)
    assert fp32 > 1.0 and 0.9 < ratio < 1.5               # W8A16 + KV8 stays near FP32
    assert number(r"(\d+) key/value quantizers", out) == 4   # 2 layers x (key, value)
    tokens = json.loads(re.search(r"generated: (\[.*\])", out).group(1))
    assert len(tokens) == 8 and all(0 <= t < 256 for t in tokens)


def check_distributed_calibration(out: str, d: Path) -> None:
    assert re.search(r"sharded == one process: True \(largest scale difference 0\)", out), out


def check_mixed_precision(out: str, d: Path) -> None:
    assert "target met: True" in out
    cost = number(r"relative cost: ([\d.]+)", out)
    acc, fp32, target = (number(p, out) for p in (r"accuracy: ([\d.]+) \(", r"\(FP32 ([\d.]+), target [\d.]+\)", r"target ([\d.]+)\)"))
    assert 0.0 < cost <= 1.0                                # never more than the starting (most precise) mix
    assert target <= acc <= 1.0 and target == pytest.approx(fp32 - 0.02, abs=1e-4)
    saved = json.loads((d / "mixed_precision" / "mixed_precision_mixed_precision.json").read_text())
    assert saved and (d / "mixed_precision" / "mixed_precision.encodings").is_file()
    json.loads((d / "mixed_precision" / "mixed_precision_config.json").read_text())


CHECKS: dict[str, Callable[[str, Path], None]] = {
    name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


def test_every_example_is_checked():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if p.name not in HELPERS}
    assert scripts == set(CHECKS), f"examples without a check: {sorted(scripts - set(CHECKS))}; " \
                                   f"checks without an example: {sorted(set(CHECKS) - scripts)}"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example(name, tmp_path):
    CHECKS[name](run_example(name, tmp_path), tmp_path)


def test_examples_run_without_the_offline_assets(tmp_path):
    """The fallback every example takes where an asset is missing: the small random model."""
    out = run_example("quickstart", tmp_path, PYQUANT_EXAMPLES_NO_ASSETS="1")
    assert "using a small random CNN instead" in out
    check_quickstart(out, tmp_path)
