"""Automatic mixed precision: each layer's weight and activation bit widths chosen from candidates so that
the model costs as little as it can while its accuracy stays within an allowed drop of FP32's.

The search (the sensitivity-then-greedy scheme of AIMET's automatic mixed precision, over the same
quantizer groups and bit-operation cost):

1. Every group at its most expensive candidate: the starting mix. When even it misses the target, the
   search ends there (`target_met=False`, with the distance); when every group at its cheapest candidate
   meets it, the search ends with that mix.
2. Sensitivity: the accuracy with one group lowered to each of its other candidates, every other group
   at the start. The prefix of the graph before the group is the same for all of these evaluations, so
   with a built-in metric it runs once (pyquant.sim.staged) and each candidate computes only the rest.
3. A greedy path from the starting mix to the cheapest: at each step the one group move with the least
   accuracy loss (from the sensitivity) per unit of cost saved. The accuracy along the path is evaluated
   by bisection for the cheapest point that meets the target, and at `pareto_points` evenly spaced points
   for the front.
4. Optional refinement. First, when the cheapest mix scores higher than a dearer mix on the path, the
   climb: every group raised alone from the cheapest mix (staged), and a greedy path back up to the starting
   mix, each step the move gaining most accuracy per unit of cost added, walked like the first path. Where
   layers compensate each other's errors (AdaRound's weights learned on the rounded model's inputs) the
   accuracy is not monotone along the first path, and the climb finds mixes near the cheapest that it
   misses; where it is monotone the climb is skipped. Then best-fit rounds from the cheapest mix meeting
   the target: every single move to a cheaper candidate evaluated on the current mix (staged), the one
   losing least accuracy per cost saved among those still meeting the target taken; the moves that met it
   are re-evaluated in the next round. Then the chosen mix's activations are calibrated anew with its
   weights in place (what a deployment of that mix would do); when that scores higher, more rounds follow
   from it (twice at most).

Every evaluated mix is a point of accuracy versus cost; the result's Pareto front is those no other point
beats on both. The cheapest point that meets the target is applied to the simulation.

Encodings: each quantizer is calibrated once per bit width it may take (weights from themselves, each
channel's range the one among the calibrated range and its clippings that reconstructs the weight with the
least squared error -- a 4-bit channel's best range clips its extremes; activations on `data` with the
simulation at the candidate width); a quantizer at the bit width it
already has keeps its own encoding (SeqMSE, GPTQ, AdaRound or a range search's work stays where the
width does not change).

Candidate weights: at a low width, round-to-nearest loses much of what a learned rounding keeps (MobileNetV2
with every weight at W4A8: 14% top-1 agreement with FP32 on 64 photo crops, 59% with AdaRound's weights;
bench/results/amp_mobilenet*.md). `candidate_weights`
gives, per weight width, the weights and encodings a rounding technique produced for it (an
`AdaroundResult` of the same model, or {quantizer: (weight, encoding)}); a group at that width then runs
with those values, at any other width with the simulation's own weights."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._batches import Batch, Data, as_batches, call
from .._checkpoint import Checkpoint
from .._dirlock import DirectoryLock
from .._fingerprint import fingerprint
from .._io import atomic_torch_save, atomic_write_text
from .._outputs import output_tensor
from .._progress import Progress
from ..quant import Encoding, LpbqEncoding, clipped_encodings, least_error
from ..sim.encodings import write_encodings
from ..sim.quantizer_state import QuantizerState
from ..sim.quantsim import QuantSim
from ..sim.staged import StagedRun, inplace_free, no_inplace_modules
from .adaround import AdaroundResult
from .layerwise import _positional
from .mixed_precision_cost import COSTS, LayerCost, layer_costs, mix_cost
from .mixed_precision_groups import Candidate, CandidateLike, QuantizerGroup, quantizer_groups

__all__ = ["mixed_precision", "MixedPrecisionResult", "MixPoint", "METRICS"]

EvalFn = Callable[[torch.nn.Module], float]

METRICS: dict[str, str] = {
    "top1_agreement": "fraction of output rows (samples, or tokens: the last dimension's vectors) whose arg-max "
                      "is FP32's (FP32: 1.0; an allowed drop of 0.01 is one point)",
    "cosine": "mean cosine similarity of the output's last-dimension vectors with FP32's (FP32: 1)",
}
"""The built-in accuracy measures (higher is better), evaluated against the FP32 model's outputs on the
evaluation data: fast, staged, no labels needed."""

Mix = dict[str, Candidate]

_RECALIBRATIONS = 2
"""Refinement: how many times the chosen mix's activations are calibrated anew (each followed by more moves)."""


def _score(metric: str, ref: list[torch.Tensor], outs: list[torch.Tensor]) -> tuple[float, float]:
    """(the metric, the mean cosine similarity of the output rows with FP32's): the second is a finer
    measure that orders moves the first cannot tell apart (agreement unchanged on every sample)."""
    agree, total, rows = 0.0, 0.0, 0
    for r, o in zip(ref, outs):
        if r.shape != o.shape:
            raise RuntimeError(f"the simulation's output has shape {tuple(o.shape)}, FP32's {tuple(r.shape)}")
        r2 = r.detach().double().reshape(-1, r.shape[-1] if r.dim() else 1)
        o2 = o.detach().double().reshape(-1, r2.shape[-1])
        agree += float((r2.argmax(-1) == o2.argmax(-1)).sum())
        total += float(F.cosine_similarity(r2, o2, dim=-1, eps=1e-12).sum())
        rows += r2.shape[0]
    cosine = total / max(rows, 1)
    return (agree / max(rows, 1) if metric == "top1_agreement" else cosine), cosine


