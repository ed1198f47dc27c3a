"""The one definition of each op (torch.library): schema, fake kernel, autograd, and the pure-torch
reference as the fallback kernel for any device. Device kernels register in _cpu.py / _cuda.py."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _layout, _reference

LIB_NAME = "pyquant"
_lib = torch.library.Library(LIB_NAME, "DEF")

# act_min/act_max: a ReLU / ReLU6 / Hardtanh fused in front of the quantizer (None: unbounded on that side)
_lib.define("quantize_dequantize(Tensor x, Tensor scale, Tensor offset, int qmin, int qmax, "
            "float grad_scale=1.0, bool check_values=True, float? act_min=None, float? act_max=None) -> Tensor")
_lib.define("quantize_dequantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor offset, int qmin, "
            "int qmax, float grad_scale, bool[3] output_mask, float? act_min=None, float? act_max=None) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("quantize(Tensor x, Tensor scale, Tensor offset, int qmin, int qmax, ScalarType out_dtype) -> Tensor")
_lib.define("dequantize(Tensor q, Tensor scale, Tensor offset, ScalarType out_dtype) -> Tensor")

_lib.define("minmax(Tensor x, int[] shape) -> (Tensor, Tensor, Tensor)")
# A learned range's encoding and chain-rule factors (scale, offset, k_s, k_o, k_ot); a factor not formed is an
# empty tensor. No autograd: the quantizer's node carries the chain rule with the factors.
_lib.define("minmax_encoding(Tensor min, Tensor max, int qmin, int qmax, float min_scale, bool symmetric, "
            "bool factors) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define("histogram(Tensor x, Tensor lo, Tensor range, int nbins) -> Tensor")
_lib.define("search(Tensor counts, Tensor c0, Tensor bw, Tensor cand_d, Tensor cand_o, int ns, float gamma, "
            "float p) -> (Tensor, Tensor)")
_lib.define("entropy_search(Tensor counts, int nq) -> (Tensor, Tensor)")

_lib.define("adaround_weight(Tensor w, Tensor alpha, Tensor scale, Tensor offset, int qmin, int qmax, "
            "bool hard=False) -> Tensor")
_lib.define("adaround_weight_backward(Tensor grad, Tensor w, Tensor alpha, Tensor scale, Tensor offset, int qmin, "
            "int qmax) -> Tensor")
_lib.define("adaround_regularizer(Tensor alpha, float beta) -> (Tensor, Tensor)")

# Non-overlapping 2-d max pooling (stride = kernel) that returns each maximum's position in its window
# (uint8): what a quantizer followed by a max pool needs for the backward, at a byte per output.
_lib.define("max_pool2d_window(Tensor x, int[2] kernel) -> (Tensor, Tensor)")
_lib.define("max_pool2d_window_backward(Tensor grad, Tensor argmax, int[2] kernel, int[] input_size) -> Tensor")
# A fused quantizer followed by such a pool: the pool of quantize_dequantize([activation](x)) computed in one
# pass, returning also the input value each maximum came from (the quantizer's backward needs only that).
# Scale/offset: one, or one per channel (dim -3). No autograd of its own: QuantizeDequantize's node uses it.
_lib.define("quantize_dequantize_max_pool2d(Tensor x, Tensor scale, Tensor offset, int qmin, int qmax, int[2] kernel, "
            "bool check_values=True, float? act_min=None, float? act_max=None) -> (Tensor, Tensor, Tensor)")

ops = torch.ops.pyquant

# The native kernel registered for each (device type, op name), for `eager_kernel` (filled by _backend.py).
NATIVE_KERNELS: dict[tuple[str, str], Callable] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensors without a subclass's own dispatch


def eager_kernel(name: str, x: torch.Tensor) -> Callable:
    """What ``torch.ops.pyquant.<name>`` runs for `x`, as a plain function: the native kernel registered for
    x's device, called without the dispatcher, or the registered op itself where the dispatcher has work
    to do (a tensor subclass, a dispatch mode such as fake tensors, tracing or compiling, no native kernel).
    For code that is already inside an autograd node (so the op's own autograd is not wanted), where the
    dispatcher's Python layers cost more than a small kernel: same arguments, same results."""
    if not torch.compiler.is_compiling() and type(x) in _PLAIN and not torch._C._len_torch_dispatch_stack():
        fn = NATIVE_KERNELS.get(("cpu" if x.is_cpu else x.device.type, name))  # is_cpu: no device object
        if fn is not None:
            return fn
    return getattr(ops, name)


def eager_native(name: str, x: torch.Tensor) -> Optional[Callable]:
    """A native entry that has no registered op of its own (a fused step inside an autograd node, such as
    "minmax_qdq_forward"), for x's device when it has one and the call is plain eager (as for
    `eager_kernel`); None otherwise, and the caller runs the registered ops instead."""
    if torch.compiler.is_compiling() or type(x) not in _PLAIN or torch._C._len_torch_dispatch_stack():
        return None
    return NATIVE_KERNELS.get(("cpu" if x.is_cpu else x.device.type, name))


def check_adaround_args(w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                        qmin: int, qmax: int) -> None:
    """AdaRound works on float32 weights with one encoding per output channel (dim 0) or one in all."""
    if w.dtype != torch.float32 or alpha.dtype != torch.float32:
        raise TypeError(f"w and alpha must be float32, got {w.dtype} and {alpha.dtype}")
    if alpha.shape != w.shape:
        raise ValueError(f"alpha must have w's shape {tuple(w.shape)}, got {tuple(alpha.shape)}")
    rows = w.shape[0] if w.dim() > 0 else 1
    for name, p in (("scale", scale), ("offset", offset)):
        if p.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {p.dtype}")
        if p.numel() not in (1, rows):
            raise ValueError(f"{name} must have 1 value or one per output channel (w.shape[0] = {rows}), "
                             f"got {p.numel()}")
        if p.device != w.device or alpha.device != w.device:
            raise ValueError(f"alpha, scale and offset must be on w's device {w.device}")
    _layout.check_grid(qmin, qmax)


def _ref_adaround_weight(w, alpha, scale, offset, qmin, qmax, hard=False):
    check_adaround_args(w, alpha, scale, offset, qmin, qmax)
    return _reference.adaround_weight(w, alpha, scale, offset, qmin, qmax, hard)


def _ref_adaround_weight_backward(grad, w, alpha, scale, offset, qmin, qmax):
    check_adaround_args(w, alpha, scale, offset, qmin, qmax)
    return _reference.adaround_weight_backward(grad.float(), w, alpha, scale, offset, qmin, qmax)


def _ref_adaround_regularizer(alpha, beta):
    if alpha.dtype != torch.float32:
        raise TypeError(f"alpha must be float32, got {alpha.dtype}")
    return _reference.adaround_regularizer(alpha, beta)


torch.library.register_kernel("pyquant::adaround_weight", None, _ref_adaround_weight, lib=_lib)
torch.library.register_kernel("pyquant::adaround_weight_backward", None, _ref_adaround_weight_backward, lib=_lib)
torch.library.register_kernel("pyquant::adaround_regularizer", None, _ref_adaround_regularizer, lib=_lib)


@torch.library.register_fake("pyquant::adaround_weight", lib=_lib)
def _fake_adaround_weight(w, alpha, scale, offset, qmin, qmax, hard=False):
    check_adaround_args(w, alpha, scale, offset, qmin, qmax)
    return torch.empty_like(w)


@torch.library.register_fake("pyquant::adaround_weight_backward", lib=_lib)
def _fake_adaround_weight_backward(grad, w, alpha, scale, offset, qmin, qmax):
    return torch.empty_like(alpha)


@torch.library.register_fake("pyquant::adaround_regularizer", lib=_lib)
def _fake_adaround_regularizer(alpha, beta):
    return alpha.new_empty(()), torch.empty_like(alpha)


def _ada_setup_context(ctx, inputs, output):
    w, alpha, scale, offset, qmin, qmax, hard = inputs
    ctx.save_for_backward(w, alpha, scale, offset)
    ctx.qmin, ctx.qmax, ctx.hard = qmin, qmax, hard


def _ada_backward(ctx, grad):
    w, alpha, scale, offset = ctx.saved_tensors
    if ctx.hard:  # hard rounding is a step function of alpha
        return None, torch.zeros_like(alpha), None, None, None, None, None
    da = ops.adaround_weight_backward(grad.contiguous(), w, alpha, scale, offset, ctx.qmin, ctx.qmax)
    return None, da, None, None, None, None, None


def _ada_reg_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _ada_reg_backward(ctx, gvalue, ggrad):
    (g,) = ctx.saved_tensors
    return gvalue * g, None


torch.library.register_autograd("pyquant::adaround_weight", _ada_backward, setup_context=_ada_setup_context,
                                lib=_lib)
torch.library.register_autograd("pyquant::adaround_regularizer", _ada_reg_backward,
                                setup_context=_ada_reg_setup_context, lib=_lib)


def check_out_dtype_for_quantize(out_dtype: torch.dtype, qmin: int, qmax: int) -> None:
    if out_dtype == torch.float32:
        return
    if out_dtype not in _layout.INT_RANGE:
        raise TypeError(f"out_dtype must be float32, int8, uint8, int16 or int32; got {out_dtype}")
    lo, hi = _layout.INT_RANGE[out_dtype]
    if qmin < lo or qmax > hi:
        raise ValueError(f"out_dtype {out_dtype} cannot hold the grid [{qmin}, {qmax}]")


def check_out_dtype_for_dequantize(out_dtype: torch.dtype) -> None:
    if out_dtype not in _layout.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")


# ---- reference kernels (fallback for every device) ------------------------------------------
def _ref_qdq(x, scale, offset, qmin, qmax, grad_scale=1.0, check_values=True, act_min=None, act_max=None):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    act = _layout.check_activation(act_min, act_max)
    if check_values:
        _layout.check_scale_values(scale)
    return _reference.quantize_dequantize(x, scale, offset, qmin, qmax, grad_scale, act)


def _ref_qdq_bwd(grad, x, scale, offset, qmin, qmax, grad_scale, output_mask, act_min=None, act_max=None):
    act = _layout.check_activation(act_min, act_max)
    return _reference.quantize_dequantize_backward(grad, x, scale, offset, qmin, qmax, grad_scale, output_mask, act)


def _ref_quantize(x, scale, offset, qmin, qmax, out_dtype):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    check_out_dtype_for_quantize(out_dtype, qmin, qmax)
    _layout.check_scale_values(scale)
    if out_dtype != torch.float32 and x.is_floating_point() and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN, which has no integer code; use out_dtype=torch.float32 to keep it")
    return _reference.quantize(x, scale, offset, qmin, qmax, out_dtype)


def _ref_dequantize(q, scale, offset, out_dtype):
    _layout.check_params(q, scale, offset, x_float=False)
    check_out_dtype_for_dequantize(out_dtype)
    _layout.check_scale_values(scale)
    return _reference.dequantize(q, scale, offset, out_dtype)


def check_group_shape(x: torch.Tensor, shape) -> tuple[int, ...]:
    shape = tuple(int(v) for v in shape)
    if len(shape) != x.dim():
        if all(v == 1 for v in shape):
            return (1,) * x.dim()
        raise ValueError(f"shape must have x.ndim={x.dim()} entries (block-broadcast form), got {shape}")
    _layout.block_sizes(x.shape, shape, "shape")
    return shape


def check_histogram_args(x, lo, rng, nbins):
    if x.dtype not in _layout.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if isinstance(nbins, bool) or not isinstance(nbins, int) or not 1 <= nbins <= 1 << 20:
        raise ValueError(f"nbins must be an int in 1..{1 << 20}, got {nbins!r}")
    if lo.dtype != torch.float32 or rng.dtype != torch.float32:
        raise TypeError(f"lo and range must be float32, got {lo.dtype} and {rng.dtype}")
    if lo.shape != rng.shape:
        raise ValueError(f"lo and range must have one shape, got {tuple(lo.shape)} and {tuple(rng.shape)}")
    if lo.numel() != 1:
        _layout.block_sizes(x.shape, lo.shape, "lo")


def check_range_values(rng: torch.Tensor) -> None:
    _layout.check_positive_finite(rng, "range")


def _ref_minmax(x, shape):
    if x.dtype not in _layout.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    return _reference.minmax(x, check_group_shape(x, shape))


def _ref_histogram(x, lo, rng, nbins):
    check_histogram_args(x, lo, rng, nbins)
    check_range_values(rng)
    return _reference.histogram(x, lo, rng, nbins)


def check_search_args(counts, c0, bw, cand_d, cand_o, ns, gamma, p):
    if counts.dtype != torch.int64 or counts.dim() != 2:
        raise TypeError(f"counts must be an int64 [groups, bins] tensor, got {counts.dtype} {tuple(counts.shape)}")
    G = counts.shape[0]
    for name, t in (("c0", c0), ("bw", bw)):
        if t.dtype != torch.float32 or t.shape != (G,):
            raise ValueError(f"{name} must be float32 of shape ({G},), got {t.dtype} {tuple(t.shape)}")
    for name, t in (("cand_d", cand_d), ("cand_o", cand_o)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != G or t.shape[1] < 1:
            raise ValueError(f"{name} must be float32 of shape ({G}, candidates), got {t.dtype} {tuple(t.shape)}")
    if cand_d.shape != cand_o.shape:
        raise ValueError("cand_d and cand_o must have one shape")
    if ns < 1:
        raise ValueError(f"ns must be >= 1, got {ns}")
    if not gamma >= 1.0:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")


def _ref_search(counts, c0, bw, cand_d, cand_o, ns, gamma, p):
    check_search_args(counts, c0, bw, cand_d, cand_o, ns, gamma, p)
    return _reference.search(counts, c0, bw, cand_d, cand_o, ns, gamma, p)


def check_entropy_args(counts, nq):
    if counts.dtype != torch.int64 or counts.dim() != 2:
        raise TypeError(f"counts must be an int64 [groups, bins] tensor, got {counts.dtype} {tuple(counts.shape)}")
    if counts.shape[1] < 1:
        raise ValueError(f"counts must have at least one bin, got shape {tuple(counts.shape)}")
    if not 1 <= nq <= counts.shape[1]:
        raise ValueError(f"nq (quantization levels) must be in 1..{counts.shape[1]} (the number of bins), got {nq}")


def _ref_entropy_search(counts, nq):
    check_entropy_args(counts, nq)
    return _reference.entropy_search(counts, nq)


def check_minmax_encoding_args(mn, mx, qmin, qmax, min_scale) -> None:
    _layout.check_grid(qmin, qmax)
    if mn.dtype != torch.float32 or mx.dtype != torch.float32:
        raise TypeError(f"min and max must be float32, got {mn.dtype} and {mx.dtype}")
    if mn.shape != mx.shape or mn.device != mx.device:
        raise ValueError(f"min and max must have one shape and device, got {tuple(mn.shape)} on {mn.device} and "
                         f"{tuple(mx.shape)} on {mx.device}")
    if not min_scale > 0:
        raise ValueError(f"min_scale must be > 0, got {min_scale}")


def reference_minmax_encoding(mn, mx, qmin, qmax, min_scale, symmetric, factors):
    """The reference kernel of minmax_encoding (every device without a native one)."""
    check_minmax_encoding_args(mn, mx, qmin, qmax, min_scale)
    with torch.no_grad():
        out = _reference.minmax_encoding(mn, mx, qmin, qmax, min_scale, symmetric, factors)
    return tuple(t if t is not None else mn.new_empty(0) for t in out)


torch.library.register_kernel("pyquant::entropy_search", None, _ref_entropy_search, lib=_lib)
torch.library.register_kernel("pyquant::minmax_encoding", None, reference_minmax_encoding, lib=_lib)
torch.library.register_kernel("pyquant::search", None, _ref_search, lib=_lib)
torch.library.register_kernel("pyquant::minmax", None, _ref_minmax, lib=_lib)
torch.library.register_kernel("pyquant::histogram", None, _ref_histogram, lib=_lib)
torch.library.register_kernel("pyquant::quantize_dequantize", None, _ref_qdq, lib=_lib)
torch.library.register_kernel("pyquant::quantize_dequantize_backward", None, _ref_qdq_bwd, lib=_lib)
torch.library.register_kernel("pyquant::quantize", None, _ref_quantize, lib=_lib)
torch.library.register_kernel("pyquant::dequantize", None, _ref_dequantize, lib=_lib)


# ---- fake (meta) kernels: shapes only, for torch.compile / torch.export ----------------------
@torch.library.register_fake("pyquant::quantize_dequantize", lib=_lib)
def _fake_qdq(x, scale, offset, qmin, qmax, grad_scale=1.0, check_values=True, act_min=None, act_max=None):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    _layout.check_activation(act_min, act_max)
    return torch.empty_like(x)


@torch.library.register_fake("pyquant::quantize_dequantize_backward", lib=_lib)
def _fake_qdq_bwd(grad, x, scale, offset, qmin, qmax, grad_scale, output_mask, act_min=None, act_max=None):
    dx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    ds = torch.empty_like(scale) if output_mask[1] else scale.new_empty(0)
    do = torch.empty_like(offset) if output_mask[2] else offset.new_empty(0)
    return dx, ds, do


@torch.library.register_fake("pyquant::quantize", lib=_lib)
def _fake_quantize(x, scale, offset, qmin, qmax, out_dtype):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    check_out_dtype_for_quantize(out_dtype, qmin, qmax)
    return torch.empty_like(x, dtype=out_dtype)


@torch.library.register_fake("pyquant::dequantize", lib=_lib)
def _fake_dequantize(q, scale, offset, out_dtype):
    _layout.check_params(q, scale, offset, x_float=False)
    check_out_dtype_for_dequantize(out_dtype)
    return torch.empty_like(q, dtype=out_dtype)


@torch.library.register_fake("pyquant::minmax", lib=_lib)
def _fake_minmax(x, shape):
    shape = check_group_shape(x, shape)
    return (x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("pyquant::minmax_encoding", lib=_lib)
def _fake_minmax_encoding(mn, mx, qmin, qmax, min_scale, symmetric, factors):
    check_minmax_encoding_args(mn, mx, qmin, qmax, min_scale)
    k_s = torch.empty_like(mn) if factors else mn.new_empty(0)
    k_o = torch.empty_like(mn) if factors and not symmetric else mn.new_empty(0)
    return torch.empty_like(mn), torch.empty_like(mn), k_s, k_o, torch.empty_like(k_o)


@torch.library.register_fake("pyquant::histogram", lib=_lib)
def _fake_histogram(x, lo, rng, nbins):
    check_histogram_args(x, lo, rng, nbins)
    return x.new_empty(tuple(lo.shape) + (nbins,), dtype=torch.int64)


@torch.library.register_fake("pyquant::search", lib=_lib)
def _fake_search(counts, c0, bw, cand_d, cand_o, ns, gamma, p):
    check_search_args(counts, c0, bw, cand_d, cand_o, ns, gamma, p)
    G = counts.shape[0]
    return counts.new_empty((G,), dtype=torch.int64), counts.new_empty((G,), dtype=torch.float64)


@torch.library.register_fake("pyquant::entropy_search", lib=_lib)
def _fake_entropy_search(counts, nq):
    check_entropy_args(counts, nq)
    G = counts.shape[0]
    return counts.new_empty((G,), dtype=torch.int64), counts.new_empty((G,), dtype=torch.float64)


# ---- autograd -------------------------------------------------------------------------------
def _qdq_setup_context(ctx, inputs, output):
    x, scale, offset, qmin, qmax = inputs[:5]
    ctx.save_for_backward(x, scale, offset)  # with a fused activation, x is its input: nothing else is held
    ctx.qmin, ctx.qmax = qmin, qmax
    ctx.grad_scale = inputs[5] if len(inputs) > 5 else 1.0
    ctx.act = (inputs[7] if len(inputs) > 7 else None, inputs[8] if len(inputs) > 8 else None)


def _qdq_backward(ctx, grad):
    x, scale, offset = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    if not any(need):
        return (None,) * 9
    dx, ds, do = ops.quantize_dequantize_backward(grad, x, scale, offset, ctx.qmin, ctx.qmax, ctx.grad_scale, need,
                                                  *ctx.act)
    return (dx if need[0] else None, ds if need[1] else None, do if need[2] else None) + (None,) * 6


torch.library.register_autograd("pyquant::quantize_dequantize", _qdq_backward,
                                setup_context=_qdq_setup_context, lib=_lib)


# ---- max pooling by window ------------------------------------------------------------------------
def check_pool_args(x: torch.Tensor, kernel) -> tuple[int, int]:
    if x.dtype not in _layout.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 3-d (C, H, W) or 4-d (N, C, H, W), got {x.dim()}-d")
    kh, kw = _check_kernel(kernel)
    if x.shape[-2] < kh or x.shape[-1] < kw:
        raise ValueError(f"kernel {list(kernel)} is larger than the input's {tuple(x.shape[-2:])}")
    return kh, kw


def pooled_shape(shape, kh: int, kw: int) -> tuple[int, ...]:
    """A window pool's output shape: floor(H / kh) x floor(W / kw) for each plane."""
    return tuple(shape[:-2]) + (shape[-2] // kh, shape[-1] // kw)


def _check_kernel(kernel) -> tuple[int, int]:
    """A pool window's (kh, kw): positive, and at most 255 positions (a window position is one byte)."""
    kh, kw = (int(k) for k in kernel)
    if kh < 1 or kw < 1 or kh * kw > 255:
        raise ValueError(f"kernel must be positive with at most 255 positions per window, got {list(kernel)}")
    return kh, kw


def check_unpool_args(grad: torch.Tensor, argmax: torch.Tensor, kernel, input_size) -> None:
    kh, kw = _check_kernel(kernel)
    size = list(input_size)
    if len(size) not in (3, 4):
        raise ValueError(f"input_size must be 3-d (C, H, W) or 4-d (N, C, H, W), got {size}")
    want = list(pooled_shape(size, kh, kw))
    if list(grad.shape) != want or list(argmax.shape) != want:
        raise ValueError(f"grad and argmax must have the pooled shape {want}, got {list(grad.shape)} and "
                         f"{list(argmax.shape)}")
    if argmax.dtype != torch.uint8:
        raise TypeError(f"argmax must be uint8, got {argmax.dtype}")


def _ref_max_pool2d_window(x, kernel):
    check_pool_args(x, kernel)
    return _reference.max_pool2d_window(x, list(kernel))


def _ref_max_pool2d_window_backward(grad, argmax, kernel, input_size):
    check_unpool_args(grad, argmax, kernel, input_size)
    return _reference.max_pool2d_window_backward(grad, argmax, list(kernel), list(input_size))


torch.library.register_kernel("pyquant::max_pool2d_window", None, _ref_max_pool2d_window, lib=_lib)
torch.library.register_kernel("pyquant::max_pool2d_window_backward", None, _ref_max_pool2d_window_backward, lib=_lib)


@torch.library.register_fake("pyquant::max_pool2d_window", lib=_lib)
def _fake_max_pool2d_window(x, kernel):
    kh, kw = check_pool_args(x, kernel)
    shape = pooled_shape(x.shape, kh, kw)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


@torch.library.register_fake("pyquant::max_pool2d_window_backward", lib=_lib)
def _fake_max_pool2d_window_backward(grad, argmax, kernel, input_size):
    check_unpool_args(grad, argmax, kernel, input_size)
    return grad.new_empty(list(input_size))


def _pool_setup_context(ctx, inputs, output):
    x, kernel = inputs
    ctx.save_for_backward(output[1])
    ctx.kernel, ctx.input_size = list(kernel), list(x.shape)


def _pool_backward(ctx, grad, grad_argmax):
    (argmax,) = ctx.saved_tensors
    return ops.max_pool2d_window_backward(grad.contiguous(), argmax, ctx.kernel, ctx.input_size), None


torch.library.register_autograd("pyquant::max_pool2d_window", _pool_backward, setup_context=_pool_setup_context,
                                lib=_lib)


def check_qdq_pool_args(x, scale, offset, qmin, qmax, kernel, act_min, act_max):
    kh, kw = check_pool_args(x, kernel)
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    act = _layout.check_activation(act_min, act_max)
    c = x.shape[-3]
    per_channel = [d for d, k in enumerate(scale.shape) if k != 1]
    if scale.numel() != 1 and (scale.numel() != c or per_channel != [scale.dim() - 3]):
        raise ValueError(f"scale must have one value, or one per channel (dim -3, {c} values); got shape "
                         f"{tuple(scale.shape)}")
    return kh, kw, act


def _ref_qdq_max_pool2d(x, scale, offset, qmin, qmax, kernel, check_values=True, act_min=None, act_max=None):
    kh, kw, act = check_qdq_pool_args(x, scale, offset, qmin, qmax, kernel, act_min, act_max)
    if check_values:
        _layout.check_scale_values(scale)
    return _reference.quantize_dequantize_max_pool2d(x, scale, offset, qmin, qmax, [kh, kw], act)


torch.library.register_kernel("pyquant::quantize_dequantize_max_pool2d", None, _ref_qdq_max_pool2d, lib=_lib)


@torch.library.register_fake("pyquant::quantize_dequantize_max_pool2d", lib=_lib)
def _fake_qdq_max_pool2d(x, scale, offset, qmin, qmax, kernel, check_values=True, act_min=None, act_max=None):
    kh, kw, _ = check_qdq_pool_args(x, scale, offset, qmin, qmax, kernel, act_min, act_max)
    shape = pooled_shape(x.shape, kh, kw)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8), x.new_empty(shape)
