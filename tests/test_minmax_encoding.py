"""pyquant::minmax_encoding: a learned range's scale, offset and chain-rule factors. The CPU kernel equals
the reference bit for bit (also for empty, zero-width, non-finite and negative-zero cases), the fake
kernel gives the shapes, and the reference is the formula of docs/design.md, 5.4 computed here in float64
where that is exact."""
from __future__ import annotations

import pytest
import torch

import pyquant
from pyquant.ops import reference
from pyquant.quant.encoding import min_scale

op = torch.ops.pyquant.minmax_encoding
GRIDS = [(2, True), (4, False), (4, True), (8, False), (16, False)]


def _ranges(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mn = -torch.rand(n, generator=g) ** 3 * 10
    mx = torch.rand(n, generator=g) ** 3 * 10
    mn[:4] = 0.0  # a zero-width range at 0: the smallest scale
    mx[:4] = 0.0
    mn[4] = float("nan")
    mx[5] = float("inf")
    mn[6:12] = mx[6:12] - 1e-9  # offsets round to -0.0 before the clamp
    mn[12:14] = -1e-12
    return mn, mx


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("factors", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bw,signed", GRIDS)
def test_cpu_kernel_equals_reference_bit_for_bit(bw, signed, symmetric, factors):
    if not pyquant.ops.HAS_CPU_KERNELS:
        pytest.skip("needs pyquant._C")
    qmin, qmax = pyquant.ops.grid(bw, signed)
    smin = min_scale(qmax - qmin)
    for shape in [(), (3, 1), (1000,)]:
        n = max(1, int(torch.tensor(shape).prod()) if shape else 1)
        mn, mx = _ranges(max(n, 20), seed=bw)
        mn, mx = mn[:n].reshape(shape), mx[:n].reshape(shape)
        got = op(mn, mx, qmin, qmax, smin, symmetric, factors)
        with torch.no_grad():
            want = reference.minmax_encoding(mn, mx, qmin, qmax, smin, symmetric, factors)
        for name, g, w in zip(("scale", "offset", "k_s", "k_o", "k_ot"), got, want):
            if w is None:
                assert g.numel() == 0, name
                continue
            assert g.shape == w.shape, name
            assert torch.equal(_bits(g), _bits(w)), (name, shape)


def test_reference_is_the_documented_formula():
    qmin, qmax = 0, 15
    mn, mx = torch.tensor([-1.3, -0.2, 0.0]), torch.tensor([2.1, 0.05, 3.0])
    s, o, k_s, k_o, k_ot = reference.minmax_encoding(mn, mx, qmin, qmax, min_scale(15), False, True)
    s64 = (mx.double() - mn.double()) / 15
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
    o64 = torch.clamp(torch.round(mn.double() / s64) - qmin, -qmax, -qmin)
    assert torch.equal(o.double(), o64)
    assert not torch.signbit(o[o == 0]).any()  # no negative zero
    assert torch.equal(k_s, torch.full_like(s, 1 / 15))
    torch.testing.assert_close(k_ot, k_o * (mn / s))


def test_fake_kernel_shapes_and_argument_checks():
    mn, mx = -torch.rand(4, 1), torch.rand(4, 1)
    with torch._subclasses.FakeTensorMode() as mode:
        fmn, fmx = mode.from_tensor(mn), mode.from_tensor(mx)
        s, o, k_s, k_o, k_ot = op(fmn, fmx, 0, 255, 1e-7, False, True)
        assert [t.shape for t in (s, o, k_s, k_o, k_ot)] == [mn.shape] * 5
        s, o, k_s, k_o, k_ot = op(fmn, fmx, -128, 127, 1e-7, True, True)
        assert k_s.shape == mn.shape and k_o.numel() == 0 and k_ot.numel() == 0
    with pytest.raises(ValueError, match="one shape"):
        op(mn, mx.reshape(-1), 0, 255, 1e-7, False, True)
    with pytest.raises(TypeError, match="float32"):
        op(mn.double(), mx, 0, 255, 1e-7, False, True)
    with pytest.raises(ValueError, match="min_scale"):
        op(mn, mx, 0, 255, 0.0, False, True)


def test_reference_kernel_matches_the_op():
    mn, mx = _ranges(64, seed=3)
    from pyquant.ops import _registry
    for got, want in zip(_registry.reference_minmax_encoding(mn, mx, 0, 255, 1e-7, False, True),
                         op(mn, mx, 0, 255, 1e-7, False, True)):
        assert torch.equal(_bits(got), _bits(want))


def test_eager_kernel_is_the_registered_kernel_or_the_op():
    """On plain CPU tensors the native kernel itself (no dispatcher); under a dispatch mode (fake tensors) the
    registered op; the same results either way."""
    if not pyquant.ops.HAS_CPU_KERNELS:
        pytest.skip("needs pyquant._C")
    x = torch.randn(8, 16)
    s, o = torch.tensor(0.05), torch.tensor(-7.0)
    fn = pyquant.ops.eager_kernel("quantize_dequantize", x)
    assert fn is not torch.ops.pyquant.quantize_dequantize
    assert torch.equal(fn(x, s, o, 0, 15), torch.ops.pyquant.quantize_dequantize(x, s, o, 0, 15))
    assert pyquant.ops.eager_kernel("minmax_encoding", torch.nn.Parameter(x)) is not op  # parameters too
    with torch._subclasses.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert pyquant.ops.eager_kernel("quantize_dequantize", fx) is torch.ops.pyquant.quantize_dequantize
    assert pyquant.ops.eager_kernel("quantize_dequantize", x.to("meta")) is torch.ops.pyquant.quantize_dequantize


@pytest.mark.parametrize("symmetric,factors", [(False, True), (True, True), (False, False)])
def test_the_registered_op_returns_tensors_that_alias_nothing(symmetric, factors):
    """The dispatcher (torch.compile, functionalization) needs outputs that share no storage with the inputs
    or with each other; the eager kernel inside the quantizer's node may share one allocation."""
    mn, mx = _ranges(32, seed=5)
    out = op(mn, mx, 0, 15, 1e-7, symmetric, factors)
    ptrs = [t.untyped_storage().data_ptr() for t in (*out, mn, mx) if t.numel()]  # an empty one has no storage
    assert len(set(ptrs)) == len(ptrs)
    torch.library.opcheck(op, (mn.nan_to_num(0.0), mx.nan_to_num(0.0, posinf=5.0), 0, 15, 1e-7, symmetric, factors))
    eager = pyquant.ops.eager_kernel("minmax_encoding", mn)(mn, mx, 0, 15, 1e-7, symmetric, factors)
    for got, want in zip(eager, out):
        assert torch.equal(_bits(got), _bits(want))
