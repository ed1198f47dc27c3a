"""Weight quantizers as parametrizations of a module's `weight`: every access of the weight returns its
fake quantization, so the module runs unchanged and the weight stays trainable (QAT)."""
from __future__ import annotations

import torch
from torch import nn

from .._layers import batchnorm_scale
from ..quant import QuantizeDequantize

__all__ = ["WeightQuantizer", "FoldedWeightQuantizer"]


class WeightQuantizer(nn.Module):
    """Parametrization that fake-quantizes a module's weight on every access."""

    def __init__(self, q: QuantizeDequantize):
        super().__init__()
        self.q = q

    def quantizer_input(self, w: torch.Tensor) -> torch.Tensor:
        """What the quantizer sees of weight `w` (what calibration observes)."""
        return w

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.q(w)


class FoldedWeightQuantizer(WeightQuantizer):
    """Parametrization for QAT with batch norms kept: quantizes the weight as it will be deployed, with
    the following batch norm folded in at its current running statistics, then divides the factor back
    out so the batch norm itself still runs (batch statistics in training, running ones in eval).
    In eval mode the layer + batch norm compute exactly conv(x, q(w * f)) + shift, the folded target."""

    def __init__(self, q: QuantizeDequantize, bn: nn.Module, axis: int):
        super().__init__(q)
        self.axis = axis
        object.__setattr__(self, "bn", bn)  # not a submodule: the model owns it (no duplicate state)

    def factor(self, w: torch.Tensor) -> torch.Tensor:
        f = batchnorm_scale(self.bn)  # the factor the final fold applies: the same weights
        f = torch.where(f == 0, torch.ones_like(f), f)  # a dead channel: nothing to undo
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return f.reshape(shape)

    def quantizer_input(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.factor(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        f = self.factor(w)
        return self.q(w * f) / f
