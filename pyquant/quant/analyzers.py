"""Encoding analyzers: statistics gathered over calibration batches, turned into encodings.

Every analyzer works on *groups* of elements that share one encoding: the analyzer's ``shape`` is the
encoding shape, right-aligned against the input like a broadcast (``(C, 1)`` per output channel of a
weight, ``(1, C, 1, 1)`` per channel of an NCHW activation, ``()`` per tensor, ``(C, K // 64)`` per block
of 64). All groups are processed in one kernel call; there is no Python loop over channels.

===============  =======================================================  ==========================
analyzer         encoding                                                 statistics
===============  =======================================================  ==========================
``MinMax``       the observed range                                        running min/max
``Sqnr``         least expected noise, clipped bins weighted by gamma      2048-bin histogram
``TfEnhanced``   ``Sqnr`` with 512 bins, range growth capped at 3x         512-bin histogram
``Mse``          least expected |error|^p (p = 2), finer candidate grid    512-bin histogram
``Percentile``   the p-th percentile of each side (50 <= p <= 100)         2048-bin histogram
``Entropy``      least KL divergence of the clipped distribution           2048-bin histogram of |x|
===============  =======================================================  ==========================

The histogram-based analyzers are defined in pyquant.quant.histogram_analyzers (and exported here).
Histograms follow AIMET's conventions (range from the first batch's finite min/max, growth by
re-binning old counts proportionally, search candidates of the SQNR analyzer), so encodings can be
compared channel by channel. NaN and ±inf are left out of every statistic, counted, and reported
once per analyzer with a warning; a batch that holds nothing else in a group adds nothing to that group
(not even the start of its histogram's range) and is named in a warning of its own.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch

from ..ops import raw
from .encoding import Encoding, from_range

op = raw

__all__ = ["EncodingAnalyzer", "MinMax", "Sqnr", "TfEnhanced", "Mse", "Percentile", "Entropy",
           "CalibrationError", "sqnr_candidates"]


class CalibrationError(RuntimeError):
    """Statistics that cannot give an encoding (none gathered, or a group with no finite value)."""


def _group_shape(shape: Sequence[int], x: torch.Tensor) -> tuple[int, ...]:
    shape = tuple(int(v) for v in shape)
    if len(shape) > x.dim():
        extra = shape[: len(shape) - x.dim()]
        if any(v != 1 for v in extra):
            raise ValueError(f"encoding shape {shape} has more dimensions than the input {tuple(x.shape)}")
        shape = shape[len(shape) - x.dim():]
    shape = (1,) * (x.dim() - len(shape)) + shape
    for d, (n, k) in enumerate(zip(x.shape, shape)):
        if k != 1 and (k <= 0 or n % k):
            raise ValueError(f"encoding shape {tuple(shape)} does not fit input {tuple(x.shape)} at dim {d}: "
                             f"each entry must be 1 or divide the input's size")
    return shape


def _widened_range(lo: Optional[torch.Tensor], hi: Optional[torch.Tensor], mn: torch.Tensor,
                   mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A running range (lo, hi) widened to take in a batch's (mn, mx); the batch's range when there is
    none yet."""
    if lo is None:
        return mn, mx
    return torch.minimum(lo, mn), torch.maximum(hi, mx)


