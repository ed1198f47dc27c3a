"""The encoding that reconstructs a tensor best, chosen per encoding group (a channel, a block or the whole tensor).

A histogram search (TF-enhanced, MSE) scores its candidates on bin centres of a 512-bin histogram. For a
weight -- a few dozen to a few thousand values per channel, spread thinly over the bins -- that score is
not the tensor's real reconstruction error, and on some channels the chosen range reconstructs the weight
worse than plain round-to-nearest over the channel's full range. A weight is all the data there is, so the
real error can be measured: `least_error_encoding` keeps the search's encoding for every group where it is
at least as good and takes round-to-nearest where that is better."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import ops
from .encoding import Encoding, _broadcast_to, from_range, from_scale_offset, min_scale
from .lpbq import LpbqEncoding

__all__ = ["least_error", "least_error_encoding", "round_to_nearest_encodings", "clipped_encodings",
           "CLIP_FACTORS"]


def _group_sum(e: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """Per-element values `e` summed over each encoding group of `enc` (a block, a channel or the whole
    tensor), in the encoding's shape."""
    s = _broadcast_to(enc.scale, e).shape
    split = [k for n, g in zip(e.shape, s) for k in (g, n // g)]  # each dim as (groups, elements per group)
    return e.reshape(split).sum(dim=tuple(range(1, 2 * e.dim(), 2))).reshape(enc.scale.shape)


def round_to_nearest_encodings(x: torch.Tensor, like: Encoding) -> list[Encoding]:
    """Round-to-nearest encodings of `x` that clip nothing, shaped, sized and on the grid of `like` (signed or
    not, strict or not): the observed range of each group, and for a signed symmetric encoding also
    absmax / qmax (the usual weight quantization)."""
    mn, mx, _ = ops.raw.minmax(x.detach().float(), list(_broadcast_to(like.scale, x).shape))
    mn, mx = mn.reshape(like.scale.shape), mx.reshape(like.scale.shape)
    out = [from_range(mn, mx, like.bitwidth, like.symmetric, like.block_size, signed=like.signed, strict=like.strict)]
    if like.symmetric and like.signed:
        amax = torch.maximum(mx, -mn)
        qmin, qmax = ops.grid(like.bitwidth, True, strict=like.strict)
        scale = torch.clamp(amax / qmax, min=min_scale(qmax - qmin))  # a zero channel keeps a valid scale
        out.append(from_scale_offset(scale, torch.zeros_like(scale), like.bitwidth, True, like.block_size,
                                     strict=like.strict))
    return out


CLIP_FACTORS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(1, 13))
"""Fractions of the full range tried by `clipped_encodings` (0.95 down to 0.4): at 4 bits a channel's best
range clips its extremes, by some 10-30% for bell-shaped weights."""


def clipped_encodings(x: torch.Tensor, like: Encoding,
                      factors: Sequence[float] = CLIP_FACTORS) -> list[Encoding]:
    """Round-to-nearest encodings of `x` over each group's full range shrunk by each of `factors`, on the grid
    of `like` (a signed symmetric grid: absmax / qmax scaled; otherwise the range about its middle): the
    candidates of a per-group clipping search, `least_error(x, [like, *clipped_encodings(x, like)])`."""
    if not factors or any(not (0.0 < float(f) <= 1.0) for f in factors):
        raise ValueError(f"factors must be fractions in (0, 1], got {list(factors)!r}")
    full = round_to_nearest_encodings(x, like)[-1]
    out = []
    for f in factors:
        if full.symmetric:
            qmin, qmax = ops.grid(full.bitwidth, full.signed, strict=full.strict)
            scale = torch.clamp(full.scale * float(f), min=min_scale(qmax - qmin))
            out.append(from_scale_offset(scale, full.offset, full.bitwidth, True, full.block_size,
                                         signed=full.signed, strict=full.strict))
        else:
            mid, half = (full.max + full.min) / 2, (full.max - full.min) / 2 * float(f)
            out.append(from_range(mid - half, mid + half, full.bitwidth, False, full.block_size,
                                  signed=full.signed, strict=full.strict))
    return out


def least_error(x: torch.Tensor, candidates: Sequence[Encoding],
                error: Optional[Callable[[Encoding], torch.Tensor]] = None) -> Encoding:
    """Per encoding group, the candidate with the least error; a tie keeps the earlier candidate. All
    candidates share shape, bit width, grid and blocks.

    `error(enc)`: the error of candidate `enc` per group, shaped like `enc.scale` (a layer's output error,
    say); default: the sum of squared errors of quantize-dequantize of `x` over each group (float64)."""
    if not candidates:
        raise ValueError("least_error needs at least one candidate encoding")
    first = candidates[0]
    for c in candidates[1:]:
        if (c.scale.shape != first.scale.shape or c.bitwidth != first.bitwidth or c.symmetric != first.symmetric
                or c.signed != first.signed or c.strict != first.strict
                or (c.block_size is None) != (first.block_size is None)):
            raise ValueError("least_error: candidates must share shape, bit width, grid (symmetry, signedness, "
                             "strictness) and blocks")
    if error is None:
        xd = x.detach()

        def error(enc: Encoding) -> torch.Tensor:
            return _squared_error(xd, enc)

    best_err = error(first).reshape(first.scale.shape)
    scale, offset = first.scale.clone(), first.offset.clone()
    for c in candidates[1:]:
        err = error(c).reshape(first.scale.shape)
        better = err < best_err
        scale = torch.where(better, c.scale, scale)
        offset = torch.where(better, c.offset, offset)
        best_err = torch.where(better, err, best_err)
    if torch.equal(scale, first.scale) and torch.equal(offset, first.offset):
        return first  # nothing better: the encoding itself, bit for bit
    return from_scale_offset(scale, offset, first.bitwidth, first.symmetric, first.block_size, signed=first.signed,
                             strict=first.strict)


_CHUNK_ELEMENTS = 1 << 22
"""Elements of `x` whose float64 error is formed at once: a large weight (a language model's embedding table)
is scored a few thousand rows at a time, not with several float64 copies of the whole table."""


def _squared_error(x: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """The sum of squared errors of quantize-dequantize of `x` per group of `enc` (float64), a slice of rows at
    a time where the groups do not span rows (one scale row per row of `x`)."""
    rows = x.shape[0] if x.dim() else 1
    per_row = x.dim() > 0 and enc.scale.dim() == x.dim() and enc.scale.shape[0] == rows
    if not per_row or x.numel() <= _CHUNK_ELEMENTS:
        return _group_sum((enc.quantize_dequantize(x).double() - x.double()).square(), enc)
    step = max(1, _CHUNK_ELEMENTS // max(1, x.numel() // rows))
    parts = []
    for i in range(0, rows, step):
        sub = from_scale_offset(enc.scale[i:i + step], enc.offset[i:i + step], enc.bitwidth, enc.symmetric,
                                enc.block_size, signed=enc.signed, strict=enc.strict)
        xs = x[i:i + step]
        parts.append(_group_sum((sub.quantize_dequantize(xs).double() - xs.double()).square(), sub))
    return torch.cat(parts, dim=0)


def least_error_encoding(x: torch.Tensor, encoding: Encoding) -> Encoding:
    """`encoding`, with each group where round-to-nearest over the group's full range reconstructs `x` with
    a smaller squared error replaced by that round-to-nearest encoding (see the module's docstring); a group
    is a channel, a block or the whole tensor. LPBQ encodings are returned as they are: their block scales
    are tied to a per-channel scale, so a block's choice is not its own."""
    if isinstance(encoding, LpbqEncoding):
        return encoding
    return least_error(x, [encoding, *round_to_nearest_encodings(x, encoding)])
