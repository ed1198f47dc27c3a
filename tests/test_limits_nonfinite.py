"""Calibration batches holding NaN or ±inf: such values are left out of every statistic; a batch that holds
nothing else (in a group) adds nothing there and is named in a warning; a group that never saw a finite value
is a CalibrationError. No encoding is ever NaN or inf."""
from __future__ import annotations

import warnings

import pytest
import torch

from pyquant.quant import CalibrationError, Entropy, MinMax, Mse, Percentile, QuantizeDequantize, Sqnr, TfEnhanced

ANALYZERS = [MinMax, Sqnr, TfEnhanced, Mse, Percentile, Entropy]


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(128, 4, generator=g) * 2 + 0.5, torch.randn(128, 4, generator=g) * 3,
            torch.rand(128, 4, generator=g) * 5 - 1]


def calibrate(cls, data, shape=(4,)):
    a = cls(shape, name="blocks.0.mlp.output")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in data:
            a.update_stats(b)
    return a, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def assert_same_encoding(a, b):
    assert torch.isfinite(a.scale).all() and torch.isfinite(a.offset).all()
    assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)


@pytest.mark.parametrize("cls", ANALYZERS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "mixed"])
@pytest.mark.parametrize("position", [0, 1, 3])
def test_a_batch_of_nan_or_inf_only_is_left_out_with_a_warning_naming_it(cls, bad, position):
    data = batches()
    x = torch.full((128, 4), float(bad) if bad != "mixed" else float("nan"))
    if bad == "mixed":
        x[::3] = float("inf")
        x[1::3] = -float("inf")
    clean, clean_warnings = calibrate(cls, data)
    dirty, messages = calibrate(cls, data[:position] + [x] + data[position:])
    assert clean_warnings == []
    named = [m for m in messages if f"calibration batch {position} holds only NaN/inf values" in m]
    assert len(named) == 1 and "blocks.0.mlp.output" in named[0], messages
    for symmetric in (False, True):
        assert_same_encoding(dirty.compute_encodings(8, symmetric), clean.compute_encodings(8, symmetric))
    assert int(dirty.nonfinite.sum()) == x.numel()


@pytest.mark.parametrize("cls", ANALYZERS)
def test_a_channel_of_nan_only_in_the_first_batch_starts_its_range_later(cls):
    """Per channel: the NaN-only channel of batch 0 takes its range from batch 1, as if batch 0 had not
    been there for it, while the other channels keep every batch."""
    data = batches(1)
    first = data[0].clone()
    first[:, 2] = float("nan")
    dirty, messages = calibrate(cls, [first] + data[1:])
    assert any("calibration batch 0 holds only NaN/inf values in 1 of its 4 groups" in m for m in messages), messages
    clean_rest, _ = calibrate(cls, data[1:])
    clean_all, _ = calibrate(cls, data)
    enc, rest, full = (a.compute_encodings(8, False) for a in (dirty, clean_rest, clean_all))
    assert torch.isfinite(enc.scale).all()
    assert torch.equal(enc.scale[2], rest.scale[2]) and torch.equal(enc.offset[2], rest.offset[2])
    if cls is MinMax:  # the other channels' statistics include batch 0 (histograms re-bin, so only MinMax is exact)
        keep = [0, 1, 3]
        assert torch.equal(enc.scale[keep], full.scale[keep]) and torch.equal(enc.offset[keep], full.offset[keep])


@pytest.mark.parametrize("cls", ANALYZERS)
def test_inf_values_among_finite_ones_are_left_out(cls):
    data = batches(2)
    spiked = data[1].clone()
    spiked[5, :] = float("inf")
    spiked[9, 1] = -float("inf")
    spiked[17, 3] = float("nan")
    dirty, messages = calibrate(cls, [data[0], spiked, data[2]])
    assert len(messages) == 1 and "holds 6 NaN/inf value(s)" in messages[0], messages
    # the range every analyzer saw is that of the finite values, computed here directly
    x = torch.cat([data[0], spiked, data[2]])
    if cls is Entropy:
        x = x.abs()
    fin = torch.isfinite(x)
    lo = torch.where(fin, x, torch.tensor(float("inf"))).amin(0)
    hi = torch.where(fin, x, torch.tensor(-float("inf"))).amax(0)
    seen = (dirty.min, dirty.max) if cls is MinMax else (dirty.data_min, dirty.data_max)
    assert torch.equal(seen[0], lo) and torch.equal(seen[1], hi)
    enc = dirty.compute_encodings(8, False)
    assert torch.isfinite(enc.scale).all() and bool((enc.scale > 0).all()) and torch.isfinite(enc.offset).all()


@pytest.mark.parametrize("cls", ANALYZERS)
def test_nan_only_calibration_is_an_error_naming_the_quantizer(cls):
    a, messages = calibrate(cls, [torch.full((16, 4), float("nan")), torch.full((16, 4), float("inf"))])
    assert len(messages) == 2
    with pytest.raises(CalibrationError, match=r"blocks\.0\.mlp\.output.*no finite value in 2 batch"):
        a.compute_encodings(8, False)


def test_quantizer_calibration_skips_the_nan_batch():
    data = batches(3)
    q = QuantizeDequantize((4,), 8, False, name="fc.output")
    with pytest.warns(RuntimeWarning, match="fc.output.*calibration batch 1 holds only NaN/inf"):
        with q.compute_encodings():
            q(data[0])
            q(torch.full_like(data[0], float("nan")))
            q(data[1])
    ref = QuantizeDequantize((4,), 8, False)
    with ref.compute_encodings():
        q_ = [ref(b) for b in data[:2]]
    del q_
    x = data[2]
    assert torch.equal(q(x), ref(x))
    # NaN at run time stays NaN (section 5.9); the encoding itself is finite
    y = q(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]]))
    assert torch.isnan(y[0, 0]) and torch.isfinite(y[0, 1:]).all()


@pytest.mark.parametrize("cls", [Sqnr, TfEnhanced, Percentile, Entropy])
def test_merge_takes_a_group_from_the_side_that_saw_finite_values(cls):
    """Shards: one saw only NaN in channel 1, the other real data there; the merged channel is the other's."""
    data = batches(4)
    nan_shard = data[0].clone()
    nan_shard[:, 1] = float("nan")
    other = data[1].clone()
    other[:, 1] = other[:, 1].abs() + 5.0  # away from 0, where the placeholder range sits
    a, _ = calibrate(cls, [nan_shard])
    b, _ = calibrate(cls, [other])
    only_b, _ = calibrate(cls, [other])
    a.merge(b)
    enc, ref_b = a.compute_encodings(8, False), only_b.compute_encodings(8, False)
    assert torch.equal(enc.scale[1], ref_b.scale[1]) and torch.equal(enc.offset[1], ref_b.offset[1])
    assert torch.equal(a.counts[1], only_b.counts[1])
