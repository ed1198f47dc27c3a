"""Post-training techniques that keep FP32 outputs: batch-norm folding and cross-layer equalization."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pyquant
import pyquant.ops as pqo
from pyquant.techniques import equalize, fold_batchnorms


def _chain(act=nn.ReLU, seed=0):
    """Conv -> BN -> act -> depthwise -> BN -> act -> Conv -> BN, with unbalanced channel scales."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), act(),
                      nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), act(),
                      nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
    with torch.no_grad():
        for bn in (m[1], m[4], m[7]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 2)
            bn.weight.copy_(torch.logspace(-3, 1, bn.num_features)[torch.randperm(bn.num_features)])
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_fold_batchnorms_keeps_outputs():
    m = _chain()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        y0 = m(x)
        pairs = fold_batchnorms(m)
        y1 = m(x)
    assert pairs == [("0", "1"), ("3", "4"), ("6", "7")]
    assert all(isinstance(m[i], nn.Identity) for i in (1, 4, 7))
    assert _rel(y1, y0) <= 1e-5


def test_equalize_keeps_outputs_and_balances_ranges():
    m = _chain()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        y0 = m(x)
        rep = equalize(m, absorb_high_bias=False)  # scaling alone is exact
        y1 = m(x)
    assert rep.pairs == [("0", "3"), ("3", "6")]
    assert _rel(y1, y0) <= 1e-5
    for name in ("0", "3"):
        assert rep.spread_after[name] < rep.spread_before[name] / 2


def _per_tensor_w8(m):
    q = copy.deepcopy(m)
    with torch.no_grad():
        for mod in q.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                s = mod.weight.abs().max() / 127
                mod.weight.copy_(pqo.quantize_dequantize(mod.weight, s, bitwidth=8, signed=True))
    return q


def test_equalize_helps_per_tensor_weights_on_mobilenet_v2():
    """The data-free quantization effect on real weights: folded MobileNetV2 (ReLU6 -> ReLU), per-tensor
    8-bit weights lose much less output SQNR after equalization, and FP32 outputs do not move."""
    from pyquant._assets import AssetMissingError
    from pyquant.metrics import sqnr_db
    try:
        from pyquant.datasets import imagenet_eval_set
        from pyquant.models import mobilenet_v2
        m = mobilenet_v2()
        x = imagenet_eval_set(n_per_image=1)
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    with torch.no_grad():
        fold_batchnorms(m)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, nn.ReLU6):
                parent, _, child = name.rpartition(".")
                setattr(m.get_submodule(parent) if parent else m, child, nn.ReLU())
        ref = m(x)
        before = sqnr_db(ref, _per_tensor_w8(m)(x))
        rep = equalize(m)
        assert len(rep.pairs) >= 30
        assert sqnr_db(ref, m(x)) > 90.0  # FP32 unchanged up to rounding
        after = sqnr_db(ref, _per_tensor_w8(m)(x))
    assert after > before + 3.0, (before, after)


def test_relu6_blocks_unless_replaced():
    m = _chain(act=nn.ReLU6)
    rep = equalize(m)
    assert rep.pairs == [] and rep.relu6_replaced == []
    m = _chain(act=nn.ReLU6)
    rep = equalize(m, replace_relu6=True)
    assert rep.relu6_replaced == ["2", "5"] and len(rep.pairs) == 2
    assert not any(isinstance(mod, nn.ReLU6) for mod in m.modules())


def test_empirical_bias_correction_shrinks_mean_error():
    from pyquant import QuantSim
    from pyquant.techniques import correct_bias

    m = _chain(seed=1)
    fold_batchnorms(m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 12, 12, generator=g) + 0.5
    sim = QuantSim(m, x[:2], quant_scheme="min_max", param_bw=4, output_bw=8, config="per_tensor")
    sim.compute_encodings(lambda model: model(x))

    def mean_err():
        with torch.no_grad():
            return float((sim.model(x) - m(x)).transpose(0, 1).reshape(8, -1).mean(1).abs().mean())

    before = mean_err()
    removed = correct_bias(sim, m, x, progress=False)
    after = mean_err()
    assert set(removed) == {"0", "3", "6"}
    assert after < before / 3, (before, after)
    assert m[0].bias is not sim.model.get_submodule("0").bias  # the FP32 model is left alone


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + torch.relu(self.c(torch.relu(self.b(y))))
        return self.fc(y.mean((2, 3)))


