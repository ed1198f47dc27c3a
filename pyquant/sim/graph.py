"""Graph capture for QuantSim: torch.fx tracing (transformers' tracer for HuggingFace models), shape
propagation, and the classification of graph nodes into the ONNX op types the hardware config
speaks of."""
from __future__ import annotations

import dataclasses
import inspect
import math
import operator
import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .._layers import WEIGHT_AXIS  # noqa: F401 (re-exported: the weighted module types)


class UntraceableModelError(RuntimeError):
    """The model could not be captured as a graph; the message names the first call that failed."""


# Leaf module types -> ONNX op type (the hardware config's vocabulary).
MODULE_OPS: dict[type, str] = {
    nn.Conv1d: "Conv", nn.Conv2d: "Conv", nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose", nn.ConvTranspose2d: "ConvTranspose",
    nn.Linear: "Gemm", nn.Embedding: "Gather",
    nn.LayerNorm: "LayerNormalization", nn.GroupNorm: "GroupNormalization", nn.RMSNorm: "RMSNormalization",
    nn.BatchNorm1d: "BatchNormalization", nn.BatchNorm2d: "BatchNormalization",
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.GELU: "Gelu", nn.SiLU: "Silu", nn.Sigmoid: "Sigmoid",
    nn.Tanh: "Tanh", nn.Softmax: "Softmax", nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu",
    nn.Hardswish: "HardSwish", nn.Hardsigmoid: "HardSigmoid", nn.ELU: "Elu",
    nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool", nn.AvgPool1d: "AveragePool", nn.AvgPool2d: "AveragePool",
    nn.AdaptiveAvgPool1d: "GlobalAveragePool", nn.AdaptiveAvgPool2d: "GlobalAveragePool",
    nn.AdaptiveMaxPool2d: "GlobalMaxPool", nn.Upsample: "Resize",
}

# Functions / methods -> ONNX op type.
FUNCTION_OPS: dict[Any, str] = {
    operator.add: "Add", torch.add: "Add", operator.iadd: "Add",
    operator.sub: "Sub", torch.sub: "Sub",
    operator.mul: "Mul", torch.mul: "Mul", operator.imul: "Mul",
    operator.truediv: "Div", torch.div: "Div",
    operator.matmul: "MatMul", torch.matmul: "MatMul", torch.bmm: "MatMul", torch.mm: "MatMul",
    torch.baddbmm: "MatMul", torch.einsum: "Einsum",
    torch.cat: "Concat", torch.concat: "Concat", torch.stack: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.gelu: "Gelu", F.silu: "Silu",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
    F.softmax: "Softmax", torch.softmax: "Softmax", F.log_softmax: "LogSoftmax",
    F.layer_norm: "LayerNormalization", F.linear: "Gemm", F.conv2d: "Conv", F.conv1d: "Conv",
    F.embedding: "Gather", F.hardswish: "HardSwish", F.leaky_relu: "LeakyRelu",
    F.max_pool2d: "MaxPool", F.avg_pool2d: "AveragePool", F.adaptive_avg_pool2d: "GlobalAveragePool",
    torch.mean: "ReduceMean", F.scaled_dot_product_attention: "Attention",
    torch.erf: "Erf", torch.pow: "Pow", torch.sqrt: "Sqrt", torch.exp: "Exp",
    F.group_norm: "GroupNormalization", F.rms_norm: "RMSNormalization", F.hardsigmoid: "HardSigmoid",
    torch.neg: "Neg", operator.neg: "Neg",
}
METHOD_OPS: dict[str, str] = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div", "matmul": "MatMul",
    "bmm": "MatMul", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax",
    "mean": "ReduceMean", "pow": "Pow", "sqrt": "Sqrt", "exp": "Exp", "neg": "Neg",
}

# Data movement: the output holds the input's values, so it needs no quantizer of its own.
PASSTHROUGH_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    operator.getitem, getattr, torch.chunk, torch.split, F.dropout, torch.narrow, torch.t,
    F.pad, torch.flip, torch.roll, torch.unflatten, torch.movedim, torch.swapaxes,
}
PASSTHROUGH_METHODS = {
    "view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "contiguous", "expand",
    "expand_as", "chunk", "split", "size", "dim", "t", "repeat", "narrow", "unbind", "type_as", "to", "float",
    "clone", "detach", "flip", "roll", "masked_fill", "unflatten", "view_as", "reshape_as", "movedim", "swapaxes",
}
PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)


