"""Encodings: the scale/offset (and the range they came from) of one quantizer, and the range→encoding
rules of docs/design.md, 5.4 (AIMET-compatible)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .. import ops

MIN_SCALE = float(torch.finfo(torch.float32).eps)


def min_scale(num_steps: int) -> float:
    """Smallest scale an encoding may have (float32 eps; 0.01/num_steps for very wide grids)."""
    return min(MIN_SCALE, 0.01 / num_steps)


def check_grid_kind(symmetric: bool, signed: Optional[bool], strict: bool) -> bool:
    """The grid's sign for an encoding: symmetric encodings (offset 0) use the signed grid unless
    `signed=False` (unsigned symmetric: [0, 2^b-1] for non-negative data), strict ones the signed grid
    without its most negative code; asymmetric encodings always use the unsigned grid."""
    signed = symmetric if signed is None else bool(signed)
    if signed and not symmetric:
        raise ValueError("an asymmetric encoding lives on the unsigned grid (signed=True needs symmetric=True)")
    if strict and not (symmetric and signed):
        raise ValueError("strict grids are for symmetric encodings on the signed grid")
    return signed


class OnGrid:
    """`qmin`, `qmax` and `num_steps` of anything with `bitwidth`, `signed` and `strict` (docs/design.md,
    5.3): the signed grid ``[-2^(b-1), 2^(b-1)-1]`` (strict: ``[-(2^(b-1)-1), 2^(b-1)-1]``) or the
    unsigned grid ``[0, 2^b-1]``."""

    bitwidth: int
    signed: bool
    strict: bool

    @property
    def qmin(self) -> int:
        return ops.grid(self.bitwidth, self.signed, strict=self.strict)[0]

    @property
    def qmax(self) -> int:
        return ops.grid(self.bitwidth, self.signed, strict=self.strict)[1]

    @property
    def num_steps(self) -> int:
        return self.qmax - self.qmin


@dataclasses.dataclass
class Encoding(OnGrid):
    """scale/offset in block-broadcast shape (see pyquant.ops), with the grid they live on.

    ``x_hat = (clamp(round(x / scale) - offset, qmin, qmax) + offset) * scale``. Symmetric encodings have
    offset 0 and use the signed grid (``strict``: without its most negative code) or, with
    ``signed=False``, the unsigned grid (unsigned symmetric); asymmetric ones use the unsigned grid and an
    integer offset in ``[-qmax, -qmin]`` (the negative of ONNX's zero point).
    """

    scale: torch.Tensor
    offset: torch.Tensor
    bitwidth: int
    symmetric: bool
    min: torch.Tensor
    max: torch.Tensor
    block_size: Optional[tuple[int, ...]] = None  # elements per scale along each dim, when known
    signed: Optional[bool] = None  # the grid's sign; None: signed exactly when symmetric
    strict: bool = False

    def __post_init__(self) -> None:
        self.signed = check_grid_kind(self.symmetric, self.signed, self.strict)

    @property
    def shape(self) -> torch.Size:
        return self.scale.shape

    @property
    def granularity(self) -> str:
        n = sum(1 for k in self.scale.shape if k > 1)
        if self.scale.numel() == 1:
            return "per_tensor"
        return "per_channel" if n == 1 and self.block_size is None else "per_block"

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        s, o = _broadcast_to(self.scale, x), _broadcast_to(self.offset, x)
        return ops.raw.quantize_dequantize(x, s, o, self.qmin, self.qmax, 1.0)

    def quantize(self, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s, o = _broadcast_to(self.scale, x), _broadcast_to(self.offset, x)
        return ops.raw.quantize(x, s, o, self.qmin, self.qmax, out_dtype)

    def dequantize(self, q: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s, o = _broadcast_to(self.scale, q), _broadcast_to(self.offset, q)
        return ops.raw.dequantize(q, s, o, out_dtype)

    def to(self, device) -> "Encoding":
        return dataclasses.replace(self, scale=self.scale.to(device), offset=self.offset.to(device),
                                   min=self.min.to(device), max=self.max.to(device))

    def __repr__(self) -> str:
        def brief(t):
            t = t.detach().flatten().cpu()
            vals = ", ".join(f"{v:.4g}" for v in t[:3].tolist())
            return f"[{vals}{', ...' if t.numel() > 3 else ''}]"
        kind = "asym" if not self.symmetric else ("strict sym" if self.strict else "sym" if self.signed
                                                   else "unsigned sym")
        return (f"Encoding({self.granularity}, shape={tuple(self.scale.shape)}, bw={self.bitwidth}, "
                f"{kind}, scale={brief(self.scale)}, offset={brief(self.offset)})")


def _broadcast_to(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Right-aligns an encoding shape against x (as AIMET does) into block-broadcast form."""
    if p.dim() == x.dim():
        return p
    if p.dim() > x.dim():
        return p.reshape(p.shape[p.dim() - x.dim():])
    return p.reshape((1,) * (x.dim() - p.dim()) + tuple(p.shape))


def from_range(mn: torch.Tensor, mx: torch.Tensor, bitwidth: int, symmetric: bool,
               block_size: Optional[Sequence[int]] = None, *, signed: Optional[bool] = None,
               strict: bool = False) -> Encoding:
    """Encoding from a range (docs/design.md, 5.4): the range is widened to hold 0 and at least min_scale per
    step; asymmetric: s = (mx - mn)/N, o = clamp(round(mn/s) - qmin, -qmax, -qmin); symmetric:
    s = max(mx/qmax, -mn/-qmin), o = 0 (strict: qmin = -qmax); unsigned symmetric (`signed=False`):
    s = mx/qmax, o = 0 (negative values clip to 0)."""
    signed = check_grid_kind(symmetric, signed, strict)
    qmin, qmax = ops.grid(bitwidth, signed, strict=strict)
    n = qmax - qmin
    smin = min_scale(n)
    mn = torch.clamp(mn.float(), max=0.0)
    mx = torch.clamp(mx.float(), min=0.0)
    fmax = torch.finfo(torch.float32).max
    mn = mn.clamp(min=-fmax)
    mx = mx.clamp(max=fmax)
    if symmetric and not signed:  # unsigned symmetric: [0, qmax * s]
        mx = torch.where(mx / n < smin, mx + n * smin, mx)
        s = mx / qmax
        return Encoding(scale=s, offset=torch.zeros_like(s), bitwidth=bitwidth, symmetric=True,
                        min=torch.zeros_like(s), max=qmax * s,
                        block_size=tuple(block_size) if block_size is not None else None, signed=False)
    narrow = (mx - mn) / n < smin
    if symmetric:
        mx = torch.where(narrow, mx + qmax * smin, mx)
        mn = torch.where(narrow, mn + qmin * smin, mn)
        s = torch.maximum(mx / qmax, mn / qmin)
        o = torch.zeros_like(s)
        lo, hi = qmin * s, qmax * s
    else:
        mx = torch.where(narrow, mx + n * smin, mx)
        s = torch.clamp((mx - mn) / n, min=smin)
        o = torch.clamp(torch.round(mn / s) - qmin, -qmax, -qmin) + 0.0  # + 0.0: no negative zero
        lo, hi = (qmin + o) * s, (qmax + o) * s
    return Encoding(scale=s, offset=o, bitwidth=bitwidth, symmetric=symmetric, min=lo, max=hi,
                    block_size=tuple(block_size) if block_size is not None else None, signed=signed, strict=strict)


def from_scale_offset(scale: torch.Tensor, offset: torch.Tensor, bitwidth: int, symmetric: bool,
                      block_size: Optional[Sequence[int]] = None, *, signed: Optional[bool] = None,
                      strict: bool = False) -> Encoding:
    """Encoding from a scale and an offset on the grid `bitwidth`, `symmetric`, `signed`, `strict` name."""
    signed = check_grid_kind(symmetric, signed, strict)
    qmin, qmax = ops.grid(bitwidth, signed, strict=strict)
    scale, offset = scale.float(), offset.float()
    return Encoding(scale=scale, offset=offset, bitwidth=bitwidth, symmetric=symmetric,
                    min=(qmin + offset) * scale, max=(qmax + offset) * scale,
                    block_size=tuple(block_size) if block_size is not None else None, signed=signed, strict=strict)
