"""The layer pairs activation smoothing scales, found in a captured graph (pyquant.sim.graph): a
normalization whose gain (and bias) can absorb a per-channel factor and the Linear layers that read its
output, a value projection whose output reaches one output projection through attention only, and a gated
MLP's up projection whose output, multiplied by the gate, is the down projection's input.

Everything here reads the graph: parameters are named by their paths (`model.layers.0.input_layernorm.weight`),
which are the same in the user's model, so the technique can change the user's parameters in place."""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._layers import layers_for
from ..sim.graph import NodeRole, get_attr
from .graph_layers import value_users

_aten = torch.ops.aten

# Ops between a norm and the Linear layers that read it which keep every value where it was (so channel j
# of the norm is input column j of the Linear): dtype casts, copies, eval-mode dropout.
_SAME_CHANNELS_FUNCTIONS = {
    _aten.to.dtype, _aten.to.device, _aten.to.dtype_layout, _aten._to_copy.default, _aten.type_as.default,
    _aten.contiguous.default, _aten.clone.default, _aten.alias.default, _aten.detach.default,
    _aten.dropout.default, F.dropout,
}
_SAME_CHANNELS_METHODS = {"to", "float", "type_as", "contiguous", "clone", "detach"}
_SAME_CHANNELS_MODULES = (nn.Dropout, nn.Identity)
_LINEAR_MODULES = layers_for("smoothing")
_LINEAR_FUNCTIONS = {F.linear, _aten.linear.default}
_LAYER_NORM_FUNCTIONS = {F.layer_norm, _aten.layer_norm.default}  # (x, shape, weight, bias, eps)
_RMS_NORM_FUNCTIONS = {F.rms_norm, _aten.rms_norm.default}        # (x, shape, weight, eps)
_ADD = {operator.add, torch.add, _aten.add.Tensor, _aten.add.Scalar}


@dataclasses.dataclass(frozen=True)
class LinearUse:
    """A Linear layer in the graph: its node, the paths of its weight and bias (None without one) and the
    node of its input."""

    node: fx.Node
    weight: str
    bias: Optional[str]
    input: fx.Node

    @property
    def layer(self) -> str:
        return self.weight.rpartition(".")[0]


@dataclasses.dataclass(frozen=True)
class NormPair:
    """A normalization and the Linear layers reading its output. `gain_form` is "w" (the gain is the weight)
    or "1+w" (Gemma: the gain is 1 + weight); `bias` is the norm's bias path (LayerNorm) or None."""

    norm: str
    output: fx.Node
    gain: str
    gain_form: str
    bias: Optional[str]
    linears: tuple[LinearUse, ...]


@dataclasses.dataclass(frozen=True)
class ValueOutputPair:
    """A value projection whose output reaches the output projection's input through data movement and the
    value slot of attention only."""

    v: LinearUse
    o: LinearUse


@dataclasses.dataclass(frozen=True)
class GatedPair:
    """A gated MLP's up projection and the down projection that reads `product` = gate * up: channel j of
    the product is up's output channel j times the gate's, so a factor on up's output row j reaches the
    down projection's input column j unchanged."""

    up: LinearUse
    down: LinearUse
    product: fx.Node


def _is_target(n: Any, fns: set, methods: set = frozenset()) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_function":
        return n.target in fns
    return n.op == "call_method" and n.target in methods


def _same_channels(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _SAME_CHANNELS_MODULES)
    if n.op == "call_function" and n.target in (_aten.slice.Tensor, _aten.select.int):
        # rows or tokens picked out (the last position before a language-model head): the channels stay
        ndim = n.args[0].meta.get("pq_ndim") if isinstance(n.args[0], fx.Node) else None
        dim = n.args[1] if len(n.args) > 1 else 0
        return ndim is not None and isinstance(dim, int) and dim % ndim != ndim - 1
    if n.op == "call_function" and n.target in (_aten.dropout.default, F.dropout):
        train = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", n.kwargs.get("train", True))
        return train is False  # eval-mode dropout is the identity
    return _is_target(n, _SAME_CHANNELS_FUNCTIONS, _SAME_CHANNELS_METHODS)


