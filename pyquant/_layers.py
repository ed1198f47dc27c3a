"""The torch layers pyquant knows, written once: where each keeps its weight's output channels, which
layers each technique handles, and the batch-norm arithmetic that folding uses (in the techniques and
in QuantSim's fold-each-step weight quantizer alike)."""
from __future__ import annotations

from torch import nn
import torch

__all__ = ["WEIGHT_AXIS", "BATCH_NORMS", "CONV_TRANSPOSE", "TECHNIQUE_LAYERS", "layers_for", "weight_axis",
           "is_transposed", "batchnorm_usable", "batchnorm_scale",
           "batchnorm_scale_shift"]

WEIGHT_AXIS: dict[type, int] = {
    nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.Linear: 0,
    nn.Embedding: 0, nn.LayerNorm: 0, nn.GroupNorm: 0, nn.PReLU: 0,
}
"""Modules whose `weight` QuantSim quantizes, and the axis of its output channels (per-channel axis)."""

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TECHNIQUE_LAYERS: dict[str, tuple[type, ...]] = {
    # a batch norm folds into the layer before it (or, exactly, after it: Linear / unpadded Conv)
    "bn_fold": _CONV + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear),
    # QuantSim(batchnorm="fold_each_step"): the weight is quantized with its batch norm folded in
    "fold_each_step": _CONV + CONV_TRANSPOSE + (nn.Linear,),
    # pairs scaled by cross-layer equalization (depthwise Conv2d included)
    "cle": (nn.Conv2d, nn.Conv1d, nn.Linear),
    # layers whose input columns activation smoothing scales (when called as modules; linear calls of
    # functional and torch.export graphs are recognised in the graph)
    "smoothing": (nn.Linear,),
    "bias_correction": (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d),
    "adaround": (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear),
    # SeqMSE and GPTQ on a QuantSim: linear layers (modules, or linear ops on graph weights)
    "layerwise_sim": (nn.Linear,),
    # QuantSim's int32 bias: layers an integer target runs with a bias on the int32 grid at s_x * s_w
    "int32_bias": _CONV + CONV_TRANSPOSE + (nn.Linear,),
    # layers whose per-channel weight ranges the analysis plots
    "weight_ranges": _CONV + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear),
}
"""Which layer types each technique handles (isinstance checks)."""


def layers_for(technique: str) -> tuple[type, ...]:
    """The layer types `technique` handles (a key of TECHNIQUE_LAYERS)."""
    try:
        return TECHNIQUE_LAYERS[technique]
    except KeyError:
        raise KeyError(f"no layer table for {technique!r}; known: {sorted(TECHNIQUE_LAYERS)}") from None


def weight_axis(m: nn.Module):
    """The output-channel axis of `m.weight`, or None for a module QuantSim does not quantize."""
    return next((a for t, a in WEIGHT_AXIS.items() if isinstance(m, t)), None)


def is_transposed(m: nn.Module) -> bool:
    """A transposed convolution: its weight keeps the output channels on dim 1."""
    return isinstance(m, CONV_TRANSPOSE)


def batchnorm_usable(bn: nn.Module) -> bool:
    """A batch norm with running statistics, which folding can use."""
    return isinstance(bn, BATCH_NORMS) and bn.track_running_stats and bn.running_mean is not None


def batchnorm_scale(bn: nn.Module) -> torch.Tensor:
    """a = gamma / sqrt(running_var + eps) per channel (gamma = 1 without affine parameters): the factor
    folding multiplies the weight by."""
    sigma = torch.sqrt(bn.running_var + bn.eps)
    return bn.weight / sigma if bn.affine else 1.0 / sigma


def batchnorm_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, shift) with bn(y) = a * y + shift per channel in eval mode: a = batchnorm_scale(bn),
    shift = beta - mean * a (beta = 0 without affine parameters)."""
    a = batchnorm_scale(bn)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * a
    return a, shift
