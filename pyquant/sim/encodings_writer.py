"""One file entry per encoding, for each encodings version (pyquant.sim.encodings describes the
formats): the encoding is checked, its layout (per tensor, channel or block) read off its scale shape
and block_size, and its scale/offset converted to the version's fields."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..quant.encoding import Encoding
from ..quant.lpbq import LpbqEncoding
from .encodings_types import EncodingsError

__all__ = ["entry_0_6_1", "entry_1_0_0", "entry_2_0_0"]


def _layout(enc: Encoding, name: str) -> tuple[str, Optional[int], Optional[int], Optional[int]]:
    """(enc_type, channel axis, block axis, block length) of an encoding, from its scale shape and
    block_size."""
    shape = tuple(enc.scale.shape)
    if enc.scale.numel() == 1:
        return "PER_TENSOR", None, None, None
    wide = [d for d, k in enumerate(shape) if k > 1]
    if enc.block_size is not None:
        bs = [int(b) for b in enc.block_size]
        if len(bs) > len(shape):
            raise EncodingsError(f"{name}: block_size {tuple(bs)} has more entries than the scale has "
                                 f"dimensions {shape}")
        # Right-align against the scale shape (leading dims: one block per element, or whole dim).
        bs = [1 if shape[d] > 1 else -1 for d in range(len(shape) - len(bs))] + bs
        block_axes = [d for d in wide if bs[d] > 1]
        if len(block_axes) > 1:
            raise EncodingsError(f"{name}: blocks along several axes {block_axes} (scale shape {shape}, "
                                 f"block_size {tuple(bs)}); the encodings formats hold blocks along one axis")
        if block_axes:
            ba = block_axes[0]
            channel = [d for d in wide if d != ba]
            if len(channel) > 1:
                raise EncodingsError(f"{name}: per-block encoding with several channel axes (scale shape {shape})")
            return "PER_BLOCK", (channel[0] if channel else None), ba, bs[ba]
    if len(wide) == 1:  # per channel (also a per-block encoding with a single block along its block axis)
        return "PER_CHANNEL", wide[0], None, None
    raise EncodingsError(f"{name}: scale shape {shape} varies along several axes {wide} but the encoding has no "
                         f"block_size; per-block encodings need it")


def _checked(enc: Encoding, name: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(scale float32, offset float32 in scale's shape, qmin, qmax) after checking the encoding."""
    if not isinstance(enc, Encoding):
        raise EncodingsError(f"{name}: expected a pyquant.quant.Encoding, got {type(enc).__name__}")
    bw = enc.bitwidth
    if isinstance(bw, bool) or not isinstance(bw, int) or not 2 <= bw <= 16:
        raise EncodingsError(f"{name}: bitwidth must be an int in 2..16, got {bw!r}")
    scale = enc.scale.detach().to("cpu", torch.float32)
    offset = enc.offset.detach().to("cpu", torch.float32)
    if scale.numel() == 0:
        raise EncodingsError(f"{name}: empty scale")
    if offset.shape != scale.shape:
        if offset.numel() == 1 or offset.numel() == scale.numel():
            offset = offset.reshape(-1).expand(scale.numel()).reshape(scale.shape) if offset.numel() == 1 \
                else offset.reshape(scale.shape)
        else:
            raise EncodingsError(f"{name}: offset shape {tuple(offset.shape)} does not match scale shape "
                                 f"{tuple(scale.shape)}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise EncodingsError(f"{name}: scale must be positive and finite, got {float(scale.reshape(-1)[i])!r} "
                             f"at index {i}")
    if not bool(torch.all(offset == torch.round(offset))):
        raise EncodingsError(f"{name}: offsets must be integers")
    qmin, qmax = enc.qmin, enc.qmax
    if enc.symmetric:
        if bool((offset != 0).any()):
            raise EncodingsError(f"{name}: a symmetric encoding must have offset 0")
    elif bool(((offset < -qmax) | (offset > -qmin)).any()):
        raise EncodingsError(f"{name}: asymmetric offsets must lie in [{-qmax}, {-qmin}]")
    return scale, offset, qmin, qmax


def _floats(t: torch.Tensor) -> list:
    return t.reshape(-1).tolist()  # float32 -> exact doubles; json writes their shortest repr


def _ints(t: torch.Tensor) -> list:
    return [int(v) for v in t.reshape(-1).tolist()]


