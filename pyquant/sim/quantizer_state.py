"""Where each quantizer of a QuantSim acts in its graph, and which are enabled, saved and restored: what
the analyses' sweeps and the searches over quantizers (pyquant.techniques.range_search) share."""
from __future__ import annotations

from ..quant import QuantizeDequantize

__all__ = ["quantizer_nodes", "QuantizerState"]


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