def test_staged_and_sequential_bias_correction_agree():
    """The one-pass staged method gives the layer-by-layer result, on a graph with a residual add."""
    from pyquant import QuantSim
    from pyquant.techniques import correct_bias

    m = _Residual().eval()
    x = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(1)) + 0.5
    biases, removed = {}, {}
    for method in ("sequential", "staged"):
        sim = QuantSim(m, x[:2], quant_scheme="min_max", param_bw=4, config="per_tensor")
        sim.compute_encodings(lambda model: model(x))
        removed[method] = correct_bias(sim, m, x, method=method, batch_size=16, progress=False)
        # the float parameters the corrections wrote (the simulation adds them on the int32 grid)
        biases[method] = torch.cat([sim.bias(n).detach() for n in ("a", "b", "c", "fc")])
    torch.testing.assert_close(biases["staged"], biases["sequential"], atol=1e-5, rtol=1e-5)
    assert removed["staged"].keys() == removed["sequential"].keys()
    with pytest.raises(ValueError, match="method must be"):
        correct_bias(sim, m, x, method="fast")
    with pytest.raises(ValueError, match="not quantized Conv/Linear"):
        correct_bias(sim, m, x, layers=["nope"])
    with pytest.raises(ValueError, match="method='sequential'"):
        correct_bias(sim, m, lambda model: model(x))


@pytest.mark.parametrize("method,stop,measured", [
    # sequential: _means runs the FP32 pass, then once per layer; stopped measuring "b", "a" is saved
    ("sequential", ("_means", 3), ("_means", 3)),
    # staged: _shift_view runs per chunk (3) after a layer's save; stopped after "b"'s; resumed, only "c"
    # and "fc" are measured (_channel_mean per chunk), the FP32 means are not recomputed
    ("staged", ("_shift_view", 4), ("_channel_mean", 6))])
def test_bias_correction_resumes_from_its_checkpoint(method, stop, measured, tmp_path, monkeypatch):
    import importlib

    from pyquant import QuantSim
    from helpers import counted
    bc_mod = importlib.import_module("pyquant.techniques.bias_correction")

    m = _Residual().eval()
    x = torch.randn(40, 3, 12, 12, generator=torch.Generator().manual_seed(1)) + 0.5

    def calibrated():
        sim = QuantSim(m, x[:2], quant_scheme="min_max", param_bw=4, config="per_tensor")
        sim.compute_encodings(lambda model: model(x))
        return sim

    def run(ckpt=None, batch_size=16):
        sim = calibrated()
        removed = bc_mod.correct_bias(sim, m, x, method=method, batch_size=batch_size, checkpoint_dir=ckpt,
                                      progress=False)
        return sim, removed

    whole, whole_removed = run()
    counted(monkeypatch, bc_mod, stop[0], stop_at=stop[1])
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    saved = torch.load(tmp_path / "bias_correction_checkpoint.pt", weights_only=True)
    assert list(saved["shifts"]) == (["a"] if method == "sequential" else ["a", "b"])
    monkeypatch.undo()
    calls = counted(monkeypatch, bc_mod, measured[0])
    resumed, resumed_removed = run(tmp_path)
    assert len(calls) == measured[1]  # the finished layers and the FP32 pass were not measured again
    assert list(resumed_removed.items()) == list(whole_removed.items())
    for n in ("a", "b", "c", "fc"):
        assert torch.equal(resumed.bias(n), whole.bias(n)), n
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.warns(UserWarning, match="batch_size: saved 16, now 8"):
        run(tmp_path, batch_size=8)  # another job's checkpoint is not resumed
    with pytest.raises(TypeError, match="checkpoint_dir must be a path"):
        bc_mod.correct_bias(whole, m, x, checkpoint_dir=3)


def test_high_bias_absorption_moves_bias_and_keeps_outputs():
    """A ReLU whose input sits well above 0 (BN beta >> gamma): beta - 3 gamma moves to the next layer's
    bias. A 1x1 second layer has no zero-padded border, so outputs match wherever the BN statistics
    hold (inputs drawn from them)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1))
    with torch.no_grad():
        m[1].running_mean.zero_()
        m[1].running_var.fill_(1.0)
        m[1].weight.fill_(0.5)
        m[1].bias.copy_(torch.linspace(0.5, 4.0, 8))
        m[0].weight.mul_(0.2)
    m.eval()
    x = torch.randn(16, 4, 5, 5)
    plain = copy.deepcopy(m)
    with torch.no_grad():
        y0 = m(x)
        equalize(plain, absorb_high_bias=False)
        rep = equalize(m)
        y1 = m(x)
    assert "0" in rep.absorbed and rep.absorbed["0"] > 0
    assert float(m[0].bias.max()) < float(plain[0].bias.max()) - 0.5  # the high bias left the first layer
    assert _rel(y1, y0) <= 1e-4


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_analytical_bias_correction_without_data(act):
    """Inputs that follow the BN statistics exactly (identity first layer, N(0, 1) data): the expected
    input through the ReLU/ReLU6 predicts the quantized layer's mean shift, which is removed."""
    from pyquant import QuantSim
    from pyquant.techniques import correct_bias_analytical

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 6, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(8).reshape(8, 8, 1, 1))
        m[1].running_mean.zero_()
        m[1].running_var.fill_(1.0)
        m[1].weight.copy_(torch.linspace(0.5, 2.0, 8))
        m[1].bias.copy_(torch.linspace(-1.0, 3.0, 8))
    m.eval()
    folded = fold_batchnorms(m)
    x = torch.randn(64, 8, 8, 8)
    sim = QuantSim(m, x[:2], quant_scheme="min_max", param_bw=3, config="per_tensor")
    sim.compute_encodings(lambda model: model(x))
    for name in list(sim.activation_quantizers):  # isolate the weight error of the second layer
        sim.enable(name, False)
    sim.enable("0.weight", False)

    def mean_err():
        with torch.no_grad():
            return float((sim.model(x) - m(x)).transpose(0, 1).reshape(6, -1).mean(1).abs().mean())

    before = mean_err()
    removed = correct_bias_analytical(sim, folded.bn_stats)
    after = mean_err()
    assert set(removed) == {"3"}
    assert after < before / 5, (before, after)


