"""What a mix of precisions costs: bit operations (each multiply-accumulate of a layer costs its weight bits
times its activation bits) and model size (each weight element its weight bits).

A layer's multiply-accumulates are counted from the shapes its graph node produces on one batch of the
data, per sample: a convolution or matrix product computes `weight elements / output channels` products
for each output element. Other weighted ops (embedding lookups) compute none; their weights still count
towards the size."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..sim import graph as G
from ..sim.quantsim import QuantSim
from .layerwise import _positional
from .mixed_precision_groups import Candidate, QuantizerGroup

__all__ = ["COSTS", "LayerCost", "layer_costs", "mix_cost"]

COSTS = ("bitops", "size")
"""The cost models: "bitops" (multiply-accumulates x weight bits x activation bits) and "size" (weight
elements x weight bits)."""

_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """A group's multiply-accumulates per sample, weight elements, and the activation bit width a
    weights-only candidate runs it at."""

    macs: int
    weight_elements: int
    activation_bits: int

    def of(self, c: Candidate, cost: str) -> float:
        """The group's cost at candidate `c` under cost model `cost`."""
        if cost == "size":
            return float(self.weight_elements * c.weight_bits)
        a = c.activation_bits if c.activation_bits is not None else self.activation_bits
        return float(self.macs * c.weight_bits * a)


def _readers(sim: QuantSim, wname: str) -> list[fx.Node]:
    """The graph nodes that compute with weight quantizer `wname`'s weight."""
    gm = sim.model
    p = sim.placement[wname]
    if p.graph_weight is None:
        module = wname[:-len(".weight")]
        return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module]
    q = sim.quantizer(wname)
    qnode = next((n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is q), None)
    if qnode is None:
        return []
    out, todo = [], list(qnode.users)
    for _ in range(64):
        if not todo:
            break
        u = todo.pop()
        if G.weight_of(u) is not None or u.op == "call_function" and u.target in G.ATEN_WEIGHTS:
            out.append(u)
        elif u.op == "call_function" and len(u.all_input_nodes) == 1:  # a slice of the output channels
            todo.extend(u.users)
    return out


def layer_costs(sim: QuantSim, groups: Sequence[QuantizerGroup], batch: Any) -> dict[str, LayerCost]:
    """Each group's LayerCost, its multiply-accumulates measured on `batch` (one batch of model inputs: a
    tensor, a tuple of positional inputs or a dict of keyword inputs)."""
    gm = sim.model
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    readers = {g.name: _readers(sim, g.weights[0]) for g in groups}
    watched = {n for rs in readers.values() for n in rs}
    numel: dict[fx.Node, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in watched and isinstance(out, torch.Tensor):
                numel[n] = numel.get(n, 0) + out.numel()
            return out

    args = _positional(gm, batch)
    samples = next((int(a.shape[0]) for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
    with torch.no_grad():
        Recorder(gm).run(*args)
    out = {}
    for g in groups:
        w = g.weights[0]
        p = sim.placement[w]
        shape = p.weight_shape or tuple(sim.weight(w).shape)
        elements = 1
        for k in shape:
            elements *= int(k)
        macs = 0
        if p.op_type in _MAC_OPS and shape:
            per_output = elements // int(shape[p.output_axis if p.output_axis is not None else 0])
            macs = sum(numel.get(n, 0) for n in readers[g.name]) * per_output // max(samples, 1)
        acts = [sim.quantizer(a).bitwidth for a in g.activations]
        out[g.name] = LayerCost(int(macs), elements, max(acts) if acts else int(sim.output_bw))
    return out


def mix_cost(costs: dict[str, LayerCost], mix: dict[str, Candidate], cost: str) -> float:
    """The total cost of `mix` (group name -> candidate) under cost model `cost`."""
    return float(sum(costs[g].of(c, cost) for g, c in mix.items()))
