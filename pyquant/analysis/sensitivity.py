"""Per-layer sensitivity: the model's metric with one layer's quantizers enabled at a time (everything
else FP32), and with one layer's quantizers disabled at a time (everything else quantized), ranked.
The layers that hurt most alone, and help most when left out, are the ones to keep at higher
precision.

Encodings are computed once (the caller's calibrated QuantSim) and reused: a sweep only toggles
quantizers. With a built-in metric the sweep runs the graph node by node over all evaluation batches
and forks at each layer: the part of the model before a layer is the same in every evaluation of the
sweep, so it runs once and each evaluation computes only what comes after the toggled layer."""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Optional, Union

import torch

from .._progress import Progress
from ..metrics import mean_kl, sqnr_db, top1_agreement
from ..sim.staged import StagedRun, inplace_free, no_inplace_modules
from ._data import Batch, as_batches, call, finite, output_tensor
from .layers import Layer, QuantizerState, layers

MetricFn = Callable[[torch.nn.Module], float]

# name -> (function of (fp32 outputs, quantized outputs), higher is better, unit)
METRICS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], float], bool, str]] = {
    "sqnr": (sqnr_db, True, "dB"),
    "top1_agreement": (lambda r, o: 100.0 * top1_agreement(r, o)[0], True, "%"),
    "kl": (mean_kl, False, "nats"),
}

MODES = ("enabled_alone", "disabled_alone")


class _Evaluator:
    """Evaluates the simulation's metric on fixed batches, either whole (any metric) or as suffixes of
    a staged run (built-in metrics on positional inputs)."""

    def __init__(self, sim, batches: list[Batch], metric: Union[str, MetricFn], higher_is_better: bool):
        self.sim = sim
        self.batches = batches
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.ref: Optional[torch.Tensor] = None
        self.evaluations = 0
        self.staged = isinstance(metric, str) and all(isinstance(b, tuple) for b in batches) \
            and inplace_free(sim.model)
        self.nodes = list(sim.model.graph.nodes)

    def _score(self, outs: list[Any]) -> float:
        ts = [output_tensor(o).detach().float() for o in outs]
        y = torch.cat([t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1) for t in ts])
        if self.ref is None:
            self.ref = y
        fn = METRICS[self.metric][0]
        return float(fn(self.ref, y))

    def full(self) -> float:
        """The metric of the simulation in its current state."""
        self.evaluations += 1
        if callable(self.metric):
            return float(self.metric(self.sim.model))
        with torch.inference_mode():  # outputs only feed the metric: no version counters, no autograd
            return self._score([call(self.sim.model, b) for b in self.batches])

    # ---- staged: one run of the shared prefix, a fork per evaluation ----
    def sweep(self, items: list[Layer], toggle: Callable[[Layer, bool], None], bar: Progress) -> list[float]:
        """Metric with each item toggled (toggle(item, True)), the rest as they are now."""
        results: list[float] = []
        if not self.staged:
            for it in items:
                toggle(it, True)
                try:
                    results.append(self.full())
                finally:
                    toggle(it, False)
                bar.update(note=it.name[-40:])
            return results
        gm = self.sim.model
        base = StagedRun(gm, self.batches)
        pos = 0
        order = sorted(range(len(items)), key=lambda i: items[i].first_node)
        scores: dict[int, float] = {}
        with torch.inference_mode(), no_inplace_modules(gm):
            for i in order:
                it = items[i]
                while pos < it.first_node:
                    base.compute(self.nodes[pos])
                    base.release(pos)
                    pos += 1
                toggle(it, True)
                try:
                    scores[i] = self._score(base.fork().run_to_end(pos))
                finally:
                    toggle(it, False)
                self.evaluations += 1
                bar.update(note=it.name[-40:])
        return [scores[i] for i in range(len(items))]


