"""Biases on the int32 grid (QuantSim(int32_bias=True), the default): the op's math against numpy, which
layers an integer target gives an int32 bias, onnxruntime's optimized kernels (QLinearConv / QGemm with the
int32 bias they derive) computed by the simulation, the exported files, calibration and the techniques
that write biases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
import pyquant.ops as pqo
from pyquant.sim.bias import Int32Bias
from pyquant.sim.quantsim import QuantSim
from helpers import one_thread, rand_input  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the op ----------------------------------------------------------------------------------------
def test_int32_fake_quant_is_numpy_float32_round_half_even():
    g = torch.Generator().manual_seed(0)
    b = rand_input((257,), seed=3) * 40
    s = torch.rand(257, generator=g) * 1e-3 + 1e-6
    # values exactly half a step apart: ties go to even
    b[:8] = (torch.arange(8, dtype=torch.float32) + 0.5) * s[:8]
    got = pqo.quantize_dequantize_int32(b, s)
    bn, sn = b.numpy(), s.numpy()
    want = (np.clip(np.round(bn / sn), -(2.0**31), 2.0**31 - 1).astype(np.float32) * sn).astype(np.float32)
    assert np.array_equal(got.numpy(), want)
    assert torch.equal(got[:8] / s[:8], torch.tensor([0.0, 2, 2, 4, 4, 6, 6, 8]))
    assert torch.equal(got, pqo.reference.quantize_dequantize_int32(b, s))
    # the grid's ends: saturated, or with overflow="float" the whole tensor stays as it is
    big = torch.tensor([3e9, -3e9, 1.7], dtype=torch.float32)
    assert pqo.quantize_dequantize_int32(big, 1.0).tolist() == [2.0**31, -(2.0**31), 2.0]
    assert torch.equal(pqo.quantize_dequantize_int32(big, 1.0, overflow="float"), big)
    assert pqo.quantize_dequantize_int32(big[2:], 1.0, overflow="float").tolist() == [2.0]


@pytest.mark.parametrize("scale_shape", [(), (1,), (300,)])
@pytest.mark.parametrize("overflow", ["clamp", "float"])
def test_int32_fake_quant_native_loop_equals_the_reference(scale_shape, overflow, monkeypatch):
    """The CPU's loop (int32_fake_quant) against the reference, bit for bit: ties, values past the grid's
    ends, NaN; and it runs for contiguous float32 (a strided or bfloat16 bias takes the reference)."""
    from pyquant.ops import _registry
    native = _registry.NATIVE_KERNELS.get(("cpu", "int32_fake_quant"))
    if native is None:
        pytest.skip("needs the compiled CPU module")
    calls = [0]

    def counted(*a):
        calls[0] += 1
        return native(*a)
    monkeypatch.setitem(_registry.NATIVE_KERNELS, ("cpu", "int32_fake_quant"), counted)
    g = torch.Generator().manual_seed(7)
    b = rand_input((300,), seed=8) * 50
    s = torch.rand(scale_shape, generator=g) * 1e-3 + 1e-7
    b[:6] = (torch.arange(6, dtype=torch.float32) + 0.5) * s.reshape(-1)[0]  # ties
    for extra in ([], [3e12], [float("nan")]):  # on the grid; past its end; NaN (on no grid)
        x = b.clone()
        x[10:10 + len(extra)] = torch.tensor(extra)
        got = pqo.quantize_dequantize_int32(x, s, overflow=overflow)
        want = pqo.reference.quantize_dequantize_int32(x, s, overflow)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert calls[0] == 3
    assert torch.equal(pqo.quantize_dequantize_int32(b[::2], s if s.numel() == 1 else s[::2], overflow=overflow),
                       pqo.reference.quantize_dequantize_int32(b[::2], s if s.numel() == 1 else s[::2], overflow))
    bb = b.bfloat16()
    assert torch.equal(pqo.quantize_dequantize_int32(bb, s, overflow=overflow),
                       pqo.reference.quantize_dequantize_int32(bb, s, overflow))
    assert calls[0] == 3


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric_input", [False, True])
def test_the_bias_scale_in_one_native_call_equals_the_op_by_op_one(per_channel, symmetric_input, monkeypatch):
    """Int32Bias.scale() of min/max quantizers on the CPU (one minmax_scale_product call) against the encodings'
    scales multiplied as tensors: bit for bit, also for a range at the grid's smallest scale."""
    from pyquant.ops import _registry
    if ("cpu", "minmax_scale_product") not in _registry.NATIVE_KERNELS:
        pytest.skip("needs the compiled CPU module")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = rand_input((4, 3, 10, 10), seed=2)
    cfg = pyquant.sim.config.load_config("default").to_dict()
    cfg["op_type"]["Conv"]["per_channel_quantization"] = str(per_channel)
    cfg["defaults"]["ops"]["is_symmetric"] = str(symmetric_input)
    sim = QuantSim(model, x[:1], quant_scheme="min_max", config=cfg, range_learning=True)
    sim.compute_encodings(lambda m: m(x))
    with torch.no_grad():  # a weight channel at the grid's smallest scale
        wq = sim.param_quantizers["0.weight"]
        wq.max.view(-1)[0] = wq.min.view(-1)[0]
    biases = [m for m in sim.model.modules() if isinstance(m, Int32Bias)]
    assert len(biases) == 2
    fn, calls = _registry.NATIVE_KERNELS[("cpu", "minmax_scale_product")], []
    monkeypatch.setitem(_registry.NATIVE_KERNELS, ("cpu", "minmax_scale_product"),
                        lambda *a: calls.append(1) or fn(*a))
    native = [b.scale() for b in biases]
    assert len(calls) == 2  # both layers took the native call
    monkeypatch.delitem(_registry.NATIVE_KERNELS, ("cpu", "minmax_scale_product"))
    plain = [b.scale() for b in biases]
    for a, b in zip(native, plain):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
    assert native[0].numel() == (8 if per_channel else 1)


