"""Max pooling by window (pyquant::max_pool2d_window and its backward): the native CPU loops at every SIMD
level and the reference against aten's max_pool2d, ties, NaN and -inf included; opcheck; autograd;
torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyquant.ops import _reference as ref

from conftest import devices
from helpers import activation, rand_input

op = torch.ops.pyquant

# (x shape, kernel): rows shorter and longer than a vector, odd sizes the floor drops, other windows
CASES = [((4, 16, 28, 28), (2, 2)), ((3, 8, 14, 14), (2, 2)), ((2, 5, 7, 7), (2, 2)), ((2, 3, 9, 70), (2, 2)),
         ((6, 13, 37), (2, 2)), ((2, 4, 9, 12), (3, 3)), ((2, 3, 8, 9), (2, 3)), ((1, 2, 5, 5), (1, 1))]


def _input(shape, dtype, device, seed=0):
    """Random values with ties (quantized to a coarse grid), NaN, -inf and a plane that is all -inf."""
    x = torch.round(rand_input(shape, torch.float32, "cpu", seed=seed) * 2) / 2
    flat = x.view(-1)
    flat[::97] = float("nan")
    flat[5::101] = float("-inf")
    x.view(-1, *shape[-2:])[1] = float("-inf")
    return x.to(dtype).to(device)


def _aten(x, kernel):
    """aten's pool with its flat indices turned into window positions."""
    out, idx = torch.ops.aten.max_pool2d_with_indices(x, list(kernel), list(kernel))
    ho, wo = out.shape[-2:]
    w = x.shape[-1]
    pos = ((idx // w - torch.arange(ho, device=x.device).view(-1, 1) * kernel[0]) * kernel[1]
           + idx % w - torch.arange(wo, device=x.device).view(1, -1) * kernel[1])
    return out, pos, idx


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_window_pool_matches_aten(device, dtype, shape, kernel, simd):
    x = _input(shape, dtype, device)
    out, arg = op.max_pool2d_window(x, list(kernel))
    want, pos, idx = _aten(x, kernel)
    assert arg.dtype == torch.uint8 and out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg.long(), pos)
    g = rand_input(out.shape, torch.float32, "cpu", seed=3).to(dtype).to(device)
    dx = op.max_pool2d_window_backward(g, arg, list(kernel), list(shape))
    want_dx = torch.ops.aten.max_pool2d_with_indices_backward(g, x, list(kernel), list(kernel), [0, 0], [1, 1],
                                                              False, idx)
    torch.testing.assert_close(dx, want_dx, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel", CASES[:6], ids=[f"{s}-{k}" for s, k in CASES[:6]])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act", [None, (0.0, None), (0.0, 6.0)], ids=["none", "relu", "relu6"])
def test_quantize_then_pool_in_one_pass(device, dtype, shape, kernel, per_channel, act, simd):
    """quantize_dequantize_max_pool2d == max pool of the fake quantization (of the activation): values,
    window positions (ties broken as aten does on the quantized values) and the input at each maximum."""
    if device == "cuda" and simd != "avx512":
        pytest.skip("CUDA results do not depend on the CPU SIMD level")
    x = _input(shape, dtype, device, seed=2) * 3
    c = shape[-3]
    s_shape = [1] * len(shape)
    if per_channel:
        s_shape[-3] = c
    g = torch.Generator().manual_seed(4)
    s = (0.05 + 0.2 * torch.rand(s_shape, generator=g)).to(device)
    o = (-torch.randint(0, 40, s_shape, generator=g)).float().to(device)
    lo, hi = act if act is not None else (None, None)
    out, arg, sel = op.quantize_dequantize_max_pool2d(x, s, o, 0, 255, list(kernel), True, lo, hi)
    y = x if act is None else activation(x, lo, hi)
    q = op.quantize_dequantize(y, s, o, 0, 255)
    want, pos, idx = _aten(q, kernel)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg.long(), pos)
    want_sel = x.flatten(-2).gather(-1, idx.flatten(-2)).reshape(want.shape)
    torch.testing.assert_close(sel, want_sel, rtol=0, atol=0, equal_nan=True)
    rout, rarg, rsel = ref.quantize_dequantize_max_pool2d(x, s, o, 0, 255, list(kernel),
                                                          (lo if lo is not None else float("-inf"),
                                                           hi if hi is not None else float("inf")))
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg, rarg)


