"""Argument checks and the mapping from (tensor, scale) to the kernels' row layout.

Ops take ``scale`` and ``offset`` in *block-broadcast* form: same number of dimensions as ``x``,
each dimension either 1 (one value for the whole dimension) or ``x.shape[d] // block[d]``. Per-tensor,
per-channel and per-block encodings are all this one form, so the kernels see a single layout.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32)
DTYPE_CODE = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2,
    torch.int8: 3, torch.uint8: 4, torch.int16: 5, torch.int32: 6,
}
INT_RANGE = {
    torch.int8: (-128, 127), torch.uint8: (0, 255),
    torch.int16: (-32768, 32767), torch.int32: (-(2**31), 2**31 - 1),
}
MAX_OUTER_DIMS = 6


NO_ACT = (-math.inf, math.inf)


def check_activation(act_min: Optional[float], act_max: Optional[float]) -> tuple[float, float]:
    """(lo, hi) of the clamp fused before quantization (ReLU: (0, None), ReLU6: (0, 6)); both None: none."""
    lo = -math.inf if act_min is None else float(act_min)
    hi = math.inf if act_max is None else float(act_max)
    if math.isnan(lo) or math.isnan(hi) or not lo < hi or lo == math.inf or hi == -math.inf:
        raise ValueError(f"the activation range needs act_min < act_max (None: unbounded), got act_min={act_min}, "
                         f"act_max={act_max}")
    return lo, hi


def check_grid(qmin: int, qmax: int) -> None:
    if not (isinstance(qmin, int) and isinstance(qmax, int)):
        raise TypeError(f"qmin and qmax must be ints, got {type(qmin).__name__} and {type(qmax).__name__}")
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    if qmin < -(2**15) or qmax > 2**16 - 1 or qmax - qmin > 2**16 - 1:
        raise ValueError(
            f"the grid [qmin, qmax] = [{qmin}, {qmax}] is wider than 16 bits; "
            "bit widths 2..16 are supported")


def block_sizes(x_shape: Sequence[int], s_shape: Sequence[int], name: str = "scale") -> tuple[int, ...]:
    """Elements per scale along each dimension; raises if ``s_shape`` is not block-broadcast."""
    if len(s_shape) != len(x_shape):
        raise ValueError(
            f"{name} must have x.ndim={len(x_shape)} dimensions in block-broadcast form "
            f"(use pyquant.ops.quantize_dequantize for axis/block_size), got shape {tuple(s_shape)}")
    blocks = []
    for d, (n, k) in enumerate(zip(x_shape, s_shape)):
        if k == 1:
            blocks.append(max(n, 1))
        elif k == 0 and n == 0:  # one value per channel of an empty dimension: none
            blocks.append(1)
        elif k > 0 and n % k == 0:
            blocks.append(n // k)
        elif k == 0 and n == 0:  # an empty dimension has no blocks: per-channel or per-block along it
            blocks.append(1)
        else:
            raise ValueError(
                f"{name}.shape[{d}]={k} does not divide x.shape[{d}]={n}; each dimension of {name} "
                f"must be 1 or a divisor of x's")
    return tuple(blocks)


def check_x_dtype(x: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"x must be one of {names}; got {x.dtype}")


def check_params(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *, x_float: bool = True) -> None:
    """Type and shape checks shared by every kernel and the fake (meta) kernels."""
    check_x_dtype(x, FLOAT_DTYPES if x_float else FLOAT_DTYPES + INT_DTYPES)
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if offset.dtype != torch.float32:
        raise TypeError(f"offset must be float32, got {offset.dtype}")
    if scale.device != x.device or offset.device != x.device:
        raise ValueError(f"scale and offset must be on x's device {x.device}, got {scale.device} and {offset.device}")
    if scale.numel() == 1 and offset.numel() == 1:
        return
    block_sizes(x.shape, scale.shape, "scale")
    if offset.shape != scale.shape:
        raise ValueError(f"offset must have the shape of scale {tuple(scale.shape)}, got {tuple(offset.shape)}")


# Checking scale/range values reads them on the host: on a GPU that is a device synchronization per
# call. set_value_checks(False) skips the check for GPU tensors (CPU checks are a cheap native loop and
# always run); a zero, negative or non-finite scale then yields inf/NaN outputs instead of an error.
_VALUE_CHECKS = {"gpu": True}


def set_value_checks(enabled: bool) -> bool:
    """Turns the positive-and-finite check of scales and histogram ranges on GPU tensors on or off;
    returns the previous setting. On by default."""
    prev = _VALUE_CHECKS["gpu"]
    _VALUE_CHECKS["gpu"] = bool(enabled)
    return prev


def check_positive_finite(t: torch.Tensor, name: str, hint: str = "") -> None:
    """`t` must be positive and finite: a zero or NaN scale or range would silently produce garbage."""
    if t.device.type != "cpu" and not _VALUE_CHECKS["gpu"]:
        return
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        v = t[bad].flatten()[0].item()
        raise ValueError(f"{name} must be positive and finite; found {v}{hint}")


def check_finite(t: torch.Tensor, name: str) -> None:
    """`t` must be finite (an offset: NaN or inf would make every output NaN or inf). GPU tensors follow
    set_value_checks, as scales do."""
    if t.device.type != "cpu" and not _VALUE_CHECKS["gpu"]:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite; found {t[bad].flatten()[0].item()}")


def check_scale_values(scale: torch.Tensor) -> None:
    check_positive_finite(scale, "scale", " (use a range-derived encoding)")


def check_scale_values_on_device(scale: torch.Tensor) -> None:
    """The scale check without a host read on a GPU: an asynchronous device-side assertion, which fails
    the next synchronizing call (as CUDA errors do) instead of raising here. CPU scales are checked at
    once. GPU tensors follow set_value_checks."""
    if scale.device.type == "cpu":
        check_scale_values(scale)
    elif _VALUE_CHECKS["gpu"]:
        torch._assert_async((torch.isfinite(scale) & (scale > 0)).all(),
                            "pyquant: scale must be positive and finite (use a range-derived encoding)")


def as_block_broadcast(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-tensor parameters of any shape become (1,)*x.ndim; others must already be block-broadcast."""
    if p.dim() == x.dim():
        return p
    if p.numel() == 1:
        return p.reshape((1,) * x.dim())
    return p  # check_params reports the mismatch


