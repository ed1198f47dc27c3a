"""AutoQuant's recipes and its technique steps, written once: what a simulation is built from (`Recipe`,
a pure description that a cached step is rebuilt from) and, in order, the post-training techniques the
flow tries on top of the best simulation so far (`TECHNIQUE_STEPS`). The flow walks the table; adding
a technique is a recipe field, a table entry and its part of `AutoQuant._build`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

__all__ = ["Recipe", "TechniqueStep", "TECHNIQUE_STEPS"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a simulation is built: from which FP32 model (folded, equalized), with which schemes, and
    which techniques on top."""

    weight_scheme: str
    act_scheme: str
    cle: Optional[str] = None          # None, "cle" or "cle+hba"
    smoothing: bool = False            # activation smoothing of the FP32 model (after equalization)
    bias_correction: Optional[str] = None  # None, "empirical" or "analytical"
    adaround: bool = False
    layerwise: Optional[str] = None    # None, "seq_mse" or "gptq": a layer-wise weight method on the simulation
    range_search: bool = False         # activation ranges searched by the output's loss (last, on the calibrated sim)
    mixed_precision: bool = False      # per-layer bit widths chosen under the target (after everything else)
    weights: bool = True               # weight quantizers on
    activations: bool = True           # activation quantizers on

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def applied(self, folded: bool) -> list[str]:
        """What the simulation carries, in the order it is built."""
        out = ["batch-norm folding"] if folded else []
        out.append(f"weights {self.weight_scheme} / activations {self.act_scheme}")
        for t in sorted(TECHNIQUE_STEPS, key=lambda t: t.build_order):
            note = t.describe(self)
            if note and note not in out:
                out.append(note)
        return out


@dataclasses.dataclass(frozen=True)
class TechniqueStep:
    """One technique step of the flow.

    `key`: the step's record key; `title(aq, best)`: its title; `enabled(aq)`: whether the flow tries it;
    `change(aq)`: the recipe fields it sets on top of the best recipe so far; `settings(aq)`: its own
    settings, kept with its record (changing them recomputes this step only); `describe(recipe)`: how a
    recipe that carries it says so (None: it does not); `build_order`: where it applies when a
    simulation is built (equalization before rounding before bias correction)."""

    key: str
    title: Callable[[Any, Recipe], str]
    enabled: Callable[[Any], bool]
    change: Callable[[Any], dict[str, Any]]
    settings: Callable[[Any], dict[str, Any]]
    describe: Callable[[Recipe], Optional[str]]
    build_order: int


def _cle(variant: str, title: str) -> TechniqueStep:
    return TechniqueStep(
        key=variant, title=lambda aq, best: title, enabled=lambda aq: True, change=lambda aq: {"cle": variant},
        settings=lambda aq: {"replace_relu6": aq.replace_relu6},
        describe=lambda r: (None if r.cle is None else "cross-layer equalization"
                            + (" + high-bias absorption" if r.cle == "cle+hba" else "")),
        build_order=0)


def _layerwise(method: str, title: str) -> TechniqueStep:
    """SeqMSE or GPTQ on the best simulation so far: one weight method at a time (each replaces the other
    and AdaRound), tried by default when weights have at most 4 bits, where rounding costs most."""
    return TechniqueStep(
        key=method, title=lambda aq, best: title + (" + bias correction" if best.bias_correction else ""),
        enabled=lambda aq: aq.layerwise_enabled(method),
        change=lambda aq: {"layerwise": method, "adaround": False},
        settings=lambda aq: {f"{method}_kwargs": aq.layerwise_kwargs[method]},
        describe=lambda r: title if r.layerwise == method else None, build_order=1)


TECHNIQUE_STEPS: tuple[TechniqueStep, ...] = (
    _cle("cle", "cross-layer equalization"),
    _cle("cle+hba", "cross-layer equalization + high-bias absorption"),
    TechniqueStep(
        key="smoothing", title=lambda aq, best: f"activation smoothing (alpha {aq.smoothing_alpha:g})",
        enabled=lambda aq: aq.smoothing_alpha is not None and aq.has_smoothing_pairs(),
        change=lambda aq: {"smoothing": True}, settings=lambda aq: {"alpha": aq.smoothing_alpha},
        describe=lambda r: "activation smoothing" if r.smoothing else None, build_order=0),
    TechniqueStep(
        key="bias_correction", title=lambda aq, best: f"bias correction ({aq.bias_correction})",
        enabled=lambda aq: bool(aq.bias_correction), change=lambda aq: {"bias_correction": aq.bias_correction},
        settings=lambda aq: {"method": aq.bias_correction},
        describe=lambda r: f"bias correction ({r.bias_correction})" if r.bias_correction else None,
        build_order=2),
    _layerwise("seq_mse", "SeqMSE"),
    _layerwise("gptq", "GPTQ"),
    TechniqueStep(
        key="adaround", title=lambda aq, best: "AdaRound" + (" + bias correction" if best.bias_correction else ""),
        enabled=lambda aq: aq.adaround, change=lambda aq: {"adaround": True, "layerwise": None},
        settings=lambda aq: {"adaround_kwargs": aq.adaround_kwargs},
        describe=lambda r: "AdaRound" if r.adaround else None, build_order=1),
    TechniqueStep(
        key="range_search", title=lambda aq, best: "activation range search",
        enabled=lambda aq: aq.range_search, change=lambda aq: {"range_search": True},
        settings=lambda aq: {"range_search_kwargs": aq.range_search_kwargs},
        describe=lambda r: "activation range search" if r.range_search else None, build_order=3),
    TechniqueStep(
        key="mixed_precision",
        title=lambda aq, best: f"mixed precision ({','.join(aq.mixed_precision_candidates or ())})",
        enabled=lambda aq: aq.mixed_precision_candidates is not None, change=lambda aq: {"mixed_precision": True},
        settings=lambda aq: {"candidates": list(aq.mixed_precision_candidates or ()),
                             "mixed_precision_kwargs": aq.mixed_precision_kwargs,
                             "allowed_accuracy_drop": aq.allowed_drop},
        describe=lambda r: "mixed precision" if r.mixed_precision else None, build_order=4),
)
"""The technique steps, in the order the flow tries them. Mixed precision is of another kind: it trades
accuracy for cost, so it runs last, only once the target is met, on the best simulation, and is kept when
its mix still meets the target."""
