"""Batch-norm folding: a BatchNorm that directly follows a Conv/ConvTranspose/Linear (and is that
layer's only consumer) is folded into the layer's weight and bias, as an integer target runs it.

    w' = w * gamma / sigma (per output channel),   b' = (b - mean) * gamma / sigma + beta,
    sigma = sqrt(running_var + eps)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FoldedPairs(list):
    """The folded (layer, batchnorm) names; `bn_stats[layer]` keeps the BN's (beta, |gamma|): the mean
    and standard deviation the layer's folded outputs had during training (used by high-bias
    absorption and analytical bias correction)."""

    def __init__(self, pairs=(), bn_stats=None):
        super().__init__(pairs)
        self.bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(bn_stats or {})


def fold_batchnorms(model: nn.Module, dummy_input: Optional[Any] = None) -> FoldedPairs:
    """Folds BatchNorms into the preceding layers of `model` in place (the BN becomes nn.Identity).

    The graph is read with torch.fx; `dummy_input` is accepted for API symmetry with the other
    techniques. Returns the folded (layer, batchnorm) module names. The model's outputs in eval mode
    are unchanged up to float rounding."""
    gm = fx.symbolic_trace(model)
    pairs = FoldedPairs()
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        bn = gm.get_submodule(n.target)
        if not isinstance(bn, _BNS) or not bn.track_running_stats or bn.running_mean is None:
            continue
        prev = n.args[0] if n.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, _LAYERS):
            continue
        bn_mod = model.get_submodule(n.target)
        if bn_mod.affine:
            pairs.bn_stats[prev.target] = (bn_mod.bias.detach().clone(), bn_mod.weight.detach().abs().clone())
        _fold(model.get_submodule(prev.target), bn_mod)
        _replace(model, n.target, nn.Identity())
        pairs.append((prev.target, n.target))
    return pairs


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    axis = 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0
    if axis == 1 and layer.groups != 1:
        raise NotImplementedError("folding into a grouped ConvTranspose is not supported")
    shape = [1] * w.dim()
    shape[axis] = -1
    w.mul_(scale.reshape(shape))
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_b = (b - bn.running_mean) * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b)
    else:
        layer.bias.copy_(new_b)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
