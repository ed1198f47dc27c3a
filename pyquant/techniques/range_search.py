"""Output-aware activation range search: each activation quantizer's clipping range chosen by what the
model's output loses, not by the error of the tensor it quantizes.

Calibration schemes derive a range from one tensor's own values (min/max, the SQNR of its histogram, a
percentile). A transformer's activations carry a few outlier channels -- BERT's residual stream holds values
in the hundreds in one dimension, which its FFN output layers write -- and an 8-bit per-tensor grid that
holds them leaves every other channel a few levels, while the model's output may hardly depend on the
outlier's exact size. A tensor's own error cannot see that; the output can.

The search is a greedy coordinate pass, the discrete form of loss-aware post-training quantization (LAPQ,
Nahshan et al. 2019, which minimises the task loss jointly over the clipping values): the activation
quantizers are visited in graph order; the calibrated range [min, max] of quantizer q is scaled by each
factor f of `factors` (the grid derived from [f min, f max] as calibration derives a grid from a range),
and the factor whose simulation gives the least `loss` between the model's output and the FP32 model's
output on `data` -- every other quantizer as it stands -- is kept, then the next quantizer. Unless
`exhaustive`, the factors are walked from the current one outwards (down, then up) and each direction
stops at the first factor that does not improve on the best so far. A factor
replaces the current one only when its loss is strictly lower, so the loss on `data` never rises.

Evaluations are staged (pyquant.sim.staged): the part of the graph before quantizer q is computed once
for all of q's candidates, and each candidate computes only what comes after it -- about half the work of
whole forwards over a pass. Graphs that write into their inputs (in-place ops) are evaluated whole.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._batches import Batch, Data, as_batches, call
from .._progress import Progress
from .._warnings import nothing_to_do
from .._outputs import output_tensor
from ..quant import Encoding, QuantizerBase, from_range
from ..sim.quantizer_state import QuantizerState, quantizer_nodes
from ..sim.quantsim import QuantSim
from ..sim.staged import StagedRun, inplace_free, no_inplace_modules
from .layerwise import LayerCheckpoint, _positional

__all__ = ["search_activation_ranges", "RangeSearchResult", "RangeChoice", "LOSSES", "DEFAULT_FACTORS"]

DEFAULT_FACTORS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)
"""Range factors tried per quantizer by default: the calibrated range and five clippings of it, down to
0.15 of it (outlier channels of BERT-like models are ~10x the typical channel's range)."""

LossFn = Callable[[torch.Tensor, torch.Tensor, Batch], float]


def _sum_count(kind: str, ref: torch.Tensor, out: torch.Tensor) -> tuple[float, int]:
    """(sum of the loss over elements or rows, how many) of one batch's output `out` against `ref`."""
    r, o = ref.detach().double(), out.detach().double()
    if kind == "mse":
        return float(((o - r) ** 2).sum()), r.numel()
    if r.dim() == 0:
        r, o = r.reshape(1), o.reshape(1)
    r, o = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
    if kind == "cosine":
        return float((1.0 - F.cosine_similarity(r, o, dim=-1, eps=1e-12)).sum()), r.shape[0]
    logp, logq = r.log_softmax(-1), o.log_softmax(-1)  # kl: KL(softmax(ref) || softmax(out)) per row
    return float(torch.where(logp.isneginf(), 0.0, logp.exp() * (logp - logq)).sum()), r.shape[0]


LOSSES: dict[str, str] = {
    "mse": "mean squared error of the output against FP32's, per element",
    "cosine": "1 - cosine similarity of the output's last-dimension vectors (tokens, embeddings) with FP32's, "
              "mean over vectors",
    "kl": "KL(softmax(FP32 output) || softmax(output)) over the last dimension (logits), mean over rows",
}
"""The built-in losses (lower is better), by name."""


@dataclasses.dataclass
class RangeChoice:
    """One quantizer's decision: the factor kept (1.0: the calibrated range), the loss before and after its
    turn, and the range it ends with."""

    name: str
    op_type: str
    factor: float
    loss_before: float
    loss_after: float
    min: float
    max: float
    seconds: float


@dataclasses.dataclass
class RangeSearchResult:
    """What `search_activation_ranges` did: `choices` per quantizer in the order searched (each pass), the
    loss of the calibrated simulation (`loss_before`) and of the searched one (`loss_after`) on the search
    data, how many evaluations it made, whether they were staged, and the quantizers left alone (with why)."""

    loss: str
    loss_before: float
    loss_after: float
    choices: list[RangeChoice]
    skipped: dict[str, str]
    evaluations: int
    staged: bool
    seconds: float

    @property
    def clipped(self) -> list[RangeChoice]:
        """The final choices whose range is not the calibrated one."""
        last = {c.name: c for c in self.choices}
        return [c for c in last.values() if c.factor != 1.0]

    def summary(self) -> str:
        lines = [f"activation range search ({self.loss}): loss {self.loss_before:.6g} -> {self.loss_after:.6g}, "
                 f"{self.evaluations} evaluations{' (staged)' if self.staged else ''}, {self.seconds:.1f} s"]
        for c in self.clipped:
            lines.append(f"  {c.name:48s} {c.op_type:12s} x{c.factor:<5g} [{c.min:.4g}, {c.max:.4g}]  "
                         f"loss {c.loss_before:.6g} -> {c.loss_after:.6g}")
        if self.skipped:
            lines.append(f"left as they were: {len(self.skipped)} quantizer(s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _check_factors(factors: Sequence[float]) -> tuple[float, ...]:
    try:
        fs = tuple(float(f) for f in factors)
    except (TypeError, ValueError):
        raise ValueError(f"factors must be a sequence of positive numbers, got {factors!r}") from None
    if not fs or any(isinstance(f, bool) for f in factors) or not all(math.isfinite(f) and f > 0 for f in fs):
        raise ValueError(f"factors must be a non-empty sequence of finite numbers > 0 (fractions of the "
                         f"calibrated range; > 1 widens it), got {factors!r}")
    return tuple(dict.fromkeys(fs))


def _directions(fs: tuple[float, ...], current: float, exhaustive: bool) -> list[list[float]]:
    """The candidates to try from `current`: every other factor in the given order (exhaustive), or the
    smaller factors in decreasing and the larger ones in increasing order, each walked until the loss
    stops falling."""
    if exhaustive:
        return [[f for f in fs if f != current]]
    return [sorted((f for f in fs if f < current), reverse=True), sorted(f for f in fs if f > current)]


def _scaled(calibrated: Encoding, q: QuantizerBase, factor: float) -> Encoding:
    return from_range(calibrated.min * factor, calibrated.max * factor, q.bitwidth, q.symmetric, q.block_size,
                      signed=q.signed, strict=q.strict)


class _Scorer:
    """The loss of the simulation's output against the FP32 reference, over all batches, evaluated whole
    or from a point of a staged run."""

    def __init__(self, sim: QuantSim, batches: list[Batch], loss: Union[str, LossFn]):
        self.sim, self.batches, self.loss = sim, batches, loss
        gm = sim.model
        self.staged = inplace_free(gm)
        self.chunks = [_positional(gm, b) for b in batches] if self.staged else None
        self.evaluations = 0
        self.ref: list[torch.Tensor] = []

    def outputs_whole(self) -> list[torch.Tensor]:
        with torch.inference_mode():
            if self.staged:
                return [output_tensor(o) for o in StagedRun(self.sim.model, self.chunks).run_to_end(0)]
            return [output_tensor(call(self.sim.model, b)) for b in self.batches]

    def score(self, outs: list[torch.Tensor]) -> float:
        self.evaluations += 1
        if callable(self.loss):
            return float(sum(float(self.loss(r, o, b)) for r, o, b in zip(self.ref, outs, self.batches))) / len(outs)
        total, count = 0.0, 0
        for r, o in zip(self.ref, outs):
            if r.shape != o.shape:
                raise RuntimeError(f"the simulation's output has shape {tuple(o.shape)}, FP32's {tuple(r.shape)}")
            s, n = _sum_count(self.loss, r, o)
            total, count = total + s, count + n
        return total / max(count, 1)


def search_activation_ranges(sim: QuantSim, data: Data, *, loss: Union[str, LossFn] = "mse",
                             factors: Sequence[float] = DEFAULT_FACTORS, passes: int = 1,
                             exhaustive: bool = False, quantizers: Optional[Sequence[str]] = None,
                             batch_size: int = 8,
                             max_samples: Optional[int] = None,
                             checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                             progress: Optional[bool] = None) -> RangeSearchResult:
    """Chooses the clipping range of each calibrated activation quantizer of `sim` (in place) by the loss of
    the model's output against FP32 on `data` (see the module's docstring), and freezes the quantizers it
    searched so that a later `sim.compute_encodings` keeps their ranges (`sim.unfreeze()` releases them).
    An error or an interruption leaves `sim` as it was given.

    Args:
        sim: a QuantSim after `compute_encodings` (its weight encodings, SeqMSE/GPTQ/AdaRound results
            included, are used as they are and never changed).
        data: the search data (a few hundred samples are plenty; the calibration data does): a tensor of
            samples split into `batch_size` batches, or batches -- tensors, tuples of positional inputs, or
            dicts of keyword inputs such as {"input_ids": ..., "attention_mask": ...}. The FP32 outputs
            of every batch and, with staging, the live activations of every batch are held in memory.
        loss: "mse" (default), "cosine" (embeddings, hidden states), "kl" (logits) -- see `LOSSES` -- or
            a callable `loss(fp32_output, output, batch) -> float` (lower is better; averaged over batches),
            which sees the batch (e.g. an attention mask for pooling). The output is the model's output
            tensor, its `logits`, or the first tensor it returns.
        factors: fractions of the calibrated range to try (default `DEFAULT_FACTORS`: 1 down to 0.15;
            values > 1 widen it, for ranges that calibration clipped). The calibrated range is always a
            candidate.
        passes: passes over the quantizers (>= 1; each later pass tries every factor again, the other
            quantizers at their new ranges).
        exhaustive: evaluate every factor for every quantizer. Default False: from the current range, the
            smaller factors are tried in decreasing order and the larger ones in increasing order, and each
            direction stops at the first factor that does not lower the loss -- the same choice when the
            loss is unimodal in the factor (clipping first helps resolution, then cuts values the output
            needs), at a fraction of the evaluations (most ranges are best as calibrated).
        quantizers: the activation quantizers to search (default: every enabled, calibrated, unfrozen one).
        max_samples: samples of `data` used (default: all).
        checkpoint_dir: where each decision is saved; a rerun on a simulation built and calibrated as the
            first was, with the same data and settings, continues after the last one. One job uses it at a
            time (another process's: `pyquant.DirectoryInUseError`).
        progress: show a progress bar (None: on a terminal).

    Returns a RangeSearchResult; `result.loss_after <= result.loss_before` always holds on `data`."""
    if not isinstance(sim, QuantSim):
        raise TypeError(f"sim must be a pyquant.QuantSim, got {type(sim).__name__}")
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable loss(fp32_output, output, "
                             f"batch) -> float, got {loss!r}")
    elif not callable(loss):
        raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
    fs = _check_factors(factors)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    names, skipped = _searched(sim, quantizers)
    if not names:
        nothing_to_do("search_activation_ranges: no enabled, calibrated, unfrozen activation quantizer to search")
        return RangeSearchResult(loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"),
                                 math.nan, math.nan, [], skipped, 0, False, 0.0)
    batches = as_batches(data, batch_size, max_samples, "data")
    t0 = time.perf_counter()
    where = quantizer_nodes(sim)
    order = sorted(names, key=lambda n: where[n])
    calibrated = {n: sim.quantizer(n).get_encoding() for n in order}
    scorer = _Scorer(sim, batches, loss)
    with QuantizerState(sim) as state:
        state.set(params=False, activations=False)
        scorer.ref = [r.detach() for r in scorer.outputs_whole()]
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
    settings = {"loss": loss_name, "factors": list(fs), "passes": passes, "exhaustive": bool(exhaustive),
                "quantizers": order}
    with LayerCheckpoint(checkpoint_dir, "range_search", sim, batches, settings) as job:
        factor = {n: 1.0 for n in order}
        for key in job.done:
            name = key.split("/", 1)[1]
            factor[name] = float(job.tensors(key)["factor"])
            sim.quantizer(name).set_encoding(_scaled(calibrated[name], sim.quantizer(name), factor[name]))
        choices = [RangeChoice(**r) for r in job.report]
        current = scorer.score(scorer.outputs_whole())
        first = choices[0].loss_before if choices else current
        todo = [(p, n) for p in range(passes) for n in order if f"{p}/{n}" not in job.done]
        bar = Progress(passes * len(order), "range_search", progress)
        bar.n = passes * len(order) - len(todo)

        def decide(p: int, name: str, evaluate: Callable[[], float]) -> None:
            nonlocal current
            t1 = time.perf_counter()
            q = sim.quantizer(name)
            before, best = current, (current, factor[name])
            for direction in _directions(fs, factor[name], exhaustive):
                for f in direction:
                    q.set_encoding(_scaled(calibrated[name], q, f))
                    v = evaluate()
                    if v < best[0]:
                        best = (v, f)
                    elif not exhaustive:
                        break  # past the minimum along this direction
            factor[name], current = best[1], best[0]
            q.set_encoding(_scaled(calibrated[name], q, factor[name]))
            enc = q.get_encoding()
            choices.append(RangeChoice(name, sim.op_type(name), factor[name], before, current,
                                       float(enc.min.min()), float(enc.max.max()), time.perf_counter() - t1))
            job.save(f"{p}/{name}", {"factor": torch.tensor(factor[name], dtype=torch.float64)},
                     dataclasses.asdict(choices[-1]))
            bar.update(note=name[-40:])

        try:
            if scorer.staged:
                _staged_pass(sim, scorer, where, todo, decide)
            else:
                for p, name in todo:
                    decide(p, name, lambda: scorer.score(scorer.outputs_whole()))
        except BaseException:
            # an error or an interruption leaves the simulation as it was given (the decisions made so far
            # are in checkpoint_dir: a rerun on it continues there)
            for n in order:
                sim.quantizer(n).set_encoding(calibrated[n])
            raise
        finally:
            bar.close()
    for n in order:
        sim.quantizer(n).freeze()
    return RangeSearchResult(loss_name, first, current, choices, skipped, scorer.evaluations, scorer.staged,
                             time.perf_counter() - t0)


def _staged_pass(sim: QuantSim, scorer: _Scorer, where: dict[str, int], todo: list[tuple[int, str]],
                 decide: Callable[[int, str, Callable[[], float]], None]) -> None:
    """`decide` for each quantizer of `todo` (in graph order within a pass), its candidates evaluated from
    the quantizer's node on: one run of the graph per pass carries the decided prefix forward."""
    gm = sim.model
    nodes = list(gm.graph.nodes)
    with no_inplace_modules(gm):
        for p in sorted({p for p, _ in todo}):
            base, pos = StagedRun(gm, scorer.chunks), 0
            for _, name in [t for t in todo if t[0] == p]:
                with torch.inference_mode():
                    while pos < where[name]:
                        base.compute(nodes[pos])
                        base.release(pos)
                        pos += 1

                def evaluate(start: int = pos, run: StagedRun = base) -> float:
                    with torch.inference_mode():
                        return scorer.score([output_tensor(o) for o in run.fork().run_to_end(start)])

                decide(p, name, evaluate)


def _searched(sim: QuantSim, quantizers: Optional[Sequence[str]]) -> tuple[list[str], dict[str, str]]:
    """The activation quantizers to search, and those left alone with why."""
    acts = sim.activation_quantizers
    if quantizers is None:
        wanted = list(acts)
    else:
        if isinstance(quantizers, str):
            quantizers = [quantizers]
        unknown = [n for n in quantizers if n not in acts]
        if unknown:
            hint = " (a weight quantizer: see seq_mse / gptq)" if any(n in sim.param_quantizers for n in unknown) else ""
            raise ValueError(f"quantizers: {unknown} are not activation quantizers of the simulation{hint}; "
                             f"it has {len(acts)}, e.g. {list(acts)[:3]}")
        wanted = list(dict.fromkeys(quantizers))
    names, skipped = [], {}
    for n in wanted:
        q = acts[n]
        if not q.enabled:
            skipped[n] = "disabled"
        elif not q.has_encoding:
            raise RuntimeError(f"activation quantizer {n!r} has no encoding: calibrate the simulation with "
                               f"sim.compute_encodings(...) before searching its ranges")
        elif getattr(q, "frozen", False):
            skipped[n] = "frozen (its range is fixed)"
        else:
            names.append(n)
    return names, skipped