@dataclasses.dataclass(frozen=True)
class MixPoint:
    """One evaluated mix: its `accuracy`, `cost` (under the search's cost model), `relative_cost` (to the
    starting mix, every group at its most expensive candidate), how it was found (`source`: "start",
    "sensitivity", "path", "climb", "refine", "recalibrated") and the mix itself (group name -> candidate
    name)."""

    accuracy: float
    cost: float
    relative_cost: float
    source: str
    mix: dict[str, str]


@dataclasses.dataclass
class MixedPrecisionResult:
    """What `mixed_precision` chose.

    `mix`: group name -> Candidate (the chosen bit widths per group); `groups`: the quantizer groups (their
    quantizers and allowed candidates); `ungrouped`: activation quantizers that kept their bit width;
    `accuracy` of the chosen mix, `fp32_accuracy`, `target` (FP32 minus the allowed drop) and `target_met`;
    `shortfall`: how far below the target the chosen mix is (0 when met); `cost` and `relative_cost` (to
    the starting mix) under `cost_model`, and `costs` (both models, absolute); `pareto`: the non-dominated
    evaluated points, cheapest first; `points`: every evaluated point; `evaluations` run (cached ones not
    counted: `cached`), `staged`, `complete` (False when the time budget ended the search early), `seconds`."""

    mix: Mix
    groups: list[QuantizerGroup]
    ungrouped: list[str]
    metric: str
    accuracy: float
    fp32_accuracy: float
    target: float
    target_met: bool
    shortfall: float
    cost_model: str
    cost: float
    relative_cost: float
    costs: dict[str, float]
    pareto: list[MixPoint]
    points: list[MixPoint]
    evaluations: int
    cached: int
    staged: bool
    complete: bool
    seconds: float

    @property
    def bitwidths(self) -> dict[str, tuple[int, Optional[int]]]:
        """Group name -> (weight bits, activation bits; None: unchanged)."""
        return {g: (c.weight_bits, c.activation_bits) for g, c in self.mix.items()}

    def table(self) -> list[dict[str, Any]]:
        """The Pareto front as rows: relative cost, cost, accuracy, whether it meets the target, and how many
        groups run each candidate."""
        rows = []
        for p in self.pareto:
            counts: dict[str, int] = {}
            for c in p.mix.values():
                counts[c] = counts.get(c, 0) + 1
            rows.append({"relative_cost": p.relative_cost, "cost": p.cost, "accuracy": p.accuracy,
                         "meets_target": p.accuracy >= self.target, "source": p.source,
                         "candidates": dict(sorted(counts.items()))})
        return rows

    def summary(self) -> str:
        state = "met" if self.target_met else f"NOT met, {self.shortfall:.4g} short"
        lines = [f"mixed precision ({self.metric}, cost {self.cost_model}): accuracy {self.accuracy:.4g} "
                 f"(FP32 {self.fp32_accuracy:.4g}, target {self.target:.4g}: {state}), cost {self.relative_cost:.1%} "
                 f"of the starting mix, {self.evaluations} evaluations{' (staged)' if self.staged else ''}"
                 f"{'' if self.complete else ', stopped by the time budget'}, {self.seconds:.1f} s"]
        lines.append("Pareto front (relative cost, accuracy, candidates):")
        for r in self.table():
            mark = "*" if r["meets_target"] else " "
            lines.append(f" {mark} {r['relative_cost']:7.1%}  {r['accuracy']:10.4g}  "
                         + ", ".join(f"{k} x{v}" for k, v in r["candidates"].items()))
        counts: dict[str, int] = {}
        for c in self.mix.values():
            counts[c.name] = counts.get(c.name, 0) + 1
        lines.append("chosen: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_json(self) -> dict[str, Any]:
        """The result as plain data (what `save` writes as `<prefix>_mixed_precision.json`)."""
        return {"metric": self.metric, "accuracy": self.accuracy, "fp32_accuracy": self.fp32_accuracy,
                "target": self.target, "target_met": self.target_met, "shortfall": self.shortfall,
                "cost_model": self.cost_model, "cost": self.cost, "relative_cost": self.relative_cost,
                "costs": self.costs, "evaluations": self.evaluations, "cached": self.cached, "staged": self.staged,
                "complete": self.complete, "seconds": self.seconds,
                "mix": {g: c.name for g, c in self.mix.items()},
                "groups": [{"name": g.name, "weights": list(g.weights), "activations": list(g.activations),
                            "op_types": list(g.op_types), "allowed": [c.name for c in g.allowed]}
                           for g in self.groups],
                "ungrouped": self.ungrouped, "pareto": [dataclasses.asdict(p) for p in self.pareto],
                "points": [dataclasses.asdict(p) for p in self.points]}

    def save(self, sim: QuantSim, path: Union[str, os.PathLike], prefix: str = "mixed_precision") -> dict[str, Path]:
        """Writes what a target needs to run the chosen mix, each file atomically: `<prefix>.encodings` (the
        simulation's encodings, each at its chosen bit width: `QuantSim.load_encodings` takes the widths back),
        `<prefix>.pth` (the FP32 weights the encodings go with: learned-rounding weights of `candidate_weights`
        where the mix chose them, `QuantSim.fp32_state_dict`), `<prefix>_config.json` (the hardware config the
        mix runs under) and `<prefix>_mixed_precision.json` (this result: the mix per group, the front, every
        point). `sim` must hold the mix (as `mixed_precision` leaves it)."""
        for g, c in self.mix.items():
            for w in next(x for x in self.groups if x.name == g).weights:
                if sim.quantizer(w).bitwidth != c.weight_bits:
                    raise ValueError(f"sim: weight {w!r} has {sim.quantizer(w).bitwidth} bits, the mix gives it "
                                     f"{c.weight_bits}; save the simulation mixed_precision was run on")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"encodings": out / f"{prefix}.encodings", "weights": out / f"{prefix}.pth",
                 "config": out / f"{prefix}_config.json", "result": out / f"{prefix}_mixed_precision.json"}
        act, par = sim.encodings()
        write_encodings(paths["encodings"], act, par)
        atomic_torch_save(sim.fp32_state_dict(), paths["weights"])
        atomic_write_text(paths["config"], json.dumps(sim.config.to_dict(), indent=2))
        atomic_write_text(paths["result"], json.dumps(self.to_json(), indent=1))
        return paths


