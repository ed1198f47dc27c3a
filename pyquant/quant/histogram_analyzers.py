"""Histogram-based encoding analyzers (``Sqnr``, ``TfEnhanced``, ``Mse``, ``Percentile``, ``Entropy``; see
pyquant.quant.analyzers for the table of all analyzers): per-group histograms kept with AIMET's
conventions, and the searches that turn them into encodings."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import ops
from ..ops import raw as op
from .analyzers import CalibrationError, EncodingAnalyzer, _ensure_synced_batches, _group_shape, _widened_range
from .encoding import Encoding, check_grid_kind, from_range, from_scale_offset, min_scale

__all__ = ["Sqnr", "TfEnhanced", "Mse", "Percentile", "Entropy", "sqnr_candidates"]


class _Histogram(EncodingAnalyzer):
    """Per-group histograms over [lo, hi] with `num_bins` bins (AIMET's conventions).

    The first batch sets each group's range to its finite min/max (a constant group gets ±0.5);
    later batches widen the range (up to `growth_limit` times the first range's width on each side
    in total, when given) and re-bin the old counts proportionally. Values outside the range land in
    the end bins. `update_range(x)` may be called on all batches first (e.g. with `sync`) to fix the
    range before any counting, which makes histograms of shards add up exactly.
    """

    default_bins = 2048

    def __init__(self, shape: Sequence[int] = (), num_bins: Optional[int] = None, *,
                 growth_limit: Optional[float] = None, name: Optional[str] = None):
        super().__init__(shape, name=name)
        self.num_bins = int(num_bins or self.default_bins)
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if growth_limit is not None and not growth_limit >= 1.0:
            raise ValueError(f"growth_limit must be >= 1 (or None), got {growth_limit}")
        self.growth_limit = growth_limit
        self.counts: Optional[torch.Tensor] = None   # [*shape, nb] int64
        self.lo: Optional[torch.Tensor] = None       # histogram range (AIMET's stat.min / stat.max)
        self.hi: Optional[torch.Tensor] = None
        self.limit_lo: Optional[torch.Tensor] = None
        self.limit_hi: Optional[torch.Tensor] = None
        self.data_min: Optional[torch.Tensor] = None  # finite min/max of all data seen
        self.data_max: Optional[torch.Tensor] = None

    # ---- the histogram's edges (float32, as AIMET computes them) ----
    def _edges(self, lo, hi):
        """(edges[0], edges[-1], bin width) with a constant range widened to ±0.5."""
        const = lo == hi
        lo2 = torch.where(const, lo - 0.5, lo)
        hi2 = torch.where(const, hi + 0.5, hi)
        w = (hi2 - lo2) / self.num_bins
        e_last = self.num_bins * w + lo2
        e_first = 0 * w + lo2
        return e_first, e_last, w

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def update_range(self, x: torch.Tensor) -> None:
        """Widens the range to x's finite min/max without counting (see class doc)."""
        mn, mx, _ = self._group_minmax(self._transform(x.detach()))
        self.lo, self.hi = _widened_range(self.lo, self.hi, mn, mx)

    def _first_range(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range a group's histogram starts with, from the first batch with finite values in it."""
        return mn, mx

    def _set_limits(self, groups: Optional[torch.Tensor] = None) -> None:
        """The growth limits of `groups` (all when None) from their current range."""
        if self.growth_limit is None:
            return
        e0, en, _ = self._edges(self.lo, self.hi)
        half = self.growth_limit * (en - e0) / 2
        if groups is None:
            self.limit_lo, self.limit_hi = e0 - half, en + half
        else:
            self.limit_lo = torch.where(groups, e0 - half, self.limit_lo)
            self.limit_hi = torch.where(groups, en + half, self.limit_hi)

    def update_stats(self, x: torch.Tensor) -> None:
        x = self._transform(x.detach())
        g = _group_shape(self.shape, x)
        mn, mx, nf = op.minmax(x, list(g))
        mn, mx, nf = self._reshape_out(mn), self._reshape_out(mx), self._reshape_out(nf)
        self._note_nonfinite(nf, mn)
        fin = torch.isfinite(mn)
        # Groups that have seen no finite value yet (earlier batches empty or all NaN/inf) have a placeholder
        # range and no counts: their first finite batch starts their range, as a first batch would.
        unranged = None if self.data_min is None else ~torch.isfinite(self.data_min)
        self.data_min, self.data_max = _widened_range(self.data_min, self.data_max, mn, mx)
        nb = self.num_bins
        if self.counts is None:
            if self.lo is None:  # range from this batch (groups without finite values get a placeholder range)
                lo, hi = self._first_range(mn, mx)
                self.lo = torch.where(fin, lo, torch.zeros_like(lo))
                self.hi = torch.where(fin, hi, torch.zeros_like(hi))
            else:
                self.lo = torch.where(torch.isfinite(self.lo), self.lo, torch.zeros_like(self.lo))
                self.hi = torch.where(torch.isfinite(self.hi), self.hi, torch.zeros_like(self.hi))
            self._set_limits()
            self.counts = None
        else:
            first = fin & unranged if unranged is not None else torch.zeros_like(fin)
            if bool(first.any()):
                lo, hi = self._first_range(mn, mx)
                self.lo = torch.where(first, lo, self.lo)
                self.hi = torch.where(first, hi, self.hi)
                self._set_limits(first)
            lim_lo = self.limit_lo if self.limit_lo is not None else torch.full_like(self.lo, -math.inf)
            lim_hi = self.limit_hi if self.limit_hi is not None else torch.full_like(self.hi, math.inf)
            e0, en, _ = self._edges(self.lo, self.hi)
            new_lo = torch.where(fin, torch.minimum(torch.maximum(mn, lim_lo), e0), e0)
            new_hi = torch.where(fin, torch.maximum(torch.minimum(mx, lim_hi), en), en)
            grow = ((new_lo != self.lo) | (new_hi != self.hi)) & ~first
            if bool(grow.any()):
                lo_n = torch.where(grow, new_lo, self.lo)
                hi_n = torch.where(grow, new_hi, self.hi)
                self.counts = torch.where(grow.unsqueeze(-1), self._rebin(self.counts, self.lo, self.hi, lo_n, hi_n),
                                          self.counts)
                self.lo, self.hi = lo_n, hi_n
        e0, en, _ = self._edges(self.lo, self.hi)
        gs = g if len(g) else ()
        new = op.histogram(x, e0.reshape(gs).contiguous(), (en - e0).reshape(gs).contiguous(), nb)
        new = new.reshape(self.lo.shape + (nb,))
        if self.counts is None:
            self.counts = new
        else:
            self.counts += new
        self.num_batches += 1

    def _rebin(self, counts, lo, hi, lo_n, hi_n):
        """Old counts over [lo, hi] onto [lo_n, hi_n]: each old bin is split between the (at most two)
        new bins it overlaps, in proportion to the overlap, rounded to whole counts."""
        nb = self.num_bins
        e0, _, w_old = self._edges(lo, hi)
        n0, _, w_new = self._edges(lo_n, hi_n)
        G = counts.numel() // nb
        c = counts.reshape(G, nb).double()
        e0, w_old, n0, w_new = (t.reshape(G, 1) for t in (e0, w_old, n0, w_new))
        j = torch.arange(nb, device=counts.device, dtype=torch.float32).unsqueeze(0)
        start = j * w_old + e0
        d = torch.clamp(((start - n0) / w_new).to(torch.int32), max=nb - 1).long()
        end_d = n0 + w_new * (d + 1).float()
        part = torch.minimum(torch.round(((end_d - start) / w_old).double() * c), c)
        rest = c - part
        d2 = torch.clamp(((start + w_new - n0) / w_new).to(torch.int32), max=nb - 1).long()
        out = torch.zeros_like(c)
        out.scatter_add_(1, d.clamp(min=0), part)
        out.scatter_add_(1, d2.clamp(min=0), rest)
        return out.round().to(torch.int64).reshape(counts.shape)

    def _state_tensors(self):
        return {"counts": self.counts, "lo": self.lo, "hi": self.hi, "limit_lo": self.limit_lo,
                "limit_hi": self.limit_hi, "data_min": self.data_min, "data_max": self.data_max}

    def reset(self) -> None:
        super().reset()
        for k in self._state_tensors():
            setattr(self, k, None)

    def merge(self, other: "_Histogram") -> None:
        """Adds another analyzer's histograms (same shape and bins): both are re-binned onto the
        union of the ranges (no re-binning where the ranges already agree)."""
        if type(other) is not type(self) or other.num_bins != self.num_bins or other.shape != self.shape:
            raise ValueError("merge needs an analyzer of the same kind, shape and number of bins")
        if other.num_batches == 0:
            return
        if self.num_batches == 0:
            self.load_state_dict(other.state_dict())
            return
        # a group that saw no finite value on one side has a placeholder range there: the other side's counts
        mine, theirs = torch.isfinite(self.data_min), torch.isfinite(other.data_min)
        both = mine & theirs
        lo = torch.where(both, torch.minimum(self.lo, other.lo), torch.where(mine, self.lo, other.lo))
        hi = torch.where(both, torch.maximum(self.hi, other.hi), torch.where(mine, self.hi, other.hi))
        if self.limit_lo is not None and other.limit_lo is not None:
            self.limit_lo = torch.where(mine, self.limit_lo, other.limit_lo)
            self.limit_hi = torch.where(mine, self.limit_hi, other.limit_hi)
        a = self._rebin_if(self.counts, self.lo, self.hi, lo, hi)
        b = self._rebin_if(other.counts, other.lo, other.hi, lo, hi)
        self.counts, self.lo, self.hi = a + b, lo, hi
        self.data_min = torch.minimum(self.data_min, other.data_min)
        self.data_max = torch.maximum(self.data_max, other.data_max)
        self.nonfinite = self.nonfinite + other.nonfinite
        self.num_batches += other.num_batches

    def _rebin_if(self, counts, lo, hi, lo_n, hi_n):
        same = (lo == lo_n) & (hi == hi_n)
        if bool(same.all()):
            return counts
        return torch.where(same.unsqueeze(-1), counts, self._rebin(counts, lo, hi, lo_n, hi_n))

    def sync_range(self, process_group=None) -> None:
        """All-reduces the ranges set by update_range, so that every rank then counts into the same bins
        (two-pass calibration: update_range on all batches, sync_range, update_stats, sync)."""
        import torch.distributed as dist
        if self.lo is None:
            raise CalibrationError(f"{self._label()}: sync_range needs update_range first")
        dist.all_reduce(self.lo, op=dist.ReduceOp.MIN, group=process_group)
        dist.all_reduce(self.hi, op=dist.ReduceOp.MAX, group=process_group)

    def sync(self, process_group=None) -> None:
        import torch.distributed as dist
        _ensure_synced_batches(self, process_group)
        lo, hi = self.lo.clone(), self.hi.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=process_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=process_group)
        self.counts = self._rebin_if(self.counts, self.lo, self.hi, lo, hi)
        self.lo, self.hi = lo, hi
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=process_group)
        dist.all_reduce(self.data_min, op=dist.ReduceOp.MIN, group=process_group)
        dist.all_reduce(self.data_max, op=dist.ReduceOp.MAX, group=process_group)
        dist.all_reduce(self.nonfinite, op=dist.ReduceOp.SUM, group=process_group)

    def _flat(self):
        """counts [G, nb], bin centres c0 [G] and widths bw [G] (AIMET's centre arithmetic)."""
        nb = self.num_bins
        G = self.counts.numel() // nb
        e0, _, w = self._edges(self.lo, self.hi)
        e1 = 1 * w + self._edges(self.lo, self.hi)[0]
        bw = (e1 - e0).reshape(G)
        c0 = (e0.reshape(G) + bw / 2)
        return self.counts.reshape(G, nb), c0.contiguous(), bw.contiguous()

    def observed_min(self) -> torch.Tensor:
        self._require_stats()
        return self.data_min

    def _range_for_search(self):
        self._require_stats()
        self._check_finite_groups(self.data_min, self.data_max)
        return self.lo, self.hi