def test_quantize_then_pool_checks_the_scale_layout():
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="one per channel"):
        op.quantize_dequantize_max_pool2d(x, torch.full((1, 1, 6, 1), 0.1), torch.zeros(1, 1, 6, 1), 0, 255, [2, 2])
    with pytest.raises(ValueError, match="scale must be positive"):
        op.quantize_dequantize_max_pool2d(x, torch.full((1, 4, 1, 1), -0.1), torch.zeros(1, 4, 1, 1), 0, 255, [2, 2])
    torch.library.opcheck(op.quantize_dequantize_max_pool2d,
                          (x, torch.full((1, 4, 1, 1), 0.1), torch.zeros(1, 4, 1, 1), 0, 255, [2, 2], True, 0.0, 6.0))


def test_native_equals_reference_on_strided_input(simd):
    x = _input((2, 6, 16, 20), torch.float32, "cpu")[:, ::2]  # not contiguous: the reference runs
    out, arg = op.max_pool2d_window(x, [2, 2])
    rout, rarg = ref.max_pool2d_window(x.contiguous(), [2, 2])
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg, rarg)
    s, o = torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), -20.0)
    got = op.quantize_dequantize_max_pool2d(x, s, o, 0, 255, [2, 2], True, 0.0, None)
    want = ref.quantize_dequantize_max_pool2d(x.contiguous(), s, o, 0, 255, [2, 2], (0.0, float("inf")))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_autograd_matches_aten_max_pool():
    x = rand_input((3, 4, 10, 12), torch.float32, "cpu", seed=5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, _ = op.max_pool2d_window(xa, [2, 2])
    want = F.max_pool2d(xb, 2)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x = rand_input((2, 3, 8, 10), torch.float32, device).requires_grad_(True)
    torch.library.opcheck(op.max_pool2d_window, (x, [2, 2]))
    out, arg = op.max_pool2d_window(x.detach(), [2, 2])
    torch.library.opcheck(op.max_pool2d_window_backward, (torch.randn_like(out), arg, [2, 2], [2, 3, 8, 10]))


def test_compiles_without_graph_break():
    x = rand_input((2, 3, 8, 8), torch.float32, "cpu")

    def f(t):
        return op.max_pool2d_window(t, [2, 2])[0] * 2

    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("kw,match", [
    (dict(x=torch.zeros(2, 3, dtype=torch.int32) + 1, kernel=[2, 2]), "float32"),
    (dict(x=torch.randn(4, 4), kernel=[2, 2]), "3-d"),
    (dict(x=torch.randn(1, 1, 4, 4), kernel=[0, 2]), "positive"),
    (dict(x=torch.randn(1, 1, 4, 4), kernel=[16, 16]), "at most 255|larger"),
    (dict(x=torch.randn(1, 1, 2, 4), kernel=[3, 2]), "larger than the input"),
])
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        op.max_pool2d_window(kw["x"], kw["kernel"])


def test_backward_checks_its_arguments():
    g, arg = torch.randn(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="positive"):
        op.max_pool2d_window_backward(g, arg, [0, 2], [1, 2, 6, 6])
    with pytest.raises(ValueError, match="pooled shape"):
        op.max_pool2d_window_backward(g, arg, [2, 2], [1, 2, 8, 8])
    with pytest.raises(TypeError, match="uint8"):
        op.max_pool2d_window_backward(g, arg.long(), [2, 2], [1, 2, 6, 6])
    # a window position outside the window writes nothing (no memory outside the plane is touched)
    bad = torch.full((1, 2, 3, 3), 200, dtype=torch.uint8)
    assert op.max_pool2d_window_backward(g, bad, [3, 3], [1, 2, 9, 9]).abs().sum() == 0