# ---- encodings of every candidate ------------------------------------------------------------------------

class _Encodings:
    """Each grouped quantizer's encoding at each bit width it may take, and switching groups between them."""

    def __init__(self, sim: QuantSim, groups: list[QuantizerGroup], calib: list[Batch],
                 given: Optional[dict[tuple[str, int], tuple[torch.Tensor, Encoding]]] = None):
        self.sim = sim
        self.encs: dict[tuple[str, int], Encoding] = {}
        # candidate weights (weight quantizer, width) -> values, and the simulation's own weights they replace
        self.values: dict[tuple[str, int], torch.Tensor] = {k: v for k, (v, _) in (given or {}).items()}
        with torch.no_grad():
            self.own = {n: sim.weight(n).detach().clone() for n in {n for n, _ in self.values}}
        self.generation = 0
        self.generations: list[dict] = []
        self.grouped = {n for g in groups for n in g.quantizers}  # their encodings come from the table
        saved = {n: (q.bitwidth, q.get_encoding() if q.has_encoding else None, q.frozen)
                 for n, q in sim.quantizers.items()}
        self.saved = saved
        for n, (b, e, _) in saved.items():
            if e is not None:
                self.encs[(n, b)] = e
        try:
            for g in groups:
                for w in g.weights:
                    for bits in sorted({c.weight_bits for c in g.allowed}):
                        if (w, bits) in (given or {}):
                            self.encs[(w, bits)] = given[(w, bits)][1]
                        elif (w, bits) not in self.encs:
                            self._retarget(w, bits)
                            sim.calibrate_weight(w)
                            self.encs[(w, bits)] = self._least_error(w)
                    self._restore({w: saved[w]})  # activations calibrate with the weights as they were
            widths = sorted({c.activation_bits for g in groups for c in g.allowed if c.activation_bits is not None})
            for a in widths:
                todo = [x for g in groups if any(c.activation_bits == a for c in g.allowed) for x in g.activations
                        if (x, a) not in self.encs]
                if not todo:
                    continue
                for x in todo:
                    self._retarget(x, a)
                sim.compute_encodings(calib, progress=False)
                for x in todo:
                    if sim.quantizer(x).has_encoding:
                        self.encs[(x, a)] = sim.quantizer(x).get_encoding()
                self._restore(saved)
        finally:
            self._restore(saved)

    @property
    def tag(self) -> str:
        """What names the activation calibration in use in an evaluation's cache key ("" for the first)."""
        return "" if self.generation == 0 else f"|activations calibrated on mix {self.generation}"

    def _activation_state(self) -> dict:
        acts = {n for n in self.sim.quantizers if n not in self.sim.param_quantizers}
        # grouped activations are kept per width in the table (the mix in place when a generation is restored
        # may give them other widths than now); the ungrouped ones keep their width and are kept as they are
        return {"table": {k: e for k, e in self.encs.items() if k[0] in acts},
                "live": {n: self.sim.quantizer(n).get_encoding() for n in acts - self.grouped
                         if self.sim.quantizer(n).has_encoding}}

    def recalibrate(self, calib: list[Batch]) -> None:
        """The activations calibrated anew with the simulation as it stands (a mix applied; every weight keeps
        its encoding, a frozen activation too): each activation's encoding at its current width in the table
        is replaced, a new generation (`use` goes back to an earlier one)."""
        if not self.generations:
            self.generations.append(self._activation_state())
        sim = self.sim
        thawed = [n for n in sim.param_quantizers if sim.quantizer(n).enabled and not sim.quantizer(n).frozen]
        for n in thawed:
            sim.quantizer(n).freeze()
        try:
            sim.compute_encodings(calib, progress=False)
        finally:
            for n in thawed:
                sim.quantizer(n).unfreeze()
        for n, q in sim.quantizers.items():
            if n not in sim.param_quantizers and q.has_encoding and (n, q.bitwidth) in self.encs:
                self.encs[(n, q.bitwidth)] = q.get_encoding()
        self.generations.append(self._activation_state())
        self.generation = len(self.generations) - 1

    def use(self, generation: int) -> None:
        """The activation table and the ungrouped activations' encodings of `generation` (grouped ones take
        theirs from the table at the next `put`, at whatever width the mix then gives them)."""
        if generation == self.generation:
            return
        state = self.generations[generation]
        self.encs.update(state["table"])
        for n, e in state["live"].items():
            self.sim.quantizer(n).set_encoding(e)
        self.generation = generation

    def _least_error(self, name: str) -> Encoding:
        """Weight quantizer `name`'s calibrated encoding, with each channel's range clipped wherever that
        reconstructs the weight better: a width the simulation was not calibrated at (W4 from W8) gets the
        clipping a low width needs (pyquant.quant.clipped_encodings; LPBQ encodings as they are)."""
        enc = self.sim.quantizer(name).get_encoding()
        if isinstance(enc, LpbqEncoding):
            return enc
        with torch.no_grad():
            w = self.sim.quantizer_input(name).detach()
            return least_error(w, [enc, *clipped_encodings(w, enc)])

    def _retarget(self, name: str, bits: int) -> None:
        q = self.sim.quantizer(name)
        if q.frozen:
            q.unfreeze()
        self.sim.set_bitwidth(name, bits)

    def _restore(self, saved: dict) -> None:
        for n, (b, e, frozen) in saved.items():
            if n in self.own:
                self._set_weight(n, self.own[n])
            q = self.sim.quantizer(n)
            if q.bitwidth != b:
                self.sim.set_bitwidth(n, b)
            if e is not None:
                q.set_encoding(e)
            if frozen and not q.frozen:
                q.freeze()

    def restore(self) -> None:
        """The simulation as it was before the search (widths, encodings, frozen flags)."""
        self._restore(self.saved)

    def put(self, g: QuantizerGroup, c: Candidate) -> None:
        """Group `g`'s quantizers at candidate `c`, with their encodings at its widths."""
        todo = [(w, c.weight_bits) for w in g.weights]
        if c.activation_bits is not None:
            todo += [(a, c.activation_bits) for a in g.activations]
        for name, bits in todo:
            enc = self.encs.get((name, bits))
            if enc is None:
                raise RuntimeError(f"quantizer {name!r} has no encoding at {bits} bits (it saw no calibration data)")
            q = self.sim.quantizer(name)
            if q.bitwidth != bits:
                q.bitwidth = bits
            q.set_encoding(enc)
            if name in self.own:
                self._set_weight(name, self.values.get((name, bits), self.own[name]))

    def given(self, name: str, bits: int) -> bool:
        """Whether weight quantizer `name` runs with candidate weights at `bits`."""
        return (name, bits) in self.values

    def _set_weight(self, name: str, value: torch.Tensor) -> None:
        w = self.sim.weight(name)
        with torch.no_grad():
            w.copy_(value.to(w.device, w.dtype))


