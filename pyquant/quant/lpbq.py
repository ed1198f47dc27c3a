"""Low-power blockwise quantization (LPBQ): per-block weight scales stored as small integers under one
float scale per output channel, so that a target keeps one float scale per channel and the codes times
their block's integer scale fit a wider integer grid.

With `b` the grid's bit width (the codes, e.g. 4) and `d` the decompressed bit width (e.g. 8), `k = d - b`
is the number of bits of the integer block scales. From per-block float scales `s` (calibrated as for any
per-block encoding) of one channel (docs/design.md, 5.12):

    c     = max(s over the channel's blocks) / 2^k        the per-channel float scale
    n     = clamp(rint(s / c), 1, 2^k)                    the per-block integer scales
    scale = c * n                                         the block scale the simulation uses

The largest block of each channel gets n = 2^k exactly. The codes stay on the symmetric `b`-bit grid, so
`|code * n| <= 2^(b-1) * 2^k = 2^(d-1)`: one step past the signed `d`-bit grid at the very bottom, as
AIMET defines it (its files write the offset of the `d`-bit grid, -2^(d-1))."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..ops import raw
from .analyzers import EncodingAnalyzer
from .encoding import Encoding, _broadcast_to, from_scale_offset
from .quantizer import QuantizeDequantize, QuantizerError

__all__ = ["LpbqEncoding", "LpbqQuantizeDequantize", "lpbq_scales", "lpbq_encoding", "block_axis"]


def block_axis(shape: Sequence[int], block_size: Optional[Sequence[int]]) -> int:
    """The dimension of an encoding shape along which its blocks lie: the one whose block length is above 1
    (`block_size` right-aligned against `shape`). ValueError when there is not exactly one."""
    if block_size is None:
        raise ValueError(f"an LPBQ encoding needs a block_size; scale shape {tuple(shape)} has none")
    bs = [1] * (len(shape) - len(block_size)) + [int(b) for b in block_size][-len(shape):]
    axes = [d for d, b in enumerate(bs) if b > 1]
    if len(axes) != 1:
        raise ValueError(f"an LPBQ encoding has blocks along exactly one axis; block_size {tuple(block_size)} "
                         f"against scale shape {tuple(shape)} gives {len(axes)}")
    return axes[0]


def lpbq_scales(block_scale: torch.Tensor, int_bits: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel float scale, per-block integer scale) of per-block float scales `block_scale` whose blocks
    lie along `axis`: ``c = amax(s, axis) / 2^int_bits``, ``n = clamp(rint(s / c), 1, 2^int_bits)``."""
    if not 1 <= int_bits <= 15:
        raise ValueError(f"int_bits (the integer block scales' bits, decompressed_bw - bitwidth) must be in "
                         f"1..15, got {int_bits}")
    s = block_scale.detach().float()
    c = s.amax(dim=axis, keepdim=True) / float(2 ** int_bits)  # a power of two: exact
    n = raw.quantize(s, c, torch.zeros_like(c), 1, 2 ** int_bits, torch.float32)
    return c, n


@dataclasses.dataclass(repr=False)
class LpbqEncoding(Encoding):
    """A per-block symmetric encoding whose block scales are `per_channel_scale * int_scale`
    (`scale` holds that product). `per_channel_scale` has the scale's shape with 1 along the block axis;
    `int_scale` holds integers in 1..2^(decompressed_bw - bitwidth)."""

    per_channel_scale: Optional[torch.Tensor] = None
    int_scale: Optional[torch.Tensor] = None
    decompressed_bw: Optional[int] = None

    def to(self, device) -> "LpbqEncoding":
        return dataclasses.replace(super().to(device), per_channel_scale=self.per_channel_scale.to(device),
                                   int_scale=self.int_scale.to(device))

    def __repr__(self) -> str:
        return super().__repr__().replace("Encoding(", f"LpbqEncoding(decompressed_bw={self.decompressed_bw}, ", 1)


def lpbq_encoding(per_channel_scale: torch.Tensor, int_scale: torch.Tensor, bitwidth: int, decompressed_bw: int,
                  block_size: Sequence[int], *, strict: bool = False) -> LpbqEncoding:
    """The LPBQ encoding with the given per-channel float scales and per-block integer scales (checked: the
    integer scales lie in 1..2^(decompressed_bw - bitwidth) and the per-channel scales are positive)."""
    k = int(decompressed_bw) - int(bitwidth)
    if not 1 <= k <= 15:
        raise ValueError(f"decompressed_bw must exceed bitwidth by 1..15 bits, got decompressed_bw={decompressed_bw}, "
                         f"bitwidth={bitwidth}")
    c, n = per_channel_scale.float(), int_scale.float()
    if c.dim() != n.dim() or any(a not in (1, b) for a, b in zip(c.shape, n.shape)):
        raise ValueError(f"per_channel_scale of shape {tuple(c.shape)} does not broadcast to the integer scales' "
                         f"shape {tuple(n.shape)} (it needs the same rank, 1 along the block axis)")
    if not bool(((n >= 1) & (n <= 2 ** k) & (n == torch.round(n))).all()):
        raise ValueError(f"integer block scales must be integers in 1..{2 ** k} (decompressed_bw {decompressed_bw}, "
                         f"bitwidth {bitwidth}), got values from {float(n.min())} to {float(n.max())}")
    if not bool((torch.isfinite(c) & (c > 0)).all()):
        raise ValueError("per-channel scales must be positive and finite")
    base = from_scale_offset(c * n, torch.zeros_like(n), bitwidth, True, block_size, strict=strict)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Encoding)}
    return LpbqEncoding(**fields, per_channel_scale=c.clone(), int_scale=n.clone(),
                        decompressed_bw=int(decompressed_bw))


