"""Encoding analyzers and quantizer modules: AIMET-compatible encodings, histogram growth, bad
input, encoding quality, state save/load/merge, and calibration sharded over torch.distributed."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from pyquant.quant import (CalibrationError, Dequantize, Entropy, MinMax, Mse, Percentile, Quantize,
                           QuantizeDequantize, QuantizerError, Sqnr, TfEnhanced, from_range, sqnr_candidates)

from conftest import devices

ANALYZERS = [MinMax, TfEnhanced, Sqnr, Mse, Percentile, Entropy]


def test_tf_enhanced_matches_values_aimet_computes():
    """Per-channel TF-enhanced of torch.randn(64, 256) (seed 0), as aimet-torch 2.42 reports it
    (its quantizer re-derives scale = (max - min) / 255 from the stored range: compare to 1e-6)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    a = TfEnhanced((64, 1))
    a.update_stats(w)
    asym = a.compute_encodings(8, symmetric=False)
    torch.testing.assert_close(asym.scale[:3, 0], torch.tensor([0.023622844368219376, 0.028451833873987198,
                                                                0.024029001593589783]), rtol=1e-6, atol=0)
    assert asym.offset[:3, 0].tolist() == [-111.0, -111.0, -114.0]
    sym = a.compute_encodings(8, symmetric=True)
    torch.testing.assert_close(sym.scale[:3, 0], torch.tensor([0.02674904093146324, 0.03216857463121414,
                                                               0.02662271074950695]), rtol=1e-6, atol=0)
    assert (sym.offset == 0).all()


def test_sqnr_candidates_follow_aimet_grid():
    d, o = sqnr_candidates(torch.tensor([-1.0]), torch.tensor([3.0]), 255, symmetric=False)
    assert d.shape == (1, 17 * 21)
    offs = sorted(set(o[0, :21].tolist()))  # first delta: offsets within the observed range
    assert min(o.tolist()[0]) >= -255 and max(o.tolist()[0]) <= 0
    assert len(offs) >= 2
    d, o = sqnr_candidates(torch.tensor([-1.0]), torch.tensor([3.0]), 255, symmetric=True)
    D = 2 * 3.0 / 255
    torch.testing.assert_close(d[0, [0, 99, 100]], torch.tensor([D / 100, D, D * 101 / 100]))
    assert (o == -128).all()


def test_histogram_growth_rebins_like_aimet():
    """AIMET's documented example: 4 bins over [0.1, 0.95] with counts [2, 0, 1, 2], then 1.5 arrives:
    range [0.1, 1.5], counts [2, 2, 1, 1]."""
    a = Sqnr((), num_bins=4)
    a.update_stats(torch.tensor([0.1, 0.2, 0.6, 0.9, 0.95]))
    assert a.counts.tolist() == [2, 0, 1, 2]
    a.update_stats(torch.tensor([1.5]))
    assert a.counts.tolist() == [2, 2, 1, 1]
    assert float(a.lo) == pytest.approx(0.1) and float(a.hi) == pytest.approx(1.5)


def test_growth_limit_caps_the_range():
    a = TfEnhanced((), num_bins=16)
    a.update_stats(torch.linspace(0, 1, 100))
    a.update_stats(torch.tensor([-10.0, 10.0]))
    assert float(a.lo) == pytest.approx(-1.5) and float(a.hi) == pytest.approx(2.5)
    assert int(a.counts.sum()) == 102  # clipped values land in the end bins
    assert int(a.counts[0]) >= 1 and int(a.counts[-1]) >= 1