def layer_sensitivity(sim, data: Union[torch.Tensor, Iterable[Any]], metric: Union[str, MetricFn] = "sqnr", *,
                      higher_is_better: Optional[bool] = None, modes: Iterable[str] = MODES,
                      batch_size: int = 32, max_samples: Optional[int] = None,
                      progress: Optional[bool] = None) -> dict[str, Any]:
    """Sweeps the layers of a calibrated `sim` (see pyquant.analysis.layers) and ranks them.

    Args:
        sim: a QuantSim after compute_encodings; its encodings are reused, never recomputed, and its
            quantizer flags are restored afterwards.
        data: evaluation samples (a tensor, split into `batch_size` batches, or an iterable of batches);
            at most `max_samples` samples are used. Ignored by a callable metric, which brings its own.
        metric: "sqnr" (default: dB of the model output against FP32's), "top1_agreement" (% of samples
            where FP32 is confident, p > 0.5, and top-1 agrees), "kl" (mean KL(FP32 || quantized)), or
            a callable `metric(model) -> float` (e.g. accuracy on labelled data).
        higher_is_better: direction of a callable metric (default True); fixed for the named ones.
        modes: "enabled_alone" (one layer quantized, the rest FP32) and/or "disabled_alone" (one layer
            FP32, the rest quantized).
        progress: a progress bar on stderr (default: when stderr is a terminal).

    Returns {"metric", "unit", "higher_is_better", "fp32", "quantized", "layers": [{"layer", "op_type",
    "quantizers", "enabled_alone", "disabled_alone", "rank"}], "ranking": [names, most sensitive first],
    "evaluations", "seconds", "cpu_seconds" (all threads), "staged", "samples"}. The ranking orders by the enabled-alone metric (worst first),
    ties and a disabled-alone-only sweep by the disabled-alone metric (best first)."""
    modes = _checked_modes(modes)
    higher_is_better, unit = _metric_direction_and_unit(metric, higher_is_better)
    if not any(q.get_encoding() is not None for q in sim.quantizers.values()):
        raise RuntimeError("the QuantSim has no encodings: call sim.compute_encodings(...) first")
    batches = as_batches(data, batch_size, max_samples) if isinstance(metric, str) else []
    items = layers(sim)
    started = time.perf_counter(), time.process_time()
    ev = _Evaluator(sim, batches, metric, higher_is_better)
    res: dict[str, list[float]] = {}
    with QuantizerState(sim) as state:
        def toggle_to(on: bool):
            def t(layer: Layer, active: bool) -> None:
                for q in layer.quantizers:
                    if q in state.usable:
                        sim.enable(q, on if active else not on)
            return t
        state.set(params=False, activations=False)
        fp32 = ev.full()                      # also the reference outputs of the built-in metrics
        state.set(params=True, activations=True)
        quantized = ev.full()
        bar = Progress(len(items) * len(modes), "sensitivity", progress)
        try:
            for mode in modes:
                on = mode == "enabled_alone"
                state.set(params=not on, activations=not on)
                res[mode] = ev.sweep(items, toggle_to(on), bar)
        finally:
            bar.close()
    rows, ranking = _ranked_rows(items, res, higher_is_better)
    return _result(metric, unit, higher_is_better, fp32, quantized, rows, ranking, ev, batches, started)


def _checked_modes(modes: Iterable[str]) -> tuple[str, ...]:
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    return modes


def _metric_direction_and_unit(metric: Union[str, MetricFn], higher_is_better: Optional[bool]) -> tuple[bool, str]:
    """(higher_is_better, unit) of a metric: fixed for the named ones (asking for the other direction is
    an error), True unless told otherwise for a callable."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)} or a callable metric(model) -> float, "
                             f"got {metric!r}")
        if higher_is_better is not None and higher_is_better != METRICS[metric][1]:
            raise ValueError(f"metric {metric!r} is {'higher' if METRICS[metric][1] else 'lower'}-is-better; "
                             f"leave higher_is_better unset")
        return METRICS[metric][1], METRICS[metric][2]
    if callable(metric):
        return (True if higher_is_better is None else bool(higher_is_better)), ""
    raise TypeError(f"metric must be a name or a callable, got {type(metric).__name__}")


def _ranked_rows(items: list[Layer], res: dict[str, list[float]],
                 higher_is_better: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per layer (in model order, with its rank) and the layer names, most sensitive first:
    by the enabled-alone metric (worst first), ties and a disabled-alone-only sweep by the
    disabled-alone metric (best first); NaN ranks last."""
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    for i, it in enumerate(items):
        rows.append({"layer": it.name, "op_type": it.op_type, "quantizers": it.quantizers,
                     "enabled_alone": res.get("enabled_alone", [None] * len(items))[i],
                     "disabled_alone": res.get("disabled_alone", [None] * len(items))[i]})

    def key(r):
        e = r["enabled_alone"]
        d = r["disabled_alone"]
        ke = sign * e if e is not None and not math.isnan(e) else math.inf
        kd = -sign * d if d is not None and not math.isnan(d) else math.inf
        return (ke, kd)

    ranked = sorted(rows, key=key)
    for rank, r in enumerate(ranked, 1):
        r["rank"] = rank
    for r in rows:  # JSON-safe once ranked (rounded, NaN/inf as None); the ranking used the exact values
        r["enabled_alone"], r["disabled_alone"] = finite(r["enabled_alone"]), finite(r["disabled_alone"])
    return rows, [r["layer"] for r in ranked]


def _result(metric: Union[str, MetricFn], unit: str, higher_is_better: bool, fp32: float, quantized: float,
            rows: list[dict[str, Any]], ranking: list[str], ev: _Evaluator, batches: list[Batch],
            started: tuple[float, float]) -> dict[str, Any]:
    """The dict layer_sensitivity returns; `started` is (perf_counter, process_time) at the sweep's start."""
    t0, c0 = started
    return {"metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"), "unit": unit,
            "higher_is_better": higher_is_better, "fp32": finite(fp32), "quantized": finite(quantized),
            "layers": rows, "ranking": ranking, "evaluations": ev.evaluations,
            "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3),
            "staged": ev.staged,
            "samples": sum(int(b[0].shape[0]) if isinstance(b, tuple) else 0 for b in batches)}