# ---- evaluation, cached ---------------------------------------------------------------------------------

class _TimeUp(Exception):
    """The time budget is spent."""


class _Evaluator:
    """The accuracy of mixes: whole (a callable eval_fn, or a graph that writes into its inputs) or staged
    from a node on (built-in metrics), each result kept in the resumable cache."""

    def __init__(self, sim: QuantSim, eval_fn: Union[str, EvalFn], batches: list[Batch], cache: "_Cache",
                 deadline: float):
        self.sim, self.eval_fn, self.batches, self.cache, self.deadline = sim, eval_fn, batches, cache, deadline
        gm = sim.model
        self.staged = isinstance(eval_fn, str) and inplace_free(gm)
        self.chunks = [_positional(gm, b) for b in batches] if isinstance(eval_fn, str) else []
        self.ref: list[torch.Tensor] = []
        self.fine: dict[str, float] = {}  # built-in metrics: the cosine of each evaluated mix, for ordering
        self.evaluations = 0
        self.cached = 0

    def _outputs(self) -> list[torch.Tensor]:
        with torch.inference_mode():
            if self.staged:
                return [output_tensor(o) for o in StagedRun(self.sim.model, self.chunks).run_to_end(0)]
            return [output_tensor(call(self.sim.model, b)) for b in self.batches]

    def fp32(self) -> float:
        with QuantizerState(self.sim) as state:
            state.set(params=False, activations=False)
            if callable(self.eval_fn):
                return self._checked(self.eval_fn(self.sim.model))
            self.ref = [r.detach() for r in self._outputs()]
        return _score(self.eval_fn, self.ref, self.ref)[0]

    def _checked(self, v: Any) -> float:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"eval_fn must return a number, got {type(v).__name__}") from None
        if math.isnan(f):
            raise ValueError("eval_fn returned NaN")
        return f

    def lookup(self, key: str) -> Optional[float]:
        v = self.cache.scores.get(key)
        if v is not None and key in self.cache.fine:
            self.fine[key] = self.cache.fine[key]
        if v is not None:
            self.cached += 1
        return v

    def _record(self, key: str, v: Union[float, tuple[float, float]]) -> float:
        self.evaluations += 1
        if isinstance(v, tuple):
            v, self.fine[key] = v
        self.cache.put(key, v, self.fine.get(key))
        return v

    def check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _TimeUp

    def whole(self, key: str) -> float:
        """The accuracy of the simulation as it stands (its mix named `key`)."""
        v = self.lookup(key)
        if v is not None:
            return v
        self.check_time()
        if callable(self.eval_fn):
            return self._record(key, self._checked(self.eval_fn(self.sim.model)))
        return self._record(key, _score(self.eval_fn, self.ref, self._outputs()))

    def from_node(self, key: str, run: StagedRun, start: int) -> float:
        """The accuracy computed from node `start` on, the values before it taken from `run`."""
        v = self.lookup(key)
        if v is not None:
            return v
        self.check_time()
        with torch.inference_mode():
            outs = [output_tensor(o) for o in run.fork().run_to_end(start)]
        return self._record(key, _score(self.eval_fn, self.ref, outs))


class _Cache:
    """The evaluated mixes' accuracies (and, for built-in metrics, their cosine with FP32), saved after each
    evaluation under the job's fingerprint (resumable); in memory only without a folder."""

    def __init__(self, folder: Optional[Union[str, os.PathLike]], fp: dict[str, Any]):
        self.scores: dict[str, float] = {}
        self.fine: dict[str, float] = {}
        self._ckpt = None if folder is None else Checkpoint(Path(folder) / "mixed_precision_cache.pt", fp)
        if self._ckpt is not None:
            saved = self._ckpt.resume({"scores": {}, "fine": {}}, "mixed_precision")
            self.scores, self.fine = dict(saved["scores"]), dict(saved.get("fine", {}))

    def put(self, key: str, v: float, fine: Optional[float] = None) -> None:
        self.scores[key] = float(v)
        if fine is not None:
            self.fine[key] = float(fine)
        if self._ckpt is not None:
            self._ckpt.save({"scores": self.scores, "fine": self.fine})


# ---- the search -----------------------------------------------------------------------------------------

def _key(groups: list[QuantizerGroup], mix: Mix) -> str:
    return ";".join(mix[g.name].name for g in groups)