def _strip_casts(gm: fx.GraphModule, n: Any) -> Any:
    while isinstance(n, fx.Node) and _same_channels(gm, n) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def param_uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes read each parameter (by path): the users of its get_attr node, plus one per call of a
    module that owns it."""
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses[n.target] = uses.get(n.target, 0) + len(value_users(n))
        elif n.op == "call_module":
            for name, _ in gm.get_submodule(n.target).named_parameters():
                path = f"{n.target}.{name}"
                uses[path] = uses.get(path, 0) + 1
    return uses


def linear_use(gm: fx.GraphModule, n: fx.Node) -> Optional[LinearUse]:
    """`n` as a Linear layer whose weight is a whole parameter (not a slice or a computed tensor), else None."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, _LINEAR_MODULES) and n.args and isinstance(n.args[0], fx.Node):
            return LinearUse(n, f"{n.target}.weight", f"{n.target}.bias" if mod.bias is not None else None, n.args[0])
        return None
    if not _is_target(n, _LINEAR_FUNCTIONS) or not isinstance(n.args[0], fx.Node):
        return None
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    return LinearUse(n, w.target, b.target if b is not None else None, n.args[0])


def _gain(gm: fx.GraphModule, g: Any) -> Optional[tuple[str, str]]:
    """(path, form) of an RMSNorm gain node: a parameter ("w") or 1 + a parameter ("1+w"), through casts;
    None when it is anything else or is also read elsewhere."""
    g = _strip_casts(gm, g)
    form = "w"
    if _is_target(g, _ADD, {"add"}) and len(g.args) == 2:
        consts = [a for a in g.args if not isinstance(a, fx.Node)]
        nodes = [a for a in g.args if isinstance(a, fx.Node)]
        if len(consts) != 1 or consts[0] != 1 or len(nodes) != 1:
            return None
        g, form = _strip_casts(gm, nodes[0]), "1+w"
    if not (isinstance(g, fx.Node) and g.op == "get_attr"):
        return None
    return g.target, form


def _norm_params(gm: fx.GraphModule, n: fx.Node, role: NodeRole) -> Union[str, tuple[str, str, str, Optional[str]]]:
    """(name, gain path, gain form, bias path) of a normalization output node, or why it cannot absorb a
    per-channel factor."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        w = getattr(mod, "weight", None)
        if w is None:
            return "it has no gain to absorb the scales"
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
            return "it normalizes over more than the last dimension"
        bias = f"{n.target}.bias" if getattr(mod, "bias", None) is not None else None
        return n.target, f"{n.target}.weight", "w", bias
    if _is_target(n, _LAYER_NORM_FUNCTIONS | _RMS_NORM_FUNCTIONS):
        shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        if shape is None or len(shape) != 1:
            return "it normalizes over more than the last dimension"
        w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        b = (n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")) if _is_target(n, _LAYER_NORM_FUNCTIONS) else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return "it has no gain parameter to absorb the scales"
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            return "its bias is not a parameter"
        return w.target.rpartition(".")[0], w.target, "w", b.target if b is not None else None
    # an RMSNorm written out as ops: its output node is the product with the gain
    if len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
        return "it has no gain to absorb the scales"
    found = [_gain(gm, a) for a in n.args]
    found = [f for f in found if f is not None]
    if len(found) != 1:
        return "it has no gain parameter to absorb the scales"
    path, form = found[0]
    return path.rpartition(".")[0], path, form, None


def _readers(gm: fx.GraphModule, n: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the nodes that read `n`'s channels unchanged beyond casts/copies/eval dropout, the other readers)."""
    direct, other, todo = [], [], value_users(n)
    while todo:
        u = todo.pop()
        if _same_channels(gm, u):
            todo += value_users(u)
        elif linear_use(gm, u) is not None and linear_use(gm, u).input in _chain(gm, n):
            direct.append(u)
        else:
            other.append(u)
    return direct, other


