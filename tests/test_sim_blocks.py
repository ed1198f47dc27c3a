"""Per-block weights in QuantSim: where blocks go (Gemm/MatMul weights along their input dimension; other
weights keep their channels), the block size from the argument or the config, the simulated weights
against a pure-torch computation, least-error calibration per block, float biases beside per-block
weights, the summary, the encodings files and the QDQ export run by onnxruntime; and the default bit
widths a config's supported_kernels give."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant import QuantSim
from pyquant.sim.config import load_config
from helpers import assert_onnx_runs_simulation, one_thread  # noqa: F401  (fixture)
import zoo

pytestmark = pytest.mark.usefixtures("one_thread")


class Mlp(nn.Module):
    """Two linear layers with ReLUs, and a functional linear layer whose weight is a graph attribute."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.proj = nn.Parameter(torch.randn(8, 32) * 0.3)

    def forward(self, x):
        return F.linear(F.relu(self.fc2(F.relu(self.fc1(x)))), self.proj)


class ConvHead(nn.Module):
    """A convolution (stays per channel) before a linear layer (per block)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def _data(n: int, k: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Mlp().eval()


def _blocked_minmax_reference(w: torch.Tensor, block: int, bw: int) -> torch.Tensor:
    """Symmetric per-block min/max quantization of a [out, in] weight, blocks along `in`, in plain torch."""
    qmin, qmax = -(2 ** (bw - 1)), 2 ** (bw - 1) - 1
    wb = w.reshape(w.shape[0], -1, block)
    mn = wb.amin(dim=-1, keepdim=True).clamp(max=0)
    mx = wb.amax(dim=-1, keepdim=True).clamp(min=0)
    s = torch.maximum(mx / qmax, mn / qmin)
    return (torch.clamp(torch.round(wb / s), qmin, qmax) * s + 0.0).reshape(w.shape)  # + 0.0: no -0


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("bw", [4, 8])
def test_blocks_along_the_input_dimension_simulate_per_block_minmax(block, bw):
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], quant_scheme="min_max", param_bw=bw, block_size=block)
    fc1, fc2, proj = (sim.quantizer(n) for n in ("fc1.weight", "fc2.weight", "proj"))
    assert (fc1.shape, fc1.block_size) == ((32, 64 // block), (1, block))
    assert (fc2.shape, fc2.block_size) == ((32, 32 // block), (1, block))
    assert (proj.shape, proj.block_size) == ((8, 32 // block), (1, block))
    assert sim.placement["fc1.weight"].block_size == block
    sim.compute_encodings(lambda m: m(x))
    for name, layer in (("fc1.weight", "fc1"), ("fc2.weight", "fc2")):
        w = sim.weight(name).detach()
        want = _blocked_minmax_reference(w, block, bw)
        # the quantizer keeps the range as min/max and derives its scale from them: the same to an ulp or so
        torch.testing.assert_close(sim.model.get_submodule(layer).weight.detach(), want, rtol=1e-6, atol=0)
        assert sim.quantizer(name).get_encoding().granularity == "per_block"
    w = sim.weight("proj").detach()
    torch.testing.assert_close(sim.quantizer("proj")(w).detach(), _blocked_minmax_reference(w, block, bw),
                               rtol=1e-6, atol=0)


def test_a_block_size_that_does_not_divide_is_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"block_size = 24 does not divide the input dimension 64 of weight "
                                         r"'fc1.weight' \(shape \(32, 64\)\)"):
        QuantSim(_mlp(), _data(2), block_size=24)
    cfg = load_config("default").to_dict()
    cfg["op_type"]["Gemm"]["block_size"] = 48
    with pytest.raises(ValueError, match=r"config's block_size for Gemm = 48 does not divide .* 'fc1.weight'"):
        QuantSim(_mlp(), _data(2), config=cfg)
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            QuantSim(_mlp(), _data(2), block_size=bad)


def test_convolutions_keep_their_channels():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 4, 4)
    sim = QuantSim(ConvHead().eval(), x, block_size=16)
    assert sim.quantizer("conv.weight").block_size is None
    assert sim.quantizer("conv.weight").shape == (8, 1, 1, 1)  # per output channel, as the profile says
    assert (sim.quantizer("fc.weight").shape, sim.quantizer("fc.weight").block_size) == ((10, 8), (1, 16))


def test_the_config_key_places_what_the_argument_places_and_the_argument_wins():
    x = _data(8)
    cfg = load_config("default").to_dict()
    cfg["defaults"]["block_size"] = 16
    by_config = QuantSim(_mlp(), x, config=cfg)
    by_argument = QuantSim(_mlp(), x, block_size=16)
    assert {n: p.shape for n, p in by_config.placement.items()} == \
        {n: p.shape for n, p in by_argument.placement.items()}
    assert by_config.quantizer("fc1.weight").shape == (32, 4)
    assert QuantSim(_mlp(), x, config=cfg, block_size=32).quantizer("fc1.weight").shape == (32, 2)
    cfg["op_type"]["Gemm"]["block_size"] = 0  # this op type unblocked: per channel again
    sim = QuantSim(_mlp(), x, config=cfg)
    assert (sim.quantizer("fc1.weight").shape, sim.quantizer("fc1.weight").block_size) == ((32, 1), None)
    assert sim.op_type("proj") == "Gemm" and sim.quantizer("proj").shape == (8, 1)
    assert load_config(load_config(cfg).to_dict()) == load_config(cfg)
    cfg["defaults"]["block_size"] = "16"
    with pytest.raises(ValueError, match=r"defaults.block_size: expected an integer"):
        load_config(cfg)


def test_least_error_calibration_works_per_block():
    """With a histogram scheme each block keeps the search's encoding unless round-to-nearest over the block's
    range reconstructs it better: no block ends worse than round-to-nearest."""
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], quant_scheme="tf_enhanced", param_bw=4, block_size=16)
    sim.compute_encodings(lambda m: m(x))
    w = sim.weight("fc1.weight").detach()
    err = (sim.model.fc1.weight.detach() - w).square().reshape(32, 4, 16).sum(-1)
    rtn = (_blocked_minmax_reference(w, 16, 4) - w).square().reshape(32, 4, 16).sum(-1)
    assert bool((err <= rtn * (1 + 1e-6)).all())


def test_biases_stay_float_beside_per_block_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.randn(8) * 0.37)
    x = _data(8, 32)
    sim = QuantSim(model, x[:2], quant_scheme="min_max", param_bw=4, block_size=16)
    sim.compute_encodings(lambda m: m(x))
    assert "0" in sim.int32_biases  # a Gemm whose bias an int32 target would add ...
    qx, qy = sim.quantizer("input.input"), sim.quantizer("0.output")
    w_hat = _blocked_minmax_reference(sim.weight("0.weight").detach(), 16, 4)
    want = qy(F.linear(qx(x), w_hat, model[0].bias))  # ... but per-block weights keep it float
    torch.testing.assert_close(sim.model(x), want, rtol=0, atol=1e-6)


def test_summary_names_the_blocks():
    x = _data(4)
    sim = QuantSim(_mlp(), x, block_size=16)
    text = sim.summary(file=open("/dev/null", "w"))
    assert "per_block 16" in text.splitlines()[2]
    sim.compute_encodings(lambda m: m(x))
    text = sim.summary(file=open("/dev/null", "w"))
    assert sum("per_block 16" in line for line in text.splitlines()) == 3


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_encodings_round_trip_into_an_identical_simulation(tmp_path, version):
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16)
    sim.compute_encodings(lambda m: m(x))
    paths = sim.export(tmp_path, "m", encoding_version=version)
    entries = json.loads(paths["encodings"].read_text())
    entries = entries["encodings"] if version == "2.0.0" else entries["param_encodings"]
    fc1 = next(e for e in entries if e["name"] == "fc1.weight")
    assert fc1["block_size"] == 16
    other = QuantSim(_mlp(), x[:2], param_bw=4, block_size=16)
    other.load_encodings(paths["encodings"])
    assert torch.equal(other.model(x), sim.model(x))
    for name, q in sim.param_quantizers.items():
        assert torch.equal(other.quantizer(name).get_encoding().scale, q.get_encoding().scale)
    with pytest.raises(ValueError, match="0.6.1 has no per-block encodings"):
        sim.export(tmp_path, "old", encoding_version="0.6.1")


@pytest.mark.parametrize("bw,dtype", [(4, 2 + 20), (8, 3)])  # onnx TensorProto: INT4 = 22, INT8 = 3
def test_export_runs_in_onnxruntime_as_the_simulation(tmp_path, bw, dtype):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    x = _data(16)
    sim = QuantSim(_mlp(), x[:2], param_bw=bw, block_size=16)
    sim.compute_encodings(lambda m: m(x))
    paths = sim.export(tmp_path, "m")
    assert paths.opset == 21
    model = onnx.load(str(paths["onnx"]))
    blocked = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
               and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    assert len(blocked) == 3
    zps = {t.name: t.data_type for t in model.graph.initializer}
    assert {zps[n.input[2]] for n in blocked} == {dtype}
    assert_onnx_runs_simulation(sim, paths["onnx"], {"input": 2 * _data(8, seed=3)})


def test_tiny_llama_blocks_its_projections():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = zoo.tiny_llama()
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    sim = QuantSim(model, {"input_ids": ids}, param_bw=4, output_bw=16, block_size=32)
    blocked = {n: q.shape for n, q in sim.param_quantizers.items() if q.block_size is not None}
    assert blocked["model.layers.0.self_attn.q_proj.weight"] == (64, 2)
    assert blocked["model.layers.0.self_attn.k_proj.weight"] == (32, 2)  # GQA: 2 heads of 16
    assert blocked["model.layers.1.mlp.down_proj.weight"] == (64, 4)  # input 128
    unblocked = [n for n, q in sim.param_quantizers.items() if q.block_size is None]
    assert all("embed_tokens" in n for n in unblocked), unblocked  # the Gather table stays as the config says
    sim.compute_encodings([{"input_ids": ids}])
    y = sim.model(input_ids=ids)
    logits = y["logits"] if isinstance(y, dict) else y[0]
    ref = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape == ref.shape
    sqnr = 10 * torch.log10(ref.square().mean() / (logits - ref).square().mean())
    assert sqnr > 5.0  # W4 per block of 32 on a random-weight model: a usable signal


# ---- precision settings ------------------------------------------------------------------------------------
def test_default_bit_widths_come_from_the_configs_first_kernel_and_arguments_win():
    cfg = load_config("default").to_dict()
    cfg["defaults"]["supported_kernels"] = [{"activation": {"bitwidth": 16, "dtype": "int"},
                                             "param": {"bitwidth": 4, "dtype": "int"}},
                                            {"activation": {"bitwidth": 8, "dtype": "int"},
                                             "param": {"bitwidth": 8, "dtype": "int"}}]
    x = _data(4)
    w4a16 = QuantSim(_mlp(), x, config=cfg)
    assert (w4a16.param_bw, w4a16.output_bw) == (4, 16)
    assert {q.bitwidth for q in w4a16.param_quantizers.values()} == {4}
    assert {q.bitwidth for q in w4a16.activation_quantizers.values()} == {16}
    w8a8 = QuantSim(_mlp(), x, param_bw=8, output_bw=8, config=cfg)  # the second kernel, by argument
    assert {q.bitwidth for q in w8a8.quantizers.values()} == {8}
    plain = QuantSim(_mlp(), x)  # no supported_kernels: 8 and 8
    assert (plain.param_bw, plain.output_bw) == (8, 8)


# ---- AdaRound on per-block encodings -----------------------------------------------------------------------
@pytest.mark.parametrize("lpbq", [False, True])
def test_adaround_learns_the_rounding_of_per_block_weights(lpbq):
    import pyquant
    from pyquant.quant import LpbqEncoding
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = _data(64, 32, seed=4)
    cfg = load_config("default").to_dict()
    cfg["defaults"]["block_size"] = 8
    if lpbq:
        cfg["defaults"]["decompressed_bw"] = 6
    res = pyquant.adaround(model, x[:1], x, param_bw=3, iterations=300, lr=1e-2, batch_size=8, config=cfg,
                           progress=False, seed=1)
    assert [r.name for r in res.report] == ["0", "2"]
    for r in res.report:
        assert r.mse_adaround < r.mse_nearest, r
        assert 0 < r.changed_vs_nearest < 0.5
    for layer in ("0", "2"):
        enc = res.encodings[f"{layer}.weight"]
        assert enc.block_size == (1, 8) and isinstance(enc, LpbqEncoding) == lpbq
        w, w_hat = model.get_submodule(layer).weight.detach(), res.model.get_submodule(layer).weight.detach()
        s = enc.scale.repeat_interleave(8, dim=1)
        codes = w_hat / s
        # on each block's grid, and rounded down or up from the FP32 weight (never further)
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        q, f = codes.round(), torch.floor(w / s)
        assert bool(((q >= -4) & (q <= 3)).all())
        assert bool(((q == f) | (q == f + 1) | (q == -4) | (q == 3)).all())
    sim = QuantSim(res.model, x[:1], param_bw=3, config=cfg)
    res.apply_to(sim)
    assert torch.equal(sim.model.get_submodule("0").weight.detach(), res.model.get_submodule("0").weight.detach())
