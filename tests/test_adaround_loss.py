"""AdaRound's one-pass reconstruction loss (pyquant.techniques.adaround_loss): its value and gradient
equal autograd's through a plain pure-torch computation of the same loss, for dense and depthwise rows,
each activation it handles, any chunking; the Gram form equals the loss on the rows themselves."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

L = importlib.import_module("pyquant.techniques.adaround_loss")
layerwise = importlib.import_module("pyquant.techniques.layerwise")

ACTS = [nn.Identity(), nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-1.0, 2.0)]


def _reference(W, X, Y, b, act, depthwise):
    """Sum over channels of the squared error after the activation, mean over rows, through autograd."""
    z = torch.einsum("crk,ck->cr", X, W) + b[:, None] if depthwise else X @ W.t() + b
    d = act(z) - Y
    return (d * d).sum() / (X.shape[1] if depthwise else X.shape[0])


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("chunk", [None, 100, 10**9])
def test_row_loss_and_gradient_equal_autograd(act, depthwise, chunk):
    g = torch.Generator().manual_seed(7)
    C, R, K = 6, 700, 9
    X = torch.randn((C, R, K) if depthwise else (R, K), generator=g)
    Y = act(torch.randn((C, R) if depthwise else (R, C), generator=g) * 2)
    b = torch.randn(C, generator=g)
    W = (torch.randn(C, K, generator=g)).requires_grad_(True)
    ref = _reference(W, X, Y, b, act, depthwise)
    g_ref, = torch.autograd.grad(ref, W)
    got = L.row_loss(W, X, Y, b, L.activation_bounds(act), depthwise, chunk)
    g_got, = torch.autograd.grad(got * 3.0, W)  # the incoming gradient scales the result
    assert torch.allclose(got.detach(), ref.detach(), rtol=1e-5)
    assert torch.allclose(g_got, 3.0 * g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def test_row_loss_without_bias():
    g = torch.Generator().manual_seed(8)
    X, Y = torch.randn(300, 5, generator=g), torch.randn(300, 4, generator=g)
    W = torch.randn(4, 5, generator=g).requires_grad_(True)
    ref = ((torch.relu(X @ W.t()) - Y) ** 2).sum() / 300
    got = L.row_loss(W, X, Y, None, (0.0, None))
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(torch.autograd.grad(got, W)[0], torch.autograd.grad(ref, W)[0], rtol=1e-4, atol=1e-6)


def test_activation_bounds_only_for_clamps():
    assert L.activation_bounds(nn.Identity()) == (None, None)
    assert L.activation_bounds(nn.ReLU()) == (0.0, None)
    assert L.activation_bounds(nn.ReLU6()) == (0.0, 6.0)
    assert L.activation_bounds(nn.GELU()) is None


def test_gram_loss_and_gradient_equal_the_loss_on_the_rows():
    g = torch.Generator().manual_seed(9)
    X, Y, b = torch.randn(400, 12, generator=g), torch.randn(400, 7, generator=g), torch.randn(7, generator=g)
    W = torch.randn(7, 12, generator=g).requires_grad_(True)
    ref = _reference(W, X, Y, b, nn.Identity(), False)
    got = L.gram_row_loss(W, *layerwise.gram(X, Y, b))
    assert torch.allclose(got, ref, rtol=1e-4)
    assert torch.allclose(torch.autograd.grad(got, W)[0], torch.autograd.grad(ref, W)[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pool", [1000, 20])  # all positions kept / a random pool of them
def test_channel_first_rows_are_the_row_major_rows_permuted(pool):
    """A depthwise layer's rows collected channel first are the same rows, in the same order, as those
    collected row-major (same generator state), with the activation applied to the targets."""
    layer = nn.Conv2d(5, 5, 3, padding=1, groups=5)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 5, 6, 7, generator=g) for _ in range(3)]
    pairs = [(x, layer(x).detach() * 3) for x in xs]
    rm = layerwise.collect_rows("t", layer, pairs, 12, nn.ReLU6(), pool, 1024, torch.Generator().manual_seed(5))
    cf = layerwise.collect_rows("t", layer, pairs, 12, nn.ReLU6(), pool, 1024, torch.Generator().manual_seed(5),
                                channel_first=True)
    assert cf.channel_first and not rm.channel_first and cf.pool == rm.pool == min(pool, 42)
    Xr, Yr = rm.flat
    Xc, Yc = cf.flat
    assert torch.equal(Xc, Xr.reshape(Xr.shape[0], 5, 9).permute(1, 0, 2))
    assert torch.equal(Yc, Yr.t())
    assert float(Yr.max()) <= 6.0 and float(Yr.min()) >= 0.0 and float(Yr.max()) > 0
    # a dense layer ignores channel_first
    dense = nn.Conv2d(5, 4, 3, padding=1)
    pairs = [(x, dense(x).detach()) for x in xs]
    d = layerwise.collect_rows("t", dense, pairs, 12, nn.Identity(), pool, 1024, torch.Generator(), channel_first=True)
    assert not d.channel_first


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                   nn.Conv2d(4, 6, 1)], ids=["depthwise", "dense", "pointwise"])
@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Identity()], ids=["relu6", "none"])
@pytest.mark.parametrize("whole", [False, True], ids=["rows", "whole-samples"])
def test_a_step_over_every_position_of_every_sample_is_the_full_convolution_loss(layer, act, whole):
    """With every output position kept and a step as large as the table, AdaRound's sampled step loss
    and its gradient are those of the whole convolution over all samples (F.conv2d, autograd); a small
    depthwise layer kept as whole samples (`whole_up_to`) gives the same."""
    ada = importlib.import_module("pyquant.techniques.adaround")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    xs = [torch.randn(3, 4, 6, 5, generator=g) for _ in range(2)]
    ys = [layer(x).detach() + 0.3 * torch.randn(layer(x).shape, generator=g) for x in xs]
    P = ys[0].shape[2] * ys[0].shape[3]
    rows = layerwise.collect_rows("t", layer, zip(xs, ys), 6, act, P, 1024, torch.Generator(),
                                  channel_first=isinstance(act, nn.ReLU6), whole_up_to=P if whole else 0)
    assert rows.whole_samples == (whole and layer.groups > 1)
    rec = ada._Reconstruction(layer, act, rows)
    assert rec.kept_rows == 6 * P
    w = (layer.weight.detach() + 0.05 * torch.randn(layer.weight.shape, generator=g)).requires_grad_(True)
    got = rec.steps(6, P, torch.Generator())(w)
    g_got, = torch.autograd.grad(got, w)
    x, y = torch.cat(xs), act(torch.cat(ys))
    out = act(torch.nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, 1, layer.groups))
    ref = ((out - y) ** 2).sum() / (6 * P)  # sum over channels, mean over samples and positions
    g_ref, = torch.autograd.grad(ref, w)
    assert torch.allclose(got, ref, rtol=1e-4)
    assert torch.allclose(g_got, g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))
    assert rec.full_loss(w.detach()) == pytest.approx(float(ref.detach()), rel=1e-4)
