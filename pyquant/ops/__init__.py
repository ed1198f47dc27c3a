"""pyquant.ops: the stable functional API. Tensors in, tensors out; works under autograd,
``torch.compile(fullgraph=True)`` and ``torch.export``. Each op is one torch.library op
(``torch.ops.pyquant.*``) with native CPU/CUDA kernels and a pure-torch reference fallback.

Conventions (docs/design.md, "Quantization math"): ``q = clamp(round(x / s) - o, qmin, qmax)``, ``x_hat = (q + o) * s``, round
half to even, math in float32. ``signed=True`` uses the grid ``[-2^(b-1), 2^(b-1)-1]``, else
``[0, 2^b-1]``. The offset is the negative of ONNX's zero point.

Granularity is given by ``axis`` (per-channel) or ``block_size`` (per-block); neither means per-tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _cpu, _cuda, _layout, _reference, _registry
from ._layout import check_scale_values_on_device, set_value_checks
from ._registry import eager_kernel, eager_native

__all__ = [
    "quantize", "dequantize", "quantize_dequantize", "quantize_dequantize_int32", "grid", "reference", "raw",
    "adaround_weight", "adaround_regularizer", "adaround_init_alpha", "set_value_checks",
    "check_scale_values_on_device", "eager_kernel", "eager_native",
]

reference = _reference
"""The pure-torch reference of every op: the oracle the kernels are tested against (also
``fake_quant_derivatives``, the per-element derivatives of the fake-quant output)."""

raw = _registry.ops
"""The registered ops themselves (``torch.ops.pyquant``) in their low-level form: scale and offset
already shaped like the input (block-broadcast, float32), the grid as (qmin, qmax). This is what
pyquant's quantizers and techniques call on their hot paths: no argument normalization, one dispatch.
Schemas and semantics: docs/design.md, "Op registry"."""

HAS_CPU_KERNELS = _cpu.register()
HAS_CUDA_KERNELS = _cuda.register()

BlockSize = Sequence[int]


def grid(bitwidth: int, signed: bool, *, strict: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid for `bitwidth` bits (2..16): signed ``[-2^(b-1), 2^(b-1)-1]``
    (``strict``: ``[-(2^(b-1)-1), 2^(b-1)-1]``, symmetric about 0) or unsigned ``[0, 2^b-1]``."""
    if isinstance(bitwidth, bool) or not isinstance(bitwidth, int):
        raise TypeError(f"bitwidth must be an int in 2..16, got {bitwidth!r}")
    if not 2 <= bitwidth <= 16:
        raise ValueError(f"bitwidth must be in 2..16, got {bitwidth}")
    if strict and not signed:
        raise ValueError("strict grids are signed (strict=True needs signed=True)")
    if signed:
        return -(2 ** (bitwidth - 1)) + int(bool(strict)), 2 ** (bitwidth - 1) - 1
    return 0, 2**bitwidth - 1


def _param_shape(x: torch.Tensor, axis: Optional[int], block_size: Optional[BlockSize]) -> tuple[int, ...]:
    if axis is not None and block_size is not None:
        raise ValueError("give either axis (per-channel) or block_size (per-block), not both")
    nd = x.dim()
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {axis!r}")
        if not -nd <= axis < nd:
            raise ValueError(f"axis must be in [{-nd}, {nd - 1}] for a {nd}-d input, got {axis}")
        a = axis % nd
        return tuple(x.shape[d] if d == a else 1 for d in range(nd))
    if block_size is not None:
        bs = tuple(block_size)
        if len(bs) != nd:
            raise ValueError(f"block_size must have one entry per dimension of x ({nd}), got {bs}")
        shape = []
        for d, (n, b) in enumerate(zip(x.shape, bs)):
            if isinstance(b, bool) or not isinstance(b, int) or (b < 1 and b != -1):
                raise ValueError(f"block_size[{d}] must be a positive int or -1 (whole dimension), got {b!r}")
            if b == -1:  # the whole dimension, also an empty one: one scale along it
                shape.append(1)
                continue
            if n % b:
                raise ValueError(f"block_size[{d}]={b} does not divide x.shape[{d}]={n}")
            shape.append(n // b)
        return tuple(shape)
    return (1,) * nd


def _params(x: torch.Tensor, scale, offset, axis, block_size):
    shape = _param_shape(x, axis, block_size)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), device=x.device)
    if scale.dtype != torch.float32:
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
        scale = scale.float()
    n = math.prod(shape)
    if scale.numel() != n:
        what = ("per-tensor (1 value)" if axis is None and block_size is None else
                f"per-channel along axis {axis}" if axis is not None else f"per-block {tuple(block_size)}")
        raise ValueError(f"scale has {scale.numel()} values; {what} needs {n} (shape {shape})")
    scale = scale.reshape(shape)
    if offset is None:
        offset = torch.zeros(shape, dtype=torch.float32, device=x.device)
    else:
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), device=x.device)
        offset = offset.to(torch.float32)
        if offset.numel() != n:
            raise ValueError(f"offset has {offset.numel()} values; expected {n} like scale")
        offset = offset.reshape(shape)
        if not torch.compiler.is_compiling():  # a data-dependent branch would break a fullgraph compile
            _layout.check_finite(offset, "offset")
    return scale, offset


