"""Max pooling by window (pyquant::max_pool2d_window and its backward): the native CPU loops at every SIMD
level and the reference against aten's max_pool2d, ties, NaN and -inf included; opcheck; autograd;
torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyquant.ops import _reference as ref

from conftest import devices
from helpers import rand_input

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


def test_native_equals_reference_on_strided_input(simd):
    x = _input((2, 6, 16, 20), torch.float32, "cpu")[:, ::2]  # not contiguous: the reference runs
    out, arg = op.max_pool2d_window(x, [2, 2])
    rout, rarg = ref.max_pool2d_window(x.contiguous(), [2, 2])
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg, rarg)


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