def _check(sim: QuantSim, eval_fn: Any, allowed_accuracy_drop: Any, cost: str, pareto_points: Any,
           time_budget: Any) -> float:
    if not isinstance(sim, QuantSim):
        raise TypeError(f"sim must be a pyquant.QuantSim, got {type(sim).__name__}")
    if isinstance(eval_fn, str):
        if eval_fn not in METRICS:
            raise ValueError(f"eval_fn must be one of {sorted(METRICS)} or a callable eval_fn(model) -> float "
                             f"(higher is better), got {eval_fn!r}")
    elif not callable(eval_fn):
        raise TypeError(f"eval_fn must be a metric name or a callable, got {type(eval_fn).__name__}")
    if isinstance(allowed_accuracy_drop, bool) or not isinstance(allowed_accuracy_drop, (int, float)) \
            or not math.isfinite(allowed_accuracy_drop) or allowed_accuracy_drop < 0:
        raise ValueError(f"allowed_accuracy_drop must be a finite number >= 0 (in eval_fn's units), "
                         f"got {allowed_accuracy_drop!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if isinstance(pareto_points, bool) or not isinstance(pareto_points, int) or pareto_points < 0:
        raise ValueError(f"pareto_points must be an int >= 0 (path points evaluated for the front), "
                         f"got {pareto_points!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise ValueError(f"time_budget must be None or a number of seconds > 0, got {time_budget!r}")
    if not any(q.has_encoding for q in sim.quantizers.values()):
        raise RuntimeError("the QuantSim has no encodings: call sim.compute_encodings(...) first")
    return float(allowed_accuracy_drop)


CandidateWeights = Union[AdaroundResult, dict[str, tuple[torch.Tensor, Encoding]]]
"""Weights a rounding technique produced for one width: an AdaroundResult, or {weight quantizer: (weight, encoding)}."""


def _candidate_weights(sim: QuantSim, groups: list[QuantizerGroup], candidate_weights: Any
                       ) -> dict[tuple[str, int], tuple[torch.Tensor, Encoding]]:
    """`candidate_weights` checked against the simulation and the groups: {(weight quantizer, bits): (values,
    encoding)}. Each error names the width and the quantizer."""
    if candidate_weights is None:
        return {}
    if not isinstance(candidate_weights, dict):
        raise TypeError(f"candidate_weights must be a dict {{weight bits: weights}}, got "
                        f"{type(candidate_weights).__name__}")
    widths = {c.weight_bits for g in groups for c in g.allowed}
    group_of = {w: g for g in groups for w in g.weights}
    out: dict[tuple[str, int], tuple[torch.Tensor, Encoding]] = {}
    for bits, src in candidate_weights.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in widths:
            raise ValueError(f"candidate_weights: key {bits!r} is not a weight width of the candidates "
                             f"({sorted(widths)})")
        if isinstance(src, AdaroundResult):
            items = {n: (src.model.get_parameter(n).detach(), e) for n, e in src.encodings.items()}
        elif isinstance(src, dict):
            items = dict(src)
        else:
            raise TypeError(f"candidate_weights[{bits}] must be an AdaroundResult or a dict {{weight quantizer: "
                            f"(weight, encoding)}}, got {type(src).__name__}")
        for name, pair in items.items():
            where = f"candidate_weights[{bits}][{name!r}]"
            if name not in group_of:
                raise ValueError(f"{where}: the simulation has no grouped weight quantizer of that name "
                                 f"(weights: {sorted(group_of)[:8]}{' ...' if len(group_of) > 8 else ''})")
            if not any(c.weight_bits == bits for c in group_of[name].allowed):
                raise ValueError(f"{where}: its group {group_of[name].name!r} has no {bits}-bit candidate")
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], torch.Tensor)
                    and isinstance(pair[1], Encoding)):
                raise TypeError(f"{where} must be a (weight tensor, Encoding) pair")
            value, enc = pair
            q, w = sim.quantizer(name), sim.weight(name)
            if tuple(value.shape) != tuple(w.shape):
                raise ValueError(f"{where}: weight shape {tuple(value.shape)} is not the simulation's "
                                 f"{tuple(w.shape)}")
            if enc.bitwidth != bits or enc.symmetric != q.symmetric or enc.strict != q.strict:
                raise ValueError(f"{where}: the encoding is {enc.bitwidth}-bit "
                                 f"{'symmetric' if enc.symmetric else 'asymmetric'}, the quantizer takes "
                                 f"{bits}-bit {'symmetric' if q.symmetric else 'asymmetric'} encodings")
            if enc.scale.numel() != max(math.prod(q.shape), 1):
                raise ValueError(f"{where}: the encoding has {enc.scale.numel()} scales, the quantizer "
                                 f"{max(math.prod(q.shape), 1)} (shape {tuple(q.shape)})")
            out[(name, bits)] = (value.detach().float().clone(), enc)
    return out


def _greedy(groups: list[QuantizerGroup], origin: Mix, origin_acc: tuple[float, float],
            measured: dict[tuple[str, Candidate], tuple[float, float]], cost_of: Callable[[str, Candidate], float],
            up: bool) -> list[Mix]:
    """Mixes from `origin`, one group move a step: down to cheaper candidates (`up=False`: the move losing
    least accuracy per unit of cost saved, larger savings first among equals) or up to dearer ones (the move
    gaining most accuracy per unit of cost added, smaller additions first). A move's accuracy is `measured`
    (the group moved alone from `origin`), relative to the group's current candidate; ties go by the finer
    measure (the cosine with FP32 of a built-in metric; 0 otherwise). Moves not measured (the time budget
    ended the measurement) are not taken."""
    unknown = (math.inf, math.inf) if up else (-math.inf, -math.inf)
    cur = dict(origin)
    path = [dict(cur)]
    while True:
        best = None
        for g in groups:
            c0 = cur[g.name]
            here = origin_acc if c0 == origin[g.name] else measured.get((g.name, c0), unknown)
            for c in g.allowed:
                step = cost_of(g.name, c) - cost_of(g.name, c0)
                acc = measured.get((g.name, c))
                if (step <= 0 if up else step >= 0) or acc is None:
                    continue
                if up:
                    rank = (-(acc[0] - here[0]) / step, -(acc[1] - here[1]) / step, step)
                else:  # step < 0: -step is the cost saved
                    rank = (max(here[0] - acc[0], 0.0) / -step, max(here[1] - acc[1], 0.0) / -step, step)
                rank += (g.first_node, c.name)
                if best is None or rank < best[0]:
                    best = (rank, g.name, c)
        if best is None:
            return path
        cur[best[1]] = best[2]
        path.append(dict(cur))