class EncodingAnalyzer:
    """Base class: statistics per group, `compute_encodings` -> Encoding of the analyzer's shape."""

    def __init__(self, shape: Sequence[int] = (), *, name: Optional[str] = None):
        self.shape = tuple(int(v) for v in shape)
        self.name = name
        self._warned_nonfinite = False
        self.nonfinite = None  # per-group count of NaN/inf seen
        self.num_batches = 0

    # ---- helpers ----
    def _label(self) -> str:
        return f"{type(self).__name__} of quantizer '{self.name}'" if self.name else type(self).__name__

    def _note_nonfinite(self, nf: torch.Tensor, mn: torch.Tensor) -> None:
        """Counts a batch's NaN/inf values (`nf`, per group; `mn`: the batch's finite minimum, +inf in a group
        without a finite value) and warns: once per analyzer about NaN/inf values at all, and for every batch
        in which some group holds NaN/inf only -- that batch adds nothing to those groups."""
        self.nonfinite = nf if self.nonfinite is None else self.nonfinite + nf
        total = int(nf.sum())
        if not total:
            return
        dead = (nf > 0) & ~torch.isfinite(mn)
        ndead = int(dead.sum())
        if ndead:
            where = "" if dead.numel() == 1 else f" in {ndead} of its {dead.numel()} groups"
            warnings.warn(f"{self._label()}: calibration batch {self.num_batches} holds only NaN/inf values{where}; "
                          f"it is left out there (the encoding comes from the other batches)", RuntimeWarning,
                          stacklevel=3)
        elif not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"{self._label()}: calibration data holds {total} NaN/inf value(s); they are left out "
                          f"of the statistics (further batches are counted without warning)", RuntimeWarning,
                          stacklevel=3)

    def _require_stats(self) -> None:
        if self.num_batches == 0:
            raise CalibrationError(f"{self._label()}: compute_encodings called before any statistics were gathered "
                                   f"(run calibration data through update_stats first)")

    def _check_finite_groups(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        empty = ~(torch.isfinite(mn) & torch.isfinite(mx))
        if bool(empty.any()):
            idx = torch.nonzero(empty.flatten())[0].item()
            raise CalibrationError(f"{self._label()}: group {idx} of encoding shape {tuple(mn.shape)} saw no finite "
                                   f"value in {self.num_batches} batch(es) (they were empty or held NaN/inf only), "
                                   f"so it has no range")

    def _reshape_out(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.shape) if self.shape else t.reshape(())

    def _group_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Finite min, finite max and NaN/inf count of each group of x, in the analyzer's shape."""
        mn, mx, nf = op.minmax(x, list(_group_shape(self.shape, x)))
        return self._reshape_out(mn), self._reshape_out(mx), self._reshape_out(nf)

    # ---- interface ----
    def update_stats(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_encodings(self, bitwidth: int, symmetric: bool, *, signed: Optional[bool] = None,
                          strict: bool = False) -> Encoding:
        """The encoding of the statistics gathered so far on the grid `bitwidth`, `symmetric` (`signed=False`:
        unsigned symmetric; `strict`: the strict signed grid) name -- docs/design.md, 5.3."""
        raise NotImplementedError

    def observed_min(self) -> torch.Tensor:
        """The smallest finite value seen in each group (whether the data is one-sided)."""
        raise NotImplementedError

    def reset(self) -> None:
        self.nonfinite = None
        self.num_batches = 0
        self._warned_nonfinite = False

    def _state_tensors(self) -> dict[str, Optional[torch.Tensor]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        st = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in self._state_tensors().items()}
        st["num_batches"] = self.num_batches
        st["nonfinite"] = None if self.nonfinite is None else self.nonfinite.clone()
        st["kind"] = type(self).__name__
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"state of a {state.get('kind')} cannot be loaded into a {type(self).__name__}")
        for k in self._state_tensors():
            setattr(self, k, state[k])
        self.num_batches = int(state["num_batches"])
        self.nonfinite = state["nonfinite"]

    def merge(self, other: "EncodingAnalyzer") -> None:
        raise NotImplementedError

    def sync(self, process_group=None) -> None:
        """All-reduces the statistics over torch.distributed ranks (every rank ends with the merged
        statistics). Call it after the calibration batches, before compute_encodings."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
class MinMax(EncodingAnalyzer):
    """Running min/max of the finite values of each group."""

    def __init__(self, shape: Sequence[int] = (), *, name: Optional[str] = None):
        super().__init__(shape, name=name)
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None

    def update_stats(self, x: torch.Tensor) -> None:
        mn, mx, nf = self._group_minmax(x.detach())
        self._note_nonfinite(nf, mn)
        self.min, self.max = _widened_range(self.min, self.max, mn, mx)
        self.num_batches += 1

    def compute_encodings(self, bitwidth: int, symmetric: bool, *, signed: Optional[bool] = None,
                          strict: bool = False) -> Encoding:
        self._require_stats()
        self._check_finite_groups(self.min, self.max)
        return from_range(self.min, self.max, bitwidth, symmetric, signed=signed, strict=strict)

    def observed_min(self) -> torch.Tensor:
        self._require_stats()
        return self.min

    def reset(self) -> None:
        super().reset()
        self.min = self.max = None

    def _state_tensors(self):
        return {"min": self.min, "max": self.max}

    def merge(self, other: "MinMax") -> None:
        if other.num_batches == 0:
            return
        if self.num_batches == 0:
            self.load_state_dict(other.state_dict())
            return
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.nonfinite = self.nonfinite + other.nonfinite
        self.num_batches += other.num_batches

    def sync(self, process_group=None) -> None:
        import torch.distributed as dist
        _ensure_synced_batches(self, process_group)
        dist.all_reduce(self.min, op=dist.ReduceOp.MIN, group=process_group)
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX, group=process_group)
        dist.all_reduce(self.nonfinite, op=dist.ReduceOp.SUM, group=process_group)


def _ensure_synced_batches(a: EncodingAnalyzer, pg) -> None:
    import torch.distributed as dist
    n = torch.tensor([a.num_batches], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MIN, group=pg)
    if int(n) == 0:
        raise CalibrationError(f"{a._label()}: sync needs statistics on every rank; some rank has none")
    a.num_batches = int(n) if a.num_batches == 0 else a.num_batches


# The histogram-based analyzers subclass EncodingAnalyzer and use the functions above, so they are
# imported once those exist; pyquant.quant.analyzers keeps exporting them.
from .histogram_analyzers import Entropy, Mse, Percentile, Sqnr, TfEnhanced, sqnr_candidates  # noqa: E402