def _check_out_dtype(out_dtype: object) -> None:
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype, got {out_dtype!r}")


def quantize_dequantize(x: torch.Tensor, scale: Union[torch.Tensor, float],
                        offset: Union[torch.Tensor, float, None] = None, *, bitwidth: int = 8,
                        signed: bool = False, axis: Optional[int] = None,
                        block_size: Optional[BlockSize] = None, lsq_grad_scale: bool = False,
                        activation: Optional[tuple[Optional[float], Optional[float]]] = None) -> torch.Tensor:
    """Fake quantization ``(clamp(round(x/s) - o, qmin, qmax) + o) * s`` in x's dtype.

    Differentiable in x (straight-through), scale and offset (range learning). ``lsq_grad_scale``
    multiplies the scale/offset gradients by ``1/sqrt(n * qmax)`` (n = elements per scale), as LSQ does.
    ``activation=(lo, hi)`` quantizes ``clamp(x, lo, hi)`` in the same pass -- ``(0, None)`` is a ReLU,
    ``(0, 6)`` a ReLU6 -- with the activation's gradient, and keeps only ``x`` for the backward. The result
    equals the activation followed by fake quantization (for bounds representable in x's dtype).
    """
    qmin, qmax = grid(bitwidth, signed)
    s, o = _params(x, scale, offset, axis, block_size)
    gs = 1.0
    if lsq_grad_scale:
        gs = 1.0 / math.sqrt(max(x.numel() // max(s.numel(), 1), 1) * qmax)
    if activation is None:
        return _registry.ops.quantize_dequantize(x, s, o, qmin, qmax, gs)
    if not isinstance(activation, (tuple, list)) or len(activation) != 2:
        raise TypeError(f"activation must be a (lo, hi) pair (None: unbounded), got {activation!r}")
    lo, hi = activation
    return _registry.ops.quantize_dequantize(x, s, o, qmin, qmax, gs, True, lo, hi)


def quantize(x: torch.Tensor, scale: Union[torch.Tensor, float], offset: Union[torch.Tensor, float, None] = None,
             *, bitwidth: int = 8, signed: bool = False, axis: Optional[int] = None,
             block_size: Optional[BlockSize] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer codes ``clamp(round(x/s) - o, qmin, qmax)``, as float32 (default) or an integer dtype
    that holds the grid (int8/uint8/int16/int32). Integer output rejects NaN inputs."""
    qmin, qmax = grid(bitwidth, signed)
    _check_out_dtype(out_dtype)
    s, o = _params(x, scale, offset, axis, block_size)
    return _registry.ops.quantize(x, s, o, qmin, qmax, out_dtype)


def dequantize(q: torch.Tensor, scale: Union[torch.Tensor, float], offset: Union[torch.Tensor, float, None] = None,
               *, axis: Optional[int] = None, block_size: Optional[BlockSize] = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q + o) * s`` for integer codes (any int or float dtype) in float32/float16/bfloat16."""
    if q.dtype not in _layout.FLOAT_DTYPES + _layout.INT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _layout.FLOAT_DTYPES + _layout.INT_DTYPES)
        raise TypeError(f"q must be one of {names}; got {q.dtype}")
    _check_out_dtype(out_dtype)
    s, o = _params(q, scale, offset, axis, block_size)
    return _registry.ops.dequantize(q, s, o, out_dtype)


# ---- int32 (biases) --------------------------------------------------------------------------------
class _Int32FakeQuant(torch.autograd.Function):
    """The forward of the reference, bit for bit; the gradient passes straight through (nothing is kept for
    the backward: the grid's ends are 2^31 steps away)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, overflow: str) -> torch.Tensor:
        native = eager_native("int32_fake_quant", x)
        if (native is not None and x.dtype == torch.float32 and x.is_contiguous() and s.is_contiguous()
                and (s.numel() == 1 or s.shape == x.shape)):
            return native(x, s, overflow)  # one loop, the reference's float32 operations
        return _reference.quantize_dequantize_int32(x, s, overflow)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None


INT32_OVERFLOW = ("clamp", "float")


def quantize_dequantize_int32(x: torch.Tensor, scale: Union[torch.Tensor, float], *, overflow: str = "clamp",
                              check_values: bool = True) -> torch.Tensor:
    """Fake quantization on the signed 32-bit grid with offset 0, as integer targets hold a bias (at scale
    ``s_input * s_weight``): ``clamp(round(x / s), -2^31, 2^31 - 1) * s`` in float32 (true division, round
    half to even, as section 5.2 of docs/design.md), in x's dtype. `scale` broadcasts against x (one value,
    or one per element of a 1-d bias). `overflow`: "clamp" (default) saturates at the grid's ends; "float"
    returns x unchanged when some element lies beyond them (a tensor the grid cannot hold stays in float).
    Differentiable in x (straight through), not in the scale. `check_values=False` skips the check that the
    scale is positive and finite."""
    if overflow not in INT32_OVERFLOW:
        raise ValueError(f"overflow must be one of {list(INT32_OVERFLOW)}, got {overflow!r}")
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), device=x.device)
    if s.dtype != torch.float32 or s.device != x.device:
        s = s.to(device=x.device, dtype=torch.float32)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if s.shape != x.shape and s.dim() != 0 and (not _broadcasts(s.shape, x.shape)
                                                or torch.broadcast_shapes(s.shape, x.shape) != x.shape):
        raise ValueError(f"scale of shape {tuple(s.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    if check_values and not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError(f"scale must be positive and finite, got {s.flatten()[:4].tolist()}")
    return _Int32FakeQuant.apply(x, s, overflow)


def _broadcasts(a: Sequence[int], b: Sequence[int]) -> bool:
    try:
        torch.broadcast_shapes(tuple(a), tuple(b))
    except RuntimeError:
        return False
    return True


# ---- AdaRound --------------------------------------------------------------------------------------
def _channel_params(w: torch.Tensor, scale, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset as flat float32 (one value, or one per output channel), checked: scale positive and
    finite, offset finite."""
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), device=w.device)
    o = offset if isinstance(offset, torch.Tensor) else torch.tensor(float(offset or 0.0), device=w.device)
    if not s.is_floating_point() or not o.is_floating_point():
        raise TypeError(f"scale and offset must be floating point, got {s.dtype} and {o.dtype}")
    s, o = s.float().reshape(-1), o.float().reshape(-1)
    rows = w.shape[0] if w.dim() > 0 else 1
    for name, p in (("scale", s), ("offset", o)):
        if p.numel() not in (1, rows):
            raise ValueError(f"{name} must have 1 value or one per output channel (w.shape[0] = {rows}), got "
                             f"{p.numel()}")
    if not torch.compiler.is_compiling():
        _layout.check_positive_finite(s, "scale")
        _layout.check_finite(o, "offset")
    return s, o