def _front(points: list[MixPoint]) -> list[MixPoint]:
    """The points no other beats: none cheaper-or-equal with accuracy higher-or-equal, better in one."""
    out = []
    for p in points:
        if not any((q.cost <= p.cost and q.accuracy >= p.accuracy and (q.cost < p.cost or q.accuracy > p.accuracy))
                   for q in points):
            if not any(q.cost == p.cost and q.accuracy == p.accuracy for q in out):
                out.append(p)
    return sorted(out, key=lambda p: (p.cost, -p.accuracy))


def mixed_precision(sim: QuantSim, candidates: Union[str, Sequence[CandidateLike]], eval_fn: Union[str, EvalFn],
                    data: Data, allowed_accuracy_drop: float, *, eval_data: Optional[Data] = None,
                    cost: str = "bitops", refine: bool = False, pareto_points: int = 8, batch_size: int = 32,
                    max_samples: Optional[int] = None, time_budget: Optional[float] = None,
                    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                    candidate_weights: Optional[dict[int, CandidateWeights]] = None,
                    progress: Optional[bool] = None) -> MixedPrecisionResult:
    """Chooses each quantizer group's bit widths from `candidates` (see the module's docstring) and leaves
    `sim` at the cheapest mix found that keeps the accuracy within `allowed_accuracy_drop` of FP32's.

    Args:
        sim: a calibrated QuantSim; its quantizers' bit widths and encodings are changed in place (to the
            chosen mix).
        candidates: "w4a8,w8a8,w8a16", ["w4", "w8"] (weights only: activations keep their widths), or
            (weight_bits, activation_bits) pairs. A group gets only those its ops' `supported_kernels` run (and
            LPBQ weights those below their decompressed_bw); a candidate no group can run is a ValueError
            naming it. Per-block and LPBQ weights keep their blocks at every width.
        eval_fn: "top1_agreement" or "cosine" (`METRICS`: against FP32's outputs on the evaluation data,
            staged), or a callable `eval_fn(model) -> float`, higher is better (e.g. accuracy on labelled
            data), which brings its own data and is evaluated whole.
        data: calibration data for the encodings at each candidate width (and the evaluation data of a
            built-in metric unless `eval_data` is given): a tensor of samples split into `batch_size`
            batches, or batches -- tensors, tuples of positional inputs, dicts of keyword inputs.
        allowed_accuracy_drop: how far below FP32's accuracy (in eval_fn's units: 0.01 is one point of
            "top1_agreement") the mix may go. When even the most expensive mix misses it, that mix is
            applied and returned with `target_met=False` and its `shortfall`.
        eval_data: evaluation data for a built-in metric (default: `data`).
        cost: "bitops" (default: multiply-accumulates x weight bits x activation bits) or "size" (weight bits).
        refine: after the path, the climb from the cheapest mix, best-fit rounds of single moves
            re-evaluated on the chosen mix, and its activations calibrated anew with its weights (module
            docstring, step 4): more evaluations, a cheaper mix where layers interact.
        pareto_points: path points evaluated beside the bisection, evenly spaced, for the front (default 8).
        max_samples: samples of `data` / `eval_data` used (default: all).
        time_budget: seconds; when spent, the search stops and returns the cheapest mix evaluated so far
            that meets the target (`complete=False`).
        checkpoint_dir: where every evaluation is cached; a rerun with the same simulation, data and settings
            (after a kill, or to try another target) evaluates only what is not there. One job at a time
            (another process's: `pyquant.DirectoryInUseError`).
        candidate_weights: {weight bits: weights} -- what a weight runs with at that width instead of the
            simulation's own weight with a round-to-nearest encoding: an `AdaroundResult` (of the model the
            simulation was built from, at that `param_bw`) or {weight quantizer: (weight values, encoding)}.
            Weights it does not name keep the default. A chosen weight that runs with given values is left
            frozen, so that a later `sim.compute_encodings` keeps its grid.
        progress: show progress bars (None: on a terminal).

    Returns a MixedPrecisionResult (`summary()`, `save(sim, folder)` for the encodings and config)."""
    drop = _check(sim, eval_fn, allowed_accuracy_drop, cost, pareto_points, time_budget)
    if not isinstance(refine, bool):
        raise TypeError(f"refine must be True or False, got {refine!r}")
    t0 = time.perf_counter()
    groups, ungrouped = quantizer_groups(sim, candidates)
    given = _candidate_weights(sim, groups, candidate_weights)
    calib = as_batches(data, batch_size, max_samples, "data")
    evals = calib if eval_data is None else as_batches(eval_data, batch_size, max_samples, "eval_data")
    metric_name = eval_fn if isinstance(eval_fn, str) else getattr(eval_fn, "__name__", "custom")
    settings = {"candidates": sorted({c.name for g in groups for c in g.allowed}), "metric": metric_name,
                "groups": [[g.name, list(g.quantizers), [c.name for c in g.allowed]] for g in groups]}
    parts: dict[str, Any] = {"eval_fn": eval_fn} if callable(eval_fn) else {}
    if given:
        parts["candidate_weights"] = {f"{n}@{b}": {"weight": v, "scale": e.scale, "offset": e.offset}
                                      for (n, b), (v, e) in sorted(given.items())}
    lock = DirectoryLock(Path(checkpoint_dir), "checkpoint_dir").acquire() if checkpoint_dir is not None else None
    try:
        fp = fingerprint(model=sim.model, data=calib + (evals if eval_data is not None else []),
                         settings=settings, **parts) if checkpoint_dir is not None else {}
        cache = _Cache(checkpoint_dir, fp)
        deadline = math.inf if time_budget is None else t0 + float(time_budget)
        return _search(sim, groups, ungrouped, calib, evals, eval_fn, metric_name, drop, cost, refine,
                       pareto_points, cache, deadline, progress, t0, given)
    finally:
        if lock is not None:
            lock.release()


