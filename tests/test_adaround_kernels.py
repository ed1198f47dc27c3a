"""AdaRound kernels (soft/hard quantized weight, alpha gradient, regularizer) against the pure-torch
reference on random weights, per device and shape; gradcheck of the reference formulation; opcheck;
torch.compile."""
from __future__ import annotations

import pytest
import torch

import pyquant.ops as pqo
from pyquant.ops import _reference as ref

from conftest import devices

SHAPES = [(16, 3, 3, 3), (8, 1, 3, 3), (33, 70), (5,), (64, 129)]


def _case(shape, device, signed=True, bitwidth=4, per_channel=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.3).to(device)
    rows = shape[0] if per_channel else 1
    qmax = 2 ** (bitwidth - 1) - 1 if signed else 2**bitwidth - 1
    s = (w.reshape(shape[0], -1).abs().amax(1).cpu() if per_channel else w.abs().amax().reshape(1).cpu())
    s = (s / qmax * (0.6 + 0.5 * torch.rand(rows, generator=g))).to(device)  # some weights clip
    o = torch.zeros(rows) if signed else -torch.randint(0, 2**bitwidth, (rows,), generator=g).float()
    alpha = (torch.randn(shape, generator=g) * 3).to(device)
    alpha.view(-1)[:7] = torch.tensor([0.0, 50.0, -50.0, 2.3979, -2.3979, 1e-3, -1e-3])[: alpha.numel()].to(device)
    return w, alpha, s, o.to(device), pqo.grid(bitwidth, signed)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed,per_channel", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("hard", [False, True])
def test_adaround_weight_matches_reference_exactly(device, shape, signed, per_channel, hard):
    w, a, s, o, (qmin, qmax) = _case(shape, device, signed, per_channel=per_channel)
    got = torch.ops.pyquant.adaround_weight(w, a, s, o, qmin, qmax, hard)
    want = ref.adaround_weight(w, a, s, o, qmin, qmax, hard)
    assert torch.equal(got, want)
    q = got / ref._rows(s, w) - ref._rows(o, w)
    assert float(q.min()) >= qmin - 1e-3 and float(q.max()) <= qmax + 1e-3
    if hard:  # hard rounding lands on the grid, (integer + o) * s, one step from nearest at most
        assert torch.allclose(q, q.round(), atol=1e-3)
        nearest = torch.clamp(torch.round(w / ref._rows(s, w)) - ref._rows(o, w), qmin, qmax)
        assert float((q.round() - nearest).abs().max()) <= 1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed", [True, False])
def test_adaround_backward_matches_reference_exactly(device, shape, signed):
    w, a, s, o, (qmin, qmax) = _case(shape, device, signed)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = torch.ops.pyquant.adaround_weight_backward(g, w, a, s, o, qmin, qmax)
    want = ref.adaround_weight_backward(g, w, a, s, o, qmin, qmax)
    assert torch.equal(got, want)
    if got.numel() > 50:  # clamped and live elements both present
        assert bool((got == 0).any()) and bool((got != 0).any())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", [1, 1000, 100_003])