_aten = torch.ops.aten
# Graphs captured with torch.export hold ATen ops: op type and, for weighted ops, the weight's argument
# index and channel axis.
ATEN_OPS: dict[Any, str] = {
    _aten.linear.default: "Gemm", _aten.conv1d.default: "Conv", _aten.conv2d.default: "Conv",
    _aten.convolution.default: "Conv", _aten.embedding.default: "Gather",
    _aten.layer_norm.default: "LayerNormalization", _aten.gelu.default: "Gelu", _aten.relu.default: "Relu",
    _aten.hardtanh.default: "Clip", _aten.silu.default: "Silu", _aten.sigmoid.default: "Sigmoid",
    _aten.tanh.default: "Tanh", _aten.softmax.int: "Softmax", _aten._softmax.default: "Softmax",
    _aten.add.Tensor: "Add", _aten.sub.Tensor: "Sub", _aten.mul.Tensor: "Mul", _aten.div.Tensor: "Div",
    _aten.matmul.default: "MatMul", _aten.bmm.default: "MatMul", _aten.mm.default: "MatMul",
    _aten.cat.default: "Concat", _aten.mean.dim: "ReduceMean",
    _aten.scaled_dot_product_attention.default: "Attention",
    _aten.max_pool2d.default: "MaxPool", _aten.avg_pool2d.default: "AveragePool",
    _aten.adaptive_avg_pool2d.default: "GlobalAveragePool",
    _aten.rms_norm.default: "RMSNormalization", _aten.group_norm.default: "GroupNormalization",
    _aten.hardswish.default: "HardSwish", _aten.hardsigmoid.default: "HardSigmoid",
    _aten._safe_softmax.default: "Softmax", _aten.neg.default: "Neg", _aten.einsum.default: "Einsum",
    _aten.baddbmm.default: "MatMul", _aten.erf.default: "Erf", _aten.exp.default: "Exp",
    _aten.pow.Tensor_Scalar: "Pow", _aten.sqrt.default: "Sqrt",
}
ATEN_WEIGHTS: dict[Any, tuple[int, int]] = {  # op -> (weight argument index, channel axis)
    _aten.linear.default: (1, 0), _aten.conv1d.default: (1, 0), _aten.conv2d.default: (1, 0),
    _aten.convolution.default: (1, 0), _aten.embedding.default: (0, 0),
}
# Functional calls whose weight may be a graph attribute (a parameter the module reads itself, as the
# unfused nn.MultiheadAttention does): function -> (weight argument index, channel axis).
FUNCTION_WEIGHTS: dict[Any, tuple[int, int]] = {
    F.linear: (1, 0), F.conv1d: (1, 0), F.conv2d: (1, 0), F.embedding: (1, 0),
}
ATEN_PASSTHROUGH = {
    _aten.view.default, _aten.reshape.default, _aten.transpose.int, _aten.permute.default,
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.expand.default, _aten.slice.Tensor, _aten.select.int,
    _aten.dropout.default, _aten.clone.default, _aten.contiguous.default, _aten.flatten.using_ints,
    _aten.to.dtype, _aten.to.device, _aten.to.dtype_layout, _aten._to_copy.default, _aten.t.default,
    _aten.masked_fill.Scalar, _aten.masked_fill.Tensor, _aten.split.Tensor, _aten.split_with_sizes.default,
    _aten.chunk.default, _aten.unbind.int, _aten.squeeze.dims, _aten.squeeze.default, _aten.unflatten.int,
    _aten.repeat.default, _aten.index.Tensor, _aten.index_select.default, _aten.gather.default,
    _aten.alias.default, _aten.type_as.default, _aten.constant_pad_nd.default, _aten.pad.default,
    _aten.flip.default, _aten.roll.default, _aten.narrow.default, _aten._unsafe_view.default,
    _aten.expand_as.default, _aten.view_as.default, _aten.detach.default,
}