def _search(sim: QuantSim, groups: list[QuantizerGroup], ungrouped: list[str], calib: list[Batch],
            evals: list[Batch], eval_fn: Union[str, EvalFn], metric_name: str, drop: float, cost: str,
            refine: bool, pareto_points: int, cache: _Cache, deadline: float, progress: Optional[bool],
            t0: float, given: dict[tuple[str, int], tuple[torch.Tensor, Encoding]]) -> MixedPrecisionResult:
    encs = _Encodings(sim, groups, calib, given)
    costs: dict[str, LayerCost] = layer_costs(sim, groups, evals[0])
    ev = _Evaluator(sim, eval_fn, evals, cache, deadline)
    fp32 = ev.fp32()
    target = fp32 - drop

    def cost_of(g: str, c: Candidate) -> float:
        return costs[g].of(c, cost)

    start = {g.name: max(g.allowed, key=lambda c: (cost_of(g.name, c), costs[g.name].of(c, "size"),
                                                     -g.allowed.index(c)))
             for g in groups}
    start_cost = mix_cost(costs, start, cost) or 1.0
    points: list[MixPoint] = []
    by_key: dict[str, MixPoint] = {}

    def apply(mix: Mix) -> None:
        for g in groups:
            encs.put(g, mix[g.name])

    generation_of: dict[int, int] = {}  # id of a point -> the activation calibration it was evaluated with

    def note(mix: Mix, acc: float, source: str) -> None:
        key = _key(groups, mix) + encs.tag
        if key not in by_key:
            c = mix_cost(costs, mix, cost)
            by_key[key] = MixPoint(acc, c, c / start_cost, source, {g: m.name for g, m in mix.items()})
            points.append(by_key[key])
            generation_of[id(by_key[key])] = encs.generation

    def evaluate(mix: Mix, source: str) -> float:
        key = _key(groups, mix) + encs.tag
        if key in by_key:  # evaluated earlier in this search (a path point that a sensitivity step reached)
            return by_key[key].accuracy
        acc = ev.lookup(key)
        if acc is None:
            apply(mix)
            acc = ev.whole(key)
        note(mix, acc, source)
        return acc

    sens: dict[tuple[str, Candidate], tuple[float, float]] = {}
    by_name = {(g.name, c.name): c for g in groups for c in g.allowed}

    def as_mix(p: MixPoint) -> Mix:
        return {g: by_name[(g, c)] for g, c in p.mix.items()}

    def cheapest() -> Optional[MixPoint]:
        meeting = [p for p in points if p.accuracy >= target]
        return min(meeting, key=lambda p: (p.cost, -p.accuracy)) if meeting else None

    def phases() -> bool:
        """The search; False when the time budget ended it."""
        try:
            start_acc = evaluate(start, "start")
            floor = {g.name: min(g.allowed, key=lambda c: (cost_of(g.name, c), costs[g.name].of(c, "size"),
                                                            g.allowed.index(c)))
                     for g in groups}
            # the cheapest mix first: when it meets the target there is nothing to search
            if start_acc >= target and (floor == start or evaluate(floor, "path") < target):
                _sensitivity(sim, groups, start, encs, ev, sens, progress, note)
                path = _greedy(groups, start, (start_acc, ev.fine.get(_key(groups, start), 0.0)), sens, cost_of,
                               up=False)
                _walk_path(path, target, pareto_points, evaluate, progress)
                floor_acc = (evaluate(floor, "path"), ev.fine.get(_key(groups, floor) + encs.tag, 0.0))
                floor_cost = mix_cost(costs, floor, cost)
                if refine and any(p.source == "path" and p.cost > floor_cost and p.accuracy < floor_acc[0]
                                  for p in points):
                    # the cheapest mix beats dearer ones on the path: layers compensate each other (learned
                    # rounding), and raising from the bottom finds mixes that lowering from the top misses
                    raised: dict[tuple[str, Candidate], tuple[float, float]] = {}
                    _sensitivity(sim, groups, floor, encs, ev, raised, progress, note,
                                 [(g, c) for g in groups for c in g.allowed
                                  if cost_of(g.name, c) > cost_of(g.name, floor[g.name])], "climb")
                    climb = _greedy(groups, floor, floor_acc, raised, cost_of, up=True)
                    if climb[-1] == start:  # walked down from the top like the greedy path
                        _walk_path(climb[::-1], target, pareto_points, evaluate, progress, "climb")
                if refine:
                    def moves_from(mix: Mix, todo: list[tuple[QuantizerGroup, Candidate]]) -> dict:
                        got: dict[tuple[str, Candidate], tuple[float, float]] = {}
                        _sensitivity(sim, groups, mix, encs, ev, got, progress, note, todo, "refine")
                        return got

                    chosen = cheapest()
                    if chosen is not None:
                        _refine(groups, target, as_mix(chosen), chosen.accuracy, moves_from, cost_of)
                    for _ in range(_RECALIBRATIONS):  # the chosen mix's own activation ranges, then more moves
                        chosen = cheapest()
                        if chosen is None:
                            break
                        mix = as_mix(chosen)
                        encs.use(generation_of[id(chosen)])
                        apply(mix)
                        before = encs.generation
                        encs.recalibrate(calib)
                        acc = evaluate(mix, "recalibrated")
                        if acc <= chosen.accuracy:
                            encs.use(before)  # no better for it: the search goes on as it was
                            break
                        cost_before = chosen.cost
                        _refine(groups, target, mix, acc, moves_from, cost_of)
                        if cheapest().cost >= cost_before:
                            break
        except _TimeUp:
            if not points:
                raise RuntimeError("mixed_precision: the time budget ended before the starting mix was evaluated; "
                                   "give a larger time_budget") from None
            return False
        return True

    try:
        complete = phases()
    except BaseException:  # an error or an interruption leaves the simulation as it was given
        encs.restore()
        raise
    best = cheapest() or max(points, key=lambda p: p.accuracy)
    mix = as_mix(best)
    encs.use(generation_of[id(best)])
    apply(mix)
    for g in groups:  # given weights sit on their encoding's grid: a recalibration must not move it
        for w in g.weights:
            if encs.given(w, mix[g.name].weight_bits):
                sim.quantizer(w).freeze()
    met = best.accuracy >= target
    return MixedPrecisionResult(
        mix=mix, groups=groups, ungrouped=ungrouped, metric=metric_name, accuracy=best.accuracy, fp32_accuracy=fp32,
        target=target, target_met=met, shortfall=0.0 if met else target - best.accuracy, cost_model=cost,
        cost=best.cost, relative_cost=best.relative_cost,
        costs={m: mix_cost(costs, mix, m) for m in COSTS}, pareto=_front(points), points=points,
        evaluations=ev.evaluations, cached=ev.cached, staged=ev.staged, complete=complete,
        seconds=time.perf_counter() - t0)


