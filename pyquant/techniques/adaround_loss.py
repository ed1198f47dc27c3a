"""AdaRound's reconstruction loss on a step's rows, with its gradient in the weight computed in the same
pass over the rows.

The loss of a layer on rows X (inputs) and Y (FP32 targets after the activation) is

    L(W) = sum over rows and channels of (act(X W^T + b) - Y)^2 / rows

and its gradient dL/dW = (2 / rows) * (act'(Z) * (act(Z) - Y))^T X with Z = X W^T + b. Autograd
walks the [rows, channels] tensors of a step some eight times (bias, activation, difference, square,
sum, and the same backwards) and keeps them all for the backward. Here the forward computes the
gradient right away, with the bias added inside the product and the activation's mask applied by
one op, a chunk of rows at a time (a few million floats of X: the temporaries stay small, and there
are few chunks, so few thread synchronizations). The gradient is then handed to autograd for the rest
of the chain (soft rounding -> alpha).

A layer with no activation after it has a loss quadratic in W: with the Gram statistics of all its
rows (G = X^T X, B = (Y - b)^T X, yy = sum (Y - b)^2; pyquant.techniques.layerwise.gram),
L(W) = (tr(W G W^T) - 2 tr(W B^T) + yy) / rows and dL/dW = 2 (W G - B) / rows: one matrix product
gives both (autograd would take three).

Two row layouts: dense layers (Linear, convolutions with one group) take X [rows, K] and Y [rows, C];
depthwise convolutions (one output channel per group) take X [C, rows, k] and Y [C, rows], channel
first, so that a channel's rows are contiguous and the product is one batched matrix-vector product.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["activation_bounds", "RowLoss", "row_loss", "GramLoss", "gram_row_loss"]

# Floats of X per chunk on CPU (16 MB): on MobileNetV2's layers smaller chunks are no faster on one
# thread, and each chunk costs a few thread synchronizations on more.
_CPU_CHUNK = 1 << 22


def activation_bounds(act: nn.Module) -> Optional[tuple[Optional[float], Optional[float]]]:
    """(lower, upper) clamp of the activation after a layer, None on a side without one; (None, None) for
    Identity; None when `act` is not a clamp (ReLU, ReLU6, Hardtanh, Identity) and needs autograd."""
    if isinstance(act, nn.Identity):
        return (None, None)
    if isinstance(act, nn.ReLU):
        return (0.0, None)
    if isinstance(act, nn.Hardtanh):  # ReLU6 included
        return (float(act.min_val), float(act.max_val))
    return None


def _loss_and_grad_z(z: torch.Tensor, y: torch.Tensor,
                     bounds: tuple[Optional[float], Optional[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, d/dz of it / 2) for the pre-activations z of a chunk (z is overwritten).
    The gradient is zero where the activation clamps, with autograd's convention at the bounds
    (hardtanh_backward / threshold_backward: zero at the bound itself)."""
    lo, hi = bounds
    if lo is None and hi is None:
        d = z.sub_(y)
        return torch.dot(d.reshape(-1), d.reshape(-1)), d
    d = z.clamp(lo, hi).sub_(y)
    sse = torch.dot(d.reshape(-1), d.reshape(-1))
    if hi is None:
        return sse, torch.ops.aten.threshold_backward(d, z, lo)
    return sse, torch.ops.aten.hardtanh_backward(d, z, lo if lo is not None else -math.inf, hi)


def _dense(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor],
           bounds: tuple, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = X.shape[0]
    step = max(64, chunk // max(X.shape[1] + Y.shape[1], 1))
    gW = torch.zeros_like(W)
    sse = W.new_zeros(())
    Wt = W.t()
    for r0 in range(0, rows, step):
        x = X[r0:r0 + step]
        z = torch.addmm(b, x, Wt) if b is not None else x @ Wt
        s, g = _loss_and_grad_z(z, Y[r0:r0 + step], bounds)
        sse += s
        gW.addmm_(g.t(), x)
    return sse, gW


def _depthwise(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor],
               bounds: tuple, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    C, rows, k = X.shape
    step = max(1, chunk // max(rows * k, 1))
    gW = torch.empty_like(W)
    sse = W.new_zeros(())
    for c0 in range(0, C, step):
        x = X[c0:c0 + step]                                    # [c, rows, k]
        z = torch.bmm(x, W[c0:c0 + step].unsqueeze(-1)).squeeze(-1)  # [c, rows]
        if b is not None:
            z += b[c0:c0 + step].unsqueeze(-1)
        s, g = _loss_and_grad_z(z, Y[c0:c0 + step], bounds)
        sse += s
        gW[c0:c0 + step] = torch.bmm(g.unsqueeze(1), x).squeeze(1)
    return sse, gW


class RowLoss(torch.autograd.Function):
    """L(W) of the module docstring as an autograd function of W ([C, K], or [C, k] for depthwise)."""

    @staticmethod
    def forward(ctx, W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, b: Optional[torch.Tensor],
                bounds: tuple, depthwise: bool, chunk: int) -> torch.Tensor:
        rows = X.shape[1] if depthwise else X.shape[0]
        sse, gW = (_depthwise if depthwise else _dense)(X, Y, W.detach(), b, bounds, chunk)
        ctx.save_for_backward(gW * (2.0 / max(rows, 1)))
        return sse / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gW,) = ctx.saved_tensors
        return gW * grad_out, None, None, None, None, None, None


def row_loss(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, b: Optional[torch.Tensor],
             bounds: tuple[Optional[float], Optional[float]], depthwise: bool = False,
             chunk: Optional[int] = None) -> torch.Tensor:
    """The reconstruction loss of weight `W` (2-d: [C, K]; depthwise [C, k]) on rows `X`, `Y` (layouts in the
    module docstring), differentiable in W. `bounds`: `activation_bounds` of the activation after the layer.
    `chunk`: floats of X per chunk (default: 4M on CPU, all rows at once on a GPU)."""
    if chunk is None:
        chunk = _CPU_CHUNK if X.device.type == "cpu" else max(X.numel(), 1)
    b = b.detach() if b is not None else None
    return RowLoss.apply(W, X, Y, b, tuple(bounds), bool(depthwise), int(chunk))


class GramLoss(torch.autograd.Function):
    """L(W) from the Gram statistics of the rows (module docstring), with its gradient from the same
    product W G."""

    @staticmethod
    def forward(ctx, W: torch.Tensor, G: torch.Tensor, B: torch.Tensor, yy: float, rows: int) -> torch.Tensor:
        W = W.detach()
        WG = W @ G
        n = max(int(rows), 1)
        loss = (torch.dot((WG - 2.0 * B).reshape(-1), W.reshape(-1)) + yy) / n
        ctx.save_for_backward(WG.sub_(B).mul_(2.0 / n))
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gW,) = ctx.saved_tensors
        return gW * grad_out, None, None, None, None


def gram_row_loss(W: torch.Tensor, G: torch.Tensor, B: torch.Tensor, yy: float, rows: int) -> torch.Tensor:
    """The reconstruction loss of weight `W` ([C, K], or any shape with C first) from the Gram statistics
    `layerwise.gram` returns, differentiable in W."""
    return GramLoss.apply(W.reshape(W.shape[0], -1), G, B, float(yy), int(rows))