@pytest.mark.parametrize("cls", ANALYZERS)
@pytest.mark.parametrize("device", devices())
def test_nonfinite_values_are_counted_warned_once_and_left_out(cls, device):
    a = cls((4, 1), name="conv.weight")
    x = torch.randn(4, 100, device=device)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="conv.weight.*2 NaN/inf"):
        a.update_stats(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        a.update_stats(x)
    assert int(a.nonfinite.sum()) == 4
    enc = a.compute_encodings(8, False)
    assert torch.isfinite(enc.scale).all() and (enc.scale > 0).all()
    assert float(enc.max.max()) < 10  # inf not folded into the range


@pytest.mark.parametrize("cls", ANALYZERS)
def test_errors_name_the_quantizer(cls):
    a = cls((3, 1), name="fc.weight")
    with pytest.raises(CalibrationError, match="fc.weight.*before any statistics"):
        a.compute_encodings(8, False)
    x = torch.randn(3, 10)
    x[2] = float("nan")
    with pytest.warns(RuntimeWarning):
        a.update_stats(x)
    with pytest.raises(CalibrationError, match="fc.weight.*group 2.*no finite value"):
        a.compute_encodings(8, False)


@pytest.mark.parametrize("cls", ANALYZERS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_channel_gives_valid_encoding(cls, symmetric):
    x = torch.randn(3, 50)
    x[1] = 0.0
    x[2] = 0.75
    a = cls((3, 1))
    a.update_stats(x)
    enc = a.compute_encodings(8, symmetric)
    assert torch.isfinite(enc.scale).all() and (enc.scale > 0).all()
    y = enc.quantize_dequantize(x)
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cls", [Sqnr, TfEnhanced, Mse])
def test_search_encodings_beat_minmax_on_laplace(bits, cls):
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    errs = {}
    for name, a in (("minmax", MinMax(())), ("search", cls(()))):
        a.update_stats(x)
        enc = a.compute_encodings(bits, symmetric=False)
        errs[name] = float(((enc.quantize_dequantize(x) - x) ** 2).mean())
    assert errs["search"] < errs["minmax"], errs


@pytest.mark.parametrize("cls", ANALYZERS)
def test_state_dict_round_trip_and_merge(cls):
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 300), torch.randn(8, 300) * 1.5
    a = cls((8, 1))
    a.update_stats(x1)
    a.update_stats(x2)
    b = cls((8, 1))
    b.load_state_dict(a.state_dict())
    ea, eb = a.compute_encodings(8, False), b.compute_encodings(8, False)
    assert torch.equal(ea.scale, eb.scale) and torch.equal(ea.offset, eb.offset)
    # merge: two analyzers over halves with the range fixed first equal one analyzer over all
    full, h1, h2 = cls((8, 1)), cls((8, 1)), cls((8, 1))
    both = torch.cat([x1, x2], dim=1)
    if hasattr(full, "update_range"):
        for an in (full, h1, h2):
            an.update_range(both)
    full.update_stats(both)
    h1.update_stats(x1)
    h2.update_stats(x2)
    h1.merge(h2)
    e_full, e_merged = full.compute_encodings(8, True), h1.compute_encodings(8, True)
    assert torch.equal(e_full.scale, e_merged.scale) and torch.equal(e_full.offset, e_merged.offset)


def test_percentile_range_checks_and_clipping():
    with pytest.raises(ValueError, match=r"percentile must be in \[50, 100\]"):
        Percentile((), percentile=40)
    x = torch.arange(100.0)
    a = Percentile((), num_bins=10, percentile=90)
    a.update_stats(x)
    enc = a.compute_encodings(8, False)
    assert float(enc.max) == pytest.approx(79.2, rel=0.02)  # AIMET: left edge of the bin, 79.2


def test_entropy_clips_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(100_000, generator=g))
    x[:10] = 50.0  # rare outliers
    a = Entropy(())
    a.update_stats(x)
    enc = a.compute_encodings(8, False)
    assert float(enc.offset) == 0.0 and float(enc.max) < 25.0