@functools.lru_cache(maxsize=4096)
def _plan(shape: tuple[int, ...], s_shape: tuple[int, ...]) -> tuple:
    """(numel, row_len, inner_block, nscale, outer_size, outer_block, outer_sstride) for a contiguous
    tensor of `shape` and a contiguous block-broadcast scale of `s_shape`."""
    numel = math.prod(shape)
    nscale = math.prod(s_shape) if s_shape else 1
    dims = []  # (size, nblocks) outer→inner, size-1 dims dropped
    for n, k in zip(shape, s_shape):
        if n != 1:
            dims.append((n, k))
    if numel == 0 or not dims:
        return (numel, max(numel, 1), max(numel, 1), nscale, [], [], [])
    # scale strides of a contiguous tensor of nblocks
    sstr = [0] * len(dims)
    acc = 1
    for i in range(len(dims) - 1, -1, -1):
        sstr[i] = acc
        acc *= dims[i][1]
    # Row: trailing broadcast dims merge into one row with one scale; else the last dim is the row.
    i = len(dims)
    row_len = 1
    while i > 0 and dims[i - 1][1] == 1:
        row_len *= dims[i - 1][0]
        i -= 1
    if i == len(dims):
        n, k = dims[-1]
        row_len, inner_block = n, n // k
        i -= 1
    else:
        inner_block = row_len
    outer = []  # (size, block, sstride)
    for d in range(i):
        n, k = dims[d]
        blk = n // k
        if k == 1:
            entry = (n, n, 0)
        else:
            entry = (n, blk, sstr[d])
        if outer:
            pn, pb, ps = outer[-1]
            if k == 1 and pb == pn:  # two broadcast dims
                outer[-1] = (pn * n, pn * n, 0)
                continue
            if blk == 1 and pb == 1 and ps == sstr[d] * n:  # two per-element dims, contiguous in scale
                outer[-1] = (pn * n, 1, sstr[d])
                continue
        outer.append(entry)
    if len(outer) > MAX_OUTER_DIMS:
        raise ValueError(f"this block structure needs {len(outer)} outer dimensions; at most {MAX_OUTER_DIMS} are supported")
    return (numel, row_len, inner_block, nscale,
            [o[0] for o in outer], [o[1] for o in outer], [o[2] for o in outer])


@functools.lru_cache(maxsize=4096)
def _native_layout(module, shape: tuple[int, ...], s_shape: tuple[int, ...]):
    return module.Layout(*_plan(shape, s_shape))


@functools.lru_cache(maxsize=4096)
def checked_layout(module, shape: tuple[int, ...], s_shape: tuple[int, ...]):
    """The native layout of a contiguous tensor of `shape` whose scale has the block-broadcast `s_shape`
    (or any shape with one value: per tensor), its shapes checked once per pair (a mismatch raises each
    time, as errors are not cached)."""
    if len(s_shape) != len(shape) and math.prod(s_shape) == 1:
        s_shape = (1,) * len(shape)
    block_sizes(shape, s_shape)
    return _native_layout(module, shape, s_shape)


def _dense_perm(x: torch.Tensor) -> Optional[tuple[int, ...]]:
    """The permutation that makes a dense (non-overlapping, gap-free) tensor contiguous, or None."""
    perm = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d])))
    if x.permute(perm).is_contiguous():
        return perm
    return None


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def prepare(module, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """Brings x into memory order (contiguous when it is not dense) and returns
    (x, x_kernel, scale_kernel, offset_kernel, layout, perm). `perm` maps tensors allocated with
    torch.empty_like(x) to the kernel's order; None means x is used as it is."""
    x, xk, (s, o), layout, perm = prepare_groups(module, x, tuple(scale.shape), [scale, offset])
    return x, xk, s, o, layout, perm


def prepare_groups(module, x: torch.Tensor, g_shape: tuple[int, ...], params: list[torch.Tensor]):
    """Like prepare for any number of per-group tensors of block-broadcast shape `g_shape`:
    returns (x, x_kernel, params_kernel, layout, perm)."""
    # one value per parameter, in whatever shape (the kernels read only its address): kept as it is
    single = len(g_shape) != x.dim()
    if single:
        g_shape = (1,) * x.dim()
    perm = None
    if not x.is_contiguous():
        perm = _dense_perm(x)
        if perm is None:
            x = x.contiguous()
    if perm is not None:
        xk = x.permute(perm)
        if not single:
            params = [p.permute(perm) for p in params]
            g_shape = tuple(g_shape[d] for d in perm)
    else:
        xk = x
    params = [p if p.is_contiguous() else p.contiguous() for p in params]
    layout = _native_layout(module, tuple(xk.shape), tuple(g_shape))
    return x, xk, params, layout, perm
