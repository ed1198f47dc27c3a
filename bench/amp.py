"""Mixed precision: pyquant.mixed_precision against aimet-torch 2.42's
`aimet_torch.mixed_precision.choose_mixed_precision`, in one process, on the same model, data, candidates
and target.

1. MobileNetV2 (ImageNet weights, batch norms folded, W8A8 per-channel TF-enhanced), candidates W4A8, W8A8
   and W8A16, accuracy = top-1 agreement with FP32 on real-photo crops (`--confident`: on the crops FP32 is
   sure of, as pyquant.metrics.top1_agreement counts it). Target: within 1 point of W8A8's
   agreement, i.e. allowed drop = (1 - agreement of W8A8) + 0.01.
2. all-MiniLM-L6-v2 on fortune texts, W4 / W8 weights with 8-bit activations, accuracy = cosine similarity of
   the token states with FP32's; target: within 0.01 of W8A8's.

With `--adaround-w4 N`, pyquant's 4-bit candidates run with AdaRound's weights (pyquant.adaround at 4 bits,
N iterations per layer, on the calibration data; `candidate_weights`), a row of its own whose seconds include
AdaRound's, written to amp_<section>_adaround.

pyquant runs with `refine=True` (its refinement: single moves measured on the chosen mix, and the chosen
mix's activations calibrated anew; `--no-refine` for the path alone). For each: the search's seconds and
evaluations, the chosen mix's bit operations relative to all-W8A8 (both
mixes costed by pyquant's cost model: MACs x weight bits x activation bits, MACs from the captured graph's
shapes), its accuracy, and the Pareto fronts side by side. Targets: pyquant's mix costs no more bit
operations than AIMET's, its search is at least 5x faster, and on MobileNetV2 the mix costs at most 60% of
W8A8's bit operations within 1 point of W8A8's agreement.

    python -m bench.amp --quick          # a few crops, pyquant only unless aimet_torch imports (a smoke run)
    python -m bench.amp                  # MobileNetV2 on 256 crops, then MiniLM
    python -m bench.amp --only mobilenet # one section
    python -m bench.amp --no-aimet       # pyquant's columns alone

With AIMET (the peer env, as bench/quantsim.py's docstring sets it up), from a checkout with this file::

    cd /work/main && /tmp/pyquant-peers/bin/python -P bench/amp.py
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a file (python -P bench/amp.py): checkout last on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench._harness import publish, require_native, versions

COLUMNS = ["model", "tool", "seconds", "evaluations", "bitops_vs_w8a8", "accuracy", "w8a8_accuracy", "target",
           "at_target", "mix", "met"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _batches(x: torch.Tensor, bs: int) -> list[tuple[torch.Tensor]]:
    return [(x[i:i + bs],) for i in range(0, len(x), bs)]


def _call(model: torch.nn.Module, b, positional: bool = False) -> torch.Tensor:
    """The output tensor of `model` on batch `b` (a tuple of inputs, or a dict of keyword inputs, given
    positionally in its order to a model traced with positional inputs, as AIMET's is)."""
    if isinstance(b, dict):
        out = model(*b.values()) if positional else model(**b)
    else:
        out = model(*b)
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)


def _agreement(ref: list[torch.Tensor], model: torch.nn.Module, batches: list, positional: bool = False) -> float:
    """Top-1 agreement with the FP32 arg-max, as pyquant's built-in "top1_agreement" counts it."""
    with torch.no_grad():
        hits = sum(int((_call(model, b, positional).argmax(-1) == r).sum()) for b, r in zip(batches, ref))
    return hits / sum(r.numel() for r in ref)