def test_int32_fake_quant_gradient_and_arguments():
    b = rand_input((16,), seed=4).requires_grad_(True)
    s = torch.full((16,), 0.01)
    g = rand_input((16,), seed=5)
    pqo.quantize_dequantize_int32(b, s).backward(g)
    assert torch.equal(b.grad, g)  # straight through; nothing kept for the backward
    with pytest.raises(ValueError, match="positive"):
        pqo.quantize_dequantize_int32(b, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="overflow"):
        pqo.quantize_dequantize_int32(b, s, overflow="wrap")
    with pytest.raises(TypeError, match="floating-point"):
        pqo.quantize_dequantize_int32(torch.arange(4), 1.0)


# ---- which layers ----------------------------------------------------------------------------------
class Paths(nn.Module):
    """Layers whose input reaches them in every way the export can write it."""

    def __init__(self):
        super().__init__()
        self.direct = nn.Conv2d(3, 8, 3)                       # input quantizer right before it
        self.drop = nn.Dropout(0.1)
        self.after_dropout = nn.Conv2d(8, 8, 1)                # through an eval-mode dropout: no ONNX node
        self.transposed = nn.Conv2d(8, 8, 1)                   # through a transpose: a DQ crosses it
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)        # per-channel weights on dim 1: float bias
        self.via_view = nn.Linear(4 * 12 * 12, 16)             # through view: Reshape, a DQ crosses it
        self.via_flatten = nn.Linear(16, 8)                    # after torch.flatten: Flatten, float bias
        self.seq = nn.Linear(8, 8)                             # on a 3-d input: MatMul + Add, float bias
        self.twice = nn.Linear(8, 8)                           # two call sites: two input scales
        self.no_bias = nn.Conv2d(8, 8, 1, bias=False)

    def forward(self, x):
        y = torch.relu(self.direct(x))
        y = self.after_dropout(self.drop(y))
        y = self.no_bias(torch.relu(self.transposed(y.transpose(2, 3))))
        y = self.up(y)
        z = self.via_view(y.view(y.shape[0], -1))
        z = self.via_flatten(torch.flatten(z.unsqueeze(-1), 1))
        z = self.seq(z.unsqueeze(1)).squeeze(1)
        return self.twice(self.twice(z))


