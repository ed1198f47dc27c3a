"""Batch-norm folding, as an integer target runs it.

A BatchNorm that directly follows a Conv/ConvTranspose/Linear (and is that layer's only consumer) is
folded into the layer's weight and bias:

    w' = w * gamma / sigma (per output channel),   b' = (b - mean) * gamma / sigma + beta,
    sigma = sqrt(running_var + eps)

A BatchNorm that directly precedes a Linear, or a convolution without padding (only then is the
per-channel shift exact at every output position), is folded forward into that layer instead:

    w' = w * a (per input channel),   b' = b + sum over inputs of w * (beta - mean * a),   a = gamma / sigma

`fold_batchnorms_to_scale(sim)` does the first kind of folding inside a QuantSim: the weight
quantizers' encodings are scaled with the weights, so a simulation trained with its batch norms
(QAT) keeps its learned ranges after folding.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from .._deprecation import _UNSET
from .._layers import batchnorm_scale_shift, batchnorm_usable, is_transposed, layers_for
from .._warnings import nothing_to_do, verbose_switch
from .graph_layers import batchnorm_of, layer_graph, layer_of, value_users

_LAYERS = layers_for("bn_fold")


class FoldedPairs(list):
    """The folded (layer, batchnorm) names. `bn_stats[layer]` keeps the BN's (beta, |gamma|): the mean
    and standard deviation the layer's folded outputs had during training (used by high-bias
    absorption and analytical bias correction). `forward` lists the (batchnorm, layer) pairs folded
    into the layer after the BN."""

    def __init__(self, pairs=(), bn_stats=None, forward=()):
        super().__init__(pairs)
        self.bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(bn_stats or {})
        self.forward: list[tuple[str, str]] = list(forward)

    def __repr__(self) -> str:
        return f"FoldedPairs({list(self)!r}, forward={self.forward!r})"

    def summary(self) -> str:
        lines = [f"batch-norm folding: {len(self)} into the layer before, {len(self.forward)} into the layer "
                 f"after"]
        lines += [f"  {bn} -> {layer}" for layer, bn in self]
        lines += [f"  {bn} -> {layer} (forward)" for bn, layer in self.forward]
        return "\n".join(lines)


def _can_fold_forward(layer: nn.Module, channels: int) -> bool:
    if isinstance(layer, nn.Linear):
        return layer.in_features == channels
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        no_pad = layer.padding == "valid" or all(p == 0 for p in (layer.padding if isinstance(layer.padding, tuple)
                                                                   else (layer.padding,)))
        return no_pad and layer.in_channels == channels
    return False


def fold_batchnorms(model: nn.Module, dummy_input: Optional[Any] = None, *, verbose: Any = _UNSET) -> FoldedPairs:
    """Folds BatchNorms into the adjacent layers of `model` in place (each folded BN becomes
    nn.Identity) and returns what was folded.

    The graph is read with torch.fx, or, for a model fx cannot trace, captured with torch.export from
    `dummy_input` (a tensor, a tuple of positional inputs or a dict of keyword inputs) as QuantSim captures
    it. The model's outputs in eval mode are unchanged up to float rounding. A model with
    nothing to fold is left as it is, with a NothingToDoWarning (`verbose` is deprecated: filter the
    category instead)."""
    with verbose_switch(verbose, "fold_batchnorms"):
        pairs = _fold_model(model, dummy_input)
        if not pairs and not pairs.forward:
            nothing_to_do("fold_batchnorms: no batch norm next to a Conv/ConvTranspose/Linear was found; the "
                          "model is unchanged", stacklevel=4)
    return pairs


def _fold_model(model: nn.Module, dummy_input: Optional[Any] = None) -> FoldedPairs:
    gm = layer_graph(model, dummy_input)
    pairs = FoldedPairs()
    done: set[str] = set()
    for n in gm.graph.nodes:
        bn_name = batchnorm_of(model, gm, n)
        if bn_name is None or not batchnorm_usable(model.get_submodule(bn_name)):
            continue
        prev = n.args[0] if n.args else None
        if not isinstance(prev, fx.Node) or len(value_users(prev)) != 1:
            continue
        layer = layer_of(model, gm, prev, _LAYERS)
        if layer is None:
            continue
        bn_mod = model.get_submodule(bn_name)
        if bn_mod.affine:
            pairs.bn_stats[layer] = (bn_mod.bias.detach().clone(), bn_mod.weight.detach().abs().clone())
        _fold(model.get_submodule(layer), bn_mod)
        _replace(model, bn_name, nn.Identity())
        pairs.append((layer, bn_name))
        done.add(bn_name)
    # BN -> layer, where the BN's output feeds only that layer and folding is exact
    for n in gm.graph.nodes:
        bn_name = batchnorm_of(model, gm, n)
        if bn_name is None or bn_name in done or not batchnorm_usable(model.get_submodule(bn_name)):
            continue
        out = _bn_output(n)
        users = value_users(out) if out is not None else []
        if len(users) != 1 or not users[0].args or users[0].args[0] is not out:
            continue
        layer_name = layer_of(model, gm, users[0], _LAYERS)
        if layer_name is None:
            continue
        layer = model.get_submodule(layer_name)
        bn_mod = model.get_submodule(bn_name)
        if not _can_fold_forward(layer, bn_mod.num_features) or getattr(layer, "groups", 1) != 1:
            continue
        _fold_forward(bn_mod, layer)
        _replace(model, bn_name, nn.Identity())
        pairs.forward.append((bn_name, layer_name))
    return pairs


def _bn_output(n: fx.Node) -> Optional[fx.Node]:
    """The node holding a batch norm's normalized output: the node itself, or for the ATen op that returns
    (output, mean, invstd) its first item."""
    if n.op == "call_function" and n.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        items = [u for u in n.users if u.target is operator.getitem and u.args[1] == 0]
        return items[0] if len(items) == 1 else None
    return n


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module, weight: Optional[torch.Tensor] = None,
          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Folds `bn` into `layer` (in place); returns the per-output-channel factor applied to the weight.
    `weight` / `bias`: the parameters to change where they are not the layer's attributes (a simulation's,
    behind its quantizers)."""
    w = layer.weight if weight is None else weight
    scale, _ = batchnorm_scale_shift(bn)
    axis = 1 if is_transposed(layer) else 0
    if axis == 1 and layer.groups != 1:
        raise NotImplementedError("folding into a grouped ConvTranspose is not supported")
    shape = [1] * w.dim()
    shape[axis] = -1
    w.mul_(scale.reshape(shape))
    if bias is not None:
        bias.copy_((bias - bn.running_mean) * scale + (bn.bias if bn.affine else 0.0))
        return scale
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_b = (b - bn.running_mean) * scale + (bn.bias if bn.affine else 0.0)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b)
    else:
        layer.bias.copy_(new_b)
    return scale


