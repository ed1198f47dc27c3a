"""The encoding that reconstructs a tensor best, chosen per encoding group (a channel, or the whole tensor).

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

__all__ = ["least_error", "least_error_encoding", "round_to_nearest_encodings"]


def _group_dims(x: torch.Tensor, enc: Encoding) -> tuple[int, ...]:
    """The dimensions of `x` that one scale of `enc` covers (those where the scale has size 1)."""
    s = _broadcast_to(enc.scale, x)
    return tuple(d for d in range(x.dim()) if s.shape[d] == 1)


def round_to_nearest_encodings(x: torch.Tensor, like: Encoding) -> list[Encoding]:
    """Round-to-nearest encodings of `x` that clip nothing, shaped, sized and on the grid of `like` (signed or
    not, strict or not): the observed range of each group, and for a signed symmetric encoding also
    absmax / qmax (the usual weight quantization)."""
    mn, mx, _ = ops.raw.minmax(x.detach().float(), list(_broadcast_to(like.scale, x).shape))
    mn, mx = mn.reshape(like.scale.shape), mx.reshape(like.scale.shape)
    out = [from_range(mn, mx, like.bitwidth, like.symmetric, signed=like.signed, strict=like.strict)]
    if like.symmetric and like.signed:
        amax = torch.maximum(mx, -mn)
        qmin, qmax = ops.grid(like.bitwidth, True, strict=like.strict)
        scale = torch.clamp(amax / qmax, min=min_scale(qmax - qmin))  # a zero channel keeps a valid scale
        out.append(from_scale_offset(scale, torch.zeros_like(scale), like.bitwidth, True, strict=like.strict))
    return out


def least_error(x: torch.Tensor, candidates: Sequence[Encoding],
                error: Optional[Callable[[Encoding], torch.Tensor]] = None) -> Encoding:
    """Per encoding group, the candidate with the least error; a tie keeps the earlier candidate. All
    candidates share shape, bit width, grid and block size.

    `error(enc)`: the error of candidate `enc` per group, shaped like `enc.scale` (a layer's output error,
    say); default: the sum of squared errors of quantize-dequantize of `x` (float64), which needs
    candidates without blocks."""
    if not candidates:
        raise ValueError("least_error needs at least one candidate encoding")
    first = candidates[0]
    for c in candidates[1:]:
        if (c.scale.shape != first.scale.shape or c.bitwidth != first.bitwidth or c.symmetric != first.symmetric
                or c.signed != first.signed or c.strict != first.strict or c.block_size != first.block_size):
            raise ValueError("least_error: candidates must share shape, bit width, grid (symmetry, "
                             "signedness, strictness) and block size")
    if error is None:
        if first.block_size is not None:
            raise ValueError("least_error: per-block candidates need an `error` function")
        dims = _group_dims(x, first)
        xd = x.detach()

        def error(enc: Encoding) -> torch.Tensor:
            e = (enc.quantize_dequantize(xd).double() - xd.double()).square()
            return (e.sum(dim=dims, keepdim=True) if dims else e).reshape(first.scale.shape)

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


def least_error_encoding(x: torch.Tensor, encoding: Encoding) -> Encoding:
    """`encoding`, with each group where round-to-nearest over the group's full range reconstructs `x` with
    a smaller squared error replaced by that round-to-nearest encoding (see the module's docstring)."""
    if encoding.block_size is not None:
        return encoding
    return least_error(x, [encoding, *round_to_nearest_encodings(x, encoding)])
