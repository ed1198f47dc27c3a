"""Layers, batch norms and activations as a captured graph holds them, for the techniques that find
their layer pairs in the graph (batch-norm folding, cross-layer equalization, analytical bias correction).

A graph from torch.fx calls the model's modules (`call_module` nodes); one from torch.export (models fx
cannot trace, transformers models) runs ATen ops on the parameters, read as graph attributes by their
paths (`features.0.weight`). Both name a layer by its module path in the user's model, so a technique
changes the user's modules in place whichever way the model was captured."""
from __future__ import annotations

import copy
import itertools
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._layers import BATCH_NORMS
from ..sim.graph import trace

__all__ = ["layer_graph", "value_users", "layer_of", "batchnorm_of", "activation_of", "IDENTITY_OPS"]

_aten = torch.ops.aten

# Ops that run a weighted layer on its input (argument 0) with the weight and bias at 1 and 2.
_LAYER_CALLS = {
    _aten.linear.default, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
    F.linear, F.conv1d, F.conv2d, F.conv3d,
}
_BATCH_NORM_CALLS = {_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default, F.batch_norm}
# Reads of a value that do not read its data (export's metadata checks, shapes).
_METADATA_ONLY = {_aten._assert_tensor_metadata.default, _aten.sym_size.int, _aten.sym_numel.default}
IDENTITY_OPS = {_aten.clone.default, _aten.alias.default, _aten.detach.default, _aten.contiguous.default}
"""ATen ops whose output is their input unchanged (an nn.Identity as torch.export records it)."""

_RELU = {torch.relu, torch.relu_, F.relu, _aten.relu.default, _aten.relu_.default}
_FUNCTION_ACTIVATIONS = {
    F.gelu: nn.GELU, _aten.gelu.default: nn.GELU, F.silu: nn.SiLU, _aten.silu.default: nn.SiLU,
    torch.sigmoid: nn.Sigmoid, _aten.sigmoid.default: nn.Sigmoid, torch.tanh: nn.Tanh, _aten.tanh.default: nn.Tanh,
    F.hardswish: nn.Hardswish, _aten.hardswish.default: nn.Hardswish, F.leaky_relu: nn.LeakyReLU,
    _aten.leaky_relu.default: nn.LeakyReLU, F.relu6: nn.ReLU6, F.elu: nn.ELU, _aten.elu.default: nn.ELU,
}


def layer_graph(model: nn.Module, dummy_input: Any = None) -> fx.GraphModule:
    """`model` as a graph whose layers can be found by module path: the model itself when it is a
    GraphModule, torch.fx's symbolic trace when it traces, else pyquant.sim.graph.trace (torch.export) with
    `dummy_input` (a tensor, a tuple of positional inputs or a dict of keyword inputs). The export capture
    runs on an eval-mode shell of the model that shares its parameters and buffers, so the model itself
    is neither copied nor prepared.

    Raises ValueError naming `dummy_input` when fx cannot trace the model and no input was given, and
    pyquant.sim.graph.UntraceableModelError when torch.export cannot capture it either."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any fx failure: capture with torch.export instead
        if dummy_input is None:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ValueError(f"dummy_input: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                             f"{first}); give an example input (a tensor, a tuple of inputs or a dict of keyword "
                             f"inputs) to capture it with torch.export") from exc
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shell = copy.deepcopy(model, memo=shared).eval()  # trace() prepares what it captures in place
    return trace(shell, dummy_input)


def value_users(n: fx.Node) -> list[fx.Node]:
    """The nodes that read `n`'s values (not only its shape or metadata)."""
    return [u for u in n.users if not (u.op == "call_function" and u.target in _METADATA_ONLY)
            and not (u.op == "call_module" and u.target == "_guards_fn")]


def _attr(n: Any, suffix: str) -> Optional[str]:
    """The module path of a get_attr node reading `<path>.<suffix>`, else None."""
    if isinstance(n, fx.Node) and n.op == "get_attr" and n.target.endswith("." + suffix):
        return n.target[:-len(suffix) - 1]
    return None


def _arg(n: fx.Node, i: int, name: str) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name)


def _module(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def layer_of(model: nn.Module, gm: fx.GraphModule, n: fx.Node, types: tuple) -> Optional[str]:
    """The module path (in `model`) of the layer of one of `types` that node `n` of `gm` runs, else None:
    a module call, or an ATen/functional linear or convolution reading that module's own weight and bias
    (its weight read by no other node, so that scaling it changes this call only)."""
    if n.op == "call_module":
        return n.target if isinstance(_module(model, n.target), types) else None
    if n.op != "call_function" or n.target not in _LAYER_CALLS or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    w, b = _arg(n, 1, "weight"), _arg(n, 2, "bias")
    path = _attr(w, "weight")
    mod = _module(model, path) if path is not None else None
    if not isinstance(mod, types) or len(value_users(w)) != 1:
        return None
    if (b is None) != (getattr(mod, "bias", None) is None) or (b is not None and _attr(b, "bias") != path):
        return None
    return path


def batchnorm_of(model: nn.Module, gm: fx.GraphModule, n: fx.Node) -> Optional[str]:
    """The module path (in `model`) of the batch norm node `n` of `gm` runs (a module call, or the op in
    eval mode reading `<path>.running_mean`), else None."""
    if n.op == "call_module":
        return n.target if isinstance(_module(model, n.target), BATCH_NORMS) else None
    if n.op != "call_function" or n.target not in _BATCH_NORM_CALLS:
        return None
    if n.target is not _aten._native_batch_norm_legit_no_training.default and _arg(n, 5, "training") is not False:
        return None
    return _attr(_arg(n, 3, "running_mean"), "running_mean")


def activation_of(model: nn.Module, gm: fx.GraphModule, n: fx.Node) -> Optional[tuple[type, Any]]:
    """(activation type, its module or None) of a node that applies an elementwise activation (or the
    identity: eval-mode dropout, copies) to its one input, else None; the type is the nn module class the
    activation is (nn.ReLU for torch.relu and aten.relu, nn.PReLU with its module for aten.prelu)."""
    if n.op == "call_module":
        mod = _module(model, n.target)
        return (type(mod), mod) if mod is not None else None
    if n.op == "call_method":
        return (nn.ReLU, None) if n.target in ("relu", "relu_") else None
    if n.op != "call_function":
        return None
    if n.target in _RELU:
        return nn.ReLU, None
    if n.target in IDENTITY_OPS:
        return nn.Identity, None
    if n.target in (_aten.dropout.default, F.dropout):
        train = _arg(n, 2, "train" if n.target is _aten.dropout.default else "training")
        return (nn.Dropout, None) if train is False else None
    if n.target is _aten.hardtanh.default:
        lo, hi = _arg(n, 1, "min_val"), _arg(n, 2, "max_val")
        return (nn.ReLU6, None) if (lo, hi) == (0.0, 6.0) else (nn.Hardtanh, None)
    if n.target is _aten.prelu.default:
        path = _attr(_arg(n, 1, "weight"), "weight")
        mod = _module(model, path) if path is not None else None
        return (nn.PReLU, mod) if isinstance(mod, nn.PReLU) else None
    t = _FUNCTION_ACTIVATIONS.get(n.target)
    return (t, None) if t is not None else None
