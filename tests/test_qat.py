"""Quantization-aware training with a QuantSim: fixed ranges vs range learning, freeze, batch norms
(kept then folded to scale; re-estimation), torch.compile, bf16 autocast, save/resume, export of the
trained encodings, and DistributedDataParallel (two gloo processes == one process on the whole batch)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyquant
from pyquant.quant import QuantizeDequantize
from pyquant.sim.quantsim import QuantSim

from helpers import activation as torch_activation


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = torch.relu(self.c2(y))
        return self.fc(y.mean((2, 3)))


def _setup(range_learning, fold=True, seed=0, n=32, int32_bias=True):
    torch.manual_seed(seed)
    m = Net().eval()
    if fold:
        pyquant.fold_batchnorms(m)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    sim = QuantSim(m, x[:1], quant_scheme="min_max", param_bw=4, output_bw=4, range_learning=range_learning,
                   int32_bias=int32_bias)
    sim.compute_encodings(lambda mm: mm(x))
    return sim, x, y


def _step(sim, x, y, opt):
    opt.zero_grad()
    loss = F.cross_entropy(sim.model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _encodings(sim):
    return {n: (q.get_encoding().scale.clone(), q.get_encoding().offset.clone()) for n, q in sim.quantizers.items()}


def test_fixed_ranges_train_weights_only():
    sim, x, y = _setup(range_learning=False)
    assert not any(p.requires_grad for p in sim.quantizer_parameters())
    before, w0 = _encodings(sim), sim.weight("c1.weight").clone()
    opt = torch.optim.SGD(sim.model_parameters(), lr=0.1)
    _step(sim, x, y, opt)
    after = _encodings(sim)
    assert all(torch.equal(before[n][0], after[n][0]) for n in before)
    assert not torch.equal(w0, sim.weight("c1.weight"))  # STE gradients reached the weights


def test_range_learning_moves_encodings_and_freeze_keeps_one():
    sim, x, y = _setup(range_learning=True)
    qp = sim.quantizer_parameters()
    assert qp and all(p.requires_grad for p in qp)
    sim.freeze("c2.weight")
    before = _encodings(sim)
    opt = torch.optim.Adam([{"params": sim.model_parameters(), "lr": 1e-3},
                            {"params": sim.quantizer_parameters(), "lr": 1e-2}])
    losses = [_step(sim, x, y, opt) for _ in range(5)]
    after = _encodings(sim)
    moved = [n for n in before if not torch.equal(before[n][0], after[n][0])]
    assert "c2.weight" not in moved and len(moved) >= len(before) // 2
    assert losses[-1] < losses[0]
    sim.unfreeze("c2.weight")
    assert sim.param_quantizers["c2.weight"].min.requires_grad


def test_range_learning_of_scale_and_offset():
    torch.manual_seed(0)
    m = Net().eval()
    pyquant.fold_batchnorms(m)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    sims = {}
    for mode in ("minmax", "scale_offset"):
        sims[mode] = QuantSim(m, x[:1], quant_scheme="min_max", param_bw=4, output_bw=4, range_learning=True,
                              range_params=mode)
        sims[mode].compute_encodings(lambda mm: mm(x))
    sim = sims["scale_offset"]
    assert all(q.range_params == "scale_offset" for q in sim.quantizers.values())
    # the same calibrated encodings and outputs whichever parameters are trained
    for n, q in sim.quantizers.items():
        torch.testing.assert_close(q.get_encoding().scale, sims["minmax"].quantizers[n].get_encoding().scale)
    assert torch.equal(sim.model(x), sims["minmax"].model(x))
    before = _encodings(sim)
    opt = torch.optim.Adam([{"params": sim.model_parameters(), "lr": 1e-3},
                            {"params": [p for p in sim.quantizer_parameters() if p.requires_grad], "lr": 1e-3}])
    losses = [_step(sim, x, y, opt) for _ in range(5)]
    after = _encodings(sim)
    assert sum(not torch.equal(before[n][0], after[n][0]) for n in before) >= len(before) // 2
    assert losses[-1] < losses[0]
    assert not sim.param_quantizers["c1.weight"].offset.requires_grad  # symmetric weights: offset stays 0
    with pytest.raises(ValueError, match="range_params"):
        QuantSim(m, x[:1], range_params="lsq")


def test_lsq_gradient_scale_changes_the_range_gradients():
    grads = []
    for lsq in (False, True):
        sim, x, y = _setup(range_learning=True)
        sim.set_range_learning(True, lsq_grad_scale=lsq)
        F.cross_entropy(sim.model(x), y).backward()
        grads.append(sim.param_quantizers["c1.weight"].max.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_batchnorm_kept_during_qat_then_folded_to_scale_and_reestimated():
    # biases in float: folding then changes the function by float rounding only (an int32 bias would also
    # round the folded bias onto its grid, which the target does and this test is not about)
    sim, x, y = _setup(range_learning=True, fold=False, int32_bias=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in sim.model.modules())
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.05)
    sim.model.train()
    for _ in range(3):
        _step(sim, x, y, opt)
    sim.model.eval()
    n = pyquant.reestimate_batchnorm(sim.model, [x[:16], x[16:]])
    assert n == 1
    bn = sim.model.get_submodule("bn")
    with torch.no_grad():
        pre = sim.model.get_submodule("c1")(sim.activation_quantizers["input.x"](x))
    torch.testing.assert_close(bn.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    y0 = sim.model(x)
    pairs = pyquant.fold_batchnorms_to_scale(sim)
    assert [p[0] for p in pairs] == ["c1"]
    y1 = sim.model(x)
    assert float((y1 - y0).abs().max()) < 0.05 * float(y0.abs().max()) + 1e-3


def test_batchnorm_folded_into_the_simulated_weight_each_step(tmp_path):
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():  # BN statistics far from identity, so folding matters
        bn0 = m.bn
        bn0.running_mean.uniform_(-0.5, 0.5), bn0.running_var.uniform_(0.2, 3.0), bn0.weight.uniform_(0.3, 2.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    sim = QuantSim(m, x[:1], quant_scheme="min_max", param_bw=4, output_bw=8, range_learning=True,
                   batchnorm="fold_each_step", int32_bias=False)  # folding exact up to float rounding
    sim.compute_encodings(lambda mm: mm(x))
    # The weight encoding is the folded weight's: the same as a simulation of the folded model.
    folded = Net().eval()
    folded.load_state_dict(m.state_dict())
    pyquant.fold_batchnorms(folded)
    ref = QuantSim(folded, x[:1], quant_scheme="min_max", param_bw=4, output_bw=8)
    ref.compute_encodings(lambda mm: mm(x))
    e, r = sim.param_quantizers["c1.weight"].get_encoding(), ref.param_quantizers["c1.weight"].get_encoding()
    torch.testing.assert_close(e.scale, r.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(sim.model(x), ref.model(x), rtol=0, atol=2e-2)
    # Training: the batch norm normalizes with batch statistics and learns; its factor reaches the weight.
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.05)
    sim.model.train()
    rm = sim.model.get_submodule("bn").running_mean.clone()
    losses = [_step(sim, x, y, opt) for _ in range(3)]
    assert not torch.equal(rm, sim.model.get_submodule("bn").running_mean)
    assert sim.model.get_submodule("bn").weight.grad is not None
    sim.model.eval()
    enc = sim.param_quantizers["c1.weight"].get_encoding()
    y0 = sim.model(x)
    with pytest.raises(RuntimeError, match="fold_batchnorms_to_scale"):
        sim.export(tmp_path, "m")
    pairs = pyquant.fold_batchnorms_to_scale(sim)
    assert [p[0] for p in pairs] == ["c1"] and pairs.recalibrated == []
    after = sim.param_quantizers["c1.weight"].get_encoding()
    assert torch.equal(enc.scale, after.scale) and torch.equal(enc.offset, after.offset)
    torch.testing.assert_close(sim.model(x), y0, rtol=1e-4, atol=1e-4)
    assert losses[-1] < losses[0]


def test_batchnorm_argument_is_checked():
    with pytest.raises(ValueError, match="batchnorm"):
        QuantSim(Net().eval(), torch.randn(1, 1, 8, 8), batchnorm="fold")


def _quantizer_by_autograd(q, x, activation, pool):
    """QuantizeDequantize's training path recorded op by op: parameters -> (scale, offset) -> activation ->
    fake quantization -> max pool, for autograd to differentiate."""
    from pyquant.quant.encoding import _broadcast_to
    sc, off = q.scale_offset()
    if activation is not None:
        x = torch_activation(x, *activation)
    gs = 1.0
    if q.lsq_grad_scale:
        gs = 1.0 / (max(x.numel() // sc.numel(), 1) * q.qmax) ** 0.5
    y = torch.ops.pyquant.quantize_dequantize(x, _broadcast_to(sc, x), _broadcast_to(off, x), q.qmin, q.qmax, gs)
    return F.max_pool2d(y, *pool) if pool is not None else y


@pytest.mark.parametrize("mode,symmetric", [("minmax", False), ("minmax", True), ("scale_offset", False)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("activation,pool,lsq", [(None, None, False), ((0.0, float("inf")), None, True),
                                                 ((0.0, 6.0), ([2, 2], [2, 2], [0, 0], [1, 1], False), False)])
def test_quantizer_gradients_equal_autograd_of_its_ops(mode, symmetric, per_channel, activation, pool, lsq):
    """The quantizer's one-node backward (chain rule to min/max or scale/offset written out) equals
    autograd through the separate ops, including channels whose scale or offset clamp is active."""
    from pyquant.quant import from_range
    torch.manual_seed(0)
    shape = (1, 6, 1, 1) if per_channel else ()
    q = QuantizeDequantize(shape, 8, symmetric, range_params=mode, lsq_grad_scale=lsq)
    mn = torch.tensor([-2.0, 0.5, -1.0, -3.0, 1.0, -0.25]) if per_channel else torch.tensor(-2.0)
    mx = torch.tensor([3.0, 4.0, 1e-9, 1.0, 1.0, 5.0]) if per_channel else torch.tensor(3.0)
    if symmetric:
        mx = torch.maximum(mx.abs(), mn.abs())
        mn = -mx
    enc = from_range(mn.reshape(shape), mx.reshape(shape), 8, symmetric)
    q.set_encoding(enc)
    if mode == "minmax":  # the raw min/max, clamps included, not the encoding's adjusted ones
        with torch.no_grad():
            q.min.copy_(mn.reshape(shape))
            q.max.copy_(mx.reshape(shape))
    x = torch.randn(4, 6, 8, 8) * 3
    grads = []
    for fn in (lambda t: q(t, activation, pool), lambda t: _quantizer_by_autograd(q, t, activation, pool)):
        q.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
        grads.append([xr.grad] + [p.grad.clone() for p in q.encoding_parameters() if p.requires_grad])
    (ya, *pa), (yb, *pb) = grads
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    assert len(pa) == len(pb) >= 1
    for a, b in zip(pa, pb):  # with a pool the range gradients sum fewer terms, in another order
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 if pool else 1e-6)


@pytest.mark.parametrize("shape,size", [((1, 1, 8, 1), 8), ((1, 1, 1, 8), 8), ((1, 1, 2, 2), 6), ((1, 1, 3, 1), 6)])
def test_pooled_quantizer_with_encodings_along_h_or_w(shape, size):
    """Encodings that vary along H or W are indexed by the input's coordinates, so the pooled node keeps the
    whole input for them: same values and gradients as quantizer -> max pool (blocks that do not line up
    with the pool windows included)."""
    from pyquant.quant import from_range
    torch.manual_seed(0)
    q = QuantizeDequantize(shape, 4, False)
    q.set_encoding(from_range(-torch.rand(shape) - 0.5, torch.rand(shape) * 3 + 0.5, 4, False))
    x = torch.randn(2, 3, size, size) * 2
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    grads = []
    for fn in (lambda t: q(t, (0.0, float("inf")), pool), lambda t: _quantizer_by_autograd(q, t, (0.0, float("inf")), pool)):
        q.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads.append((y.detach(), xr.grad, q.min.grad.clone(), q.max.grad.clone()))
    (ya, dxa, mna, mxa), (yb, dxb, mnb, mxb) = grads
    assert torch.equal(ya, yb)
    torch.testing.assert_close(dxa, dxb, rtol=0, atol=0)
    torch.testing.assert_close(mna, mnb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mxa, mxb, rtol=1e-4, atol=1e-5)


class ActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.c2, self.a2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.pool(self.a2(self.c2(self.a1(self.c1(x)))))
        y = torch.relu(self.c3(y))
        return self.fc(y.mean((2, 3)))


def _saved_bytes(model, x, min_bytes: int = 0):
    """Bytes of the storages autograd saves for the backward (the parameters' aside), those of at least
    `min_bytes` (a quantizer's encoding and chain factors are a few bytes, laid out per path)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params and v >= min_bytes)


@pytest.mark.parametrize("range_learning", [False, True])
def test_fused_activations_match_and_save_memory(range_learning):
    torch.manual_seed(0)
    m = ActNet().eval()
    x = torch.randn(8, 3, 12, 12) * 2
    sims = []
    for fuse in (False, True):
        sim = QuantSim(m, x[:1], quant_scheme="min_max", param_bw=4, output_bw=4, range_learning=range_learning,
                       fuse_activations=fuse)
        sim.compute_encodings(lambda mm: mm(x))
        sims.append(sim)
    plain, fused = sims
    assert sorted(fused.fused_activations) == ["a1.output", "a2.output", "relu.output"], fused.fused_activations
    for a, b in zip(plain.quantizers.values(), fused.quantizers.values()):
        assert torch.equal(a.get_encoding().scale, b.get_encoding().scale)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain.model(xa), fused.model(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    grads = 0
    for (na, pa), (nb, pb) in zip(plain.model.named_parameters(), fused.model.named_parameters()):
        assert na == nb
        assert (pa.grad is None) == (pb.grad is None), na
        if pa.grad is not None:  # the range gradients sum in another order
            grads += 1
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=na)
    trainable = sum(p.requires_grad for p in fused.model.parameters())
    assert grads == trainable and trainable > (8 if range_learning else 7), (grads, trainable)
    with torch.no_grad():  # inference and calibration take the plain path
        assert torch.equal(plain.model(x), fused.model(x))
    # Unfused, a ReLU6 holds its input and the quantizer its own (the ReLU6 output); the ReLU before the
    # pool holds its output (shared with the quantizer) and the pool the quantizer's output and int64
    # indices. Fused, the first keeps only its input, and the pooled quantizer the input value of each
    # window's maximum and a byte for its position.
    full, pooled = 8 * 8 * 12 * 12 * 4, 8 * 8 * 6 * 6
    saved = [_saved_bytes(s.model, x.clone().requires_grad_(True), min_bytes=256) for s in sims]
    assert saved[0] - saved[1] == full + 2 * full + pooled * (8 - 4 - 1), saved


class GrayNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1, stride=2), nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


class PoolGrayNet(GrayNet):
    def __init__(self):
        super().__init__()
        self.act, self.pool = nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x):
        return self.fc(self.c2(self.pool(self.act(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("range_params", ["minmax", "scale_offset"])
def test_single_channel_input_quantizer_runs_with_its_conv(range_params):
    """The model input's quantizer and a one-channel Conv2d as one node: the same outputs, and the same
    gradients (weights, bias, every range) as the separate modules, without an input gradient."""
    torch.manual_seed(0)
    m = GrayNet().eval()
    x = torch.randn(6, 1, 12, 12) * 2
    sims = []
    for fuse in (False, True):
        sim = QuantSim(m, x[:1], quant_scheme="min_max", range_learning=True, fuse_activations=fuse,
                       range_params=range_params)
        sim.compute_encodings(lambda mm: mm(x))
        sims.append(sim)
    plain, fused = sims
    assert "input.x" in fused.fused_activations and "quantized_input_conv" in fused.model.code
    outs = []
    for sim in sims:
        out = sim.model(x)
        out.backward(torch.ones_like(out))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for (na, pa), (nb, pb) in zip(plain.model.named_parameters(), fused.model.named_parameters()):
        assert na == nb and (pa.grad is None) == (pb.grad is None) == (not pa.requires_grad), na
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=na)
    q = fused.activation_quantizers["input.x"]
    assert q.encoding_parameters()[0].grad.abs().sum() > 0
    # where the node does not apply, the separate modules run: an input that wants its gradient, a frozen
    # input quantizer, inference
    xg = x.clone().requires_grad_(True)
    fused.model(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    q.freeze()
    with torch.no_grad():
        assert torch.equal(fused.model(x), plain.model(x))


def test_fused_sim_exports_what_it_simulates(tmp_path):
    """After fused QAT the export writes the separate QDQ ops: onnxruntime, run as written, reproduces the
    simulation exactly."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from pyquant.sim.export import run_onnx

    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    sim = QuantSim(PoolGrayNet().eval(), x[:1], range_learning=True, fuse_activations=True)
    sim.compute_encodings(lambda m: m(x))
    assert {"input.x", "act.output"} <= set(sim.fused_activations) and "pool = (" in sim.model.code
    F.cross_entropy(sim.model(x), torch.tensor([0, 1, 2, 0])).backward()
    with torch.no_grad():
        for p in sim.quantizer_parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    paths = sim.export(tmp_path, "net", x[:1])
    with torch.no_grad():
        want = sim.model(x)
    torch.testing.assert_close(run_onnx(paths["onnx"], x, optimize=False)[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("net,channels", [("ActNet", 3), ("PoolGrayNet", 1)])
def test_fused_nodes_compile_without_graph_break(net, channels):
    """Activation + quantizer (+ pool) nodes, and the single-channel input node, under torch.compile."""
    torch.manual_seed(0)
    m = globals()[net]().eval()
    x = torch.randn(4, channels, 12, 12)
    sim = QuantSim(m, x[:1], quant_scheme="min_max", range_learning=True, fuse_activations=True)
    sim.compute_encodings(lambda mm: mm(x))
    torch._dynamo.reset()
    assert torch._dynamo.explain(sim.model)(x).graph_break_count == 0
    torch.testing.assert_close(torch.compile(sim.model, fullgraph=True)(x), sim.model(x))


def test_compile_matches_eager_and_has_no_graph_break():
    sim, x, y = _setup(range_learning=True)
    ref_out = sim.model(x)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(sim.model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(sim.model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, ref_out)
    F.cross_entropy(out, y).backward()
    assert sim.param_quantizers["c1.weight"].max.grad is not None


def test_bf16_autocast_step():
    sim, x, y = _setup(range_learning=True)
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sim.model(x)
        loss = F.cross_entropy(out.float(), y)
    assert out.dtype == torch.bfloat16
    opt.zero_grad()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in sim.quantizer_parameters() if p.grad is not None)
    opt.step()


def test_bf16_autocast_step_with_fused_nodes():
    """Under autocast the fused nodes (input quantizer + conv, activation + quantizer + pool) compute what the
    separate modules do, in bfloat16."""
    torch.manual_seed(0)
    m = PoolGrayNet().eval()
    x = torch.randn(8, 1, 16, 16)
    sims = []
    for fuse in (False, True):
        sim = QuantSim(m, x[:1], quant_scheme="min_max", range_learning=True, fuse_activations=fuse)
        sim.compute_encodings(lambda mm: mm(x))
        sims.append(sim)
    outs = []
    for sim in sims:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sim.model(x)
        out.float().square().sum().backward()
        outs.append(out)
    assert outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for (na, pa), (nb, pb) in zip(sims[0].model.named_parameters(), sims[1].model.named_parameters()):
        if pa.grad is not None:  # bfloat16 convolutions: reassociated sums round differently
            assert pb.grad is not None and pb.grad.dtype == pa.grad.dtype, na
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0.05, atol=0.05 * float(pa.grad.abs().max()), msg=na)


def test_save_resume_continues_exactly_and_export_has_trained_encodings(tmp_path):
    sim, x, y = _setup(range_learning=True)
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-2)
    for _ in range(2):
        _step(sim, x, y, opt)
    sim.save_checkpoint(tmp_path / "ckpt.pt", opt, epoch=2)
    straight = [_step(sim, x, y, opt) for _ in range(3)]
    final = {k: v.clone() for k, v in sim.model.state_dict().items()}

    sim2, _, _ = _setup(range_learning=False)  # another sim of the same model, other settings
    opt2 = torch.optim.Adam(sim2.model.parameters(), lr=1e-2)
    extra = sim2.load_checkpoint(tmp_path / "ckpt.pt", opt2)
    assert extra == {"epoch": 2}
    resumed = [_step(sim2, x, y, opt2) for _ in range(3)]
    assert resumed == straight
    for k, v in sim2.model.state_dict().items():
        assert torch.equal(v, final[k]), k
    pyquant.write_encodings(tmp_path / "qat.encodings", *sim2.encodings())  # 4-bit: encodings, no QDQ ONNX
    act, par = pyquant.load_encodings(tmp_path / "qat.encodings")
    torch.testing.assert_close(par["c1.weight"].scale.reshape(-1),
                               sim2.param_quantizers["c1.weight"].get_encoding().scale.reshape(-1))


def _ddp_worker(rank, world, port, x, y, out_dir):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sim, _, _ = _setup(range_learning=True)
    ddp = torch.nn.parallel.DistributedDataParallel(sim.model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    half = len(x) // world
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    opt.zero_grad()
    F.cross_entropy(ddp(xs), ys).backward()
    opt.step()
    if rank == 0:
        torch.save(sim.model.state_dict(), os.path.join(out_dir, "ddp.pt"))
    del ddp, opt  # the reducer's hooks and threads go before the process group they use
    dist.barrier()  # both ranks done before teardown: gloo aborts a rank whose peer vanished mid-exit
    dist.destroy_process_group()
    # Leave without the interpreter's teardown, where a gloo thread still being joined can abort the process
    # ("terminate called without an active exception") after the step is done and saved. Failures above
    # still raise, and reach the parent through torch.multiprocessing.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_step_equals_single_process_step(tmp_path):
    import socket

    import torch.multiprocessing as mp
    _, x, y = _setup(range_learning=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, x, y, str(tmp_path)), nprocs=2, join=True)
    ddp_state = torch.load(tmp_path / "ddp.pt")
    sim, _, _ = _setup(range_learning=True)
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.1)
    _step(sim, x, y, opt)
    for k, v in sim.model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any("max" in k for k in ddp_state)  # quantizer parameters are part of the comparison
