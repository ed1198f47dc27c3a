"""The op registry: opcheck, autograd, torch.compile / torch.export, the public API's argument
handling and its errors, and property-based layouts (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyquant.ops as pqo
from pyquant.ops import _reference as ref

from conftest import devices
from helpers import ds_tolerance, grid, lsq_scale, rand_input, rand_params

op = torch.ops.pyquant


def _args(device="cpu", dtype=torch.float32, shape=(4, 3, 6), s_shape=(4, 1, 1), bw=8, signed=False, grad=False):
    x = rand_input(shape, dtype, device)
    s, o = rand_params(x, s_shape, bw, signed)
    if grad:
        x.requires_grad_(True)
        s.requires_grad_(True)
        o.requires_grad_(True)
    qmin, qmax = grid(bw, signed)
    return x, s, o, qmin, qmax


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s_shape", [(1, 1, 1), (4, 1, 1), (1, 1, 6), (2, 3, 2)])
def test_opcheck(device, dtype, s_shape):
    x, s, o, qmin, qmax = _args(device, dtype, s_shape=s_shape, grad=dtype == torch.float32)
    torch.library.opcheck(op.quantize_dequantize, (x, s, o, qmin, qmax, 1.0))
    torch.library.opcheck(op.quantize, (x.detach(), s.detach(), o.detach(), qmin, qmax, torch.uint8))
    q = op.quantize(x.detach(), s.detach(), o.detach(), qmin, qmax, torch.float32)
    torch.library.opcheck(op.dequantize, (q, s.detach(), o.detach(), dtype))
    g = torch.randn_like(x.detach())
    torch.library.opcheck(op.quantize_dequantize_backward,
                          (g, x.detach(), s.detach(), o.detach(), qmin, qmax, 1.0, [True, True, True]))
    # with a fused ReLU6
    torch.library.opcheck(op.quantize_dequantize, (x, s, o, qmin, qmax, 1.0, True, 0.0, 6.0))
    torch.library.opcheck(op.quantize_dequantize_backward,
                          (g, x.detach(), s.detach(), o.detach(), qmin, qmax, 1.0, [True, True, True], 0.0, 6.0))


def _ste_reference(x, s, o, qmin, qmax):
    """The same forward written with a straight-through round, so autograd derives its gradients."""
    se, oe = ref.expand(s, x.shape), ref.expand(o, x.shape)
    t = x.float() / se
    r = t + (torch.round(t) - t).detach()
    q = torch.clamp(r - oe, qmin, qmax)
    return ((q + oe) * se).to(x.dtype)


@pytest.mark.parametrize("s_shape", [(1, 1, 1), (4, 1, 1), (1, 3, 1), (2, 1, 3)])
@pytest.mark.parametrize("bw,signed", [(4, False), (8, True)])
def test_reference_backward_equals_autograd_of_ste(s_shape, bw, signed):
    """The hand-written backward (used by every kernel) is the derivative of the STE forward."""
    x, s, o, qmin, qmax = _args(s_shape=s_shape, bw=bw, signed=signed)
    x64, s64, o64 = (t.double().requires_grad_(True) for t in (x, s, o))
    y = _ste_reference(x64, s64, o64, qmin, qmax)
    g = torch.randn_like(y)
    y.backward(g)
    dx, ds, do = ref.quantize_dequantize_backward(g.float(), x, s, o, qmin, qmax, 1.0, [True, True, True])
    # identical rounding decisions in float64 and float32 for these inputs; gradients agree to float32
    torch.testing.assert_close(dx.double(), x64.grad, rtol=0, atol=0)
    torch.testing.assert_close(ds.double(), s64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(do.double(), o64.grad, rtol=1e-4, atol=1e-4)


def test_gradcheck_dequantize_in_scale_and_offset():
    """dequantize is smooth in nothing it is given as op inputs; the qdq reference is smooth in the
    offset once clipped: check that region numerically."""
    x = torch.full((3, 5), 50.0, dtype=torch.float64) + torch.rand(3, 5, dtype=torch.float64)
    s = torch.full((3, 1), 0.1, dtype=torch.float64, requires_grad=True)
    o = torch.full((3, 1), -3.0, dtype=torch.float64, requires_grad=True)

    def f(s, o):  # everything clipped at qmax: x_hat = (qmax + o) * s, smooth in s and o
        return _ste_reference(x, s, o, 0, 15)

    assert torch.autograd.gradcheck(f, (s, o))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("which", ["x", "so", "all"])
def test_autograd_paths(device, which):
    x, s, o, qmin, qmax = _args(device)
    x.requires_grad_(which in ("x", "all"))
    s.requires_grad_(which in ("so", "all"))
    o.requires_grad_(which in ("so", "all"))
    y = op.quantize_dequantize(x, s, o, qmin, qmax, 1.0)
    g = torch.randn_like(y)
    y.backward(g)
    rdx, rds, rdo = ref.quantize_dequantize_backward(g, x.detach(), s.detach(), o.detach(), qmin, qmax, 1.0,
                                                     [True, True, True])
    if which in ("x", "all"):
        assert torch.equal(x.grad, rdx)
    else:
        assert x.grad is None
    if which in ("so", "all"):
        torch.testing.assert_close(s.grad, rds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.grad, rdo, rtol=1e-5, atol=1e-5)
    else:
        assert s.grad is None and o.grad is None


def test_lsq_grad_scale():
    x = rand_input((16, 40))
    s, o = rand_params(x, (16, 1), 4, False)
    s1, o1 = s.clone().requires_grad_(True), o.clone().requires_grad_(True)
    s2, o2 = s.clone().requires_grad_(True), o.clone().requires_grad_(True)
    g = torch.randn(16, 40)
    pqo.quantize_dequantize(x, s1, o1, bitwidth=4, axis=0).backward(g)
    pqo.quantize_dequantize(x, s2, o2, bitwidth=4, axis=0, lsq_grad_scale=True).backward(g)
    k = lsq_scale(640, 16, 15)
    torch.testing.assert_close(s2.grad, (s1.grad.double() * k).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o2.grad, (o1.grad.double() * k).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    x, s, o, qmin, qmax = _args(device, shape=(8, 32), s_shape=(8, 1))

    def f(x, s, o):
        return pqo.quantize_dequantize(x * 2.0, s, o, bitwidth=8, axis=0).sum(dim=1)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ss = [s.reshape(8).clone().requires_grad_(True) for _ in range(2)]
    os_ = [o.reshape(8).clone().requires_grad_(True) for _ in range(2)]
    y0 = f(xs[0], ss[0], os_[0])
    y1 = cf(xs[1], ss[1], os_[1])
    assert torch.equal(y0, y1)
    y0.sum().backward()
    y1.sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ss[0].grad, ss[1].grad)
    torch.testing.assert_close(os_[0].grad, os_[1].grad)


def test_torch_compile_inductor():
    x, s, o, qmin, qmax = _args(shape=(8, 32), s_shape=(8, 1))
    torch._dynamo.reset()
    cf = torch.compile(lambda x: pqo.quantize_dequantize(x, s.reshape(8), o.reshape(8), axis=0) + 1.0, fullgraph=True)
    assert torch.equal(cf(x), pqo.quantize_dequantize(x, s.reshape(8), o.reshape(8), axis=0) + 1.0)


def test_torch_export_captures_op():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.full((6,), 0.05))
            self.register_buffer("o", torch.full((6,), -128.0))

        def forward(self, x):
            return pqo.quantize_dequantize(x, self.s, self.o, bitwidth=8, axis=1)

    m = M()
    x = rand_input((2, 6, 5))
    ep = torch.export.export(m, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("pyquant.quantize_dequantize" in t for t in targets), targets
    assert torch.equal(ep.module()(x), m(x))


# ---- the public API: granularity arguments and errors -------------------------------------------------
def test_api_granularities_match_block_broadcast_form():
    x = rand_input((6, 8, 10))
    s = torch.rand(8) * 0.1 + 0.01
    o = -torch.randint(0, 255, (8,)).float()
    y = pqo.quantize_dequantize(x, s, o, bitwidth=8, axis=1)
    assert torch.equal(y, ref.quantize_dequantize(x, s.reshape(1, 8, 1), o.reshape(1, 8, 1), 0, 255))
    y = pqo.quantize_dequantize(x, s, o, bitwidth=8, axis=-2)
    assert torch.equal(y, ref.quantize_dequantize(x, s.reshape(1, 8, 1), o.reshape(1, 8, 1), 0, 255))
    sb = torch.rand(3, 2, 5) * 0.1 + 0.01
    y = pqo.quantize_dequantize(x, sb, bitwidth=4, signed=True, block_size=(2, 4, 2))
    assert torch.equal(y, ref.quantize_dequantize(x, sb, torch.zeros(3, 2, 5), -8, 7))
    y = pqo.quantize_dequantize(x, 0.02, bitwidth=8)
    assert torch.equal(y, ref.quantize_dequantize(x, torch.full((1, 1, 1), 0.02), torch.zeros(1, 1, 1), 0, 255))
    yb = pqo.quantize_dequantize(x, sb.reshape(-1), bitwidth=4, signed=True, block_size=(2, -1, 2)[:2] + (2,)
                                 if False else (2, 4, 2))
    assert torch.equal(yb, pqo.quantize_dequantize(x, sb, bitwidth=4, signed=True, block_size=(2, 4, 2)))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bitwidth=1), ValueError, "bitwidth must be in 2..16"),
    (dict(bitwidth=17), ValueError, "bitwidth must be in 2..16"),
    (dict(bitwidth=8.0), TypeError, "bitwidth must be an int"),
    (dict(axis=3), ValueError, r"axis must be in \[-3, 2\]"),
    (dict(axis=1, block_size=(1, 2, 1)), ValueError, "either axis"),
    (dict(block_size=(1, 3, 1)), ValueError, r"block_size\[1\]=3 does not divide x.shape\[1\]=8"),
    (dict(block_size=(1, 2)), ValueError, "one entry per dimension"),
    (dict(block_size=(1, 0, 1)), ValueError, r"block_size\[1\] must be a positive int or -1"),
])
def test_api_argument_errors(kwargs, exc, match):
    x = rand_input((6, 8, 10))
    with pytest.raises(exc, match=match):
        pqo.quantize_dequantize(x, 0.1, **kwargs)


@pytest.mark.parametrize("device", devices())
def test_value_errors(device):
    x = rand_input((6, 8), device=device)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            pqo.quantize_dequantize(x, torch.tensor([0.1] * 5 + [bad], device=device), axis=0)
    with pytest.raises(ValueError, match="per-channel along axis 0 needs 6"):
        pqo.quantize_dequantize(x, torch.full((5,), 0.1, device=device), axis=0)
    with pytest.raises(ValueError, match="offset has 3 values"):
        pqo.quantize_dequantize(x, torch.full((6,), 0.1, device=device), torch.zeros(3, device=device), axis=0)
    with pytest.raises(TypeError, match="x must be one of float32, float16, bfloat16"):
        pqo.quantize_dequantize(x.to(torch.int32), 0.1)
    with pytest.raises(TypeError, match="scale must be a floating tensor"):
        pqo.quantize_dequantize(x, torch.ones(1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"scale.shape\[0\]=4 does not divide x.shape\[0\]=6"):
        op.quantize_dequantize(x, torch.full((4, 1), 0.1, device=device), torch.zeros(4, 1, device=device), 0, 255)
    with pytest.raises(ValueError, match="qmin must be < qmax"):
        op.quantize_dequantize(x, torch.full((1, 1), 0.1, device=device), torch.zeros(1, 1, device=device), 5, 5)
    with pytest.raises(ValueError, match="cannot hold the grid"):
        pqo.quantize(x, 0.1, bitwidth=16, out_dtype=torch.int8)
    with pytest.raises(TypeError, match="out_dtype must be float32, float16 or bfloat16"):
        pqo.dequantize(x, 0.1, out_dtype=torch.int8)


def test_scalar_and_empty_inputs():
    x = torch.tensor(1.234)
    assert torch.equal(pqo.quantize_dequantize(x, 0.1), ref.quantize_dequantize(x, torch.tensor(0.1), torch.tensor(0.0), 0, 255))
    e = torch.empty(0, 5)
    assert pqo.quantize_dequantize(e, torch.full((5,), 0.1), axis=1).shape == (0, 5)


# ---- property-based: random shapes, axes, blocks, grids --------------------------------------------------
@st.composite
def layouts(draw):
    nd = draw(st.integers(1, 4))
    shape, s_shape = [], []
    for _ in range(nd):
        nblocks = draw(st.integers(1, 5))
        block = draw(st.integers(1, 7))
        shape.append(nblocks * block)
        s_shape.append(draw(st.sampled_from([1, nblocks])))
    return tuple(shape), tuple(s_shape)


@settings(max_examples=150, deadline=None)
@given(layout=layouts(), bw=st.integers(2, 16), signed=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 10_000),
       permute=st.booleans())
def test_hypothesis_layouts(layout, bw, signed, dtype, seed, permute):
    shape, s_shape = layout
    x = rand_input(shape, dtype, seed=seed)
    s, o = rand_params(x, s_shape, bw, signed, seed=seed + 1)
    if permute and x.dim() > 1:
        perm = tuple(reversed(range(x.dim())))
        x = x.permute(perm).contiguous().permute(perm)  # dense, not contiguous
    qmin, qmax = grid(bw, signed)
    y = op.quantize_dequantize(x, s, o, qmin, qmax)
    torch.testing.assert_close(y, ref.quantize_dequantize(x, s, o, qmin, qmax), rtol=0, atol=0, equal_nan=True)
    g = rand_input(shape, dtype, seed=seed + 2)
    dx, ds, do = op.quantize_dequantize_backward(g, x, s, o, qmin, qmax, 1.0, [True, True, True])
    rdx, rds, rdo = ref.quantize_dequantize_backward(g, x, s, o, qmin, qmax, 1.0, [True, True, True])
    torch.testing.assert_close(dx, rdx, rtol=0, atol=0)
    tol = ds_tolerance(g, x, s, o, qmin, qmax, s.shape)  # a per-tensor sum over ~400k terms needs more than rtol
    assert ((ds - rds).abs() <= tol).all(), ((ds - rds).abs().max(), tol.min())
    assert ((do - rdo).abs() <= tol).all(), ((do - rdo).abs().max(), tol.min())


def test_gpu_value_checks_can_be_turned_off_cpu_checks_stay():
    import pyquant.ops as pqo
    x = torch.randn(4, 8)
    prev = pqo.set_value_checks(False)
    try:
        with pytest.raises(ValueError, match="scale must be positive"):
            pqo.quantize_dequantize(x, torch.tensor(0.0), bitwidth=8)  # CPU: always checked
    finally:
        assert pqo.set_value_checks(prev) is False
