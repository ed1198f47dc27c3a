"""Calibration kernels (min/max, histograms, encoding search, KL search) against brute-force
pure-torch references, on the CPU at every SIMD level and on CUDA when present."""
from __future__ import annotations

import pytest
import torch

from pyquant.ops import _reference as ref
from pyquant.quant import sqnr_candidates

from conftest import devices


op = torch.ops.pyquant
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, x shape, group shape)
LAYOUTS = [
    ("per_tensor", (37, 129), (1, 1)),
    ("per_channel_axis0", (24, 3, 7, 7), (24, 1, 1, 1)),
    ("per_channel_axis1", (4, 16, 9, 5), (1, 16, 1, 1)),
    ("per_channel_last", (6, 7, 48), (1, 1, 48)),
    ("per_block", (16, 256), (16, 4)),
    ("per_block_2d", (32, 96), (4, 3)),
]


def data(kind, shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        x = torch.randn(shape, generator=g)
    elif kind == "heavy":  # Student-t like: a few huge values
        x = torch.randn(shape, generator=g) / (torch.rand(shape, generator=g) + 0.02)
    elif kind == "relu":
        x = torch.relu(torch.randn(shape, generator=g) * 2 + 0.3)
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,shape,gshape", LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "relu"])
def test_minmax_and_histogram_match_reference(device, dtype, name, shape, gshape, kind, simd):
    x = data(kind, shape, dtype, device)
    if kind == "gauss":  # non-finite values are left out and counted
        x.view(-1)[3] = float("nan")
        x.view(-1)[x.numel() // 2] = float("inf")
        x.view(-1)[-1] = float("-inf")
    mn, mx, nf = op.minmax(x, list(gshape))
    rmn, rmx, rnf = ref.minmax(x, gshape)
    assert torch.equal(mn, rmn) and torch.equal(mx, rmx) and torch.equal(nf, rnf)
    assert int(nf.sum()) == (3 if kind == "gauss" else 0)
    for nb in (512, 2048, 7):
        rng = torch.where(mx > mn, mx - mn, torch.ones_like(mx))
        counts = op.histogram(x, mn.contiguous(), rng.contiguous(), nb)
        rcounts = ref.histogram(x, mn, rng, nb)
        assert counts.shape == tuple(gshape) + (nb,)
        assert torch.equal(counts, rcounts)
        assert int(counts.sum()) == x.numel() - int(nf.sum())


@pytest.mark.parametrize("device", devices())
def test_histogram_bins_are_torch_histc(device):
    """Same bins as torch.histc over [lo, lo + range] (AIMET histograms with histc)."""
    for seed in range(20):
        x = data("gauss", (5000,), torch.float32, device, seed) * (seed + 1) * 0.37 + seed
        lo, hi = x.min(), x.max()
        for nb in (512, 2048, 3):
            c = op.histogram(x.reshape(1, -1), lo.reshape(1, 1), (hi - lo).reshape(1, 1), nb).reshape(nb)
            h = torch.histc(x, nb, float(lo), float(hi))
            assert torch.equal(c.float(), h), (seed, nb)


@pytest.mark.parametrize("device", devices())
def test_histogram_clamps_out_of_range_into_end_bins(device):
    x = torch.tensor([[-5.0, 0.1, 0.5, 0.9, 7.0, float("nan")]], device=device)
    c = op.histogram(x, torch.zeros(1, 1, device=device), torch.ones(1, 1, device=device), 4)
    assert c.shape == (1, 1, 4) and c.reshape(-1).tolist() == [2, 0, 1, 2]


def _hist_case(G, nb, kind, device, seed=0):
    x = data(kind, (G, 3000), torch.float32, device, seed)
    mn, mx, _ = op.minmax(x, [G, 1])
    rng = (mx - mn)
    counts = op.histogram(x, mn, rng, nb).reshape(G, nb)
    bw = (rng / nb).reshape(G)
    c0 = mn.reshape(G) + bw / 2
    return counts, c0.contiguous(), bw.contiguous(), mn.reshape(G), mx.reshape(G)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["gauss", "heavy", "relu"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_search_same_argmin_as_brute_force(device, kind, symmetric, bits, simd):
    ns = 2**bits - 1
    counts, c0, bw, mn, mx = _hist_case(24, 512, kind, device)
    d, o = sqnr_candidates(mn, mx, ns, symmetric)
    for gamma, p in [(3.0, 2.0), (1.0, 2.0), (1.0, 1.5)]:
        best, noise = op.search(counts, c0, bw, d, o, ns, gamma, p)
        rbest, rnoise = ref.search(counts, c0, bw, d, o, ns, gamma, p)
        assert torch.equal(best, rbest), (gamma, p)
        # clipped bins are summed from prefix sums in float64, the reference sums float32 terms
        torch.testing.assert_close(noise, rnoise, rtol=1e-6, atol=1e-9)


def test_search_identical_across_simd_levels():
    from pyquant import _native
    C = _native.cpu_module()
    counts, c0, bw, mn, mx = _hist_case(32, 512, "heavy", "cpu", seed=3)
    d, o = sqnr_candidates(mn, mx, 255, False)
    results = []
    for level in ("avx512", "avx2", "baseline"):
        if C.set_simd_level(level):
            results.append(op.search(counts, c0, bw, d, o, 255, 3.0, 2.0))
    C.set_simd_level("auto")
    for b, n in results[1:]:
        assert torch.equal(b, results[0][0]) and torch.equal(n, results[0][1])  # bit-identical totals


@pytest.mark.cuda
def test_search_and_entropy_identical_on_cpu_and_cuda():
    counts, c0, bw, mn, mx = _hist_case(16, 512, "heavy", "cpu", seed=5)
    for sym in (False, True):
        d, o = sqnr_candidates(mn, mx, 255, sym)
        a = op.search(counts, c0, bw, d, o, 255, 3.0, 2.0)
        b = op.search(*(t.cuda() for t in (counts, c0, bw, d, o)), 255, 3.0, 2.0)
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    a = op.entropy_search(counts, 128)
    b = op.entropy_search(counts.cuda(), 128)
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    x = data("heavy", (64, 1000), torch.float32, "cpu")
    for t_cpu, t_gpu in zip(op.minmax(x, [64, 1]), op.minmax(x.cuda(), [64, 1])):
        assert torch.equal(t_cpu, t_gpu.cpu())


@pytest.mark.parametrize("device", devices())
def test_entropy_search_same_argmin_as_brute_force(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20000, generator=g).abs()
    x[1] = torch.distributions.Laplace(0.0, 1.0).sample((20000,)).abs()
    mx = x.amax(dim=1, keepdim=True)
    counts = op.histogram(x.to(device), torch.zeros(3, 1, device=device), mx.to(device), 256).reshape(3, 256)
    for nq in (16, 64):
        best, kl = op.entropy_search(counts, nq)
        rbest, rkl = ref.entropy_search(counts.cpu(), nq)
        assert torch.equal(best.cpu(), rbest)
        torch.testing.assert_close(kl.cpu(), rkl, rtol=1e-9, atol=1e-12)
        assert ((best >= nq) & (best <= 256)).all()


@pytest.mark.parametrize("device", devices())
def test_opcheck_stats_ops(device):
    x = data("gauss", (8, 40), torch.float32, device)
    torch.library.opcheck(op.minmax, (x, [8, 1]))
    mn, mx, _ = op.minmax(x, [8, 1])
    torch.library.opcheck(op.histogram, (x, mn, (mx - mn).contiguous(), 64))
    counts, c0, bw, lo, hi = _hist_case(4, 64, "gauss", device)
    d, o = sqnr_candidates(lo, hi, 255, False)
    torch.library.opcheck(op.search, (counts, c0, bw, d, o, 255, 3.0, 2.0))
    torch.library.opcheck(op.entropy_search, (counts, 16))


def test_stats_argument_errors():
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"shape.shape\[0\]=4 does not divide"):
        op.minmax(x, [4, 1])
    with pytest.raises(TypeError, match="x must be float32"):
        op.minmax(x.int(), [1, 1])
    with pytest.raises(ValueError, match="nbins must be an int"):
        op.histogram(x, torch.zeros(1, 1), torch.ones(1, 1), 0)
    with pytest.raises(ValueError, match="range must be positive and finite"):
        op.histogram(x, torch.zeros(1, 1), torch.zeros(1, 1), 8)
    with pytest.raises(ValueError, match="nq"):
        op.entropy_search(torch.ones(1, 8, dtype=torch.int64), 9)
