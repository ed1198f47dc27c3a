"""QuantSim: quantizer placement, calibration, export (QDQ ONNX, encodings, weights) and the
on-target check with onnxruntime's int8 kernels, on small models; MobileNetV2 and MiniLM on slices."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant.metrics import sqnr_db, top1_agreement
from pyquant.sim.graph import UntraceableModelError
from pyquant.sim.quantsim import QuantSim
from pyquant.techniques import fold_batchnorms


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.r1(self.b1(self.c1(x)))
        y = torch.relu(self.c2(y) + y)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y)


class Functional(nn.Module):
    """Functional calls (matmul, gelu, cat, softmax, layer_norm) as in transformer blocks."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(32)

    def forward(self, x):
        a = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(1, 2)) / 4.0, dim=-1)
        h = torch.cat([torch.matmul(a, x), F.gelu(x)], dim=-1)
        return self.ln(h)


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g)


def _net():
    torch.manual_seed(0)
    m = SmallNet().eval()
    with torch.no_grad():
        m.b1.running_mean.uniform_(-0.5, 0.5)
        m.b1.running_var.uniform_(0.5, 2.0)
    return m


def test_placement_follows_config_and_model_is_untouched():
    m = _net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sim = QuantSim(m, _data(2), quant_scheme="min_max")
    assert set(sim.param_quantizers) == {"c1.weight", "c2.weight", "fc.weight"}
    # Conv -> BN -> ReLU is one supergroup: only the ReLU's output is quantized
    acts = set(sim.activation_quantizers)
    assert "r1.output" in acts and "c1.output" not in acts and "b1.output" not in acts
    assert "input.x" in acts and "c2.output" in acts and "relu.output" in acts
    assert sim.param_quantizers["c1.weight"].shape == (8, 1, 1, 1)  # per-channel default profile
    assert sim.param_quantizers["c1.weight"].symmetric
    assert not any("parametrizations" in k for k in m.state_dict())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    pt = QuantSim(m, _data(2), config="per_tensor")
    assert pt.param_quantizers["c1.weight"].shape == (1, 1, 1, 1)


@pytest.mark.parametrize("scheme", ["min_max", "tf_enhanced", "mse", "percentile", "entropy"])
def test_simulation_tracks_fp32(scheme):
    m = _net()
    x = _data()
    sim = QuantSim(m, x[:2], quant_scheme=scheme)
    sim.compute_encodings(lambda model: model(x))
    with torch.no_grad():
        ref, out = m(x), sim.model(x)
    assert sqnr_db(ref, out) > 20.0
    assert not torch.equal(ref, out)  # the quantizers are really there
    text = sim.summary(file=open(os.devnull, "w"))
    assert all(name in text for name in sim.quantizers)


def test_functional_ops_get_quantizers_and_softmax_constraint():
    torch.manual_seed(0)
    m = Functional().eval()
    x = torch.randn(2, 5, 16)
    sim = QuantSim(m, x)
    ops = set(sim.op_types.values())
    assert {"MatMul", "Softmax", "Gelu", "Concat", "LayerNormalization"} <= ops
    sim.compute_encodings(lambda model: model(x))
    sm = [n for n, t in sim.op_types.items() if t == "Softmax"][0]
    enc = sim.activation_quantizers[sm].get_encoding()
    assert float(enc.scale) == pytest.approx(1 / 255) and float(enc.offset) == 0.0
    assert sqnr_db(m(x), sim.model(x)) > 20.0


def test_calibration_from_a_loader_and_unused_quantizers():
    m = _net()
    x = _data()
    sim = QuantSim(m, x[:2])
    sim.compute_encodings([(x[:8], torch.zeros(8, dtype=torch.long)), (x[8:], torch.ones(8, dtype=torch.long))],
                          progress=False)
    assert all(q.get_encoding() is not None for q in sim.quantizers.values())


def test_enable_disable_and_bitwidth_override():
    m = _net()
    x = _data()
    sim = QuantSim(m, x[:2])
    sim.compute_encodings(lambda model: model(x))
    out8 = sim.model(x)
    sim.set_bitwidth("c2.weight", 4)
    with torch.no_grad():
        q = sim.param_quantizers["c2.weight"]
        with q.compute_encodings():
            q(sim.weight("c2.weight"))
    out4 = sim.model(x)
    assert sqnr_db(m(x), out4) < sqnr_db(m(x), out8)
    for name in sim.quantizers:
        sim.enable(name, False)
    torch.testing.assert_close(sim.model(x), m(x))
    with pytest.raises(KeyError, match="no quantizer named"):
        sim.enable("nope")


