"""Activation fusion for QuantSim(fuse_activations=True): an activation and the quantizer after it
(and a max pool after that) run as one quantizer call, and a quantized single-channel model input
runs with its convolution as one node. Values are the separate ops'; a training step keeps less."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..quant import QuantizeDequantize
from ..quant.input_conv import can_fuse_input_conv, quantized_input_conv

__all__ = ["fuse_activations"]


def fuse_activations(gm: fx.GraphModule, names: dict[int, str]) -> list[str]:
    """Rewrites `act -> quantizer` as `quantizer(x, activation=(lo, hi))` where the activation is a
    ReLU / ReLU6 / Hardtanh whose only user is the quantizer, `quantizer -> MaxPool2d` as
    `quantizer(x, pool=...)`, and `model input -> quantizer -> single-channel Conv2d` as one node
    (pyquant.quant.input_conv). `names`: id(quantizer) -> its name. Returns the fused quantizers' names."""
    fused = []
    for qn in list(gm.graph.nodes):
        if qn.op != "call_module" or not isinstance(gm.get_submodule(qn.target), QuantizeDequantize):
            continue
        act = qn.args[0] if qn.args else None
        if not isinstance(act, fx.Node) or len(act.users) != 1 or qn.kwargs:
            continue
        rng = _activation_range(gm, act)
        src = act.args[0] if act.args else None
        if rng is None or not isinstance(src, fx.Node) or len(src.users) != 1:
            continue  # an in-place activation's input seen by others would change meaning
        qn.args = (src,)
        qn.kwargs = {"activation": rng}
        gm.graph.erase_node(act)
        fused.append(names.get(id(gm.get_submodule(qn.target)), qn.target))
    # quantizer -> max pool: the pool's backward needs only its indices and the input's shape
    for qn in list(gm.graph.nodes):
        if qn.op != "call_module" or not isinstance(gm.get_submodule(qn.target), QuantizeDequantize):
            continue
        users = list(qn.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (qn,):
            continue
        pool_node = users[0]
        pool = _pool_args(gm.get_submodule(pool_node.target))
        if pool is None or len(pool_node.args) != 1 or pool_node.kwargs:
            continue
        qn.kwargs = {**qn.kwargs, "pool": pool}
        pool_node.replace_all_uses_with(qn)
        gm.graph.erase_node(pool_node)
        name = names.get(id(gm.get_submodule(qn.target)), qn.target)
        if name not in fused:
            fused.append(name)
    # model input -> quantizer -> single-channel Conv2d: one node (pyquant.quant.input_conv)
    for qn in list(gm.graph.nodes):
        if (qn.op != "call_module" or not isinstance(gm.get_submodule(qn.target), QuantizeDequantize)
                or qn.kwargs or len(qn.args) != 1 or getattr(qn.args[0], "op", None) != "placeholder"):
            continue
        users = list(qn.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (qn,) or users[0].kwargs:
            continue
        conv_node = users[0]
        if not can_fuse_input_conv(gm.get_submodule(conv_node.target)):
            continue
        with gm.graph.inserting_before(conv_node):
            q_attr = gm.graph.get_attr(qn.target)
            c_attr = gm.graph.get_attr(conv_node.target)
            node = gm.graph.call_function(quantized_input_conv, (q_attr, c_attr, qn.args[0]))
        conv_node.replace_all_uses_with(node)
        gm.graph.erase_node(conv_node)
        gm.graph.erase_node(qn)
        fused.append(names.get(id(gm.get_submodule(qn.target)), qn.target))
    gm.graph.lint()
    gm.recompile()
    return fused


def _pool_args(m: nn.Module):
    """aten.max_pool2d_with_indices' arguments for an nn.MaxPool2d that returns values only, else None."""
    if type(m) is not nn.MaxPool2d or m.return_indices:
        return None
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]
    stride = m.stride if m.stride is not None else m.kernel_size
    return (pair(m.kernel_size), pair(stride), pair(m.padding), pair(m.dilation), bool(m.ceil_mode))


def _activation_range(gm: fx.GraphModule, n: fx.Node) -> Optional[tuple[float, float]]:
    """(lo, hi) of a ReLU / ReLU6 / Hardtanh node with the input as its only argument, else None."""
    import torch.nn.functional as F
    inf = float("inf")
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is nn.ReLU:
            return (0.0, inf)
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return (float(m.min_val), float(m.max_val))
        return None
    if len(n.args) != 1 or any(k != "inplace" for k in n.kwargs):
        return None
    if n.op == "call_function" and n.target in (torch.relu, F.relu, torch.relu_):
        return (0.0, inf)
    if n.op == "call_function" and n.target is F.relu6:
        return (0.0, 6.0)
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return (0.0, inf)
    return None
