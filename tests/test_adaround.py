"""AdaRound end to end: learned rounding beats nearest rounding on the layer outputs, the result loads
into QuantSim with frozen encodings, a killed run resumes to the same weights, bad arguments name
themselves; Fashion-MNIST (real labels) at W4A8 on a slice."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import pyquant
from pyquant.sim.quantsim import QuantSim
from helpers import counted, fashion_mnist_or_skip

ada_mod = importlib.import_module("pyquant.techniques.adaround")  # the module, not the function
layerwise = importlib.import_module("pyquant.techniques.layerwise")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.c1d = nn.Conv1d(6, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = torch.relu(self.dw(y))
        y = self.up(y)                       # [N, 6, 16, 16]
        y = torch.relu(self.c1d(y.mean(2)))  # [N, 8, 14]
        return self.fc(y.mean(2))


def _data(n=48):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _run(tmp=None, **kw):
    args = dict(param_bw=3, iterations=400, lr=1e-2, batch_size=8, positions_per_sample=16, progress=False, seed=3)
    args.update(kw)
    return pyquant.adaround(Net().eval(), _data()[:1], _data(), checkpoint_dir=tmp, **args)


def test_learned_rounding_beats_nearest_and_loads_into_quantsim():
    res = _run()
    names = [r.name for r in res.report]
    assert names == ["c1", "dw", "up", "c1d", "fc"]
    assert res.folded == [("c1", "bn")]
    # learned rounding reconstructs better overall, and on most layers (a 108-weight depthwise layer
    # can come out even)
    assert sum(r.mse_adaround / r.mse_nearest for r in res.report) / len(res.report) < 0.9
    assert sum(r.mse_adaround < r.mse_nearest for r in res.report) >= 4
    for r in res.report:
        assert r.mse_adaround < 1.05 * r.mse_nearest, r
        assert 0 < r.changed_vs_nearest < 0.5
    x = _data()
    # weights on their grids: a QuantSim with the frozen encodings leaves them unchanged
    sim = QuantSim(res.model, x[:1], param_bw=3, output_bw=8)
    res.apply_to(sim)
    for name, q in sim.param_quantizers.items():
        w = sim.weight(name)
        assert q.frozen and torch.allclose(q(w), w, atol=1e-6), name
    sim.compute_encodings(lambda m: m(x))
    assert all(q.get_encoding() is not None for q in sim.quantizers.values())
    text = res.summary()
    assert "c1d" in text and "mse nearest" in text


def test_killed_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    full = _run()
    counted(monkeypatch, ada_mod, "_optimize_layer", stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    saved = torch.load(tmp_path / "adaround_checkpoint.pt", weights_only=False)
    assert saved["done"] == ["c1", "dw"]
    calls = counted(monkeypatch, ada_mod, "_optimize_layer")
    resumed = _run(tmp_path)
    assert len(calls) == 3  # only the unfinished layers ran
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r.name for r in resumed.report] == ["c1", "dw", "up", "c1d", "fc"]
    assert (tmp_path / "adaround_param_encodings.json").exists()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.warns(UserWarning, match="other settings"):
        _run(tmp_path, iterations=10)  # a checkpoint from other settings is not reused


def test_skip_and_overrides():
    res = _run(skip=["fc"], overrides={"c1": {"param_bw": 8, "iterations": 20}})
    assert "fc" not in [r.name for r in res.report] and res.skipped == ["fc"]
    assert res.encodings["c1.weight"].bitwidth == 8 and res.encodings["dw.weight"].bitwidth == 3


@pytest.mark.parametrize("kw,match", [
    (dict(param_bw=1), "param_bw"), (dict(iterations=-1), "iterations"), (dict(warm_start=1.5), "warm_start"),
    (dict(beta_range=(20, 0)), "beta_range"), (dict(batch_size=0), "batch_size"),
    (dict(skip=["nope"]), "nope"), (dict(quant_scheme="best"), "quant_scheme")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _run(**kw)


def test_fashion_mnist_w4a8_within_a_point_of_fp32():
    from pyquant.models.fashion_cnn import evaluate
    model, xtr, xte, yte = fashion_mnist_or_skip()
    xte, yte = xte[:2000], yte[:2000]
    calib = xtr[:256]
    res = pyquant.adaround(model, calib[:1], calib, param_bw=4, iterations=300, progress=False)
    sim = QuantSim(res.model, calib[:1], param_bw=4, output_bw=8, quant_scheme="min_max")
    res.apply_to(sim)
    sim.compute_encodings(lambda m: m(calib))
    fp32 = evaluate(model, xte, yte)
    assert evaluate(sim.model, xte, yte) >= fp32 - 0.01


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (3, 6, 11, 9)),          # depthwise, strided
    (nn.Conv2d(4, 5, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1)), (2, 4, 13, 10)),
    (nn.Conv2d(4, 6, 1), (2, 4, 7, 7)),
    (nn.Conv1d(3, 4, 3, padding=1, stride=2), (2, 3, 17)),
])
def test_rows_at_kept_positions_equal_the_full_im2col_gathered(layer, shape):
    from pyquant.techniques.layerwise import rows_in as _rows_in, rows_in_at as _rows_in_at
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    full = _rows_in(layer, x)                                     # [N, P, K] via F.unfold
    keep = max(1, full.shape[1] // 2)
    idx = torch.stack([torch.randperm(full.shape[1], generator=g)[:keep] for _ in range(shape[0])])
    want = torch.gather(full, 1, idx.unsqueeze(-1).expand(-1, -1, full.shape[2]))
    assert torch.equal(_rows_in_at(layer, x, idx), want)


def test_gram_loss_equals_the_row_loss_and_its_gradient():
    from pyquant.techniques.adaround_loss import gram_row_loss as _gram_loss
    from pyquant.techniques.layerwise import gram as _gram
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(3000, 40, generator=g), torch.randn(3000, 7, generator=g)
    b = torch.randn(7, generator=g)
    W = (torch.randn(7, 40, generator=g) * 0.1).requires_grad_(True)
    d = X @ W.t() + b - Y
    rows = (d * d).sum() / len(X)
    gw, = torch.autograd.grad(rows, W)
    G = _gram(X, Y, b)
    quad = _gram_loss(W, *G)
    qw, = torch.autograd.grad(quad, W)
    torch.testing.assert_close(quad, rows.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(qw, gw, rtol=1e-4, atol=1e-5)


def test_activation_found_through_a_folded_batchnorm_and_gram_path_for_linear_layers(monkeypatch):
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.bn, self.act, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.act(self.bn(self.a(x))))

    seen = {}
    real_opt, real_gram = ada_mod._optimize_layer, layerwise.gram

    def spy_opt(name, li, lf, lq, pairs, n_total, enc, act, *a, **k):
        seen[name] = type(act).__name__
        return real_opt(name, li, lf, lq, pairs, n_total, enc, act, *a, **k)

    grams = []
    monkeypatch.setattr(ada_mod, "_optimize_layer", spy_opt)
    monkeypatch.setattr(layerwise, "gram", lambda *a: grams.append(a[0].shape) or real_gram(*a))
    res = pyquant.adaround(Seq().eval(), _data()[:1], _data(), param_bw=3, iterations=200, lr=1e-2, batch_size=8,
                           positions_per_sample=16, progress=False)
    assert seen == {"a": "ReLU6", "b": "NoneType"}   # the BN folded into "a" left an Identity before the ReLU6
    assert grams == [torch.Size([48 * 64, 8])]       # "b": no activation, 8 inputs < 128 rows a step
    rb = next(r for r in res.report if r.name == "b")
    assert rb.mse_adaround < rb.mse_nearest and rb.changed_vs_nearest > 0


def test_channels_last_walk_gives_the_same_rounding_and_restores_the_layout(monkeypatch):
    """Image models are walked channels last; the result is that of a walk in the default layout, and
    every weight of the result comes back in the default (contiguous) layout."""
    fast = _run(iterations=100)
    assert all(p.is_contiguous() for p in fast.model.parameters())

    @ada_mod.contextlib.contextmanager
    def plain(fp32, qmodel, chunks):
        yield chunks
    monkeypatch.setattr(ada_mod, "_channels_last", plain)
    ref = _run(iterations=100)
    for a, b in zip(fast.report, ref.report):
        assert a.name == b.name and abs(a.mse_nearest - b.mse_nearest) <= 1e-4 * b.mse_nearest
    for (n, p), q in zip(fast.model.named_parameters(), ref.model.parameters()):
        assert (p == q).float().mean() > 0.98, n