def adaround_weight(w: torch.Tensor, alpha: torch.Tensor, scale: Union[torch.Tensor, float],
                    offset: Union[torch.Tensor, float, None] = None, *, bitwidth: int = 4, signed: bool = True,
                    hard: bool = False) -> torch.Tensor:
    """AdaRound's quantized weight ``(clamp(floor(w/s) + h(alpha) - o, qmin, qmax) + o) * s`` with
    ``h = clamp(sigmoid(alpha) * 1.2 - 0.1, 0, 1)`` (soft, differentiable in alpha) or ``h = alpha >= 0``
    (``hard=True``). float32; scale/offset: one value, or one per output channel (dim 0 of w)."""
    qmin, qmax = grid(bitwidth, signed)
    s, o = _channel_params(w, scale, offset)
    return _registry.ops.adaround_weight(w, alpha, s, o, qmin, qmax, hard)


def adaround_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(alpha) - 1|^beta)``: pushes every h to 0 or 1 (differentiable in alpha). `beta` > 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return _registry.ops.adaround_regularizer(alpha, float(beta))[0]


def adaround_init_alpha(w: torch.Tensor, scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """The alpha for which h(alpha) equals the fractional part of w/s (soft rounding starts at w itself).
    `scale`: positive and finite, one value or one per output channel (dim 0 of w)."""
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    s, _ = _channel_params(w, scale, None)
    s = s.reshape((-1,) + (1,) * (w.dim() - 1)) if w.dim() > 0 else s.reshape(())
    frac = w.float() / s - torch.floor(w.float() / s)
    sig = ((frac + 0.1) / 1.2).clamp(1e-6, 1 - 1e-6)
    return torch.log(sig / (1 - sig))
