"""pyquant.quant.least_error: per group, the encoding with the smallest real reconstruction error, on the
grid the encoding names (signed, strict or unsigned)."""
from __future__ import annotations

import importlib

import pytest

import torch

from pyquant.quant import (CLIP_FACTORS, clipped_encodings, from_range, from_scale_offset, least_error,
                           least_error_encoding)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _sse(x: torch.Tensor, enc) -> torch.Tensor:
    return (enc.quantize_dequantize(x).double() - x.double()).square().sum(dim=1)


@pytest.mark.parametrize("grid", [dict(), dict(strict=True)])
def test_each_channel_gets_the_candidate_with_the_smaller_error(grid):
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    amax = w.abs().amax(dim=1, keepdim=True)
    # a clipped range on even channels (worse), a full one on odd channels (as good as round-to-nearest)
    clip = torch.where(torch.arange(6).reshape(6, 1) % 2 == 0, 0.3 * amax, amax)
    enc = from_range(-clip, clip, 4, True, **grid)
    best = least_error_encoding(w, enc)
    assert best.strict == enc.strict and best.signed and best.qmin == enc.qmin
    got, before = _sse(w, best), _sse(w, enc)
    assert (got <= before).all()
    assert (got[0::2] < before[0::2]).all()  # the clipped channels were replaced
    assert torch.equal(best.scale[1::2], enc.scale[1::2]) or (got[1::2] <= before[1::2]).all()
    # nothing on the result's grid below its qmin: a strict grid keeps dropping the most negative code
    codes = torch.round(best.quantize_dequantize(w) / best.scale)
    assert codes.min() >= best.qmin


def test_an_encoding_nothing_beats_comes_back_unchanged():
    torch.manual_seed(1)
    w = torch.randn(4, 32)
    amax = w.abs().amax(dim=1, keepdim=True)
    once = least_error_encoding(w, from_range(-0.5 * amax, 0.5 * amax, 8, True))
    assert least_error_encoding(w, once) is once  # already the least error on every channel: kept as is


def test_unsigned_symmetric_stays_unsigned():
    torch.manual_seed(2)
    x = torch.rand(3, 64) + 0.01
    enc = from_range(torch.zeros(3, 1), 0.2 * x.amax(dim=1, keepdim=True), 8, True, signed=False)
    best = least_error_encoding(x, enc)
    assert best.symmetric and not best.signed and (best.qmin, best.qmax) == (0, 255)
    assert (_sse(x, best) < _sse(x, enc)).all()


def test_candidates_on_different_grids_are_refused():
    a = from_range(torch.tensor([-1.0]), torch.tensor([1.0]), 8, True)
    b = from_range(torch.tensor([-1.0]), torch.tensor([1.0]), 8, True, strict=True)
    with pytest.raises(ValueError, match="grid"):
        least_error(torch.randn(8), [a, b])
    with pytest.raises(ValueError, match="at least one"):
        least_error(torch.randn(8), [])


def test_a_large_weight_is_scored_a_slice_of_rows_at_a_time_with_the_same_result(monkeypatch):
    le = importlib.import_module("pyquant.quant.least_error")  # the package exports a function of that name
    from pyquant.quant import from_range
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 48, generator=g) * torch.logspace(-2, 0, 300).unsqueeze(1)
    enc = from_range(-w.abs().amax(1, keepdim=True) * 0.7, w.abs().amax(1, keepdim=True) * 0.7, 4, True)
    whole = le.least_error_encoding(w, enc)
    monkeypatch.setattr(le, "_CHUNK_ELEMENTS", 48 * 7)  # 7 rows at a time
    sliced = le.least_error_encoding(w, enc)
    assert torch.equal(whole.scale, sliced.scale) and torch.equal(whole.offset, sliced.offset)
    assert not torch.equal(whole.scale, enc.scale)  # some rows did change


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_encodings_shrink_the_full_range_and_the_search_beats_no_clipping_at_4_bits(symmetric):
    torch.manual_seed(4)
    w = torch.randn(16, 256) * torch.linspace(0.1, 2.0, 16).reshape(16, 1) + (0.0 if symmetric else 0.3)
    mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    like = from_range(mn, mx, 4, symmetric)
    cands = clipped_encodings(w, like)
    assert len(cands) == len(CLIP_FACTORS)
    for f, c in zip(CLIP_FACTORS, cands):
        assert (c.bitwidth, c.symmetric, c.signed, c.scale.shape) == (4, like.symmetric, like.signed, like.scale.shape)
        if symmetric:  # absmax / qmax, scaled
            assert torch.allclose(c.scale, f * torch.maximum(mx, -mn) / 7, rtol=1e-6)
        else:  # the observed range shrunk about its middle (from_range then widens it to hold 0)
            span, holds0 = c.max - c.min, (mn < 0) & (mx > 0)
            assert (span <= (mx - mn) * 1.01).all()
            assert torch.allclose(span[holds0], f * (mx - mn)[holds0], rtol=0.15)
    best = least_error(w, [like, *cands])
    # a bell-shaped channel at 4 bits reconstructs better with its extremes clipped: (almost) every channel
    assert (_sse(w, best) <= _sse(w, like)).all() and int((_sse(w, best) < _sse(w, like)).sum()) >= 12
    # and nothing of the candidates beats the choice on any channel
    for c in cands:
        assert (_sse(w, best) <= _sse(w, c) + 1e-9).all()


def test_clipped_encodings_refuse_factors_outside_0_1():
    like = from_range(torch.tensor([-1.0]), torch.tensor([1.0]), 4, True)
    for bad in ([], [0.0], [1.5], [-0.2]):
        with pytest.raises(ValueError, match="factors"):
            clipped_encodings(torch.randn(8), like, bad)
