"""Fake-quant kernels (CPU at every SIMD level, CUDA when present) against the pure-torch reference."""
from __future__ import annotations

import pytest
import torch

import pyquant.ops as pqo
from pyquant import _native
from pyquant.ops import _reference as ref

from conftest import devices
from helpers import activation, block_shape, ds_tolerance, grid, rand_input, rand_params

op = torch.ops.pyquant
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, x shape, elements per scale along each dim)
LAYOUTS = [
    ("per_tensor", (64, 33), (64, 33)),
    ("per_channel_axis0", (48, 3, 5, 5), (1, 3, 5, 5)),
    ("per_channel_axis1", (2, 16, 7, 9), (2, 1, 7, 9)),
    ("per_channel_last", (4, 6, 40), (4, 6, 1)),
    ("per_block_row", (32, 128), (1, 32)),
    ("per_block_2d", (64, 96), (8, 32)),
    ("per_block_middle", (3, 32, 10), (3, 8, 10)),
    ("per_block_odd", (5, 7, 24), (1, 7, 3)),
    ("vector", (1000,), (1000,)),
    ("per_element_2d", (9, 17), (1, 1)),
]
GRIDS = [(2, False), (4, True), (8, False), (8, True), (16, False), (16, True)]


def assert_same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_qdq(x, s, o, qmin, qmax):
    y = op.quantize_dequantize(x, s, o, qmin, qmax)
    assert_same(y, ref.quantize_dequantize(x, s, o, qmin, qmax))
    return y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,blocks", LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize("bw,signed", GRIDS)
