"""Cross-layer equalization (Nagel et al., 2019, "Data-free quantization"): for two layers joined by a
positively homogeneous activation (ReLU, PReLU, none), scaling output channel c of the first by 1/s_c
and input channel c of the second by s_c leaves the function unchanged; s_c = sqrt(r1_c / r2_c)
equalizes the channel ranges r1 (first layer's output channel) and r2 (second layer's input channel),
so per-tensor quantization loses less. Chains through depthwise convolutions are equalized pair by
pair, repeated until the scales settle."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from .._batches import call
from .._deprecation import _UNSET
from .._layers import layers_for
from .._warnings import nothing_to_do, verbose_switch
from ..quant import QuantizerBase
from .bn_fold import _fold_model
from .graph_layers import activation_of, layer_graph, layer_of, value_users

_LAYERS = layers_for("cle")
_HOMOGENEOUS = (nn.ReLU, nn.PReLU, nn.Identity, nn.Dropout)
# elementwise activations a pair may sit around: those outside the allowed ones block the pair, said so
_ELEMENTWISE = _HOMOGENEOUS + (nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh,
                               nn.LeakyReLU, nn.ELU, nn.Hardsigmoid, nn.Mish, nn.Softplus)


@dataclasses.dataclass
class EqualizationReport:
    """What equalize() did: the layer pairs it scaled and the spread of their channel ranges
    (max over min of the per-output-channel weight range) before and after."""

    pairs: list[tuple[str, str]]
    spread_before: dict[str, float]
    spread_after: dict[str, float]
    folded: list[tuple[str, str]]
    relu6_replaced: list[str]
    iterations: int
    absorbed: dict[str, float] = dataclasses.field(default_factory=dict)  # layer -> largest bias moved on
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # "a -> b" -> why it was left alone
    relu6_output_change: Optional[float] = None  # max relative change of the outputs from replacing ReLU6
    # each folded layer's output (mean, std) as its BN knew them, carried through scaling and absorption:
    # what analytical bias correction of the equalized model needs
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        return str(self)

    def __str__(self) -> str:
        lines = [f"equalize: {len(self.folded)} batch norms folded, {len(self.pairs)} layer pairs scaled "
                 f"({self.iterations} iterations), {len(self.absorbed)} high biases absorbed"]
        if self.relu6_replaced:
            lines.append(f"  ReLU6 -> ReLU: {len(self.relu6_replaced)} modules"
                         + (f", outputs moved by {self.relu6_output_change:.3g} (max relative)"
                            if self.relu6_output_change is not None else ""))
        for a, b in self.pairs:
            lines.append(f"  {a} -> {b}: channel-range spread {self.spread_before[a]:.1f} -> "
                         f"{self.spread_after[a]:.1f}" + (f", bias {self.absorbed[a]:.3g} absorbed"
                                                          if a in self.absorbed else ""))
        for pair, why in self.skipped.items():
            lines.append(f"  skipped {pair}: {why}")
        return "\n".join(lines)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _out_ranges(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)


def _in_ranges(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    if _is_depthwise(m):
        return w.abs().reshape(w.shape[0], -1).amax(dim=1)
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def _spread(m: nn.Module) -> float:
    r = _out_ranges(m)
    return float(r.max() / r.clamp_min(1e-12).min())


def _pairs(model: nn.Module, with_acts: bool = False, acts_allowed: tuple = _HOMOGENEOUS,
           dummy_input: Any = None, skipped: Optional[dict[str, str]] = None):
    """(first, second) layer names joined through homogeneous activations only, each first layer
    feeding only the second; with `with_acts`, also the activation types between them. The graph is
    torch.fx's, or torch.export's with `dummy_input` for a model fx cannot trace (graph_layers.layer_graph).
    Layers joined through an activation that is not allowed go into `skipped` ("a -> b" -> why)."""
    gm = layer_graph(model, dummy_input)
    out = []
    for n in gm.graph.nodes:
        first = layer_of(model, gm, n, _LAYERS)
        if first is None:
            continue
        cur = n
        acts: list[type] = []
        blocked: Optional[str] = None  # the first activation on the way that is not allowed
        while True:
            users = value_users(cur)
            if len(users) != 1:
                break
            nxt = users[0]
            second = layer_of(model, gm, nxt, _LAYERS)
            if second is not None:
                if nxt.args[0] is not cur:  # reads the chain as its weight or bias, not as its input
                    break
                if blocked is not None:
                    if skipped is not None:
                        skipped[f"{first} -> {second}"] = blocked
                    break
                a, b = model.get_submodule(first), model.get_submodule(second)
                channels_match = a.weight.shape[0] == (b.weight.shape[0] if _is_depthwise(b) else b.weight.shape[1])
                if channels_match and (not isinstance(b, nn.Conv2d) or b.groups == 1 or _is_depthwise(b)):
                    out.append((first, second, tuple(acts)) if with_acts else (first, second))
                break
            act = activation_of(model, gm, nxt)
            if act is None or not nxt.args or nxt.args[0] is not cur:
                break
            kind, mod = act
            if issubclass(kind, QuantizerBase):  # a simulation's quantizer: transparent here
                cur = nxt
                continue
            if not issubclass(kind, acts_allowed):
                if not issubclass(kind, _ELEMENTWISE):
                    break
                blocked = blocked or f"{kind.__name__} between them is not positively homogeneous"
            elif kind is nn.PReLU and (mod is None or mod.num_parameters != 1):
                blocked = blocked or "a PReLU with one slope per channel between them is not positively homogeneous"
            acts.append(kind)
            cur = nxt
    return out


@torch.no_grad()
def _scale_pair(a: nn.Module, b: nn.Module) -> torch.Tensor:
    r1, r2 = _out_ranges(a), _in_ranges(b)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-12)), torch.ones_like(r1))
    shape_a = [-1] + [1] * (a.weight.dim() - 1)
    a.weight.div_(s.reshape(shape_a))
    if a.bias is not None:
        a.bias.div_(s)
    if _is_depthwise(b):
        b.weight.mul_(s.reshape(shape_a))
    else:
        shape_b = [1, -1] + [1] * (b.weight.dim() - 2)
        b.weight.mul_(s.reshape(shape_b))
    return s


@torch.no_grad()
def _absorb(a: nn.Module, b: nn.Module, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """High-bias absorption through a ReLU: c = max(0, beta - 3 gamma) of A's outputs sits below nearly
    every activation, so ReLU(y) = ReLU(y - c) + c for them; c leaves A's bias and enters B's as W_B c."""
    c = torch.clamp(beta - 3.0 * gamma, min=0.0)
    if not bool((c > 0).any()) or a.bias is None:
        return torch.zeros_like(c)
    a.bias.sub_(c)
    w = b.weight
    if _is_depthwise(b):
        add = w.reshape(w.shape[0], -1).sum(1) * c
    else:
        add = (w.reshape(w.shape[0], w.shape[1], -1).sum(2) * c.reshape(1, -1)).sum(1)
    if b.bias is None:
        b.bias = nn.Parameter(add.clone())
    else:
        b.bias.add_(add)
    return c


def _pair_problem(a: nn.Module, b: nn.Module) -> Optional[str]:
    for name, m in (("first", a), ("second", b)):
        if not bool(torch.isfinite(m.weight).all()):
            return f"the {name} layer has non-finite weights"
    if not bool(((_out_ranges(a) > 0) & (_in_ranges(b) > 0)).any()):
        return "every channel would need a zero or infinite scale (all-zero weights)"
    return None


def _outputs(model: nn.Module, dummy_input: Any) -> Optional[torch.Tensor]:
    if dummy_input is None:
        return None
    with torch.no_grad():
        out = call(model, dummy_input if isinstance(dummy_input, (tuple, dict)) else (dummy_input,))
    out = getattr(out, "logits", out)  # a transformers model's output: its logits
    return out.detach().clone() if isinstance(out, torch.Tensor) else None


def equalize(model: nn.Module, dummy_input: Optional[Any] = None, *, replace_relu6: bool = False,
             absorb_high_bias: bool = True, max_iterations: int = 50, tol: float = 1e-6,
             verbose: Any = _UNSET) -> EqualizationReport:
    """Folds batch norms, then equalizes every layer pair of `model` in place, then (by default)
    absorbs high biases through ReLUs where a folded BN told the pre-activation statistics.

    Pairs: Conv->Conv, Conv->depthwise->Conv chains (pair by pair) and Linear->Linear (MLPs), joined
    through ReLU (module or functional), single-parameter PReLU, Dropout or nothing, the first layer
    feeding only the second. GELU/SiLU and ReLU6 are not positively homogeneous and block a pair;
    `replace_relu6=True` swaps ReLU6 for ReLU first, which changes the model: the report gives how far
    the outputs on `dummy_input` moved. Absorption is exact for activations above beta - 3 gamma (nearly
    all, for Gaussian pre-activations) and, across a zero-padded convolution, away from the borders.

    The pairs are found in the graph torch.fx traces, or, for a model fx cannot trace (transformers
    models, Python control flow on shapes), in the one torch.export captures from `dummy_input` (a tensor,
    a tuple of positional inputs or a dict of keyword inputs), as QuantSim captures it; the model's own
    modules are changed either way.

    Channels whose range is zero keep a scale of 1; a pair whose weights are non-finite or all zero, or
    whose layers are joined through an activation that is not positively homogeneous, is skipped and
    named in the report. A model without pairs is left as it is, with a NothingToDoWarning
    (`verbose` is deprecated: filter the category instead)."""
    with verbose_switch(verbose, "equalize"):
        report = _equalize(model, dummy_input, replace_relu6, absorb_high_bias, max_iterations, tol)
        if not report.pairs and not report.folded:
            nothing_to_do("equalize: no batch norm to fold and no Conv/Linear pair to equalize; the model is "
                          "unchanged" + (f" ({len(report.skipped)} pairs skipped, see the report)"
                                         if report.skipped else ""), stacklevel=4)
    return report


def _equalize(model: nn.Module, dummy_input: Optional[Any], replace_relu6: bool, absorb_high_bias: bool,
              max_iterations: int, tol: float) -> EqualizationReport:
    folded = _fold_model(model, dummy_input)
    replaced = []
    moved = None
    if replace_relu6:
        before_out = _outputs(model, dummy_input) if any(isinstance(m, nn.ReLU6) for m in model.modules()) else None
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.ReLU6):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.ReLU())
                replaced.append(name)
        if before_out is not None:
            after_out = _outputs(model, dummy_input)
            moved = float((after_out - before_out).abs().max() / before_out.abs().max().clamp_min(1e-30))
    skipped: dict[str, str] = {}
    detailed = []
    for a, b, acts in _pairs(model, with_acts=True, dummy_input=dummy_input, skipped=skipped):
        why = _pair_problem(model.get_submodule(a), model.get_submodule(b))
        if why is None:
            detailed.append((a, b, acts))
        else:
            skipped[f"{a} -> {b}"] = why
    pairs = [(a, b) for a, b, _ in detailed]
    layers = {n for p in pairs for n in p}
    before = {n: _spread(model.get_submodule(n)) for n in layers}
    stats = dict(getattr(folded, "bn_stats", {}))  # A's output statistics, rescaled with A below
    it = 0
    for it in range(1, max_iterations + 1) if pairs else ():
        change = 0.0
        for a, b in pairs:
            s = _scale_pair(model.get_submodule(a), model.get_submodule(b))
            if a in stats:
                beta, gamma = stats[a]
                stats[a] = (beta / s, gamma / s)
            change = max(change, float((s - 1).abs().max()))
        if change < tol:
            break
    after = {n: _spread(model.get_submodule(n)) for n in layers}
    absorbed: dict[str, float] = {}
    if absorb_high_bias:
        for a, b, acts in detailed:
            if a in stats and nn.ReLU in acts and all(t in (nn.ReLU, nn.Identity, nn.Dropout) for t in acts):
                c = _absorb(model.get_submodule(a), model.get_submodule(b), *stats[a])
                if bool((c > 0).any()):
                    absorbed[a] = float(c.max())
                    stats[a] = (stats[a][0] - c, stats[a][1])
    return EqualizationReport(pairs=pairs, spread_before=before, spread_after=after, folded=folded,
                              relu6_replaced=replaced, iterations=it, absorbed=absorbed, skipped=skipped,
                              relu6_output_change=moved, bn_stats=stats)
