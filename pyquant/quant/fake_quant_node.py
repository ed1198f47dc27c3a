"""A fake quantizer's training path as one autograd node (QuantizeNode), with the constants it is
called with (Spec) and the chain rule back to its encoding parameters. QuantizeDequantize uses it; the
input-convolution node (input_conv.py) shares its pieces."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import ops
from ..ops import raw
from .encoding import _broadcast_to, min_scale
from .range_params import minmax_grads, shaped

__all__ = ["Pool", "Spec", "QuantizeNode", "encoding", "encoding_grads", "activate", "act_bounds"]


def activate(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The ops a ReLU / ReLU6 / Hardtanh run, so exports and gradients are theirs."""
    return torch.relu(x) if lo == 0.0 and hi == float("inf") else torch.nn.functional.hardtanh(x, lo, hi)


def act_bounds(act: Optional[tuple[float, float]]) -> tuple[Optional[float], Optional[float]]:
    """The op's act_min/act_max of an activation (lo, hi): None for an unbounded side."""
    if act is None:
        return None, None
    lo, hi = act
    return (None if lo == float("-inf") else float(lo)), (None if hi == float("inf") else float(hi))


Pool = tuple[list[int], list[int], list[int], list[int], bool]  # max_pool2d: kernel, stride, padding, dilation, ceil


def _max_pool(x: torch.Tensor, pool: Pool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, *pool)


class Spec(NamedTuple):
    """A quantizer's constants, passed to QuantizeNode as one argument."""
    minmax: bool  # the parameters are min/max (MinMaxRange): scale and offset derive from them
    symmetric: bool
    qmin: int
    qmax: int
    grad_scale: float
    check: bool  # the kernel checks the scale (a CPU scale: a native loop, no tensor read)
    act: tuple[Optional[float], Optional[float]]
    pool: Optional[Pool]
    train: bool  # autograd on at the call: the chain factors are worth forming
    check_on_device: bool = False  # a GPU scale parameter: checked by a device-side assertion, no host read


def encoding(a: torch.Tensor, b: torch.Tensor, spec: Spec, factors: bool = True):
    """(scale, offset, chain factors) of the encoding parameters; called inside autograd Functions'
    forward, where autograd is off. Without `factors` (fixed ranges) the chain factors are not formed."""
    if spec.minmax:
        s, o, k_s, k_o, k_ot = ops.eager_kernel("minmax_encoding", a)(
            a, b, spec.qmin, spec.qmax, min_scale(spec.qmax - spec.qmin), spec.symmetric, factors)
        if not factors:
            return s, o, (None, None, None)
        return s, o, (k_s, None, None) if spec.symmetric else (k_s, k_o, k_ot)
    if spec.check_on_device:
        ops.check_scale_values_on_device(a)
    return a, b, (None, None, None)


