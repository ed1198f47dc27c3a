"""The model input's quantizer and the convolution that consumes it, as one autograd node for range
learning on single-channel inputs (grayscale images, spectrograms).

Learning the input quantizer's range needs sum(G * D) over the input, where G is the loss gradient at
the quantized input and D the fake-quant derivative in scale (or offset) per element. Autograd gets G
from the convolution's input gradient, which for one input channel is a slow kernel on the CPU (about
ten times the weight gradient). G = conv_transpose(gy, W) is linear, so

    sum(G * D) = sum_{o,kh,kw} W[o, c, kh, kw] * (weight gradient of the same conv with input D)[o, c, kh, kw]

and one weight-gradient call over [x_hat, D_scale, D_offset] gives the layer's weight gradient and both
sums. The input needs no gradient of its own (the model input), and values are the separate ops'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import raw, reference
from .encoding import _broadcast_to
from .fake_quant_node import Spec, encoding, encoding_grads
from .quantizer import QuantizeDequantize

__all__ = ["quantized_input_conv", "can_fuse_input_conv"]


def can_fuse_input_conv(conv: nn.Module) -> bool:
    """A Conv2d this node can take: one input channel, zero padding given as numbers."""
    return (isinstance(conv, nn.Conv2d) and conv.in_channels == 1 and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def quantized_input_conv(q: QuantizeDequantize, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(q(x))``; one node when q learns its range and x needs no gradient, else the two modules."""
    ready = (torch.is_grad_enabled() and not x.requires_grad and q.enabled and not q._calibrating
             and q._export_consts is None and q.has_encoding and x.dim() == 4 and x.shape[1] == 1)
    a, b = q.encoding_parameters()
    if not ready or not (a.requires_grad or b.requires_grad):
        return conv(q(x))
    return _InputConvNode.apply(x, a, b, conv.weight, conv.bias, q._spec(x),
                                (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)))


class _InputConvNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, w, bias, spec: Spec, conv: tuple):
        s, o, factors = encoding(a, b, spec)
        sb, ob = _broadcast_to(s, x), _broadcast_to(o, x)
        xh = raw.quantize_dequantize(x, sb, ob, spec.qmin, spec.qmax, spec.grad_scale, spec.check)
        stride, padding, dilation = conv
        ctx.save_for_backward(x, s, sb, ob, w, *factors)
        ctx.spec, ctx.conv, ctx.has_bias = spec, conv, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.conv2d(xh, w, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, gy):
        x, s, sb, ob, w, *factors = ctx.saved_tensors
        spec = ctx.spec
        stride, padding, dilation = ctx.conv
        need_a, need_b, need_w, need_bias = (bool(v) for v in ctx.needs_input_grad[1:5])
        xh = raw.quantize_dequantize(x, sb, ob, spec.qmin, spec.qmax, spec.grad_scale, False)
        _, d_s, d_o = reference.fake_quant_derivatives(x, sb, ob, spec.qmin, spec.qmax)  # per element
        dt = gy.dtype  # the convolution's dtype (bfloat16 under autocast)
        inp = torch.cat([xh.to(dt), d_s.to(dt), d_o.to(dt)], dim=1)
        w3 = w.new_empty((w.shape[0], 3) + tuple(w.shape[2:]), dtype=dt)  # only its shape is read
        _, dw3, dbias = torch.ops.aten.convolution_backward(
            gy, inp, w3, [w.shape[0]] if ctx.has_bias else None, list(stride), list(padding), list(dilation), False,
            [0, 0], 1, [False, True, need_bias])
        wf = w.float()
        ds = (wf * dw3[:, 1:2].float()).sum().reshape(s.shape) * spec.grad_scale
        do = (wf * dw3[:, 2:3].float()).sum().reshape(s.shape) * spec.grad_scale
        da, db = encoding_grads(spec, s, factors, ds, do, need_a, need_b)
        return (None, da, db, dw3[:, 0:1].to(w.dtype) if need_w else None,
                dbias.to(ctx.bias_dtype) if need_bias else None, None, None)