def test_forward_matches_reference(device, dtype, name, shape, blocks, bw, signed, simd):
    if device == "cuda" and simd != "avx512" and simd != _native.cpu_module().simd_level():
        pytest.skip("CUDA results do not depend on the CPU SIMD level")
    x = rand_input(shape, dtype, device, seed=bw)
    s, o = rand_params(x, block_shape(shape, blocks), bw, signed)
    qmin, qmax = grid(bw, signed)
    check_qdq(x, s, o, qmin, qmax)
    q = op.quantize(x, s, o, qmin, qmax, torch.float32)
    assert_same(q, ref.quantize(x, s, o, qmin, qmax))
    dq = op.dequantize(q, s, o, dtype)
    assert_same(dq, ref.dequantize(q, s, o, dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,blocks", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_backward_matches_reference(device, dtype, name, shape, blocks, simd):
    for bw, signed in [(4, False), (8, True)]:
        x = rand_input(shape, dtype, device, seed=bw + 7)
        s, o = rand_params(x, block_shape(shape, blocks), bw, signed, seed=3)
        g = rand_input(shape, dtype, device, seed=11, scale=1.0)
        qmin, qmax = grid(bw, signed)
        dx, ds, do = op.quantize_dequantize_backward(g, x, s, o, qmin, qmax, 1.0, [True, True, True])
        rdx, rds, rdo = ref.quantize_dequantize_backward(g, x, s, o, qmin, qmax, 1.0, [True, True, True])
        assert_same(dx, rdx)
        tol = ds_tolerance(g, x, s, o, qmin, qmax, s.shape)
        assert ds.shape == s.shape and do.shape == o.shape
        assert ((ds - rds).abs() <= tol).all(), (ds - rds).abs().max()
        assert ((do - rdo).abs() <= tol).all(), (do - rdo).abs().max()


ACTIVATIONS = [("relu", 0.0, None), ("relu6", 0.0, 6.0), ("hardtanh", -1.0, 1.0)]
ACT_LAYOUTS = [c for c in LAYOUTS if c[0] in ("per_tensor", "per_channel_axis1", "per_block_row", "vector")]


def _with_boundaries(x, lo, hi):
    """x with some elements exactly at the activation's bounds and some non-finite ones, where the
    activations' gradient conventions differ (ReLU passes +inf; NaN passes both)."""
    x = x.clone()
    flat = x.view(-1)
    special = [lo, lo, hi if hi is not None else 5.0, float("inf"), float("-inf"), float("nan")]
    for i, v in enumerate(special):
        flat[(i * 37) % flat.numel()] = v
    return x


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,blocks", ACT_LAYOUTS, ids=[c[0] for c in ACT_LAYOUTS])
@pytest.mark.parametrize("act,lo,hi", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_fused_activation_matches_reference_and_the_separate_ops(device, dtype, name, shape, blocks, act, lo, hi,
                                                                 simd):
    """quantize_dequantize(x, act_min, act_max) == the activation then quantize_dequantize, forward and
    backward, with the activations' own boundary conventions; and equal to the reference."""
    if device == "cuda" and simd != _native.cpu_module().simd_level():
        pytest.skip("CUDA results do not depend on the CPU SIMD level")
    for bw, signed in [(4, False), (8, True)]:
        x = _with_boundaries(rand_input(shape, dtype, device, seed=bw + 3), lo, hi)
        s, o = rand_params(x.nan_to_num(0.0, 0.0, 0.0), block_shape(shape, blocks), bw, signed, seed=5)
        qmin, qmax = grid(bw, signed)
        y = op.quantize_dequantize(x, s, o, qmin, qmax, 1.0, True, lo, hi)
        assert_same(y, ref.quantize_dequantize(x, s, o, qmin, qmax, 1.0, (lo, hi if hi is not None else float("inf"))))
        a = activation(x, lo, hi)
        assert_same(y, op.quantize_dequantize(a, s, o, qmin, qmax))

        g = rand_input(shape, dtype, device, seed=13, scale=1.0)
        dx, ds, do = op.quantize_dequantize_backward(g, x, s, o, qmin, qmax, 1.0, [True, True, True], lo, hi)
        # separate ops: the quantizer's backward at the activation's output, then the activation's own
        qdx, qds, qdo = op.quantize_dequantize_backward(g, a, s, o, qmin, qmax, 1.0, [True, True, True])
        sep = (torch.ops.aten.threshold_backward(qdx, x, 0.0) if hi is None else
               torch.ops.aten.hardtanh_backward(qdx, x, lo, hi))
        assert_same(dx, sep)
        tol = ds_tolerance(g.nan_to_num(0.0, 0.0, 0.0), a.nan_to_num(0.0, 0.0, 0.0), s, o, qmin, qmax, s.shape)
        for got, want in ((ds, qds), (do, qdo)):
            finite = want.isfinite()
            assert torch.equal(finite, got.isfinite())
            assert ((got - want).abs()[finite] <= tol[finite]).all(), (got - want).abs().max()


def test_fused_activation_bounds_are_checked():
    x = torch.randn(8)
    s, o = torch.tensor(0.1), torch.tensor(0.0)
    for lo, hi in [(1.0, 1.0), (2.0, 1.0), (float("nan"), None), (float("inf"), None), (None, float("-inf"))]:
        with pytest.raises(ValueError, match="act_min < act_max"):
            op.quantize_dequantize(x, s, o, 0, 255, 1.0, True, lo, hi)
    with pytest.raises(TypeError, match="activation must be a"):
        pqo.quantize_dequantize(x, 0.1, activation=0.0)
    torch.testing.assert_close(pqo.quantize_dequantize(x, 0.1, activation=(0.0, None)),
                               pqo.quantize_dequantize(torch.relu(x), 0.1), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, True], [False, True, False], [True, True, False]])
def test_backward_partial_outputs(device, mask):
    x = rand_input((8, 300), torch.float32, device)
    s, o = rand_params(x, (8, 1), 4, False)
    g = rand_input((8, 300), torch.float32, device, seed=5)
    got = op.quantize_dequantize_backward(g, x, s, o, 0, 15, 0.5, mask)
    want = ref.quantize_dequantize_backward(g, x, s, o, 0, 15, 0.5, mask)
    for a, b, m in zip(got, want, mask):
        if m:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert a.numel() == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_multithreaded_streaming(device, dtype, simd):
    """Large enough for several threads and for streaming stores (outputs over 8 MB)."""
    shape = (6, 700_001) if dtype == torch.float32 else (6, 1_400_003)
    x = rand_input(shape, dtype, device)
    s, o = rand_params(x, (6, 1), 8, False)
    check_qdq(x, s, o, 0, 255)
    check_qdq(x, s[:1, :1].clone(), o[:1, :1].clone(), 0, 255)  # per-tensor: rows split across threads
    g = rand_input(shape, dtype, device, seed=9, scale=1.0)
    dx, ds, do = op.quantize_dequantize_backward(g, x, s, o, 0, 255, 1.0, [True, True, True])
    rdx, rds, rdo = ref.quantize_dequantize_backward(g, x, s, o, 0, 255, 1.0, [True, True, True])
    assert_same(dx, rdx)
    tol = ds_tolerance(g, x, s, o, 0, 255, s.shape)
    assert ((ds - rds).abs() <= tol).all() and ((do - rdo).abs() <= tol).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_formats(device, dtype, simd):
    x = rand_input((3, 16, 5, 7), dtype, device).to(memory_format=torch.channels_last)
    s, o = rand_params(x, (1, 16, 1, 1), 8, False)
    y = check_qdq(x, s, o, 0, 255)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # transposed weight (dense, permuted) and a strided slice (not dense)
    w = rand_input((40, 24), dtype, device).t()
    s2, o2 = rand_params(w, (24, 1), 4, True)
    yw = check_qdq(w, s2, o2, -8, 7)
    assert yw.stride() == w.stride()
    sl = rand_input((10, 64), dtype, device)[:, ::3]
    s3, o3 = rand_params(sl, (1, sl.shape[1]), 8, True)
    check_qdq(sl, s3, o3, -128, 127)
    g = rand_input(x.shape, dtype, device, seed=4).to(memory_format=torch.channels_last)
    dx, ds, _ = op.quantize_dequantize_backward(g, x, s, o, 0, 255, 1.0, [True, True, True])
    rdx, rds, _ = ref.quantize_dequantize_backward(g, x, s, o, 0, 255, 1.0, [True, True, True])
    assert_same(dx, rdx)
    torch.testing.assert_close(ds, rds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(device, dtype, simd):
    x = rand_input((4, 50), dtype, device)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 9] = float("-inf")
    x[3, 40:] = float("nan")  # in the vector body, not only the tail
    s, o = rand_params(x[:, :1].float().nan_to_num(), (4, 1), 8, False)
    y = check_qdq(x, s, o, 0, 255)
    assert torch.isnan(y[0, 3]) and torch.isnan(y[3, 40:]).all()
    assert y[1, 7] == ((255 + o[1, 0]) * s[1, 0]).to(dtype)
    assert y[2, 9] == ((0 + o[2, 0]) * s[2, 0]).to(dtype)
    q = op.quantize(x, s, o, 0, 255, torch.float32)
    assert torch.isnan(q[0, 3])
    with pytest.raises(ValueError, match="NaN"):
        op.quantize(x, s, o, 0, 255, torch.uint8)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_dtype,bw,signed", [(torch.int8, 8, True), (torch.uint8, 8, False),
                                                 (torch.int16, 16, True), (torch.int32, 16, False),
                                                 (torch.int8, 4, True)])