def _cosine(ref: list[torch.Tensor], model: torch.nn.Module, batches: list, positional: bool = False) -> float:
    """Mean cosine similarity of the output's last-dimension vectors with FP32's."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for b, r in zip(batches, ref):
            o = _call(model, b, positional)
            r2, o2 = r.double().reshape(-1, r.shape[-1]), o.double().reshape(-1, r.shape[-1])
            total += float(F.cosine_similarity(r2, o2, dim=-1).sum())
            rows += r2.shape[0]
    return total / rows


# ---- costs of a mix, shared by both tools ------------------------------------------------------------------
def _relative_cost(sim, groups, batch) -> Callable[[dict], float]:
    """A mix's bit operations (pyquant's cost model) relative to every group at W8A8."""
    from pyquant.techniques import Candidate
    from pyquant.techniques.mixed_precision_cost import layer_costs, mix_cost
    costs = layer_costs(sim, groups, batch)
    base = mix_cost(costs, {g.name: Candidate(8, 8) for g in groups}, "bitops")
    return lambda mix: mix_cost(costs, mix, "bitops") / base


def _counts(mix: dict) -> str:
    c: dict[str, int] = {}
    for v in mix.values():
        c[str(v)] = c.get(str(v), 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(c.items()))


def _aimet_mix(asim, groups, candidates) -> dict:
    """AIMET's chosen bit widths, read off its simulation's quantizers, as pyquant groups' candidates (the
    modules carry the same names): the weight's bits, and the widest enabled activation quantizer among the
    module's own and those of the pyquant group's activations (an output after a ReLU6 is the ReLU6's)."""
    from pyquant.techniques import Candidate

    def bits(q) -> Optional[int]:
        return int(q.bitwidth) if q is not None and getattr(q, "bitwidth", None) is not None else None

    out = {}
    for g in groups:
        mod = asim.model.get_submodule(g.name)
        w = bits(mod.param_quantizers["weight"])
        acts = [bits(q) for q in list(getattr(mod, "output_quantizers", [])) + list(getattr(mod, "input_quantizers", []))]
        for a in g.activations:
            if a.endswith(".output"):
                try:
                    other = asim.model.get_submodule(a[:-len(".output")])
                except AttributeError:
                    continue
                acts += [bits(q) for q in getattr(other, "output_quantizers", [])]
        acts = [a for a in acts if a is not None]
        c = Candidate(w, max(acts) if acts else None)
        out[g.name] = c if c in candidates else min(candidates, key=lambda k: (abs(k.weight_bits - c.weight_bits)
                                                                              + abs((k.activation_bits or 0)
                                                                                    - (c.activation_bits or 0))))
    return out


def _aimet_search(aimet, model, dummy, calib: list[tuple], evaluate: Callable, candidates: list, drop: float,
                  prepare: bool) -> tuple[Any, float, int, list]:
    """(AIMET's simulation at its chosen mix, seconds, evaluations, its Pareto list)."""
    from aimet_torch.common.defs import CallbackFunc, QuantizationDataType
    from aimet_torch.mixed_precision import choose_mixed_precision
    from bench.quantsim import _quiet
    asim, _, _ = aimet.sim(model, dummy, "tf_enhanced", "default", prepare=prepare)
    calls = [0]

    def fwd(m, _=None):
        with torch.no_grad():
            for b in calib:
                _call(m, b, positional=True)

    def cb(m, _=None):
        calls[0] += 1
        return evaluate(m, positional=True)

    with _quiet():
        asim.compute_encodings(fwd, None)
        cands = [((c.activation_bits, QuantizationDataType.int), (c.weight_bits, QuantizationDataType.int))
                 for c in candidates]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            pareto = choose_mixed_precision(asim, dummy, cands, CallbackFunc(cb), CallbackFunc(cb), drop, d, True,
                                            CallbackFunc(fwd))
        seconds = time.perf_counter() - t0
    return asim, seconds, calls[0], list(pareto or [])


# ---- one model -----------------------------------------------------------------------------------------------
def run_case(name: str, model, dummy, calib: list[tuple], evals: list[tuple], metric: str, candidates: str,
             margin: float, aimet, prepare: bool, rows: list, notes: list, fronts: dict, refine: bool = True,
             adaround_w4: int = 0, adaround_cache: Optional[str] = None) -> None:
    import pyquant
    from pyquant.sim.quantsim import QuantSim
    from pyquant.techniques import parse_candidates, quantizer_groups

    with torch.no_grad():
        ref = [_call(model, b) for b in evals]
        ref_top = [r.argmax(-1) for r in ref]

    def evaluate(m, positional: bool = False) -> float:
        return (_agreement(ref_top, m, evals, positional) if metric == "top1_agreement"
                else _cosine(ref, m, evals, positional))

    sim = QuantSim(model, dummy, quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim.compute_encodings(calib, progress=False)
    w8a8 = evaluate(sim.model)
    drop = (1.0 - w8a8) + margin
    target = 1.0 - drop
    log(f"{name}: W8A8 {metric} {w8a8:.4f}; target {target:.4f}")
    groups, _ = quantizer_groups(sim, candidates)
    rel = _relative_cost(sim, groups, evals[0])

    t0 = time.perf_counter()
    kw: dict[str, Any] = {}
    tool = "pyquant"
    if adaround_w4:
        ada = pyquant.adaround(model, dummy, calib, param_bw=4, iterations=adaround_w4, progress=False,
                               checkpoint_dir=None if adaround_cache is None else Path(adaround_cache) / name)
        kw["candidate_weights"] = {4: ada}
        tool = f"pyquant, W4 from AdaRound ({adaround_w4} it/layer)"
        notes.append(f"{name}: AdaRound at 4 bits took {time.perf_counter() - t0:.0f} s (in the row's seconds)")
        log(notes[-1])
    res = pyquant.mixed_precision(sim, candidates, metric, calib, drop, eval_data=list(evals), refine=refine, **kw)
    t_pq = time.perf_counter() - t0
    acc = evaluate(sim.model)
    pq_rel = rel(res.mix)
    fronts[f"{name} {tool}"] = [(rel({g: parse_candidates([c])[0] for g, c in p.mix.items()}), p.accuracy)
                                 for p in res.pareto]
    met_mobilenet = pq_rel <= 0.6 and acc >= w8a8 - 0.01 if metric == "top1_agreement" else None
    rows.append(dict(model=name, tool=tool, seconds=t_pq, evaluations=res.evaluations, bitops_vs_w8a8=pq_rel,
                     accuracy=acc, w8a8_accuracy=w8a8, target=target, at_target=acc >= target, mix=_counts(res.mix),
                     met=met_mobilenet))
    log(res.summary())
    floor = {g.name: min(g.allowed, key=lambda c: rel({g.name: c})) for g in groups}
    raised = [f"{g} {c}" for g, c in res.mix.items() if c != floor[g]]
    notes.append(f"{name} {tool}: groups above their cheapest candidate: " + (", ".join(raised) or "none"))
    if not aimet.ok:
        notes.append(f"{name}: {aimet.label}")
        return
    try:
        a_dummy = tuple(dummy.values()) if isinstance(dummy, dict) else dummy
        asim, t_a, n_a, pareto = _aimet_search(aimet, copy.deepcopy(model), a_dummy, calib, evaluate,
                                               parse_candidates(candidates), drop, prepare)
    except Exception as exc:  # noqa: BLE001 - a peer failing on a model is a result, not a crash
        notes.append(f"{name}: AIMET failed: {type(exc).__name__}: {str(exc)[:300]}")
        log(notes[-1])
        return
    a_mix = _aimet_mix(asim, groups, parse_candidates(candidates))
    a_acc = evaluate(asim.model, positional=True)
    a_rel = rel(a_mix)
    fronts[f"{name} AIMET"] = [(float(p[0]), float(p[1])) for p in pareto]
    rows.append(dict(model=name, tool=aimet.label, seconds=t_a, evaluations=n_a, bitops_vs_w8a8=a_rel, accuracy=a_acc,
                     w8a8_accuracy=w8a8, target=target, at_target=a_acc >= target, mix=_counts(a_mix), met=None))
    rows.append(dict(model=name, tool="pyquant vs AIMET", seconds=t_a / t_pq, evaluations=None,
                     bitops_vs_w8a8=pq_rel / a_rel if a_rel else None, accuracy=None, w8a8_accuracy=None, target=None,
                     mix="search speed-up (>= 5x), bit operations ratio (<= 1)", met=t_a / t_pq >= 5 and pq_rel <= a_rel))


def mobilenet(a, aimet, rows, notes, fronts) -> None:
    from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
    from pyquant.datasets.images import PHOTOS
    from pyquant.models import mobilenet_v2
    from pyquant.techniques import fold_batchnorms
    n_eval = 16 if a.quick else a.eval
    n_calib = 16 if a.quick else a.calib
    model = mobilenet_v2().eval()
    fold_batchnorms(model)
    calib = imagenet_calibration_set(n_calib)
    per = math.ceil(n_eval / len(PHOTOS))
    evalx = imagenet_eval_set(n_per_image=per)
    idx = [i * per + j for j in range(per) for i in range(len(PHOTOS))][:n_eval]
    evalx = evalx[sorted(idx)]
    if a.confident:  # pyquant.metrics.top1_agreement's crops: those FP32 is sure of (softmax max > 0.5)
        with torch.no_grad():
            keep = torch.cat([model(x).softmax(-1).amax(-1) > 0.5 for x in evalx.split(64)])
        notes.append(f"MobileNetV2: agreement over the {int(keep.sum())} FP32-confident crops (softmax max > 0.5) "
                     f"of {len(evalx)}")
        log(notes[-1])
        evalx = evalx[keep]
    run_case("MobileNetV2", model, calib[:1], _batches(calib, 16), _batches(evalx, 32), "top1_agreement",
             "w4a8,w8a8,w8a16", 0.01, aimet, True, rows, notes, fronts, not a.no_refine, a.adaround_w4,
             a.adaround_cache)


def minilm(a, aimet, rows, notes, fronts) -> None:
    from pyquant.datasets import fortunes_dataset
    from pyquant.models import minilm as load_minilm
    tok, model = load_minilm(attn_implementation="eager")
    model.config.return_dict = False  # tensors out: AIMET's trace and the positional batches both take them
    texts, _, _ = fortunes_dataset(("computers", "science", "linux"), max_per_category=16 if a.quick else 96, seed=0)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # dict batches: a 2-tuple of tensors would read as (inputs, labels)
    batches = [{"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]} for i in range(0, len(ids), 16)]
    calib, evals = batches[::2], batches[1::2] or batches
    run_case("all-MiniLM-L6-v2", model, batches[0], calib, evals, "cosine", "w4a8,w8a8", 0.01, aimet, False,
             rows, notes, fronts, not a.no_refine, a.adaround_w4, a.adaround_cache)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 crops / a few texts (a smoke run)")
    p.add_argument("--eval", type=int, default=256, help="MobileNetV2 evaluation crops (default 256)")
    p.add_argument("--calib", type=int, default=64, help="MobileNetV2 calibration crops (default 64)")
    p.add_argument("--only", choices=["mobilenet", "minilm"], default=None, help="one section")
    p.add_argument("--no-aimet", action="store_true", help="pyquant alone")
    p.add_argument("--no-refine", action="store_true", help="pyquant without its refinement (refine=False)")
    p.add_argument("--confident", action="store_true",
                   help="MobileNetV2: agreement over the FP32-confident crops only, as pyquant.metrics.top1_agreement "
                        "counts it (crops FP32 itself is unsure of flip on noise)")
    p.add_argument("--adaround-w4", type=int, default=0, metavar="N",
                   help="4-bit candidates with AdaRound's weights, N iterations per layer (default 0: off)")
    p.add_argument("--adaround-cache", default=None, metavar="DIR",
                   help="keep AdaRound's layers under DIR/<model> (a rerun reuses them: its seconds then "
                        "exclude AdaRound's work)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    if not require_native("bench/amp.py"):
        return 2
    from bench.quantsim import _Aimet
    from pyquant._assets import AssetMissingError
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    aimet = _Aimet(not a.no_aimet)
    rows: list[dict[str, Any]] = []
    notes: list[str] = [versions(), aimet.label]
    fronts: dict[str, list] = {}
    for key, fn in (("mobilenet", mobilenet), ("minilm", minilm)):
        if a.only not in (None, key) or (a.quick and key == "minilm" and a.only is None):
            continue
        try:
            fn(a, aimet, rows, notes, fronts)
        except AssetMissingError as exc:
            notes.append(f"{key}: skipped ({exc})")
            log(notes[-1])
    for k, pts in fronts.items():
        notes.append(f"Pareto front, {k} (" + ("bit operations vs W8A8, accuracy" if "pyquant" in k else
                                              "AIMET's bit operations, accuracy") + "): "
                     + "; ".join(f"{c:.3g}, {acc:.4f}" for c, acc in pts))
    name = (("amp" if a.only is None else f"amp_{a.only}") + ("_adaround" if a.adaround_w4 else "")
            + ("_confident" if a.confident else ""))
    return publish(name, a, rows, COLUMNS, title="Mixed precision: pyquant vs AIMET choose_mixed_precision",
                   notes=notes)


if __name__ == "__main__":
    sys.exit(main())
