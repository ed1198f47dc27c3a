"""Zero-size tensors through every op and through calibration: a defined result (empty outputs, sums over
no elements, +inf/-inf min/max, empty histograms), the same from the native kernels and the reference, or
an error that names the argument."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyquant.ops as pqo
from pyquant.ops import _registry
from pyquant.quant import CalibrationError, Entropy, MinMax, Mse, Percentile, QuantizeDequantize, Sqnr, TfEnhanced

op = torch.ops.pyquant
SHAPES = [(0,), (0, 8), (4, 0), (2, 0, 3)]


def reference(name):
    """The op's pure-torch kernel (argument checks included), as the registry runs it without a device kernel."""
    return getattr(_registry, name)


def per_tensor(x):
    return torch.full((1,) * x.dim(), 0.25), torch.full((1,) * x.dim(), -3.0)


def assert_same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quant_ops_on_empty_tensors(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    s, o = per_tensor(x)
    y = op.quantize_dequantize(x, s, o, 0, 255)
    assert_same(y, reference("_ref_qdq")(x, s, o, 0, 255))
    assert y.shape == shape and y.dtype == dtype
    q = op.quantize(x, s, o, 0, 255, torch.uint8)
    assert_same(q, reference("_ref_quantize")(x, s, o, 0, 255, torch.uint8))
    dq = op.dequantize(q, s, o, dtype)
    assert_same(dq, reference("_ref_dequantize")(q, s, o, dtype))
    # a bad scale is still refused: the check does not depend on there being data
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        op.quantize_dequantize(x, torch.zeros_like(s), o, 0, 255)


@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_gradients_of_empty_tensors_are_sums_over_nothing(shape):
    x = torch.empty(shape, requires_grad=True)
    s = torch.full((1,) * len(shape), 0.5, requires_grad=True)
    o = torch.full((1,) * len(shape), -2.0, requires_grad=True)
    op.quantize_dequantize(x, s, o, 0, 15).sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(o.grad, torch.zeros_like(o))
    mask = [True, True, True]
    g = torch.empty(shape)
    native = op.quantize_dequantize_backward(g, x.detach(), s.detach(), o.detach(), 0, 15, 1.0, mask)
    ref = reference("_ref_qdq_bwd")(g, x.detach(), s.detach(), o.detach(), 0, 15, 1.0, mask)
    for a, b in zip(native, ref):
        assert_same(a, b)


@pytest.mark.parametrize("shape,axis", [((0, 8), 0), ((4, 0), 1), ((2, 0, 3), 1), ((0, 8), 1), ((4, 0), 0)])
def test_per_channel_and_per_block_along_an_empty_dimension(shape, axis):
    """Per-channel along a dimension of size 0 has no scale at all; the result is still defined."""
    x = torch.empty(shape)
    s = torch.rand(shape[axis]) + 0.1
    y = pqo.quantize_dequantize(x, s, axis=axis, bitwidth=4, signed=True)
    assert y.shape == shape
    codes = pqo.quantize(x, s, axis=axis, signed=True, out_dtype=torch.int8)
    assert codes.shape == shape and codes.dtype == torch.int8
    assert pqo.dequantize(codes, s, axis=axis).shape == shape
    blocks = [-1] * len(shape)
    y = pqo.quantize_dequantize(x, torch.tensor([0.5]), block_size=blocks)
    assert y.shape == shape
    # a scale count that does not fit is refused with the numbers, as for non-empty tensors
    with pytest.raises(ValueError, match="needs"):
        pqo.quantize_dequantize(x, torch.ones(shape[axis] + 2), axis=axis)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_of_empty_tensors(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    g = [1] * len(shape)
    mn, mx, nf = op.minmax(x, g)
    for a, b in zip((mn, mx, nf), reference("_ref_minmax")(x, g)):
        assert_same(a, b)
    assert bool((mn == float("inf")).all()) and bool((mx == -float("inf")).all()) and int(nf.sum()) == 0
    lo, rng = torch.zeros(g), torch.ones(g)
    counts = op.histogram(x, lo, rng, 16)
    assert_same(counts, reference("_ref_histogram")(x, lo, rng, 16))
    assert counts.shape == tuple(g) + (16,) and int(counts.sum()) == 0
    # groups along an empty dimension: none of them
    gs = list(shape)
    mn, mx, nf = op.minmax(x, gs)
    assert mn.shape == shape and mx.shape == shape and nf.shape == shape


def test_searches_over_no_groups_and_no_bins():
    empty = torch.zeros(0, 16, dtype=torch.int64)
    best, noise = op.search(empty, torch.zeros(0), torch.ones(0), torch.ones(0, 3), torch.zeros(0, 3), 255, 3.0, 2.0)
    assert best.shape == (0,) and noise.shape == (0,)
    best, kl = op.entropy_search(empty, 4)
    assert best.shape == (0,) and kl.shape == (0,)
    # histograms without bins: every candidate scores zero, the first wins
    nobins = torch.zeros(2, 0, dtype=torch.int64)
    args = (nobins, torch.zeros(2), torch.ones(2), torch.rand(2, 3) + 0.1, torch.zeros(2, 3), 255, 3.0)
    for p in (2.0, 3.0):
        best, noise = op.search(*args, p)
        rbest, rnoise = reference("_ref_search")(*args, p)
        assert best.tolist() == rbest.tolist() == [0, 0] and noise.tolist() == rnoise.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="counts must have at least one bin"):
        op.entropy_search(nobins, 1)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0)])
