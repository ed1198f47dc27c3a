"""Random inputs and encodings for the op tests (never zeros)."""
from __future__ import annotations

import math

import pytest

import torch

from pyquant.ops import _reference as ref


def rand_input(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    # heavy tail so that clipping happens on both ends
    x += torch.distributions.Laplace(0.0, 1.0).sample(shape) * (torch.rand(shape, generator=g) < 0.05)
    return x.to(dtype).to(device)


def activation(x, lo, hi):
    """The torch module a fused activation stands for: ReLU for (0, None or inf), else Hardtanh(lo, hi)."""
    if hi is None or hi == float("inf"):
        return torch.relu(x)
    return torch.nn.functional.hardtanh(x, lo, hi)


def rand_params(x, s_shape, bitwidth, signed, seed=1):
    """Scales that put most of x inside the grid (some clipping), and integer offsets on the grid."""
    g = torch.Generator().manual_seed(seed)
    n_levels = 2**bitwidth - 1
    span = 2.0 * float(x.float().abs().amax()) if x.numel() else 1.0
    base = max(span / n_levels, 1e-6)
    s = base * (0.5 + torch.rand(s_shape, generator=g))
    if signed:
        o = torch.zeros(s_shape)
    else:
        o = -torch.randint(0, 2**bitwidth, s_shape, generator=g).float()
    return s.to(x.device), o.to(x.device)


def grid(bitwidth, signed):
    if signed:
        return -(2 ** (bitwidth - 1)), 2 ** (bitwidth - 1) - 1
    return 0, 2**bitwidth - 1


def block_shape(shape, blocks):
    return tuple(n // b for n, b in zip(shape, blocks))


def lsq_scale(numel, nscale, qmax):
    return 1.0 / math.sqrt(max(numel // nscale, 1) * qmax)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is plenty, and on a busy machine OpenMP's barriers would dominate.
    Use as `from helpers import one_thread` plus `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fashion_mnist_or_skip():
    """(trained Fashion-MNIST CNN, train images, test images, test labels), or skip the test when the
    data set is not installed."""
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
        from pyquant.models import fashion_cnn
        model = fashion_cnn()
        xtr, _ = fashion_mnist_tensors("train")
        xte, yte = fashion_mnist_tensors("test")
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    return model, xtr, xte, yte


def ds_tolerance(g, x, s, o, qmin, qmax, s_shape):
    """Bound for the reduction error of ds/do: 1e-5 (about 80 float32 ulps) of the sum of |terms| that the
    kernel adds up, each term taken from the reference's own per-element derivatives."""
    _, d_scale, d_offset = ref.fake_quant_derivatives(x, s, o, qmin, qmax)
    t = x.float() / ref.expand(s, x.shape)
    # both derivatives, plus an ulp of t for the division's rounding
    mag = g.float().abs() * (d_scale.abs() + d_offset + t.abs() * 2.0**-23)
    return 1e-5 * ref.reduce_to(mag, s_shape).float() + 1e-12