def _calibrated(model, x, **kw):
    sim = QuantSim(model, x[:1], quant_scheme="min_max", **kw)
    sim.compute_encodings(lambda m: m(x))
    return sim


def test_which_layers_get_an_int32_bias():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    sim = _calibrated(Paths().eval(), x)
    assert set(sim.int32_biases) == {"direct", "after_dropout", "transposed", "up", "via_view", "no_bias"}
    assert sim.int32_biases["after_dropout"].input_quantizer == "relu.output"  # Conv + Relu: one kernel
    kinds = {n: type(sim.model.get_submodule(n).parametrizations.bias[0]).__name__
             for n in sim.int32_biases if n != "no_bias"}
    assert set(kinds.values()) == {"Int32Bias"}
    # the ConvTranspose is planned but runs its per-channel (dim 1) bias in float, as onnxruntime does
    up = sim.model.get_submodule("up")
    assert up.parametrizations.bias[0].scale() is None and torch.equal(up.bias, sim.bias("up"))
    d = sim.model.get_submodule("direct")
    assert not torch.equal(d.bias, sim.bias("direct"))  # on the grid: not the float parameter
    s = sim.quantizer("input.x").get_encoding().scale.reshape(()) * sim.quantizer("direct.weight").get_encoding(
    ).scale.reshape(-1)
    assert torch.equal(d.bias, pqo.quantize_dequantize_int32(sim.bias("direct"), s))
    assert QuantSim(Paths().eval(), x[:1], int32_bias=False).int32_biases == {}
    with pytest.raises(TypeError, match="int32_bias"):
        QuantSim(Paths().eval(), x[:1], int32_bias="yes")


# ---- the target ------------------------------------------------------------------------------------
class Small(nn.Module):
    """Few input channels per output (short accumulations): an output step is only some hundred times
    s_x * s_w, so a bias off its int32 grid moves a rounding now and then."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 6)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc2(torch.relu(self.fc(y.reshape(y.shape[0], -1))))


def _small_with_biases(seed: int) -> Small:
    """Small with random biases (never zeros): a bias that rounds on the int32 grid shows."""
    m = Small().eval()
    with torch.no_grad():
        for layer in (m.c1, m.c2, m.fc, m.fc2):
            layer.bias.copy_(rand_input(layer.bias.shape, seed=seed))
    return m


def _share_apart(sim, path, x) -> float:
    """In lockstep against onnxruntime's optimized run: the share of quantized activation values that differ."""
    from pyquant.sim.compare import compare
    from pyquant.sim.compare_report import step_distance
    rep = compare(sim, path, x, mode="lockstep", optimize=True, progress=False)
    apart = total = 0
    for name, v in rep.values.items():
        if name in sim.activation_quantizers:
            d = step_distance(v.simulation, v.target, sim.quantizer(name).get_encoding().scale)
            apart += int((d > 0.5).sum())
            total += d.numel()
    return apart / total


@pytest.mark.parametrize("param_bw", [8, 4])
def test_optimized_onnxruntime_runs_the_int32_biases(param_bw, tmp_path):
    """onnxruntime's optimized graph (QLinearConv / QGemm at 8 bits, float kernels on int4 weights) adds int32
    biases at s_x * s_w: the simulation computes them, value for value, while float biases are off by a
    rounding in a measurable share of the values."""
    pytest.importorskip("onnxruntime")
    from pyquant.sim.export import run_onnx
    torch.manual_seed(1)
    m = _small_with_biases(seed=7)
    x = rand_input((64, 2, 6, 6), seed=8)
    shares = {}
    for int32 in (True, False):
        sim = _calibrated(m, x, param_bw=param_bw, int32_bias=int32)
        paths = sim.export(tmp_path / str(int32), "small", x[:1])
        shares[int32] = _share_apart(sim, paths["onnx"], x)
        if int32:
            assert set(sim.int32_biases) == {"c1", "c2", "fc", "fc2"}
            with torch.no_grad():
                want = sim.model(x)
            assert torch.equal(run_onnx(paths["onnx"], x, optimize=False)[0], want)  # as written: exact
    assert shares[True] == 0.0
    assert shares[False] > 1e-4, shares


