"""Mixed precision's units of choice: candidates (a weight and an activation bit width a target runs a layer
with) and quantizer groups (the quantizers of a QuantSim that must share one candidate), with the candidates
the hardware config's supported_kernels let each group run.

A group is a layer with a quantized weight together with the activation quantizers that run at its
precision: its output quantizer (directly after it, or after the rest of its supergroup, Conv -> ReLU6 ->
quantizer), the op-input quantizers on its own inputs (configs that quantize layer inputs), and a
model-input or other activation quantizer whose only reader, through data movement, is the layer. Every
other activation quantizer (a residual Add's output read by two layers, a pooling output shared by
several heads) belongs to no group and keeps the bit width the simulation gives it."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence, Union

import torch.fx as fx

from ..sim.kernels import describe, runs
from ..sim.quantizer_state import quantizer_nodes
from ..sim.quantsim import QuantSim

__all__ = ["Candidate", "QuantizerGroup", "parse_candidates", "quantizer_groups"]

CandidateLike = Union[str, tuple, "Candidate"]


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
    """A precision a layer may run at: `weight_bits` for its weight and `activation_bits` for its activations
    (None: the activations keep the bit width the simulation gives them, a weights-only candidate)."""

    weight_bits: int
    activation_bits: Optional[int] = None

    @property
    def name(self) -> str:
        """"w4a8", or "w4" for a weights-only candidate."""
        return f"w{self.weight_bits}" + ("" if self.activation_bits is None else f"a{self.activation_bits}")

    def __str__(self) -> str:
        return self.name


_CANDIDATE = re.compile(r"^w(\d+)(?:a(\d+))?$")


def _bits(v, what: str, spec) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
        raise ValueError(f"candidates: {spec!r} has {what} {v!r}; bit widths are integers in 2..16")
    return v


def parse_candidates(candidates: Union[str, Sequence[CandidateLike]]) -> list[Candidate]:
    """Candidates from "w4a8,w8a8,w8a16", ["w4", "w8"], [(4, 8), (8, 16)] or Candidate objects, without
    repeats, in the order given. A malformed one is a ValueError naming it."""
    if isinstance(candidates, str):
        candidates = [c for c in candidates.split(",") if c.strip()]
    try:
        items = list(candidates)
    except TypeError:
        raise TypeError(f"candidates must be a list of 'w<bits>a<bits>' strings or (weight_bits, activation_bits) "
                        f"pairs, got {type(candidates).__name__}") from None
    out: list[Candidate] = []
    for c in items:
        if isinstance(c, Candidate):
            cand = Candidate(_bits(c.weight_bits, "weight bits", c),
                             None if c.activation_bits is None else _bits(c.activation_bits, "activation bits", c))
        elif isinstance(c, str):
            m = _CANDIDATE.match(c.strip().lower())
            if m is None:
                raise ValueError(f"candidates: {c!r} is not of the form 'w<bits>a<bits>' (e.g. 'w4a8') or "
                                 f"'w<bits>' (weights only)")
            cand = Candidate(_bits(int(m.group(1)), "weight bits", c),
                             None if m.group(2) is None else _bits(int(m.group(2)), "activation bits", c))
        elif isinstance(c, tuple) and len(c) == 2:
            cand = Candidate(_bits(c[0], "weight bits", c), None if c[1] is None else _bits(c[1], "activation bits", c))
        else:
            raise ValueError(f"candidates: {c!r} is neither 'w<bits>a<bits>' nor a (weight_bits, activation_bits) pair")
        if cand not in out:
            out.append(cand)
    if not out:
        raise ValueError("candidates: give at least one, e.g. 'w4a8,w8a8,w8a16'")
    if len({c.activation_bits is None for c in out}) > 1:
        raise ValueError(f"candidates: {[c.name for c in out]} mix weights-only candidates ('w4') with full ones "
                         f"('w4a8'); give all with activation bits or none")
    return out


@dataclasses.dataclass(frozen=True)
class QuantizerGroup:
    """Quantizers that share one candidate: `weights` (the layer's weight quantizer) and `activations`
    (those that run at its precision), the ONNX op types they belong to, where the group first acts in the
    simulation's graph (`first_node`, an index into `sim.model.graph.nodes`), and the candidates the config
    lets it run (`allowed`, in the order given)."""

    name: str
    weights: tuple[str, ...]
    activations: tuple[str, ...]
    op_types: tuple[str, ...]
    first_node: int
    allowed: tuple[Candidate, ...]

    @property
    def quantizers(self) -> tuple[str, ...]:
        return self.weights + self.activations


def _weighted_nodes(sim: QuantSim) -> dict[str, str]:
    """Graph node name -> weight quantizer of the layer it runs."""
    return {p.node: name for name, p in sim.placement.items() if p.is_param}


def _quantizer_node_ids(sim: QuantSim) -> set[int]:
    gm = sim.model
    mods = {id(q) for q in sim.quantizers.values()}
    return {id(n) for n in gm.graph.nodes if n.op == "call_module" and id(gm.get_submodule(n.target)) in mods}


def _owner_before(node: fx.Node, weighted: dict[str, str], quant_ids: set[int]) -> Optional[str]:
    """The weighted layer whose output reaches `node` through single-use, unquantized single-input ops
    (the rest of its supergroup), `node` itself included."""
    cur = node
    for _ in range(16):
        if cur.name in weighted:
            return weighted[cur.name]
        ins = [a for a in cur.all_input_nodes if a.op != "get_attr"]
        if len(ins) != 1 or ins[0].op == "placeholder" or id(ins[0]) in quant_ids or len(ins[0].users) != 1:
            return None
        cur = ins[0]
    return None


def _only_reader(qnode: fx.Node, weighted: dict[str, str], quant_ids: set[int]) -> Optional[str]:
    """The weighted layer that alone reads quantizer node `qnode`'s output, through single-use data
    movement (flatten, view, dropout)."""
    cur = qnode
    for _ in range(16):
        users = list(cur.users)
        if len(users) != 1 or id(users[0]) in quant_ids:
            return None
        u = users[0]
        if u.name in weighted:
            return weighted[u.name]
        if u.op == "output" or len([a for a in u.all_input_nodes if a.op != "get_attr"]) != 1:
            return None
        cur = u
    return None


def _group_members(sim: QuantSim) -> tuple[dict[str, list[str]], list[str]]:
    """Weight quantizer -> the quantizers of its group (weight first), and the activation quantizers of no
    group."""
    gm = sim.model
    nodes = {n.name: n for n in gm.graph.nodes}
    weighted = _weighted_nodes(sim)
    quant_ids = _quantizer_node_ids(sim)
    qnode_of = {id(gm.get_submodule(n.target)): n for n in gm.graph.nodes
                if n.op == "call_module" and id(n) in quant_ids}
    members = {w: [w] for w in sim.param_quantizers}
    loose: list[str] = []
    for name, q in sim.activation_quantizers.items():
        p = sim.placement[name]
        owner = None
        if p.kind == "op_input":
            owner = weighted.get(p.node)
        elif p.kind == "output" and p.node in nodes:
            owner = _owner_before(nodes[p.node], weighted, quant_ids)
        if owner is None and id(q) in qnode_of:
            owner = _only_reader(qnode_of[id(q)], weighted, quant_ids)
        if owner is None:
            loose.append(name)
        else:
            members[owner].append(name)
    return members, loose


def _allowed(sim: QuantSim, weights: Sequence[str], acts: Sequence[str],
             candidates: Sequence[Candidate]) -> tuple[list[Candidate], dict[Candidate, str]]:
    """The candidates the group can run, and for each refused one why (the op and the kernels it runs)."""
    cfg = sim.config
    by_node: dict[str, tuple[str, bool, bool]] = {}
    for n in list(weights) + list(acts):
        p = sim.placement[n]
        if p.kind == "input":  # model inputs belong to no op
            continue
        t, has_w, has_a = by_node.get(p.node, (p.op_type, False, False))
        by_node[p.node] = (t, has_w or p.is_param, has_a or not p.is_param)
    ok, why = [], {}
    for c in candidates:
        reason = None
        for node, (op_type, has_w, has_a) in by_node.items():
            kernels = cfg.supported_kernels(op_type)
            if not kernels:
                continue
            a = (c.activation_bits if c.activation_bits is not None else
                 max(sim.quantizer(n).bitwidth for n in acts if sim.placement[n].node == node)) if has_a else None
            w = c.weight_bits if has_w else None
            if not any(runs(k, a, w) for k in kernels):
                reason = (f"op {node!r} ({op_type}) runs {', '.join(describe(k) for k in kernels)} "
                          f"(config supported_kernels)")
                break
        if reason is None:
            for n in weights:
                dbw = sim.placement[n].decompressed_bw
                if dbw is not None and not dbw - 15 <= c.weight_bits < dbw:
                    reason = f"weight {n!r} is LPBQ with decompressed_bw {dbw}: its bit width must stay below it"
                    break
        if reason is None:
            ok.append(c)
        else:
            why[c] = reason
    return ok, why


def quantizer_groups(sim: QuantSim, candidates: Union[str, Sequence[CandidateLike]]) -> tuple[list[QuantizerGroup], list[str]]:
    """The quantizer groups of `sim` in graph order, each with the `candidates` its ops can run, and the
    activation quantizers that belong to no group (they keep their bit width).

    A candidate that no group can run is a ValueError naming it and the kernels the config lists; so is a
    group that can run none of them. Disabled weight quantizers (a float kernel) form no group."""
    cands = parse_candidates(candidates)
    members, loose = _group_members(sim)
    where = quantizer_nodes(sim)
    groups: list[QuantizerGroup] = []
    refused: dict[Candidate, str] = {}
    for w, qs in members.items():
        if not sim.quantizer(w).enabled:
            continue
        acts = tuple(q for q in qs[1:] if sim.quantizer(q).enabled)
        ok, why = _allowed(sim, (w,), acts, cands)
        if not ok:
            raise ValueError(f"layer {w[:-len('.weight')] if w.endswith('.weight') else w!r} can run none of the "
                             f"candidates {[c.name for c in cands]}: {'; '.join(f'{c.name}: {r}' for c, r in why.items())}")
        for c, r in why.items():
            refused.setdefault(c, r)
        name = w[:-len(".weight")] if w.endswith(".weight") else w
        ops = tuple(dict.fromkeys(sim.placement[q].op_type for q in (w,) + acts))
        groups.append(QuantizerGroup(name, (w,), acts, ops, min(where.get(q, 0) for q in (w,) + acts), tuple(ok)))
    if not groups:
        raise ValueError("the simulation has no enabled weight quantizer: mixed precision chooses per-layer weight "
                         "(and activation) bit widths")
    unusable = [c for c in cands if not any(c in g.allowed for g in groups)]
    if unusable:
        raise ValueError(f"candidates {[c.name for c in unusable]} cannot run on any layer of this config: "
                         f"{'; '.join(f'{c.name}: {refused[c]}' for c in unusable)}")
    groups.sort(key=lambda g: g.first_node)
    return groups, [a for a in loose if sim.quantizer(a).enabled]