@torch.no_grad()
def _fold_forward(bn: nn.Module, layer: nn.Module) -> None:
    a, shift = batchnorm_scale_shift(bn)
    w = layer.weight
    shape = [1, -1] + [1] * (w.dim() - 2)
    add = (w.reshape(w.shape[0], w.shape[1], -1).sum(2) * shift.reshape(1, -1)).sum(1)
    w.mul_(a.reshape(shape))
    if layer.bias is None:
        layer.bias = nn.Parameter(add.clone())
    else:
        layer.bias.add_(add)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fold_batchnorms_to_scale(sim, *, verbose: Any = _UNSET) -> FoldedPairs:
    """Folds the batch norms of a QuantSim's model (built on an unfolded model, e.g. for QAT with batch
    norms) into the preceding layers' weights, and scales those weights' encodings by the same
    per-channel factors, so that the simulation keeps the ranges it has (calibrated or learned).

    Exact for per-channel weight encodings with positive BN scales. A per-tensor weight encoding (or a
    channel whose BN scale is negative under a symmetric grid) cannot follow the weights exactly and
    is recalibrated on the folded weight; the returned pairs' `recalibrated` attribute names them. A
    simulation without batch norms to fold gives a NothingToDoWarning."""
    with verbose_switch(verbose, "fold_batchnorms_to_scale"):
        pairs = _fold_sim(sim)
        if not pairs:
            nothing_to_do("fold_batchnorms_to_scale: the simulation has no batch norm after a Conv/ConvTranspose/"
                          "Linear; nothing was folded", stacklevel=4)
    return pairs


def _fold_sim(sim) -> FoldedPairs:
    gm = sim.model
    pairs = FoldedPairs()
    pairs.recalibrated = []  # type: ignore[attr-defined]
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not batchnorm_usable(gm.get_submodule(n.target)):
            continue
        prev = n.args[0] if n.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = gm.get_submodule(prev.target)
        if not isinstance(layer, _LAYERS):
            continue
        bn = gm.get_submodule(n.target)
        if bn.affine:
            pairs.bn_stats[prev.target] = (bn.bias.detach().clone(), bn.weight.detach().abs().clone())
        qname = f"{prev.target}.weight"
        q = sim.param_quantizers.get(qname)
        folded_each_step = q is not None and sim.folds_batchnorm_each_step(qname)
        k = _fold(layer, bn, weight=sim.weight(qname) if q is not None else None,
                  bias=sim.bias(prev.target, create=True))
        if folded_each_step:
            # The encoding already describes the folded weight: keep it, quantize the weight as is.
            sim.stop_folding_batchnorm(qname)
        elif q is not None and q.has_encoding:
            if not q.rescale_encoding(k, 1 if is_transposed(layer) else 0):
                frozen = q.frozen
                q.frozen = False
                sim.calibrate_weight(qname)
                q.frozen = frozen
                pairs.recalibrated.append(qname)  # type: ignore[attr-defined]
        _replace(gm, n.target, nn.Identity())
        pairs.append((prev.target, n.target))
    gm.recompile()
    return pairs