def test_export_writes_the_simulated_bias_in_qdq_and_the_float_bias_in_plain(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper
    torch.manual_seed(2)
    m = Small().eval()
    x = rand_input((16, 2, 6, 6), seed=9)
    sim = _calibrated(m, x, param_bw=4)
    c1 = sim.model.get_submodule("c1")
    qdq = onnx.load(str(sim.export(tmp_path / "qdq", "small", x[:1])["onnx"]))
    plain = sim.export(tmp_path / "plain", "small", x[:1], onnx_format="plain")
    consts = {n.output[0]: numpy_helper.to_array(a.t) for n in qdq.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    consts.update({t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer})
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    assert np.array_equal(consts[conv.input[2]], c1.bias.detach().numpy())  # the simulated (int32) bias
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(plain["onnx"])).graph.initializer}
    assert np.array_equal(inits["c1.bias"], sim.bias("c1").detach().numpy())  # plain: the float bias
    state = torch.load(plain["pth"])
    assert torch.equal(state["c1.bias"], sim.bias("c1")) and "c1.parametrizations.bias.original" not in state


# ---- calibration and the techniques -----------------------------------------------------------------
def test_calibration_sees_float_biases():
    """Recalibrating gives the first calibration's encodings: the input quantizers observe without
    quantizing, and the biases derived from their old encodings stay out of it."""
    torch.manual_seed(3)
    m = _small_with_biases(seed=10)
    x = rand_input((32, 2, 6, 6), seed=11)
    sim = _calibrated(m, x, param_bw=4, output_bw=4)
    first = {n: q.get_encoding().scale.clone() for n, q in sim.activation_quantizers.items()}
    sim.compute_encodings(lambda mm: mm(x))
    assert all(torch.equal(first[n], q.get_encoding().scale) for n, q in sim.activation_quantizers.items())
    assert all(isinstance(mod, Int32Bias) and mod.active for mod in sim.model.modules()
               if isinstance(mod, Int32Bias))


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_techniques_write_the_float_bias_behind_the_simulation():
    """Folding batch norms into a simulation and bias correction create or change the float bias; the
    simulation then adds it on the int32 grid (a bias written to the simulated tensor would be lost)."""
    torch.manual_seed(4)
    m = BnNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1), m.bn.running_var.uniform_(0.5, 2), m.bn.bias.uniform_(-1, 1)
    x = rand_input((16, 3, 6, 6), seed=12)
    sim = _calibrated(m, x, param_bw=4)
    assert sim.model.get_submodule("c1").bias is None and set(sim.int32_biases) == {"c1", "c2"}
    pyquant.fold_batchnorms_to_scale(sim)
    c1 = sim.model.get_submodule("c1")
    assert isinstance(c1.parametrizations.bias[0], Int32Bias)
    assert torch.allclose(sim.bias("c1"), -m.bn.running_mean * m.bn.weight
                          / torch.sqrt(m.bn.running_var + m.bn.eps) + m.bn.bias)
    assert not torch.equal(c1.bias, sim.bias("c1"))
    with torch.no_grad():
        y0 = sim.model(x)
    report = pyquant.correct_bias(sim, m, x, progress=False)
    assert set(report) == {"c1", "c2"}
    c2 = sim.model.get_submodule("c2")
    assert isinstance(c2.parametrizations.bias[0], Int32Bias) and bool(sim.bias("c2").abs().max() > 0)
    with torch.no_grad():
        assert not torch.equal(sim.model(x), y0)