def _sensitivity(sim: QuantSim, groups: list[QuantizerGroup], start: Mix, encs: _Encodings, ev: _Evaluator,
                 sens: dict[tuple[str, Candidate], tuple[float, float]], progress: Optional[bool],
                 note: Callable[[Mix, float, str], None],
                 todo: Optional[list[tuple[QuantizerGroup, Candidate]]] = None, source: str = "sensitivity") -> None:
    """Each group at each of its other candidates (or the moves `todo`), the rest at `start`: staged from the
    group's first node when the evaluation allows it."""
    if todo is None:
        todo = [(g, c) for g in groups for c in g.allowed if c != start[g.name]]
    todo = sorted(todo, key=lambda m: m[0].first_node)  # the staged run only moves forward
    bar = Progress(len(todo), f"mixed precision: {source}", progress)
    for g in groups:
        encs.put(g, start[g.name])
    nodes = list(sim.model.graph.nodes)
    base, pos = (StagedRun(sim.model, ev.chunks), 0) if ev.staged else (None, 0)
    try:
        with no_inplace_modules(sim.model):
            for g, c in todo:
                mix = {**start, g.name: c}
                key = _key(groups, mix) + encs.tag
                acc = ev.lookup(key)
                if acc is None:
                    encs.put(g, c)
                    try:
                        if base is not None:
                            with torch.inference_mode():
                                while pos < g.first_node:
                                    base.compute(nodes[pos])
                                    base.release(pos)
                                    pos += 1
                            acc = ev.from_node(key, base, pos)
                        else:
                            acc = ev.whole(key)
                    finally:
                        encs.put(g, start[g.name])
                sens[(g.name, c)] = (acc, ev.fine.get(key, 0.0))
                note(mix, acc, source)
                bar.update(note=f"{g.name[-30:]} {c.name}")
    finally:
        bar.close()


def _walk_path(path: list[Mix], target: float, pareto_points: int, evaluate: Callable[[Mix, str], float],
               progress: Optional[bool], source: str = "path") -> None:
    """Bisection along the path for the last point that meets the target (the path's accuracy taken as
    falling), then `pareto_points` evenly spaced points."""
    spaced = sorted({round(i * (len(path) - 1) / (pareto_points + 1)) for i in range(1, pareto_points + 1)}) \
        if len(path) > 2 and pareto_points else []
    bar = Progress(max(1, math.ceil(math.log2(max(len(path), 2)))) + len(spaced), f"mixed precision: {source}",
                   progress)
    try:
        lo, hi = 0, len(path) - 1  # path[lo] meets the target (the start does)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if evaluate(path[mid], source) >= target:
                lo = mid
            else:
                hi = mid - 1
            bar.update(note=f"point {mid}/{len(path) - 1}")
        for i in spaced:
            evaluate(path[i], source)
            bar.update(note=f"point {i}/{len(path) - 1}")
    finally:
        bar.close()


def _refine(groups: list[QuantizerGroup], target: float, start: Mix, start_acc: float,
            moves_from: Callable[[Mix, list[tuple[QuantizerGroup, Candidate]]],
                                 dict[tuple[str, Candidate], tuple[float, float]]],
            cost_of: Callable[[str, Candidate], float]) -> None:
    """Best-fit rounds from `start` (a mix meeting the target, scoring `start_acc`): every single move to a
    cheaper candidate evaluated on the current mix (staged, like the sensitivity), the one that loses least
    accuracy per unit of cost saved among those still meeting the target taken, and the next round
    re-evaluates the moves that met it -- interactions the one-at-a-time sensitivity cannot see are
    measured. Every evaluation becomes a point of the search (through `moves_from`)."""
    cur, here = dict(start), start_acc
    todo = [(g, c) for g in groups for c in g.allowed if cost_of(g.name, c) < cost_of(g.name, cur[g.name])]
    while todo:
        got = moves_from(cur, todo)
        ok = [(g, c) for g, c in todo if got[(g.name, c)][0] >= target]
        if not ok:
            return
        g, c = min(ok, key=lambda m: (max(here - got[(m[0].name, m[1])][0], 0.0)
                                      / (cost_of(m[0].name, cur[m[0].name]) - cost_of(m[0].name, m[1])),
                                      -got[(m[0].name, m[1])][0], m[0].first_node, m[1].name))
        cur = {**cur, g.name: c}
        here = got[(g.name, c)][0]
        todo = [(h, d) for h, d in ok if cost_of(h.name, d) < cost_of(h.name, cur[h.name])]