@pytest.mark.parametrize("beta", [20.0, 7.5, 2.0])
def test_adaround_regularizer_matches_reference(device, n, beta):
    a = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4).to(device)
    v, g = torch.ops.pyquant.adaround_regularizer(a, beta)
    rv, rg = ref.adaround_regularizer(a, beta)
    torch.testing.assert_close(v.cpu(), rv.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("beta", [20.0, 2.0, 1.0, 0.5])
def test_adaround_regularizer_terms_where_h_is_clamped_or_live(device, beta):
    """Saturated alphas (h clamped to 0 or 1) add 0 and pass no gradient, without a power; live ones add
    1 - |2h - 1|^beta; a NaN alpha makes the value NaN. Each element's term against the formula in
    float64 (one power per element in the kernels: |d|^beta = |d|^(beta-1) * |d|)."""
    a = torch.tensor([60.0, -60.0, 8.0, -8.0, 0.3, -1.7, 2.39, -2.39, 1e-4]).to(device)
    v, g = torch.ops.pyquant.adaround_regularizer(a, beta)
    hr = ref.adaround_sigmoid(a.cpu()) * ref._ADA_STRETCH + ref._ADA_GAMMA  # in float32, as the kernels
    h = torch.clamp(hr, 0, 1).double()
    want = (1 - (2 * h - 1).abs().pow(beta)).sum()
    torch.testing.assert_close(v.double().cpu(), want, rtol=1e-6, atol=1e-6)
    clamped = (hr < 0) | (hr > 1)
    assert clamped[:4].all() and not clamped[4:].any()
    assert torch.equal(g.cpu()[clamped], torch.zeros(int(clamped.sum())))
    assert bool((g.cpu()[4:-1] != 0).all())  # live (the last one's |d|^(beta-1) may underflow to 0)
    for one in range(a.numel()):  # each term alone
        vi, _ = torch.ops.pyquant.adaround_regularizer(a[one:one + 1], beta)
        hi = h[one]
        torch.testing.assert_close(vi.double().cpu(), 1 - (2 * hi - 1).abs().pow(beta), rtol=1e-6, atol=1e-6)
        if clamped[one]:
            assert float(vi) == 0.0
    vn, gn = torch.ops.pyquant.adaround_regularizer(torch.tensor([float("nan"), 0.5]).to(device), beta)
    assert torch.isnan(vn) and float(gn.cpu()[1]) != 0


def test_reference_gradients_match_autograd_of_the_formula():
    """The explicit backward is the derivative of the forward formula: autograd in float64 agrees, and
    gradcheck passes on the differentiable pieces."""
    w, a, s, o, (qmin, qmax) = _case((6, 10), "cpu")
    w64, s64, o64 = w.double(), s.double().reshape(-1, 1), o.double().reshape(-1, 1)
    a64 = a.double().clone().requires_grad_(True)
    a64.data[a64.data.abs() > 8] = 1.0  # away from saturation for a clean float64 comparison

    def soft(alpha):
        h = torch.clamp(torch.sigmoid(alpha) * 1.2 - 0.1, 0, 1)
        t = torch.floor(w64 / s64) + h - o64
        return (torch.clamp(t, qmin, qmax) + o64) * s64

    g = torch.randn(6, 10, dtype=torch.float64)
    (want,) = torch.autograd.grad((soft(a64) * g).sum(), a64)
    got = ref.adaround_weight_backward(g.float(), w, a64.detach().float(), s, o, qmin, qmax)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    def reg(alpha):
        h = torch.clamp(torch.sigmoid(alpha) * 1.2 - 0.1, 0, 1)
        return (1 - (2 * h - 1).abs().pow(3.0)).sum()

    (want_r,) = torch.autograd.grad(reg(a64), a64)
    _, got_r = ref.adaround_regularizer(a64.detach().float(), 3.0)
    torch.testing.assert_close(got_r.double(), want_r, rtol=1e-5, atol=1e-6)
    b = a64.detach()[:2, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: torch.sigmoid(x) * 1.2 - 0.1, (b,))


@pytest.mark.parametrize("device", devices())
def test_autograd_through_the_ops(device):
    w, a, s, o, _ = _case((8, 12), device)
    a = a.clone().requires_grad_(True)
    y = pqo.adaround_weight(w, a, s, o, bitwidth=4, signed=True)
    loss = (y * torch.arange(96, device=device).reshape(8, 12)).sum() + 0.1 * pqo.adaround_regularizer(a, 5.0)
    loss.backward()
    g = torch.arange(96, device=device, dtype=torch.float32).reshape(8, 12)
    want = (ref.adaround_weight_backward(g, w, a.detach(), s, o, -8, 7)
            + 0.1 * ref.adaround_regularizer(a.detach(), 5.0)[1])
    torch.testing.assert_close(a.grad, want, rtol=1e-6, atol=1e-6)
    yh = pqo.adaround_weight(w, a.detach(), s, o, bitwidth=4, signed=True, hard=True)
    assert torch.equal(yh, ref.adaround_weight(w, a.detach(), s, o, -8, 7, True))


def test_init_alpha_reproduces_the_weight():
    w, _, s, o, (qmin, qmax) = _case((16, 20), "cpu")
    a = pqo.adaround_init_alpha(w, s)
    y = pqo.adaround_weight(w, a, s, o, bitwidth=4, signed=True)
    inside = (w / ref._rows(s, w)).abs() < qmax - 1
    torch.testing.assert_close(y[inside], w[inside], rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    w, a, s, o, (qmin, qmax) = _case((8, 3, 3, 3), device)
    a = a.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.pyquant.adaround_weight.default, (w, a, s, o, qmin, qmax, False))
    torch.library.opcheck(torch.ops.pyquant.adaround_weight_backward.default,
                          (torch.randn_like(w), w, a.detach(), s, o, qmin, qmax))
    torch.library.opcheck(torch.ops.pyquant.adaround_regularizer.default, (a, 4.0))


def test_compile_fullgraph():
    w, a, s, o, _ = _case((8, 12), "cpu")

    def f(alpha):
        return (pqo.adaround_weight(w, alpha, s, o, bitwidth=4, signed=True) ** 2).sum() + \
            pqo.adaround_regularizer(alpha, 3.0)

    a1 = a.clone().requires_grad_(True)
    a2 = a.clone().requires_grad_(True)
    f(a1).backward()
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="aot_eager")(a2).backward()
    torch.testing.assert_close(a2.grad, a1.grad)


def test_bad_arguments_name_the_argument():
    w, a, s, o, (qmin, qmax) = _case((8, 12), "cpu")
    with pytest.raises(TypeError, match="w and alpha must be float32"):
        torch.ops.pyquant.adaround_weight(w.double(), a, s, o, qmin, qmax, False)
    with pytest.raises(ValueError, match="alpha must have w's shape"):
        torch.ops.pyquant.adaround_weight(w, a[:4], s, o, qmin, qmax, False)
    with pytest.raises(ValueError, match="one per output channel"):
        torch.ops.pyquant.adaround_weight(w, a, s[:3], o[:3], qmin, qmax, False)
    with pytest.raises(ValueError, match="scale must be positive"):
        torch.ops.pyquant.adaround_weight(w, a, -s, o, qmin, qmax, False)