class QuantizeNode(torch.autograd.Function):
    """A quantizer's whole training path as one autograd node: encoding parameters (min/max or
    scale/offset) -> scale/offset -> [activation +] fake quantization [-> 2-d max pool]. Recorded op by
    op, a min/max quantizer is a dozen small autograd nodes whose bookkeeping costs as much as the kernel
    on a small layer; here the chain rule back to the parameters is written out (straight-through on the
    offset's rounding, clamps passing where they are inactive, as autograd's own rules do).

    With a pool, the node keeps for the backward only the input value each pooled maximum came from and
    its position: a pooled-size tensor instead of the full-size input, output and int64 indices of the
    separate ops, with the same values and gradients (only the summation order of the range gradients
    differs). Non-overlapping windows on the CPU take one native pass (pyquant::
    quantize_dequantize_max_pool2d)."""

    @staticmethod
    def forward(ctx, x, a, b, spec: Spec):
        ctx.fused = None
        if spec.minmax and spec.pool is None:
            fused = ops.eager_native("minmax_qdq_forward", x)
            if (fused is not None and x.is_contiguous() and x.numel() and a.dtype == b.dtype == torch.float32
                    and a.device == x.device and b.device == x.device):
                y, enc, state = fused(x, _as_block_broadcast(a, x), _as_block_broadcast(b, x), spec.qmin,
                                      spec.qmax, min_scale(spec.qmax - spec.qmin), spec.symmetric, *spec.act)
                ctx.save_for_backward(x, enc)
                ctx.spec, ctx.a_shape = spec, a.shape
                ctx.fused = (state, ops.eager_native("minmax_qdq_backward", x))
                return y
        s, o, factors = encoding(a, b, spec, spec.train and any(ctx.needs_input_grad[1:3]))
        sb, ob = _as_block_broadcast(s, x), _as_block_broadcast(o, x)
        idx = None
        pooled = False  # whether xin holds only each pooled maximum's input value
        if spec.pool is None:
            xin = x
            out = ops.eager_kernel("quantize_dequantize", x)(x, sb, ob, spec.qmin, spec.qmax, spec.grad_scale,
                                                             spec.check, *spec.act)
        elif _by_window(x, spec.pool) and _channelwise(sb):  # one pass, a byte per output for the argmax
            out, idx, xin = ops.eager_kernel("quantize_dequantize_max_pool2d", x)(
                x, sb, ob, spec.qmin, spec.qmax, spec.pool[0], spec.check, *spec.act)
            pooled = True
        else:
            q = raw.quantize_dequantize(x, sb, ob, spec.qmin, spec.qmax, spec.grad_scale, spec.check, *spec.act)
            out, idx = _max_pool(q, spec.pool)
            # a scale that varies along H or W is indexed by the input's coordinates: keep the whole input
            pooled = _channelwise(sb)
            xin = x.flatten(-2).gather(-1, idx.flatten(-2)).reshape(out.shape) if pooled else x
        ctx.save_for_backward(xin, idx, s, o, *factors)
        ctx.spec, ctx.x_shape, ctx.pooled = spec, x.shape, pooled
        return out

    @staticmethod
    def backward(ctx, g):
        spec = ctx.spec
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        if ctx.fused is not None:  # the min/max encoding's chain rule inside the native backward
            x, enc = ctx.saved_tensors
            state, backward = ctx.fused
            dx, dmin, dmax = backward(
                g, x, enc, state, spec.qmin, spec.qmax, spec.symmetric, spec.grad_scale, need_x,
                ctx.a_shape if need_a or need_b else None)
            return dx, (dmin if need_a else None), (dmax if need_b else None), None
        xin, idx, s, o, *factors = ctx.saved_tensors
        need_s = need_a or need_b
        need_o = need_s and not spec.symmetric if spec.minmax else need_b
        if spec.pool is not None and not ctx.pooled:  # the pool's backward first, at the input's size
            g = _unpool(g, idx, ctx.x_shape)
        dx, ds, do = ops.eager_kernel("quantize_dequantize_backward", xin)(
            g, xin, _as_block_broadcast(s, xin), _as_block_broadcast(o, xin), spec.qmin, spec.qmax, spec.grad_scale,
            [need_x, need_s, need_o], *spec.act)
        if need_x and ctx.pooled:
            if idx.dtype == torch.uint8:
                dx = ops.eager_kernel("max_pool2d_window_backward", dx)(dx.contiguous(), idx, spec.pool[0],
                                                                        list(ctx.x_shape))
            else:
                dx = _unpool(dx, idx, ctx.x_shape)
        da, db = encoding_grads(spec, s, factors, ds, do, need_a, need_b)
        return (dx if need_x else None, da, db, None)


def _as_block_broadcast(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An encoding parameter in the form the ops take; one value in any shape is per tensor as it is (the ops
    lay it out themselves), which spares a reshape per call."""
    return p if p.numel() == 1 else _broadcast_to(p, x)


def _channelwise(sb: torch.Tensor) -> bool:
    """One scale, or one per channel (dim -3): the layouts the pooled quantizer kernel takes."""
    return sb.numel() == 1 or [d for d, k in enumerate(sb.shape) if k != 1] == [sb.dim() - 3]


def encoding_grads(spec: Spec, s: torch.Tensor, factors, ds: torch.Tensor, do: torch.Tensor, need_a: bool,
                   need_b: bool):
    """Gradients of the encoding parameters (min, max) or (scale, offset) from those of scale and offset."""
    if not (need_a or need_b):
        return None, None
    if not spec.minmax:
        return (shaped(ds, s.shape) if need_a else None), (shaped(do, s.shape) if need_b else None)
    return minmax_grads(s.shape, factors, ds, do, need_a, need_b)


def _by_window(x: torch.Tensor, pool: Pool) -> bool:
    """Whether a max pool is one of non-overlapping windows that cover x (pyquant's window pooling)."""
    kernel, stride, padding, dilation, ceil = pool
    return (x.dim() in (3, 4) and list(stride) == list(kernel) and not any(padding) and all(d == 1 for d in dilation)
            and (not ceil or (x.shape[-2] % kernel[0] == 0 and x.shape[-1] % kernel[1] == 0))
            and kernel[0] * kernel[1] <= 255)


def _unpool(g: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The max pool's backward from its indices alone (flat positions in each H x W plane); overlapping
    windows that pick one element add up, as in aten's."""
    planes = math.prod(shape[:-2])
    out = g.new_zeros((planes, shape[-2] * shape[-1]))
    out.scatter_add_(1, idx.reshape(planes, -1), g.reshape(planes, -1))
    return out.reshape(shape)