def test_untraceable_model_names_the_call():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(UntraceableModelError, match=r"test_sim_quantsim.py:\d+.*if x.sum\(\) > 0"):
        QuantSim(Branchy(), torch.randn(3))


def test_export_onnx_matches_simulation_and_encodings_round_trip(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from pyquant.sim.export import run_onnx

    m = _net()
    fold_batchnorms(m)
    x = _data(32, seed=1)
    sim = QuantSim(m, x[:2], quant_scheme="tf_enhanced")
    sim.compute_encodings(lambda model: model(x))
    paths = sim.export(tmp_path, "net", x[:2])
    assert all(p.exists() for p in paths.values())
    assert not list(tmp_path.glob("*.tmp"))
    model = onnx.load(str(paths["onnx"]))
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("QuantizeLinear") >= 4 and kinds.count("DequantizeLinear") >= 4
    axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes and all(a == 0 for a in axes)  # per-channel weights along the output channel
    with torch.no_grad():
        sim_out = sim.model(x)
    # run as written (float emulation of QDQ), the exported graph is the simulation, exactly
    torch.testing.assert_close(run_onnx(paths["onnx"], x, optimize=False)[0], sim_out, rtol=0, atol=0)
    ort_out = run_onnx(paths["onnx"], x)[0]  # onnxruntime's int8 kernels
    agree = (ort_out.argmax(1) == sim_out.argmax(1)).float().mean().item()
    assert agree >= 0.96
    rel = ((ort_out - sim_out).norm() / sim_out.norm()).item()
    assert rel < 0.05
    # the weights file holds the FP32 weights under the original names
    state = torch.load(paths["pth"])
    assert torch.equal(state["c1.weight"], m.c1.weight)
    # encodings load back into a fresh sim and reproduce it exactly
    sim2 = QuantSim(m, x[:2], quant_scheme="tf_enhanced")
    sim2.load_encodings(paths["encodings"])
    with torch.no_grad():
        assert torch.equal(sim2.model(x), sim_out)


def test_export_is_atomic(tmp_path, monkeypatch):
    m = _net()
    x = _data(4)
    sim = QuantSim(m, x[:2])
    sim.compute_encodings(lambda model: model(x))
    paths = sim.export(tmp_path, "net", x[:2])
    before = paths["onnx"].read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        sim.export(tmp_path, "net", x[:2])
    assert paths["onnx"].read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_mobilenet_v2_on_target_agreement_slice():
    """Real ImageNet weights and real photos: sim vs onnxruntime's int8 kernels on a small slice."""
    pytest.importorskip("onnxruntime")
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.models import mobilenet_v2
        from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
        model = mobilenet_v2(pretrained=True)
        calib = imagenet_calibration_set(16)
        evalx = imagenet_eval_set(n_per_image=4)
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    import tempfile
    from pyquant.sim.export import run_onnx
    fold_batchnorms(model)
    sim = QuantSim(model, calib[:1], quant_scheme="tf_enhanced")
    sim.compute_encodings(lambda m: m(calib))
    with torch.no_grad():
        ref = model(evalx)
        out = sim.model(evalx)
    frac, n = top1_agreement(ref, out)
    assert n > 0 and frac >= 0.8
    with tempfile.TemporaryDirectory() as d:
        paths = sim.export(d, "mnv2", calib[:1])
        ort_out = run_onnx(paths["onnx"], evalx)[0]
    # onnxruntime's kernels round differently from torch's convolutions in places; on the crops the
    # simulation is confident about, the top-1 class must still agree
    frac, n = top1_agreement(out, ort_out)
    assert n > 0 and frac >= 0.9, (frac, n)


def test_minilm_through_quantsim():
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.models.minilm import minilm
        tok, model = minilm()
    except (AssetMissingError, ImportError) as exc:
        pytest.skip(str(exc))
    texts = ["The quick brown fox jumps over the lazy dog.", "A fast auburn fox leaps above a sleepy hound.",
             "Quantization maps real numbers to a small set of integers."]
    batch = tok(texts, padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    sim = QuantSim(model, inputs, quant_scheme="tf_enhanced")
    ops = list(sim.op_types.values())
    assert ops.count("Gemm") >= 6 * 6  # q, k, v, output and the two MLP projections in each of 6 layers
    assert {"Attention", "MatMul"} & set(ops) and "LayerNormalization" in ops and "Gelu" in ops
    sim.compute_encodings(lambda m: m(**inputs))
    def embed(m):  # mean pooling over the attention mask, L2-normalised (sentence-transformers' recipe)
        h = m(**inputs)
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.no_grad():
        ref, out = embed(model), embed(sim.model)
    cos = (ref * out).sum(-1)
    # W8A8 with per-tensor activations: BERT's residual stream has outliers, which cost similarity
    assert (cos > 0.75).all(), cos
    for n in sim.activation_quantizers:
        sim.enable(n, False)
    with torch.no_grad():
        w_only = (ref * embed(sim.model)).sum(-1)
    assert (w_only > 0.99).all(), w_only  # 8-bit per-channel weights alone are nearly lossless
    # the captured graph keeps batch size and sequence length free
    other = tok(["Short.", "Another, somewhat longer sentence than that one."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = sim.model(input_ids=other["input_ids"], attention_mask=other["attention_mask"])
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert h.shape[:2] == other["input_ids"].shape
    # export: the QDQ graph, run as written by onnxruntime, computes the simulation quantizer by quantizer
    pytest.importorskip("onnxruntime")
    import tempfile
    from helpers import assert_onnx_runs_simulation
    from pyquant.sim.export import run_onnx
    for n in sim.activation_quantizers:
        sim.enable(n, True)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        paths = sim.export(d, "minilm", inputs, opset_version=17)  # attention needs opset >= 14
        flips = assert_onnx_runs_simulation(sim, paths["onnx"], inputs)
        got = run_onnx(paths["onnx"], inputs["input_ids"], inputs["attention_mask"], optimize=False)[0]
        want = sim.model(**inputs).last_hidden_state
    # Not end to end for every sample: onnxruntime sums the matmuls in another order than torch (whose own
    # order depends on the CPU's SIMD level), so a value an ulp from a rounding boundary can take the other
    # code, and every later quantizer of that sample sees the step (one code in layer 3 moved outputs by
    # 0.7 on an AVX-512 machine). A sample without such a flip is the simulation exactly.
    flipped = torch.zeros(len(texts), dtype=torch.bool)
    for name, f in flips.items():
        if name in sim.activation_quantizers:
            flipped |= f.flatten(1).any(1)
    torch.testing.assert_close(got[~flipped], want[~flipped], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["min_max", "tf_enhanced"])
def test_quantsim_on_cuda_matches_cpu(scheme):
    """The same model calibrated on the GPU gets the CPU's encodings and outputs."""
    x = _data()
    sims = {}
    # TF32 convolutions would make the GPU's activations differ from the CPU's well beyond float rounding
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for dev in ("cpu", "cuda"):
        m = _net().to(dev)
        sim = QuantSim(m, x[:2].to(dev), quant_scheme=scheme)
        sim.compute_encodings(lambda model: model(x.to(dev)))
        sims[dev] = sim
    for name, q in sims["cpu"].quantizers.items():
        a, b = q.get_encoding(), sims["cuda"].quantizers[name].get_encoding()
        # min-max follows the data's extremes; TF-enhanced picks one of a discrete set of candidates
        # from histograms, which a last-bit difference in a convolution can tip to a neighbour
        tol = 1e-5 if scheme == "min_max" or name.endswith(".weight") or name.startswith("input.") else 0.05
        torch.testing.assert_close(b.scale.cpu(), a.scale, rtol=tol, atol=0, msg=name)
    with torch.no_grad():
        out_cpu = sims["cpu"].model(x)
        out_gpu = sims["cuda"].model(x.cuda()).cpu()
    # a one-step difference in a rounding tie can move single elements; the bulk must agree
    assert sqnr_db(out_cpu, out_gpu) > (40.0 if scheme == "min_max" else 25.0)


def test_param_quant_scheme_separates_weights_from_activations():
    from pyquant.quant.analyzers import MinMax, TfEnhanced
    m = _net()
    sim = QuantSim(m, _data(2), quant_scheme="tf_enhanced", param_quant_scheme="min_max")
    assert all(isinstance(q.encoding_analyzer, MinMax) for q in sim.param_quantizers.values())
    assert all(isinstance(q.encoding_analyzer, TfEnhanced) for q in sim.activation_quantizers.values())
    with pytest.raises(ValueError, match="param_quant_scheme"):
        QuantSim(m, _data(2), param_quant_scheme="best")