def test_adaround_ops_on_empty_weights(shape):
    w = torch.empty(shape)
    alpha = torch.empty(shape, requires_grad=True)
    rows = shape[0]
    s, o = torch.full((rows,), 0.1), torch.zeros(rows)
    y = op.adaround_weight(w, alpha, s, o, -8, 7)
    assert_same(y, reference("_ref_adaround_weight")(w, alpha.detach(), s, o, -8, 7))
    y.sum().backward()
    assert alpha.grad.shape == shape
    value, grad = op.adaround_regularizer(alpha.detach(), 2.0)
    assert float(value) == 0.0 and grad.shape == shape
    assert pqo.adaround_init_alpha(w, 0.1).shape == shape
    assert pqo.adaround_weight(w, alpha.detach(), 0.1).shape == shape


def test_int32_and_pool_ops_on_empty_tensors():
    assert pqo.quantize_dequantize_int32(torch.empty(0), 0.1).shape == (0,)
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4)]:
        x = torch.empty(shape)
        out, pos = op.max_pool2d_window(x, [2, 2])
        assert out.shape == shape[:2] + (2, 2) and pos.dtype == torch.uint8
        dx = op.max_pool2d_window_backward(out, pos, [2, 2], list(shape))
        assert dx.shape == shape
        s = torch.ones((1, shape[1], 1, 1)) * 0.1
        out, pos, sel = op.quantize_dequantize_max_pool2d(x, s, torch.zeros_like(s), 0, 255, [2, 2])
        assert out.shape == sel.shape == shape[:2] + (2, 2)
    # an empty plane has no window: the error names the kernel and the input's size
    with pytest.raises(ValueError, match=r"kernel \[2, 2\] is larger than the input's \(0, 4\)"):
        op.max_pool2d_window(torch.empty(2, 3, 0, 4), [2, 2])


ANALYZERS = [MinMax, Sqnr, TfEnhanced, Mse, Percentile, Entropy]


@pytest.mark.parametrize("cls", ANALYZERS)
def test_empty_batches_add_nothing_to_calibration(cls):
    """An empty batch (a routed expert that got no tokens) changes no statistic: the encoding is the one
    of the other batches, whichever comes first."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 8, generator=g) * 3 + 1, torch.randn(64, 8, generator=g)]
    plain = cls((8,))
    for b in data:
        plain.update_stats(b)
    mixed = cls((8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no data is not bad data: no warning
        for b in [torch.empty(0, 8)] + data[:1] + [torch.empty(0, 8)] + data[1:]:
            mixed.update_stats(b)
    a, b = plain.compute_encodings(8, False), mixed.compute_encodings(8, False)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)


@pytest.mark.parametrize("cls", ANALYZERS)
def test_only_empty_batches_is_a_calibration_error_naming_the_quantizer(cls):
    a = cls((), name="expert3.fc1.output")
    a.update_stats(torch.empty(0, 8))
    with pytest.raises(CalibrationError, match=r"expert3\.fc1\.output.*no finite value in 1 batch"):
        a.compute_encodings(8, False)


def test_quantizer_calibrated_with_an_empty_batch_and_data():
    q = QuantizeDequantize((), 8, False)
    x = torch.randn(32, 4)
    with q.compute_encodings():
        q(torch.empty(0, 4))
        q(x)
    ref = QuantizeDequantize((), 8, False)
    with ref.compute_encodings():
        ref(x)
    assert torch.equal(q(x), ref(x))
    assert q(torch.empty(0, 4)).shape == (0, 4)