def _chain(gm: fx.GraphModule, n: fx.Node) -> set[fx.Node]:
    """`n` and every node that holds its values unchanged (casts, copies, eval dropout)."""
    out, todo = {n}, [n]
    while todo:
        for u in value_users(todo.pop()):
            if _same_channels(gm, u) and u not in out:
                out.add(u)
                todo.append(u)
    return out


def _describe(n: fx.Node) -> str:
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return "the model output" if n.op == "output" else f"{n.name} ({t})"


def norm_pairs(gm: fx.GraphModule, roles: dict[fx.Node, NodeRole],
               uses: dict[str, int]) -> tuple[list[NormPair], dict[str, str]]:
    """The norm -> Linear pairs of a classified graph, and {norm: why it was left alone} for normalizations
    whose output reaches a Linear but cannot be smoothed exactly."""
    pairs: list[NormPair] = []
    skipped: dict[str, str] = {}
    order = {m: i for i, m in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        role = roles.get(n)
        if role is None or role.kind != "op" or role.op_type not in ("LayerNormalization", "RMSNormalization"):
            continue
        linears, other = _readers(gm, n)
        if not linears:
            continue  # nothing to smooth into (q/k norms before rotary, norms before a residual add)
        params = _norm_params(gm, n, role)
        name = n.target if n.op == "call_module" else (params[0] if isinstance(params, tuple) else n.name)
        linears.sort(key=order.__getitem__)
        names = ", ".join(linear_use(gm, u).layer for u in linears)
        if isinstance(params, str):
            skipped[f"{name} -> {names}"] = params
            continue
        name, gain, form, bias = params
        key = f"{name} -> {names}"
        if other:
            skipped[key] = (f"its output also feeds {', '.join(_describe(u) for u in other[:3])}, which is not a "
                            "Linear layer (scaling it would change the model)")
            continue
        uses_ok = [p for p in (gain, bias) if p is not None and uses.get(p, 0) != 1]
        if uses_ok:
            skipped[key] = f"its parameter {uses_ok[0]} is read elsewhere too"
            continue
        lin = tuple(linear_use(gm, u) for u in linears)
        shared = [u.weight for u in lin if uses.get(u.weight, 0) != 1]
        if shared:
            skipped[key] = f"the weight {shared[0]} is read elsewhere too"
            continue
        pairs.append(NormPair(name, n, gain, form, bias, lin))
    return pairs, skipped


def _through_data_movement(roles: dict[fx.Node, NodeRole], start: fx.Node) -> tuple[set[fx.Node], list[fx.Node]]:
    """Everything `start`'s value reaches through data movement only (passthrough nodes, `start` included),
    and the nodes that read it there and compute (in the order found, a node once per edge)."""
    seen, todo, readers = {start}, [start], []
    while todo:
        for u in value_users(todo.pop()):
            role = roles.get(u)
            if role is not None and role.kind == "passthrough":
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
            else:
                readers.append(u)
    return seen, readers


def _value_path(gm: fx.GraphModule, roles: dict[fx.Node, NodeRole],
                start: fx.Node) -> Union[str, tuple[fx.Node, set[fx.Node]]]:
    """From a value projection's output through data movement to the one attention op that reads it in its
    value slot: (the attention node, the nodes on the way), or why there is none."""
    seen, readers = _through_data_movement(roles, start)
    attn = None
    for u in readers:
        role = roles.get(u)
        kind = role.op_type if role is not None else None
        slot = "v" if (kind == "Attention" and len(u.args) > 2 and u.args[2] in seen
                       and not any(a in seen for a in u.args[:2])) else None
        if (kind == "MatMul" and len(u.args) == 2 and u.args[1] in seen and u.args[0] not in seen
                and _from_softmax(roles, u.args[0])):
            slot = "v"  # probabilities @ values
        if slot is None or (attn is not None and attn is not u):
            return f"its output reaches {_describe(u)}, not only the value slot of one attention op"
        attn = u
    if attn is None:
        return "its output reaches no attention op"
    return attn, seen


def _from_softmax(roles: dict[fx.Node, NodeRole], n: Any) -> bool:
    """Whether `n` is a Softmax output, possibly moved (transposed, dropped out in eval) on the way."""
    while isinstance(n, fx.Node) and roles.get(n) is not None and roles[n].kind == "passthrough" and n.args:
        n = n.args[0]
    return isinstance(n, fx.Node) and roles.get(n) is not None and roles[n].op_type == "Softmax"


def value_output_pairs(gm: fx.GraphModule, roles: dict[fx.Node, NodeRole],
                       uses: dict[str, int]) -> tuple[list[ValueOutputPair], dict[str, str]]:
    """Value -> output projection pairs: v's output reaches one attention op's value input through data
    movement only, and the attention output reaches one Linear (o) through data movement only. The map
    from o's input columns to v's channels is measured later (a probe run), not read from the reshapes."""
    pairs: list[ValueOutputPair] = []
    skipped: dict[str, str] = {}
    for n in gm.graph.nodes:
        v = linear_use(gm, n)
        if v is None:
            continue
        found = _value_path(gm, roles, n)
        if isinstance(found, str):
            continue  # not a value projection
        attn, _ = found
        seen, readers = _through_data_movement(roles, attn)
        o = linear_use(gm, readers[0]) if len(readers) == 1 else None
        if o is None or o.input not in seen:
            skipped[f"{v.layer} -> ?"] = ("the attention output reaches "
                                          + ", ".join(_describe(u) for u in readers[:3]) + ", not one Linear layer")
            continue
        key = f"{v.layer} -> {o.layer}"
        shared = [p for p in (v.weight, v.bias, o.weight) if p is not None and uses.get(p, 0) != 1]
        if shared:
            skipped[key] = f"the parameter {shared[0]} is read elsewhere too"
            continue
        pairs.append(ValueOutputPair(v, o))
    return pairs, skipped


def gated_pairs(gm: fx.GraphModule, roles: dict[fx.Node, NodeRole],
                uses: dict[str, int]) -> tuple[list[GatedPair], dict[str, str]]:
    """Up -> down projection pairs of gated MLPs: an elementwise product of a Linear output (up, read
    nowhere else) with another value (the activated gate), read by exactly one Linear (down) and by nothing
    else. Of two Linear operands (an MLP without an activation on its gate) the first is taken as up."""
    pairs: list[GatedPair] = []
    skipped: dict[str, str] = {}
    for n in gm.graph.nodes:
        role = roles.get(n)
        if (role is None or role.op_type != "Mul" or len(n.args) != 2
                or not all(isinstance(a, fx.Node) for a in n.args)):
            continue
        readers, other = _readers(gm, n)
        if not readers:
            continue
        ups = []
        for a in n.args:
            u = linear_use(gm, _strip_casts(gm, a))
            if u is not None:
                direct, elsewhere = _readers(gm, u.node)
                if not direct and elsewhere == [n]:
                    ups.append(u)
        if not ups:
            continue
        up, down = ups[0], linear_use(gm, readers[0])
        key = f"{up.layer} -> {down.layer}"
        if other or len(readers) != 1:
            what = [_describe(u) for u in other[:3]] + [linear_use(gm, u).layer for u in readers[1:3]]
            skipped[key] = f"the product also feeds {', '.join(what)} (scaling it would change the model)"
            continue
        if get_attr(gm, up.weight).shape[0] != get_attr(gm, down.weight).shape[-1]:
            skipped[key] = "the up projection's outputs are not the down projection's input columns one to one"
            continue
        shared = [p for p in (up.weight, up.bias, down.weight) if p is not None and uses.get(p, 0) != 1]
        if shared:
            skipped[key] = f"the parameter {shared[0]} is read elsewhere too"
            continue
        pairs.append(GatedPair(up, down, n))
    return pairs, skipped
