"""Tensors of more than 2^31 elements through the CPU fake-quant and calibration kernels: every index is
64-bit, so results past element 2^31 are those of the reference, and counts above 2^31 are exact.

Opt-in (PYQUANT_BIG_TESTS=1): a bfloat16 input of 4 GiB (4.5 GiB free to start) and, for the integer codes,
2 GiB more; a few minutes. The reference runs on slices (the first and last elements,
around element 2^31) and, for the statistics, chunk by chunk over the whole tensor."""
from __future__ import annotations

import os

import pytest
import torch

from pyquant import _native
from pyquant.ops import _reference as ref

op = torch.ops.pyquant
COLS = 1024
ROWS = (1 << 21) + 1                 # ROWS * COLS = 2^31 + 1024 elements
N = ROWS * COLS
B = 1 << 31                          # the first element an int32 index cannot reach
BOUNDARY_ROW = B // COLS
NEED_GIB = 4.5                       # the input and the reference's chunks
CODES_GIB = 2.5                      # int8 codes beside it

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PYQUANT_BIG_TESTS") != "1", reason="set PYQUANT_BIG_TESTS=1 (4.5 to 7 GiB)"),
    pytest.mark.skipif(_native.cpu_module() is None, reason="needs the compiled CPU module"),
]


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def slices():
    """Element ranges the reference checks: the start, the end, and both sides of element 2^31."""
    return [(0, 4096), (B - 4096, min(N, B + 4096)), (N - 4096, N)]


def row_slices():
    return [(0, 4), (BOUNDARY_ROW - 4, min(ROWS, BOUNDARY_ROW + 4)), (ROWS - 4, ROWS)]


def chunks(n: int, size: int = 1 << 25):
    for a in range(0, n, size):
        yield a, min(n, a + size)


@pytest.fixture(scope="module")
def big():
    if mem_available_gib() < NEED_GIB:
        pytest.skip(f"needs {NEED_GIB} GiB of available memory, {mem_available_gib():.1f} GiB free")
    g = torch.Generator().manual_seed(0)
    x = torch.empty(ROWS, COLS, dtype=torch.bfloat16)
    flat = x.view(-1)
    for a, b in chunks(N):  # a chunk at a time: no float32 copy of the whole
        flat[a:b] = torch.randn(b - a, generator=g).to(torch.bfloat16)
    # the extremes and the non-finite values sit past 2^31, where a wrapped index would miss them
    flat[B + 5] = 1000.0
    flat[B + 77] = -1000.0
    flat[N - 1] = float("nan")
    flat[B] = float("inf")
    yield x
    del x, flat


def test_minmax_and_histogram_per_tensor(big):
    flat = big.view(-1)
    mn, mx, nf = op.minmax(big, [1, 1])
    assert float(mn) == -1000.0 and float(mx) == 1000.0 and int(nf) == 2
    lo, rng = torch.full((1, 1), -4.0), torch.full((1, 1), 8.0)
    counts = op.histogram(big, lo, rng, 2048).reshape(-1)
    want = torch.zeros(2048, dtype=torch.int64)
    for a, b in chunks(N):
        want += ref.histogram(flat[a:b].reshape(1, -1), lo, rng, 2048).reshape(-1)
    assert torch.equal(counts, want)
    assert int(counts.sum()) == N - 2 and int(counts.sum()) > B  # exact int64 counts beyond 2^31


def test_minmax_and_histogram_per_row(big):
    mn, mx, nf = op.minmax(big, [ROWS, 1])
    lo = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))
    rng = torch.where(torch.isfinite(mx) & (mx > lo), mx - lo, torch.ones_like(mx))
    counts = op.histogram(big, lo.contiguous(), rng.contiguous(), 16)
    for a, b in row_slices():
        rows = big[a:b]
        rmn, rmx, rnf = ref.minmax(rows, [b - a, 1])
        assert torch.equal(mn[a:b], rmn) and torch.equal(mx[a:b], rmx) and torch.equal(nf[a:b], rnf)
        assert torch.equal(counts[a:b], ref.histogram(rows, lo[a:b], rng[a:b], 16))
    assert int(nf.sum()) == 2 and float(mx[BOUNDARY_ROW]) == 1000.0 and float(mn[BOUNDARY_ROW]) == -1000.0


@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_quantize_past_element_2_31(big, granularity):
    """Integer codes (int8: 2 GiB beside the input) from the forward kernel, the loop quantize_dequantize and
    dequantize share."""
    if mem_available_gib() < CODES_GIB:
        pytest.skip(f"the codes need {CODES_GIB} GiB more, {mem_available_gib():.1f} GiB free")
    flat = big.view(-1)
    saved = flat[N - 1].clone()
    flat[N - 1] = 0.75  # NaN has no integer code: quantize refuses it (5.9)
    try:
        shape = (1, 1) if granularity == "per_tensor" else (ROWS, 1)
        g = torch.Generator().manual_seed(1)
        s = torch.rand(shape, generator=g) * 0.02 + 0.01
        o = torch.zeros(shape)
        codes = op.quantize(big, s, o, -128, 127, torch.int8)
        for a, b in slices():
            rs = s.reshape(-1)[torch.arange(a, b) // COLS] if s.numel() > 1 else s.reshape(1).expand(b - a)
            want = ref.quantize(flat[a:b], rs, torch.zeros_like(rs), -128, 127, torch.int8)
            assert torch.equal(codes.view(-1)[a:b], want)
        assert int(codes.view(-1)[B]) == 127 and int(codes.view(-1)[B + 77]) == -128
        del codes
    finally:
        flat[N - 1] = saved


def test_scale_and_offset_gradients_sum_past_element_2_31(big):
    """ds/do per tensor: one sum over all 2^31 + 1024 elements (the grad is x itself, so no second buffer);
    compared with float64 sums of the reference's per-element terms, chunk by chunk."""
    flat = big.view(-1)
    saved = flat[B].clone(), flat[N - 1].clone()
    flat[B], flat[N - 1] = 3.0, -2.0  # a NaN or inf grad would make the sums NaN/inf (5.9)
    try:
        s, o = torch.full((1, 1), 0.02), torch.full((1, 1), -3.0)
        _, ds, do = op.quantize_dequantize_backward(big, big, s, o, -128, 127, 1.0, [False, True, True])
        want_s = want_o = 0.0
        for a, b in chunks(N):
            xf = flat[a:b].float()
            inside, d_scale, _ = ref.fake_quant_derivatives(xf, s.reshape(1), o.reshape(1), -128, 127)
            want_s += float((xf * d_scale).double().sum())
            want_o += float(((xf * 0.02) * (1.0 - inside.float())).double().sum())
        assert float(ds) == pytest.approx(want_s, rel=1e-5)
        assert float(do) == pytest.approx(want_o, rel=1e-5)
        # per row: the rows at 2^31 against the reference on those rows
        s_r = torch.full((ROWS, 1), 0.02)
        o_r = torch.full((ROWS, 1), -3.0)
        _, ds_r, do_r = op.quantize_dequantize_backward(big, big, s_r, o_r, -128, 127, 1.0, [False, True, True])
        for a, b in row_slices():
            rows = big[a:b]
            _, rds, rdo = ref.quantize_dequantize_backward(rows, rows, s_r[a:b], o_r[a:b], -128, 127, 1.0,
                                                           [False, True, True])
            torch.testing.assert_close(ds_r[a:b], rds, rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(do_r[a:b], rdo, rtol=1e-5, atol=1e-3)
    finally:
        flat[B], flat[N - 1] = saved