def test_from_range_rules():
    e = from_range(torch.tensor(0.5), torch.tensor(2.0), 8, False)
    assert float(e.offset) == 0.0 and float(e.scale) == pytest.approx(2.0 / 255)
    e = from_range(torch.tensor(-1.0), torch.tensor(2.0), 8, True)
    assert float(e.scale) == pytest.approx(2.0 / 127)
    e = from_range(torch.tensor(0.0), torch.tensor(0.0), 8, False)
    assert float(e.scale) >= torch.finfo(torch.float32).eps


# ---- quantizer modules ----------------------------------------------------------------------------
def test_quantizer_calibration_observes_only_then_quantizes():
    q = QuantizeDequantize((1, 8, 1, 1), 8, False, TfEnhanced((1, 8, 1, 1)), name="act")
    x = torch.relu(torch.randn(4, 8, 6, 6))
    with q.compute_encodings():
        y = q(x)
        assert y is x
    enc = q.get_encoding()
    assert enc.scale.shape == (1, 8, 1, 1)
    y = q(x)
    assert torch.equal(y, enc.quantize_dequantize(x))
    assert "name='act'" in repr(q) and "per_channel" in repr(q)
    q.enabled = False
    assert q(x) is x and "disabled" in repr(q)


@pytest.mark.parametrize("range_params", ["minmax", "scale_offset"])
def test_quantizer_range_learning_and_freeze(range_params):
    q = QuantizeDequantize((4, 1), 4, False, range_params=range_params)
    w = torch.randn(4, 32)
    with q.compute_encodings():
        q(w)
    q(w).square().sum().backward()
    grads = [p.grad for p in q.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    before = q.get_encoding()
    q.freeze()
    assert not any(p.requires_grad for p in q.parameters())
    with q.compute_encodings():
        q(w * 10)
    assert torch.equal(q.get_encoding().scale, before.scale)  # frozen: calibration does not overwrite
    assert "frozen" in repr(q)


def test_quantizer_without_encoding_raises_naming_it():
    with pytest.raises(QuantizerError, match="'fc1.input' has no encoding yet"):
        QuantizeDequantize((), name="fc1.input")(torch.randn(3))


def test_quantize_and_dequantize_modules():
    x = torch.randn(16, 20)
    q = Quantize((16, 1), 8, True, out_dtype=torch.int8)
    with q.compute_encodings():
        q(x)
    codes = q(x)
    assert codes.dtype == torch.int8
    dq = Dequantize(q.get_encoding())
    qdq = QuantizeDequantize((16, 1), 8, True)
    qdq.set_encoding(q.get_encoding())
    assert torch.equal(dq(codes), qdq(x))


# ---- distributed --------------------------------------------------------------------------------------
def _dist_worker(rank, world, port, shards, out):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        x = shards[rank]
        for cls in ANALYZERS:
            a = cls((1, 6, 1, 1))
            if hasattr(a, "update_range"):  # two-pass: common range, then counts that add up exactly
                a.update_range(x)
                a.sync_range()
            a.update_stats(x)
            a.sync()
            e = a.compute_encodings(8, False)
            res[cls.__name__] = (e.scale.clone(), e.offset.clone())
        out[rank] = res
    finally:
        dist.destroy_process_group()


def test_sharded_calibration_equals_single_process():
    torch.manual_seed(0)
    shards = [torch.randn(3, 6, 5, 5) * (r + 1) + r for r in range(2)]
    with socket_port() as port:
        mgr = mp.Manager()
        out = mgr.dict()
        mp.spawn(_dist_worker, args=(2, port, shards, out), nprocs=2, join=True)
    allx = torch.cat(shards)
    for cls in ANALYZERS:
        a = cls((1, 6, 1, 1))
        a.update_stats(allx)
        e = a.compute_encodings(8, False)
        for rank in range(2):
            s, o = out[rank][cls.__name__]
            assert torch.equal(s, e.scale), cls.__name__
            assert torch.equal(o, e.offset), cls.__name__


class socket_port:
    def __enter__(self):
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        port = self.s.getsockname()[1]
        self.s.close()
        return port

    def __exit__(self, *a):
        return False