def node_op_type(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The ONNX op type of a compute node, "Passthrough" for data movement, None for anything else."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, PASSTHROUGH_MODULES):
            return "Passthrough"
        for t in type(mod).__mro__:
            if t in MODULE_OPS:
                return MODULE_OPS[t]
        return None
    if node.op == "call_function":
        if node.target in PASSTHROUGH_FUNCTIONS or node.target in ATEN_PASSTHROUGH:
            return "Passthrough"
        return FUNCTION_OPS.get(node.target) or ATEN_OPS.get(node.target)
    if node.op == "call_method":
        if node.target in PASSTHROUGH_METHODS:
            return "Passthrough"
        return METHOD_OPS.get(node.target)
    return None


# ---- what each node is to the simulation ---------------------------------------------------------------
# A quantizer belongs on a tensor that carries the model's data through an op the target runs as one
# kernel. Three things make a graph node something else: it is inside such a kernel (an RMSNorm written
# out as pow, mean, add, rsqrt, mul runs as one normalization in higher precision, and attention scores
# with the mask added are the softmax's input, not a tensor of their own), its value does not depend on
# the data (attention masks, rotary cos/sin tables, positions, shapes: computed from integer inputs,
# shapes and parameters), or it is an op the simulation does not know (no quantizer, and said so).

ROLE_KINDS = ("input", "op", "passthrough", "internal", "constant", "unknown", "other")
"""NodeRole.kind: a data model input; a known op's output; data movement; inside a larger op as the target
runs it; not data-dependent; an op the simulation does not know; no floating-point tensor at all."""


@dataclasses.dataclass(frozen=True)
class NodeRole:
    """What a graph node is to the simulation: `kind` (one of ROLE_KINDS), `op_type` (the ONNX op type as the
    target runs it; for the output node of a recognised composite such as a written-out RMSNorm, the
    composite's) and `reason` (why a node of kind internal, constant or unknown gets no quantizer)."""

    kind: str
    op_type: Optional[str] = None
    reason: str = ""


def _fn_kinds() -> dict[str, tuple[set, set, set]]:
    # kind -> (torch functions, tensor method names, ATen overloads): one test for fx and export graphs
    return {
        "pow": ({torch.pow, operator.pow}, {"pow"}, {_aten.pow.Tensor_Scalar}),
        "square": ({torch.square}, {"square"}, {_aten.square.default}),
        "mean": ({torch.mean}, {"mean"}, {_aten.mean.dim}),
        "add": ({operator.add, torch.add, operator.iadd}, {"add", "add_"}, {_aten.add.Tensor, _aten.add.Scalar}),
        "mul": ({operator.mul, torch.mul, operator.imul}, {"mul", "mul_"}, {_aten.mul.Tensor, _aten.mul.Scalar}),
        "div": ({operator.truediv, torch.div}, {"div"}, {_aten.div.Tensor}),
        "rsqrt": ({torch.rsqrt}, {"rsqrt"}, {_aten.rsqrt.default}),
        "sqrt": ({torch.sqrt}, {"sqrt"}, {_aten.sqrt.default}),
        "reciprocal": ({torch.reciprocal}, {"reciprocal"}, {_aten.reciprocal.default}),
        "where": ({torch.where}, {"where"}, {_aten.where.self, _aten.where.ScalarOther}),
        "cast": (set(), {"to", "float", "half", "bfloat16", "type_as", "contiguous", "clone"},
                 {_aten.to.dtype, _aten.to.device, _aten.to.dtype_layout, _aten._to_copy.default,
                  _aten.type_as.default, _aten.contiguous.default, _aten.clone.default, _aten.alias.default}),
    }


_FN_KINDS = _fn_kinds()

# Ops whose output depends on their inputs' shapes and dtypes only, never on their values.
SHAPE_ONLY_FUNCTIONS = {
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.arange, getattr,
    _aten.new_ones.default, _aten.new_zeros.default, _aten.new_full.default, _aten.new_empty.default,
    _aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default, _aten.empty_like.default,
    _aten.sym_size.int, _aten.sym_numel.default, _aten.arange.default, _aten.arange.start,
    _aten.arange.start_step, _aten.scalar_tensor.default, _aten.full.default, _aten.zeros.default,
    _aten.ones.default,
}
SHAPE_ONLY_METHODS = {"size", "dim", "new_ones", "new_zeros", "new_full", "new_empty", "numel"}

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


def _is(n: Any, kind: str) -> bool:
    if not isinstance(n, fx.Node):
        return False
    fns, methods, aten = _FN_KINDS[kind]
    if n.op == "call_function":
        return n.target in fns or n.target in aten
    return n.op == "call_method" and n.target in methods


def _strip_casts(n: Any) -> Any:
    """The tensor a chain of dtype casts and copies starts from."""
    while _is(n, "cast") and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _is_float(n: fx.Node) -> bool:
    return n.meta.get("pq_dtype") in _FLOATS


def _shape_only(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in SHAPE_ONLY_FUNCTIONS
    return n.op == "call_method" and n.target in SHAPE_ONLY_METHODS


def _mask_only(nodes: list[fx.Node], op: dict) -> set[fx.Node]:
    """Nodes whose every use is as an attention mask (SDPA's attn_mask, or the additive bias an unfused
    nn.MultiheadAttention builds from its masks), directly or through other such nodes: a float mask given
    as a model input is a mask, not data."""
    only: set[fx.Node] = set()
    for n in reversed(nodes):
        if n.op == "output" or not n.users:
            continue
        if all(_mask_use(u, n, op) or u in only for u in n.users):
            only.add(n)
    return only


def _mask_use(user: fx.Node, n: fx.Node, op: dict) -> bool:
    if user.op == "call_function" and user.target is attention_bias:
        return True
    if op.get(user) == "Attention":  # scaled_dot_product_attention(q, k, v, attn_mask, ...)
        return (len(user.args) > 3 and user.args[3] is n) or user.kwargs.get("attn_mask") is n
    return False


def _depends_on(nodes: list[fx.Node], sources: set[fx.Node], skip=lambda n: False) -> set[fx.Node]:
    """Nodes whose value depends on a node of `sources` (themselves included); `skip`: nodes that never
    carry the dependency on."""
    out = set(sources)
    for n in nodes:
        if n not in out and not skip(n) and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _data_dependent(gm: fx.GraphModule, nodes: list[fx.Node], op: dict, masks: set[fx.Node]) -> set[fx.Node]:
    """The nodes that carry the model's data: float model inputs and embedding lookups (a table read at the
    token ids) and everything computed from them, except shape-only ops and attention masks. A float
    tensor made from integer inputs alone that feeds a Conv/Gemm (an image given as uint8, cast and scaled
    in the model) is data too; the other such tensors (masks, positions, rotary tables) are not."""
    sources = {n for n in nodes if (n.op == "placeholder" and _is_float(n) and n not in masks)
               or (op.get(n) == "Gather" and n.op != "placeholder")}
    skip = lambda n: _shape_only(n) or n in masks or (n.op == "call_function" and n.target is attention_bias)
    data = _depends_on(nodes, sources, skip)
    inputs = _depends_on(nodes, {n for n in nodes if n.op == "placeholder"})
    fed = {a for n in nodes if op.get(n) in _WEIGHTED and n not in data
           for a in n.args[:1] if isinstance(a, fx.Node) and _is_float(a) and a in inputs and a not in masks}
    return _depends_on(nodes, sources | fed, skip) if fed else data


def _rms_norms(nodes: list[fx.Node], inputs: set[fx.Node]) -> tuple[dict[fx.Node, str], dict[fx.Node, str]]:
    """RMSNorms written out as ops (transformers' LlamaRMSNorm, T5LayerNorm, Gemma's `(1 + weight)` variant,
    or any module computing x * rsqrt(mean(x^2) + eps) * gain, or x / sqrt(...)): {output node:
    "RMSNormalization"} and {internal node: reason}. `inputs`: the nodes that depend on a model input."""
    outputs: dict[fx.Node, str] = {}
    internal: dict[fx.Node, str] = {}
    for r in nodes:
        if not (_is(r, "rsqrt") or _is(r, "sqrt")):
            continue
        part = [r]
        v = r.args[0]
        if _is(v, "add") and sum(isinstance(a, fx.Node) and a in inputs for a in v.args) == 1:
            part.append(v)  # + eps
            v = next(a for a in v.args if isinstance(a, fx.Node) and a in inputs)
        if not _is(v, "mean") or not isinstance(v.args[0], fx.Node):
            continue
        sq = v.args[0]
        squares = ((_is(sq, "pow") and len(sq.args) > 1 and sq.args[1] == 2)
                   or (_is(sq, "mul") and len(sq.args) > 1 and _strip_casts(sq.args[0]) is _strip_casts(sq.args[1]))
                   or _is(sq, "square"))
        if not squares:
            continue
        part += [v, sq]
        x = _strip_casts(sq.args[0])
        norm = None
        for u in r.users:
            if _is(r, "rsqrt") and _is(u, "mul") and any(a is not r and _strip_casts(a) is x for a in u.args):
                norm = u  # x * rsqrt(mean(x^2) + eps)
            elif _is(r, "sqrt") and _is(u, "div") and u.args[1] is r and _strip_casts(u.args[0]) is x:
                norm = u  # x / sqrt(mean(x^2) + eps)
        if norm is None:
            continue
        out = norm
        nxt = _single_user(out)
        if nxt is not None and _is(nxt, "mul"):  # the gain: w * x_hat, or x_hat * (1 + w)
            gain = [a for a in nxt.args if isinstance(a, fx.Node) and _strip_casts(a) is not out]
            if len(gain) == 1 and gain[0] not in inputs:
                part.append(out)
                out = nxt
        if any(_leaks(p, part, out) for p in part):
            continue  # an intermediate value used elsewhere: not one kernel
        outputs[out] = "RMSNormalization"
        for p in part:
            internal[p] = f"inside the RMSNormalization ending at {out.name} (one kernel on the target)"
    return outputs, internal


def _users(n: fx.Node) -> list[fx.Node]:
    """The nodes that use `n`'s value (torch.export's metadata assertions read a tensor but compute nothing)."""
    return [u for u in n.users if not (u.op == "call_function" and u.target is _aten._assert_tensor_metadata.default)]


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    """The one op that uses `n`, looking through dtype casts; None when there are several."""
    while True:
        users = _users(n)
        if len(users) != 1:
            return None
        if _is(users[0], "cast"):
            n = users[0]
            continue
        return users[0]


def _leaks(p: fx.Node, part: list[fx.Node], out: fx.Node) -> bool:
    """Whether internal node `p`'s value is used outside its composite op (then it is not internal)."""
    todo = _users(p)
    while todo:
        u = todo.pop()
        if u in part or u is out:
            continue
        if _is(u, "cast"):
            todo += _users(u)
            continue
        return True
    return False


def _masked_scores(nodes: list[fx.Node], op: dict, data: set[fx.Node], inputs: set[fx.Node],
                   internal: dict[fx.Node, str]) -> None:
    """Attention scores with an additive mask (`scores + mask`, or where(mask, scores, -inf)) on their way to a
    Softmax: the mask holds -inf or finfo.min, so a quantizer on the sum would stretch its range to 1e38. A
    target adds the mask to scores that are already quantized (the op before the mask has its quantizer)
    and feeds the sum to the softmax, so the nodes from the mask up to the softmax get none."""
    for n in nodes:
        if n not in data or not (_is(n, "add") or _is(n, "where")):
            continue
        values = list(n.args[:2]) if _is(n, "add") else list(n.args[1:3])
        if len(values) != 2 or sum(isinstance(a, fx.Node) and a in data for a in values) != 1:
            continue
        mask = next(a for a in values if not (isinstance(a, fx.Node) and a in data))
        # an additive mask is made from the inputs (the padding mask, the sequence length); where() fills
        # the masked places with a constant
        if _is(n, "add") and not (isinstance(mask, fx.Node) and mask in inputs and _is_float(mask)):
            continue
        chain, cur = [n], n
        while True:
            nxt = _users(cur)
            if len(nxt) != 1:
                break
            u = nxt[0]
            if op.get(u) == "Softmax":
                for c in chain:
                    if op.get(c) != "Passthrough":
                        internal[c] = (f"attention scores with the mask added, before the Softmax at {u.name}: "
                                       f"quantized before the mask")
                break
            elastic = op.get(u) == "Passthrough" or (
                (_is(u, "mul") or _is(u, "div") or _is(u, "add")) and all(a is cur or a not in data for a in u.args))
            if not elastic:
                break
            chain.append(u)
            cur = u


def _unknown_reason(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return f"module {type(gm.get_submodule(n.target)).__name__} is not an op the simulation knows"
    what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{what} is not an op the simulation knows"


KV_CACHE_META = "pq_kv_cache"
"""node.meta key marking the placeholders of a graph captured with its key/value cache that hold cached keys
and values (pyquant.sim.decoder)."""


def _kv_cache_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """The cache inputs (KV_CACHE_META) and the concatenations that append new positions to them."""
    out = {n for n in nodes if n.op == "placeholder" and n.meta.get(KV_CACHE_META)}
    if not out:
        return out
    cats = {torch.cat, _aten.cat.default}
    for n in nodes:
        if n.op == "call_function" and n.target in cats and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def classify(gm: fx.GraphModule) -> dict[fx.Node, NodeRole]:
    """What every node of a captured graph (after propagate_shapes) is to the simulation: see NodeRole.
    placement.plan puts quantizers on inputs of kind "input" and outputs of kind "op"."""
    nodes = list(gm.graph.nodes)
    op = {n: node_op_type(gm, n) for n in nodes}
    masks = _mask_only(nodes, op)
    inputs = _depends_on(nodes, {n for n in nodes if n.op == "placeholder"})
    data = _data_dependent(gm, nodes, op, masks)
    composite, internal = _rms_norms(nodes, inputs)
    _masked_scores(nodes, op, data, inputs, internal)
    cache = _kv_cache_nodes(nodes)
    roles: dict[fx.Node, NodeRole] = {}
    for n in nodes:
        t = composite.get(n, op[n])
        if n in cache:  # cached keys/values, and the cache appending the new positions: memory, not an op
            roles[n] = NodeRole("passthrough", "Passthrough")
        elif n.op == "placeholder":
            roles[n] = NodeRole("input") if n in data else NodeRole(
                "constant" if n in masks else "other", reason="an attention mask" if n in masks else "")
        elif n.op in ("get_attr", "output") or not n.meta.get("pq_float", _is_float(n)):
            roles[n] = NodeRole("other", t)
        elif n in internal:
            roles[n] = NodeRole("internal", t, internal[n])
        elif t == "Passthrough":
            roles[n] = NodeRole("passthrough", t)
        elif n not in data:
            roles[n] = NodeRole("constant", t, "an attention mask" if n in masks else
                                "not computed from the model's data (masks, positions, rotary tables, "
                                "shapes and parameters only)")
        elif t is None:
            roles[n] = NodeRole("unknown", None, _unknown_reason(gm, n))
        else:
            roles[n] = NodeRole("op", t)
    return roles


# ---- capture forms that export ------------------------------------------------------------------------
# Some torch modules run as fused kernels that fx cannot see into and the ONNX exporter cannot write at
# opset 13: nn.MultiheadAttention in eval mode (torch's `_native_multi_head_attention`) and nn.RMSNorm
# (aten::rms_norm; ONNX has RMSNormalization only from opset 23). The copy QuantSim captures runs them as
# the ops they are made of, with the same parameters (so the state dict and weight quantizer names stay the
# module's) and the same results:
#
# * attention: the q, k and v projections (slices of the one `in_proj_weight`), QK^T, the mask, Softmax,
#   the product with V and `out_proj` -- what a target without a fused attention kernel runs, each op with
#   its own quantizer;
# * RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, which classify() recognises as one RMSNormalization.


@fx.wrap
def attention_bias(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                   num_heads: int, like: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's masks as one additive bias broadcastable to scores [N, H, L, S]: boolean
    masks become -inf where True, float masks are added as given. One graph node (fx does not trace into
    it: the masks' dtypes are only known when it runs); the graph classifies its output as a mask."""
    def as_bias(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
        return m.to(like.dtype)

    bias = None
    if attn_mask is not None:
        bias = as_bias(attn_mask)
        if bias.dim() == 3:  # [N * H, L, S]
            bias = bias.view(-1, num_heads, bias.shape[-2], bias.shape[-1])
    if key_padding_mask is not None:
        pad = as_bias(key_padding_mask)[:, None, None, :]
        bias = pad if bias is None else bias + pad
    return bias


class UnfusedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computed as separate ops (see above); same parameters, buffers and results.
    `decompose_fused_modules` turns the modules of a model into this class in place."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        del is_causal  # only a hint: nn.MultiheadAttention takes the causal mask itself as attn_mask
        if not self.batch_first:  # to [N, L, E]
            same_kv, same_qk = key is value, query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        e, h = self.embed_dim, self.num_heads
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            weights = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            b = self.in_proj_bias
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None, None, None)
        q, k, v = (F.linear(x, wi, bi).unflatten(-1, (h, e // h)).transpose(1, 2)
                   for x, wi, bi in zip((query, key, value), weights, biases))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(e // h))
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + attention_bias(attn_mask, key_padding_mask, h, scores)
        attn = torch.softmax(scores, dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = self.out_proj(torch.matmul(attn, v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


class DecomposedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm as x * rsqrt(mean(x^2) + eps) * weight (see above). eps=None takes float32's epsilon (the
    dtype is unknown while fx traces; nn.RMSNorm takes the input's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        dims = tuple(range(-len(self.normalized_shape), 0))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y


def decompose_fused_modules(model: nn.Module) -> nn.Module:
    """Turns every nn.MultiheadAttention of `model` into UnfusedMultiheadAttention and every nn.RMSNorm into
    DecomposedRMSNorm, in place (QuantSim does this to its own copy). Attention modules with options the
    unfused form does not cover (bias_k/bias_v, add_zero_attn) are left as they are, and the simulation
    lists them as ops it does not know."""
    for m in model.modules():
        if type(m) is nn.MultiheadAttention and m.bias_k is None and not m.add_zero_attn:
            m.__class__ = UnfusedMultiheadAttention
        elif type(m) is nn.RMSNorm:
            m.__class__ = DecomposedRMSNorm
    return model


class _RecordingTracer(fx.Tracer):
    """A tracer that remembers what it was tracing when it failed."""

    def __init__(self):
        super().__init__()
        self.current: Optional[str] = None

    def call_module(self, m, forward, args, kwargs):
        prev = self.current
        self.current = self.path_of_module(m) or type(m).__name__
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current = prev


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and pyquant: the user's line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        f = fr.filename
        if "/torch/" in f or "/pyquant/" in f or f.startswith("<"):
            continue
        return f"{f}:{fr.lineno}: {fr.line}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _is_hf(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _export(model: nn.Module, dummy_input: Any) -> fx.GraphModule:
    """torch.export (non-strict) as a GraphModule of ATen ops with the parameters as attributes; a graph
    captured from keyword inputs also takes them by position, in the order of the model's forward."""
    if isinstance(dummy_input, dict):
        args, kwargs = (), dict(dummy_input)
    elif isinstance(dummy_input, (tuple, list)):
        args, kwargs = tuple(dummy_input), {}
    else:
        args, kwargs = (dummy_input,), {}
    if _is_hf(model):
        # torch.export pins a dimension of size 1 in the example to 1: a batch of one sentence, or one token,
        # would give a graph that runs nothing else. Batch and sequence are captured at size >= 2 at least
        # (the graph is the same; the example's values do not matter to it).
        args = tuple(_widened(a) for a in args)
        kwargs = {k: _widened(v) for k, v in kwargs.items()}
    # Every dimension may vary (batch size, sequence length) unless the model pins it.
    auto = torch.export.Dim.AUTO
    dyn = lambda t: {d: auto for d in range(t.dim())} if isinstance(t, torch.Tensor) and t.dim() else None
    dynamic = ({k: dyn(v) for k, v in kwargs.items()} if kwargs else tuple(dyn(a) for a in args))
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    if kwargs:
        # called like the model: positional arguments bind to the forward's own parameter names
        # (`sim.model(input_ids)` as `model(input_ids)`), since the captured graph takes keywords only
        try:
            order = [n for n in inspect.signature(model.forward).parameters if n in kwargs]
        except (TypeError, ValueError):
            order = list(kwargs)
        gm.register_forward_pre_hook(_PositionalAsKeywords(order), prepend=True, with_kwargs=True)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if _is_hf(model) and isinstance(limit, int) and limit > 0:
        gm.register_forward_pre_hook(SequenceLimit(limit), with_kwargs=True)
    keep_forward_hooks(gm)
    return gm


def _widened(t: Any) -> Any:
    """An input with a batch (dim 0) of size 1 repeated to 2, and a token-shaped one (integer or boolean:
    ids, masks, positions, [batch, sequence]) also with a sequence of 1 repeated to 2. A float input's dim 1
    may be anything (channels, features), so it is left as it is."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return t
    widen = (0,) if t.is_floating_point() else (0, 1)
    reps = [2 if d in widen and t.shape[d] == 1 else 1 for d in range(t.dim())]
    return t.repeat(*reps) if any(r > 1 for r in reps) else t


class SequenceLimit:
    """Forward pre-hook of a captured transformers model: a sequence longer than the model's largest position
    (`config.max_position_embeddings`) is refused with an error naming the input and the accepted lengths,
    where the graph would index its rotary or position tables out of range."""

    INPUTS = ("input_ids", "inputs_embeds")

    def __init__(self, max_length: int):
        self.max_length = int(max_length)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for name in self.INPUTS:
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                self.check(name, t.shape[1], _cached_length(kwargs))
                return

    def check(self, name: str, length: int, past: int = 0) -> None:
        """ValueError when `length` new positions after `past` cached ones pass the largest position."""
        if past + length > self.max_length:
            cached = f" after {past} cached positions" if past else ""
            raise ValueError(f"{name}: a sequence of {length} tokens{cached} reaches beyond the model's largest "
                             f"position (config.max_position_embeddings = {self.max_length}); this simulation runs "
                             f"1..{self.max_length} positions in all")


def _cached_length(kwargs: dict) -> int:
    """How many positions a key/value cache passed to the model already holds (0 without one)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class _KeepForwardHooks:
    """A GraphModule's deep copy starts without forward hooks (GraphModule.__deepcopy__ keeps only state-dict
    hooks); the hooks that make a captured graph callable like its model (keyword inputs, the sequence limit,
    the key/value cache interface) go with it."""

    def __init__(self, original: fx.GraphModule):
        self.original = original

    def __call__(self, copy: fx.GraphModule) -> None:
        ours = set()  # pyquant's hooks; torch.export's input check needs attributes a copy does not have
        for table in ("_forward_pre_hooks", "_forward_hooks"):
            for key, hook in getattr(self.original, table, {}).items():
                if not getattr(hook, "__module__", "").startswith("torch."):
                    ours.add(key)
        for table in _HOOK_TABLES:
            if hasattr(self.original, table):
                src = getattr(self.original, table)
                setattr(copy, table, type(src)((k, v) for k, v in src.items() if k in ours))


def keep_forward_hooks(gm: fx.GraphModule) -> None:
    """The forward hooks of `gm` (registered before or after) are those of its deep copies too."""
    gm._register_deepcopy_hook(_KeepForwardHooks(gm))


class _PositionalAsKeywords:
    """Forward pre-hook of a graph captured with keyword inputs: positional arguments become the keywords
    `names` in order (a class, not a closure, so that the graph still pickles and deep-copies)."""

    def __init__(self, names: list[str]):
        self.names = names

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if not args:
            return None
        if len(args) > len(self.names):
            raise TypeError(f"the simulated model takes the inputs {', '.join(self.names)} (by position or name); "
                            f"got {len(args)} positional arguments")
        named = dict(zip(self.names, args))
        clash = sorted(set(named) & set(kwargs))
        if clash:
            raise TypeError(f"the simulated model got {', '.join(clash)} both by position and by name")
        return (), {**named, **kwargs}


def trace(model: nn.Module, dummy_input: Any, kv_cache: bool = False) -> fx.GraphModule:
    """Captures `model` as a torch.fx GraphModule: symbolic tracing keeps the module structure; models it
    cannot trace (HuggingFace transformers, Python control flow on shapes) are captured with torch.export.

    `model` is prepared in place first (QuantSim passes its own copy, or the model itself with in_place=True):
    fused modules run as their ops (decompose_fused_modules), and a transformers model stops returning a
    key/value cache, which is inference state the simulated graph does not carry -- unless `kv_cache`: then a
    transformers model that generates text is captured with its cache as graph inputs and outputs
    (pyquant.sim.decoder), for generate() with one step per new token.

    Raises UntraceableModelError naming the module and source line where tracing failed."""
    decompose_fused_modules(model)
    config = getattr(model, "config", None)
    if kv_cache:
        from .decoder import capture_cached, is_generative
        if not (_is_hf(model) and is_generative(model)):
            raise ValueError(f"kv_cache=True captures a transformers language model that generates text (a "
                             f"...ForCausalLM); {type(model).__name__} is not one")
        try:
            return capture_cached(model, dummy_input)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - one clear error
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UntraceableModelError(f"cannot capture {type(model).__name__} with its key/value cache: "
                                        f"{type(exc).__name__}: {first}") from exc
    if _is_hf(model) and getattr(config, "use_cache", False):
        config.use_cache = False
    tracer = _RecordingTracer()
    try:
        if _is_hf(model):
            return _export(model, dummy_input)
        graph = tracer.trace(model)
        _one_node_per_attribute(graph)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear error
        if not _is_hf(model):
            try:
                return _export(model, dummy_input)
            except Exception:  # noqa: BLE001 - report the symbolic tracer's (more precise) failure
                pass
        where = tracer.current
        msg = (f"cannot capture {type(model).__name__} as a graph: the first untraceable call is "
               f"{_user_frame(exc)}")
        if where:
            msg += f" (inside module '{where}')"
        msg += f" — {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Data-dependent Python " \
               "control flow cannot be traced: move it out of forward or make it a leaf module."
        raise UntraceableModelError(msg) from exc


def _one_node_per_attribute(graph: fx.Graph) -> None:
    """One get_attr node per parameter: fx adds one per access (a module called twice reads its parameter
    twice), and a weight quantizer placed after the first would miss the others."""
    first: dict[str, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op != "get_attr":
            continue
        if n.target in first:
            n.replace_all_uses_with(first[n.target])
            graph.erase_node(n)
        else:
            first[n.target] = n


def propagate_shapes(gm: fx.GraphModule, dummy_input: Any) -> None:
    """Runs the graph once on `dummy_input`, recording each node's output dtype in node.meta['pq_dtype'],
    its number of dimensions in node.meta['pq_ndim'] (None for anything but a tensor) and whether its output
    holds a floating-point tensor (alone or in a tuple) in node.meta['pq_float']."""
    dtypes: dict[fx.Node, Any] = {}
    ndims: dict[fx.Node, Optional[int]] = {}
    floats: dict[fx.Node, bool] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            dtypes[n] = out.dtype if isinstance(out, torch.Tensor) else type(out)
            ndims[n] = out.dim() if isinstance(out, torch.Tensor) else None
            floats[n] = any(isinstance(t, torch.Tensor) and t.is_floating_point()
                            for t in pytree.tree_leaves(out))
            return out

    with torch.no_grad():
        if isinstance(dummy_input, dict):
            args = [dummy_input[n.target] if n.target in dummy_input else None
                    for n in gm.graph.nodes if n.op == "placeholder"]
            Recorder(gm).run(*args)
        elif isinstance(dummy_input, (tuple, list)):
            Recorder(gm).run(*dummy_input)
        else:
            Recorder(gm).run(dummy_input)
    for n, dt in dtypes.items():
        n.meta["pq_dtype"] = dt
        n.meta["pq_ndim"] = ndims[n]
        n.meta["pq_float"] = floats[n]


def weight_of(n: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """The (parameter node, per-channel axis) of a weighted op of a functional or ATen graph whose weight is
    a graph attribute, read whole or as a slice of its output channels (the unfused attention's q, k and v
    weights are thirds of one `in_proj_weight`), else None."""
    if n.op != "call_function":
        return None
    spec = ATEN_WEIGHTS.get(n.target) or FUNCTION_WEIGHTS.get(n.target)
    if spec is None:
        return None
    w = n.args[spec[0]] if len(n.args) > spec[0] else n.kwargs.get("weight")
    while isinstance(w, fx.Node) and w.op == "call_function" and _slices_dim0(w):
        w = w.args[0]
    return (w, spec[1]) if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _slices_dim0(n: fx.Node) -> bool:
    """w[a:b] or aten.slice(w, 0, a, b): a range of a weight's output channels."""
    if n.target is operator.getitem:
        return isinstance(n.args[1], slice)
    return n.target is _aten.slice.Tensor and (n.args[1] if len(n.args) > 1 else 0) == 0


def get_attr(gm: nn.Module, target: str):
    """The attribute at dotted path `target` of `gm` (a get_attr node's value)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