def test_integer_codes_round_trip(device, out_dtype, bw, signed, simd):
    x = rand_input((7, 130), torch.float32, device)
    s, o = rand_params(x, (7, 1), bw, signed)
    qmin, qmax = grid(bw, signed)
    q = op.quantize(x, s, o, qmin, qmax, out_dtype)
    assert q.dtype == out_dtype
    assert torch.equal(q, ref.quantize(x, s, o, qmin, qmax, out_dtype))
    for dt in DTYPES:
        assert_same(op.dequantize(q, s, o, dt), ref.dequantize(q, s, o, dt))
    # quantize then dequantize is quantize_dequantize
    assert_same(op.dequantize(q, s, o, torch.float32), op.quantize_dequantize(x, s, o, qmin, qmax))


def test_poisoned_output_fully_written(simd):
    """Calls the kernel on a poisoned buffer: every element must be overwritten."""
    C = _native.cpu_module()
    from pyquant.ops import _layout
    for shape, s_shape in [((37, 1001), (37, 1)), ((3, 8, 64), (1, 8, 2)), ((5000,), (1,)), ((12, 12), (1, 12))]:
        x = rand_input(shape)
        s, o = rand_params(x, s_shape, 8, False)
        layout = _layout._native_layout(C, shape, s_shape)
        for dtype in DTYPES:
            xd = x.to(dtype)
            y = torch.full(shape, float("nan"), dtype=dtype)
            C.fake_quant_forward(0, xd.data_ptr(), _layout.DTYPE_CODE[dtype], y.data_ptr(), _layout.DTYPE_CODE[dtype],
                                 s.data_ptr(), o.data_ptr(), 0.0, 255.0, layout, *_layout.NO_ACT)
            assert not torch.isnan(y).any()
            assert_same(y, ref.quantize_dequantize(xd, s, o, 0, 255))


def test_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, 127.5])
    q = pqo.quantize(x, 1.0, bitwidth=8, signed=True)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0, 126.0, 127.0]


def test_ops_native_kernels_registered():
    assert pqo.HAS_CPU_KERNELS, "the CPU kernels must be built for these tests to mean anything"
    assert _native.native_info()["simd"] in ("avx512", "avx2", "baseline")