def _lpbq(enc: LpbqEncoding, name: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(per-channel scale, integer block scales, block axis, block length) of an LPBQ encoding, checked."""
    _checked(enc, name)
    kind, _, axis, block = _layout(enc, name)
    if kind != "PER_BLOCK":
        raise EncodingsError(f"{name}: an LPBQ encoding must be per block, got {kind.lower()}")
    if enc.strict or not enc.signed:
        raise EncodingsError(f"{name}: LPBQ encodings live on the signed grid (not strict, not unsigned)")
    c = enc.per_channel_scale.detach().to("cpu", torch.float32)
    n = enc.int_scale.detach().to("cpu", torch.float32).reshape(enc.scale.shape)
    return c.reshape([1 if d == axis else k for d, k in enumerate(n.shape)]), n, axis, block


def entry_1_0_0(enc: Encoding, name: str) -> dict[str, Any]:
    """The 1.0.0 entry of ``enc`` (all fields but ``name``); the offset on the unsigned grid. An LPBQ
    encoding is AIMET's ``LPBQ`` entry: ``bw`` the decompressed bit width, ``compressed_bw`` the grid's,
    ``scale`` the per-channel float scales, ``offset`` -2^(bw-1) per channel, ``per_block_int_scale``
    row-major."""
    if isinstance(enc, LpbqEncoding):
        c, n, _, block = _lpbq(enc, name)
        dbw = enc.decompressed_bw
        return {"dtype": "INT", "bw": dbw, "compressed_bw": enc.bitwidth, "is_sym": True, "enc_type": "LPBQ",
                "scale": _floats(c), "offset": [-(2 ** (dbw - 1))] * c.numel(), "block_size": block,
                "per_block_int_scale": _ints(n)}
    scale, offset, qmin, _ = _checked(enc, name)
    kind, _, _, block = _layout(enc, name)
    d: dict[str, Any] = {"dtype": "INT", "bw": enc.bitwidth, "is_sym": bool(enc.symmetric), "enc_type": kind,
                         "scale": _floats(scale), "offset": _ints(offset + qmin)}
    if kind == "PER_BLOCK":
        d["block_size"] = block
    return d


def entry_0_6_1(enc: Encoding, name: str) -> list[dict[str, Any]]:
    """The 0.6.1 entry of ``enc``: one dict per channel, with the min/max the grid represents."""
    scale, offset, qmin, qmax = _checked(enc, name)
    kind, _, _, _ = _layout(enc, name)
    if kind == "PER_BLOCK" or isinstance(enc, LpbqEncoding):
        raise EncodingsError(f"{name}: version 0.6.1 has no per-block encodings; write 1.0.0 or 2.0.0")
    fmax = torch.finfo(torch.float32).max  # min/max are informational here; keep them finite
    lo = ((qmin + offset) * scale).clamp(-fmax, fmax)
    hi = ((qmax + offset) * scale).clamp(-fmax, fmax)
    sym = "True" if enc.symmetric else "False"
    return [{"bitwidth": enc.bitwidth, "dtype": "int", "is_symmetric": sym, "max": mx, "min": mn, "offset": o,
             "scale": s} for s, o, mn, mx in zip(_floats(scale), _ints(offset + qmin), _floats(lo), _floats(hi))]


def entry_2_0_0(enc: Encoding, name: str, is_param: bool) -> dict[str, Any]:
    """The 2.0.0 entry of ``enc`` (all fields but ``name``); activations get a negative axis. An LPBQ
    encoding is AIMET's entry: ``axis`` and ``block_size`` of the blocks, ``per_block_int_scale`` and
    ``per_channel_float_scale`` nested in the encoding's shape (1 along the block axis for the latter) and
    ``output_dtype`` the grid's (the decompressed bit width is not written)."""
    if isinstance(enc, LpbqEncoding):
        c, n, axis, block = _lpbq(enc, name)
        return {"axis": axis if is_param else axis - n.dim(), "block_size": block,
                "per_block_int_scale": n.to(torch.int64).tolist(), "per_channel_float_scale": c.tolist(),
                "output_dtype": f"int{enc.bitwidth}"}
    scale, offset, _, _ = _checked(enc, name)
    kind, channel_axis, block_axis, block = _layout(enc, name)
    zp = (-offset).to(torch.int64) if not enc.symmetric else torch.zeros(scale.shape, dtype=torch.int64)
    # the grid's sign: an unsigned-symmetric encoding is uint with zero point 0 (strictness is not written)
    d: dict[str, Any] = {"output_dtype": f"{'' if enc.signed else 'u'}int{enc.bitwidth}"}
    if kind == "PER_TENSOR":
        d["y_scale"] = float(scale.reshape(-1)[0])
        zp_value: Any = int(zp.reshape(-1)[0])
    elif kind == "PER_CHANNEL":
        d["y_scale"] = _floats(scale)
        zp_value = zp.reshape(-1).tolist()
    else:
        d["y_scale"] = scale.tolist()
        zp_value = zp.tolist()
    if bool((zp != 0).any()):
        d["y_zero_point"] = zp_value
    axis = block_axis if kind == "PER_BLOCK" else channel_axis
    if axis is not None:
        d["axis"] = axis if is_param else axis - scale.dim()
    if kind == "PER_BLOCK":
        d["block_size"] = block
    return d
