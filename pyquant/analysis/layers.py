"""Which quantizers of a QuantSim belong to which layer, and where each layer sits in the graph.

A layer is a module with a quantized weight, together with the output quantizer that follows it
(directly, or after the activation of its supergroup, e.g. Conv -> ReLU6 -> quantizer). Quantizers
that belong to no weighted layer (model inputs, residual adds, pooling) are layers of their own, named
after their op."""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..quant import QuantizeDequantize


@dataclasses.dataclass
class Layer:
    name: str
    quantizers: list[str]
    first_node: int  # index in sim.model.graph of the first node whose result this layer's quantizers change
    op_type: str


def quantizer_nodes(sim) -> dict[str, int]:
    """Quantizer name -> index of the graph node where it acts."""
    gm = sim.model
    by_id = {id(q): n for n, q in sim.quantizers.items()}
    where: dict[str, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, QuantizeDequantize) and id(mod) in by_id:
            where.setdefault(by_id[id(mod)], i)
        wname = f"{node.target}.weight"
        if wname in sim.param_quantizers:
            where.setdefault(wname, i)
    return where


def _owner(sim, node: fx.Node, quant_node_ids: set) -> str | None:
    """The weighted layer whose output reaches `node` through a chain of single-use, unquantized ops."""
    cur = node
    for _ in range(16):
        if cur.op == "call_module" and f"{cur.target}.weight" in sim.param_quantizers:
            return cur.target
        ins = cur.all_input_nodes
        if len(ins) != 1 or ins[0].op == "placeholder" or id(ins[0]) in quant_node_ids or len(ins[0].users) != 1:
            return None
        cur = ins[0]
    return None


def layers(sim) -> list[Layer]:
    """The layers of `sim` in execution order."""
    gm = sim.model
    where = quantizer_nodes(sim)
    nodes = list(gm.graph.nodes)
    by_id = {id(q): n for n, q in sim.quantizers.items()}
    quant_nodes = {id(n) for n in nodes if n.op == "call_module"
                   and id(gm.get_submodule(n.target)) in by_id}
    groups: dict[str, list[str]] = {}
    for name in sorted(where, key=lambda n: where[n]):
        if name in sim.param_quantizers:
            key = name[:-len(".weight")] if name.endswith(".weight") else name
        else:
            node = nodes[where[name]]
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            owner = _owner(sim, src, quant_nodes) if src is not None else None
            key = owner if owner is not None else (name[:-len(".output")] if name.endswith(".output") else name)
        groups.setdefault(key, []).append(name)
    out = []
    for key, qs in groups.items():
        op = next((sim.op_type(q) for q in qs if q in sim.param_quantizers), None) or sim.op_type(qs[0])
        out.append(Layer(key, qs, min(where[q] for q in qs), op))
    out.sort(key=lambda l: l.first_node)
    return out


class QuantizerState:
    """Saves which quantizers of `sim` are enabled and restores that on exit; `set(params=..,
    activations=..)` switches whole kinds on or off (never enabling one that was off to begin with:
    those have no encoding)."""

    def __init__(self, sim):
        self.sim = sim
        self.saved = {n: q.enabled for n, q in sim.quantizers.items()}
        self.usable = {n for n, on in self.saved.items() if on and sim.quantizers[n].get_encoding() is not None}

    def set(self, params: bool, activations: bool) -> None:
        for n in self.saved:
            on = params if n in self.sim.param_quantizers else activations
            self.sim.enable(n, on and n in self.usable)

    def __enter__(self) -> "QuantizerState":
        return self

    def __exit__(self, *exc) -> None:
        for n, on in self.saved.items():
            self.sim.enable(n, on)