class LpbqQuantizeDequantize(QuantizeDequantize):
    """A symmetric per-block weight quantizer whose block scales are LPBQ's: one float scale per channel
    times a `decompressed_bw - bitwidth`-bit integer per block (see the module's docstring).

    Args:
        shape: the encoding's shape, e.g. ``(C, K // B)`` for a ``[C, K]`` weight.
        bitwidth: the codes' bit width (the grid, e.g. 4).
        decompressed_bw: the bit width the codes times their integer block scale fit (e.g. 8); it must exceed
            `bitwidth` by 1..15 bits, at most 16 in all.
        block_size: elements per scale along each dimension, e.g. ``(1, B)``; blocks along exactly one axis.
        encoding_analyzer: calibrates the per-block float scales (default ``MinMax(shape)``), which are then
            split into per-channel float and per-block integer scales.
        strict: the strict signed grid.

    Calibration and `set_encoding` of a plain per-block encoding derive the LPBQ scales from the block
    scales; `set_encoding` of an :class:`LpbqEncoding` takes its scales as they are. The range is not
    learned (`set_range_learning` leaves it fixed); the weight's gradient passes the rounding straight
    through, as with any quantizer.
    """

    def __init__(self, shape: Sequence[int], bitwidth: int, decompressed_bw: int, block_size: Sequence[int],
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, *, name: Optional[str] = None,
                 strict: bool = False):
        super().__init__(shape, bitwidth, True, encoding_analyzer, block_size, name=name, strict=strict)
        if isinstance(decompressed_bw, bool) or not isinstance(decompressed_bw, int) or not (
                bitwidth < decompressed_bw <= min(16, bitwidth + 15)):
            raise ValueError(f"{self._label()}: decompressed_bw must be an int in {bitwidth + 1}..16 (above the "
                             f"{bitwidth}-bit grid), got {decompressed_bw!r}")
        self.decompressed_bw = int(decompressed_bw)
        self.block_axis = block_axis(self.shape, self.block_size)
        pc_shape = tuple(1 if d == self.block_axis else k for d, k in enumerate(self.shape))
        self.register_buffer("per_channel_scale", torch.ones(pc_shape))
        self.register_buffer("int_scale", torch.ones(self.shape))

    @property
    def int_bits(self) -> int:
        """Bits of the integer block scales: ``decompressed_bw - bitwidth``."""
        return self.decompressed_bw - self.bitwidth

    def set_encoding(self, enc: Encoding) -> None:
        """Takes an :class:`LpbqEncoding`'s scales as they are, or splits a per-block encoding's block scales
        into LPBQ scales. Symmetric encodings on the quantizer's grid only."""
        if enc.scale.numel() != self.int_scale.numel():
            raise ValueError(f"{self._label()}: encoding of shape {tuple(enc.scale.shape)}, quantizer shape "
                             f"{self.shape}")
        if isinstance(enc, LpbqEncoding):
            c = enc.per_channel_scale.reshape(self.per_channel_scale.shape)
            n = enc.int_scale.reshape(self.shape)
            if not bool((n <= 2 ** self.int_bits).all()):
                raise ValueError(f"{self._label()}: integer block scales up to {int(n.max())} do not fit "
                                 f"{self.int_bits} bits (decompressed_bw {self.decompressed_bw}, bitwidth "
                                 f"{self.bitwidth})")
        else:
            c, n = lpbq_scales(enc.scale.reshape(self.shape), self.int_bits, self.block_axis)
        lp = lpbq_encoding(c.to(self.int_scale.device), n.to(self.int_scale.device), self.bitwidth,
                           self.decompressed_bw, self.block_size, strict=self.strict)
        super().set_encoding(lp)  # the range parameters hold the block scales (state dicts, summaries)
        with torch.no_grad():
            self.per_channel_scale.copy_(lp.per_channel_scale)
            self.int_scale.copy_(lp.int_scale)

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-channel scale x integer block scale, 0): not differentiable in the range (no range learning)."""
        s = self.per_channel_scale * self.int_scale
        return s, torch.zeros_like(s)

    def get_encoding(self) -> Optional[LpbqEncoding]:
        if not self.has_encoding:
            return None
        return lpbq_encoding(self.per_channel_scale.detach().clone(), self.int_scale.detach().clone(), self.bitwidth,
                             self.decompressed_bw, self.block_size, strict=self.strict)

    def _trainable(self, learn: bool) -> None:
        super()._trainable(False)  # the integer block scales have no gradient: the range stays as calibrated

    def rescale_encoding(self, k: torch.Tensor, axis: int) -> bool:
        return False  # recalibrate instead: the integer scales would have to be re-derived

    def _quantize_node(self, x: torch.Tensor, activation=None, pool=None) -> torch.Tensor:
        if activation is not None or pool is not None:
            raise QuantizerError(f"{self._label()}: an LPBQ weight quantizer fuses no activation or pool")
        s, o = self.scale_offset()
        return raw.quantize_dequantize(x, _broadcast_to(s, x), _broadcast_to(o, x), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"decompressed_bw={self.decompressed_bw}, " + super().extra_repr()