# ------------------------------------------------------------------------------------------------
def sqnr_candidates(lo: torch.Tensor, hi: torch.Tensor, num_steps: int, symmetric: bool,
                    asym_deltas: int = 17, sym_deltas: int = 101, offsets: int = 21, signed: bool = True):
    """Candidate (delta, offset) pairs per group, [G, C] each, on the unsigned grid 0..num_steps
    (value of code q: (q + offset) * delta), following AIMET's SQNR analyzer (float32 arithmetic):

    - asymmetric: deltas D*k/(A-1), k = 1..A, with D = (hi - lo)/ns; offsets spread over [-ns, 0] plus
      the observed one; every pair is clipped to the observed range and re-derived.
    - symmetric: deltas D*k/(S-1), k = 1..S, with D = 2*max(hi, -lo)/ns, and the offset -ns//2... made
      signed by the caller; unsigned symmetric (`signed=False`): D = hi/ns and offset 0.
    """
    ns = num_steps
    smin = min_scale(ns)
    lo = torch.clamp(lo.float(), max=0.0).reshape(-1, 1)
    hi = torch.clamp(hi.float(), min=0.0).reshape(-1, 1)
    hi = torch.maximum(hi, lo + smin * ns)
    G = lo.shape[0]
    dev = lo.device
    if symmetric:
        D = 2 * torch.maximum(hi, -lo) / ns if signed else hi / ns
        k = torch.arange(1, sym_deltas + 1, device=dev, dtype=torch.float32)
        d = torch.clamp(D * k / (sym_deltas - 1), min=smin)
        o = torch.full_like(d, float((-ns) // 2) if signed else 0.0)
        return d.contiguous(), o.contiguous()
    D = (hi - lo) / ns
    o_obs = torch.round(lo / D)
    obs_lo = D * o_obs
    obs_hi = obs_lo + D * ns
    k = torch.arange(1, asym_deltas + 1, device=dev, dtype=torch.float32)
    d0 = D * k / (asym_deltas - 1)                                          # [G, A]
    n_off = min(ns + 2, offsets)
    st = ns / (n_off - 2)
    offs = torch.round(torch.arange(-ns, st, st, device=dev, dtype=torch.float32))
    o0 = torch.cat([offs.expand(G, -1), o_obs], dim=1)                      # [G, K]
    d0 = d0.unsqueeze(2)                                                    # [G, A, 1]
    o0 = o0.unsqueeze(1)                                                    # [G, 1, K]
    tmin = torch.maximum(obs_lo.unsqueeze(2), d0 * o0)
    tmax = torch.minimum(obs_hi.unsqueeze(2), d0 * o0 + d0 * ns)
    d = torch.clamp((tmax - tmin) / ns, min=smin)
    o = torch.round(tmin / d)
    return d.reshape(G, -1).contiguous(), o.reshape(G, -1).contiguous()


class Sqnr(_Histogram):
    """Least expected quantization noise over the histogram (clipped bins weighted by `gamma`).

    Candidates and noise model as AIMET's SqnrEncodingAnalyzer: asymmetric 17 deltas x 21 offsets,
    symmetric 101 deltas, squared error at bin centres, gamma = 3."""

    default_bins = 2048
    p = 2.0

    def __init__(self, shape: Sequence[int] = (), num_bins: Optional[int] = None, *,
                 asymmetric_delta_candidates: int = 17, symmetric_delta_candidates: int = 101,
                 offset_candidates: int = 21, gamma: float = 3.0, growth_limit: Optional[float] = None,
                 name: Optional[str] = None):
        super().__init__(shape, num_bins, growth_limit=growth_limit, name=name)
        if asymmetric_delta_candidates < 2 or symmetric_delta_candidates < 2 or offset_candidates < 3:
            raise ValueError("need at least 2 delta candidates and 3 offset candidates")
        if not gamma >= 1.0:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.asym_deltas = asymmetric_delta_candidates
        self.sym_deltas = symmetric_delta_candidates
        self.offsets = offset_candidates
        self.gamma = float(gamma)

    def compute_encodings(self, bitwidth: int, symmetric: bool, *, signed: Optional[bool] = None,
                          strict: bool = False) -> Encoding:
        lo, hi = self._range_for_search()
        signed = check_grid_kind(symmetric, signed, strict)
        qmin, qmax = ops.grid(bitwidth, signed, strict=strict)
        ns = qmax - qmin
        counts, c0, bw = self._flat()
        d, o = sqnr_candidates(lo, hi, ns, symmetric, self.asym_deltas, self.sym_deltas, self.offsets, signed)
        best, _ = op.search(counts, c0, bw, d, o, ns, self.gamma, self.p)
        d_best = d.gather(1, best.unsqueeze(1)).squeeze(1)
        o_best = o.gather(1, best.unsqueeze(1)).squeeze(1)
        if symmetric:  # unsigned-grid offset -ns//2 is offset 0 on the signed grid
            o_best = torch.zeros_like(o_best)
        return from_scale_offset(self._reshape_out(d_best), self._reshape_out(o_best), bitwidth, symmetric,
                                 signed=signed, strict=strict)


class TfEnhanced(Sqnr):
    """AIMET's TF-enhanced scheme: ``Sqnr`` with 512 bins and range growth capped at 3x."""

    default_bins = 512

    def __init__(self, shape: Sequence[int] = (), num_bins: Optional[int] = None, *,
                 growth_limit: Optional[float] = 3.0, name: Optional[str] = None, **kw):
        super().__init__(shape, num_bins, growth_limit=growth_limit, name=name, **kw)


class Mse(Sqnr):
    """Least expected |error|^p (p = 2 by default) over a finer candidate grid, no clipping weight."""

    default_bins = 512

    def __init__(self, shape: Sequence[int] = (), num_bins: Optional[int] = None, *, p: float = 2.0,
                 asymmetric_delta_candidates: int = 33, symmetric_delta_candidates: int = 201,
                 offset_candidates: int = 33, growth_limit: Optional[float] = None, name: Optional[str] = None):
        super().__init__(shape, num_bins, asymmetric_delta_candidates=asymmetric_delta_candidates,
                         symmetric_delta_candidates=symmetric_delta_candidates,
                         offset_candidates=offset_candidates, gamma=1.0, growth_limit=growth_limit, name=name)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.p = float(p)


class Percentile(_Histogram):
    """Range from the p-th percentile of each side (p in [50, 100]; 100 is the full range), read off
    the histogram as AIMET does (the left edge of the bin where the cumulative count reaches it)."""

    default_bins = 2048

    def __init__(self, shape: Sequence[int] = (), num_bins: Optional[int] = None, *, percentile: float = 99.99,
                 name: Optional[str] = None):
        super().__init__(shape, num_bins, name=name)
        self.set_percentile(percentile)

    def set_percentile(self, percentile: float) -> None:
        if not 50.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {percentile}")
        self.percentile = float(percentile)

    def compute_encodings(self, bitwidth: int, symmetric: bool, *, signed: Optional[bool] = None,
                          strict: bool = False) -> Encoding:
        lo, hi = self._range_for_search()
        counts = self.counts.reshape(-1, self.num_bins)
        e0, en, w = (t.reshape(-1, 1) for t in self._edges(lo, hi))
        if self.percentile == 100.0:
            mn, mx = e0.reshape(-1), en.reshape(-1)
        else:
            cum = torch.cumsum(counts, dim=1).double()
            total = cum[:, -1:]
            i_max = torch.searchsorted(cum, total * (self.percentile / 100.0))
            i_min = torch.searchsorted(cum, total * (1.0 - self.percentile / 100.0))
            mn = (i_min.float() * w + e0).reshape(-1)
            mx = (i_max.float() * w + e0).reshape(-1)
        return from_range(self._reshape_out(mn), self._reshape_out(mx), bitwidth, symmetric, signed=signed,
                          strict=strict)


class Entropy(_Histogram):
    """Clipping threshold with the least KL divergence between the clipped, quantized distribution of
    |x| and the original (TensorRT's calibration), on a 2048-bin histogram of |x| over [0, max|x|].

    Symmetric: range [-T, T]. Asymmetric: [0, T] with 2^bits levels when the data is one-sided
    (min >= 0, e.g. after ReLU), else the data range clipped to [-T, T]."""

    default_bins = 2048

    def __init__(self, shape: Sequence[int] = (), num_bins: Optional[int] = None, *, name: Optional[str] = None):
        super().__init__(shape, num_bins, name=name)
        self.signed_min: Optional[torch.Tensor] = None
        self.signed_max: Optional[torch.Tensor] = None

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()

    def _first_range(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(mx), mx  # mx: max |x| (the histogram is of |x|)

    def observed_min(self) -> torch.Tensor:
        self._require_stats()
        return self.signed_min

    def update_stats(self, x: torch.Tensor) -> None:
        x = x.detach()
        mn, mx, _ = self._group_minmax(x)
        self.signed_min, self.signed_max = _widened_range(self.signed_min, self.signed_max, mn, mx)
        if self.lo is None:  # the histogram of |x| starts at 0
            amax = torch.maximum(mn.abs(), mx.abs())
            amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
            self.lo, self.hi = torch.zeros_like(amax), amax
        super().update_stats(x)

    def update_range(self, x: torch.Tensor) -> None:
        super().update_range(x)
        self.lo = torch.zeros_like(self.lo)

    def _state_tensors(self):
        st = super()._state_tensors()
        st.update(signed_min=self.signed_min, signed_max=self.signed_max)
        return st

    def merge(self, other: "Entropy") -> None:
        smin, smax = other.signed_min, other.signed_max
        super().merge(other)
        if smin is not None and self.signed_min is not None and self.signed_min is not smin:
            self.signed_min = torch.minimum(self.signed_min, smin)
            self.signed_max = torch.maximum(self.signed_max, smax)

    def sync(self, process_group=None) -> None:
        import torch.distributed as dist
        super().sync(process_group)
        dist.all_reduce(self.signed_min, op=dist.ReduceOp.MIN, group=process_group)
        dist.all_reduce(self.signed_max, op=dist.ReduceOp.MAX, group=process_group)

    def compute_encodings(self, bitwidth: int, symmetric: bool, *, signed: Optional[bool] = None,
                          strict: bool = False) -> Encoding:
        lo, hi = self._range_for_search()
        self._check_finite_groups(self.signed_min, self.signed_max)
        signed = check_grid_kind(symmetric, signed, strict)
        one_sided = (self.signed_min >= 0).reshape(-1)
        counts = self.counts.reshape(-1, self.num_bins)
        e0, _, w = (t.reshape(-1) for t in self._edges(lo, hi))
        levels = 2 ** (bitwidth - 1)
        if (not symmetric or not signed) and bool(one_sided.all()):
            levels = 2 ** bitwidth
        levels = min(levels, self.num_bins)
        best_i, _ = op.entropy_search(counts, levels)
        t = best_i.float() * w + e0                     # right edge of the last kept bin
        t = self._reshape_out(t)
        if symmetric:
            return from_range(-t, t, bitwidth, True, signed=signed, strict=strict)
        mn = torch.where(self.signed_min >= 0, torch.zeros_like(t), torch.maximum(self.signed_min, -t))
        mx = torch.minimum(self.signed_max, t)
        return from_range(mn, mx, bitwidth, False)