def test_batchnorm_before_a_layer_folds_forward_when_exact():
    torch.manual_seed(3)
    m = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), nn.ReLU(),   # no padding: exact
                      nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3, padding=1),    # padded: not folded
                      nn.Flatten(), nn.BatchNorm1d(5 * 8 * 8), nn.Linear(5 * 8 * 8, 3)).eval()
    with torch.no_grad():
        for bn in (m[0], m[3], m[6]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 2)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 10, 10)
    y0 = m(x)
    pairs = fold_batchnorms(m)
    assert list(pairs) == [] and pairs.forward == [("0", "1"), ("6", "7")]
    assert isinstance(m[0], nn.Identity) and isinstance(m[3], nn.BatchNorm2d) and isinstance(m[6], nn.Identity)
    assert _rel(m(x), y0) <= 1e-5


class _MLP(nn.Module):
    """Linear -> functional ReLU -> Linear, as in a ReLU transformer MLP, with unbalanced channels."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)
        with torch.no_grad():
            self.up.weight.mul_(torch.logspace(-2, 1, 64).reshape(-1, 1))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_linear_pairs_through_functional_relu_are_equalized():
    torch.manual_seed(0)
    m = _MLP().eval()
    x = torch.randn(8, 5, 16)
    y0 = m(x)
    rep = equalize(m, x)
    assert rep.pairs == [("up", "down")]
    assert rep.spread_after["up"] < rep.spread_before["up"] / 10
    assert _rel(m(x), y0) <= 1e-5
    assert "up -> down" in str(rep)


def test_nothing_to_do_warns_and_bad_pairs_are_skipped():
    m = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))  # GELU is not homogeneous
    w0 = [p.clone() for p in m.parameters()]
    with pytest.warns(UserWarning, match="unchanged"):
        rep = equalize(m)
    assert rep.pairs == [] and all(torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    with pytest.warns(UserWarning, match="no batch norm"):
        fold_batchnorms(m)
    bad = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning):
        rep = equalize(bad)
    assert rep.pairs == [] and "non-finite" in rep.skipped["0 -> 2"]
    zero = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        zero[0].weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyquant.NothingToDoWarning)
        rep = equalize(zero)
    assert "zero" in rep.skipped["0 -> 2"]


def test_relu6_replacement_reports_how_far_outputs_moved():
    m = _chain(act=nn.ReLU6)
    x = torch.randn(4, 3, 12, 12) * 10  # large enough that some activations pass 6
    swapped = copy.deepcopy(m)
    swapped[2], swapped[5] = nn.ReLU(), nn.ReLU()
    with torch.no_grad():
        want = _rel(swapped(x), m(x))
    rep = equalize(m, x, replace_relu6=True)
    assert len(rep.relu6_replaced) == 2
    assert want > 1e-3 and rep.relu6_output_change == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("config", ["default", "per_tensor"])
def test_fold_batchnorms_to_scale_keeps_the_simulation(config):
    """A QuantSim built with its batch norms (as for QAT) folds them into the simulated weights and
    their encodings: per-channel encodings follow the weights exactly."""
    from pyquant.sim.quantsim import QuantSim
    from pyquant.techniques import fold_batchnorms_to_scale

    m = _chain()
    with torch.no_grad():
        m[1].weight.abs_()  # positive BN scales: the per-channel fold is exact
        m[4].weight.abs_()
        m[7].weight.abs_()
    x = torch.randn(8, 3, 12, 12)
    # biases in float: an int32 bias would also round the folded bias onto its grid, as the target does
    sim = QuantSim(m, x[:1], quant_scheme="min_max", config=config, int32_bias=False)
    sim.compute_encodings(lambda model: model(x))
    y0 = sim.model(x)
    pairs = fold_batchnorms_to_scale(sim)
    assert [p[0] for p in pairs] == ["0", "3", "6"]
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in sim.model.modules())
    y1 = sim.model(x)
    if config == "default":
        assert pairs.recalibrated == []
        assert _rel(y1, y0) <= 1e-4
    else:
        assert sorted(pairs.recalibrated) == ["0.weight", "3.weight", "6.weight"]
        assert _rel(y1, y0) <= 0.2  # new per-tensor grids: close, not equal
