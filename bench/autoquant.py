"""AutoQuant end to end on real models and data: what accuracy it reaches, which step got it there, and
what it cost (eval_fn calls, wall time).

1. MobileNetV2 (real ImageNet weights, real-photo crops; eval_fn = top-1 agreement with FP32 on the
   FP32-confident crops) with the per-tensor hardware config at W8A8: the target is the per-channel
   W8A8 simulation's agreement minus 1 point (allowed drop = 1 - per-channel + 0.01).
2. MobileNetV2 W4A8 (per-channel config): AutoQuant should end with AdaRound and beat nearest rounding
   (its own first simulation, and min-max nearest rounding as in bench/adaround.py).
3. Fashion-MNIST CNN (real labels, eval_fn = test accuracy) W4A8, allowed drop 0.01.
4. all-MiniLM-L6-v2 W8A8 on fortunes (eval_fn = accuracy of a logistic probe trained on the FP32
   embeddings of half the texts, applied to the quantized model's embeddings of the other half).

    python -m bench.autoquant                     # ~40 minutes on 2 shared cores (AdaRound: most of it)
    python -m bench.autoquant --quick             # small sizes
    python -m bench.autoquant --skip minilm,w4    # sections: w8, w4, fashion, minilm
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import pyquant
from pyquant.metrics import logistic_probe_accuracy, top1_agreement

from bench._harness import padded_batches, publish, require_native, versions

COLUMNS = ["model", "config", "fp32", "reference", "autoquant", "best_step", "applied", "steps_evaluated",
           "wall_s", "target", "met"]
FORTUNE_CATEGORIES = ("computers", "food", "law", "linux", "love", "medicine", "politics", "science",
                      "sports", "startrek")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _predict(model, x, bs=64):
    with torch.no_grad():
        return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def _run(aq: pyquant.AutoQuant, out: Path, **kw) -> tuple[Any, float]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = aq.optimize(output_dir=out, **kw)
    wall = time.perf_counter() - t0
    log(res.summary())
    return res, wall


def _row(model: str, config: str, res, wall: float, **kw) -> dict[str, Any]:
    return dict(model=model, config=config, fp32=100 * res.fp32_accuracy, autoquant=100 * res.accuracy,
                best_step=res.best_step, applied=", ".join(res.applied[1:] if res.applied[0].startswith("batch")
                                                           else res.applied),
                steps_evaluated=sum(s.status == "evaluated" and not s.cached for s in res.steps), wall_s=wall, **kw)


def mobilenet(quick: bool, sections: set, out: Path, ada_iters: int, ada_lr: float) -> tuple[list, list]:
    from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
    from pyquant.models import mobilenet_v2
    from pyquant.sim.quantsim import QuantSim

    model = mobilenet_v2().eval()
    calib = imagenet_calibration_set(32 if quick else 128)
    evalx = imagenet_eval_set(n_per_image=4 if quick else 32)
    ref = _predict(model, evalx)
    n_conf = top1_agreement(ref, ref)[1]

    def agreement(m) -> float:
        return top1_agreement(ref, _predict(m, evalx))[0]

    folded = copy.deepcopy(model)
    pyquant.fold_batchnorms(folded)

    def nearest(config: str, bw: int, **kw) -> float:
        sim = QuantSim(folded, calib[:1], param_bw=bw, output_bw=8, config=config, **kw)
        sim.compute_encodings([calib[i:i + 32] for i in range(0, len(calib), 32)], progress=False)
        return agreement(sim.model)

    rows, notes = [], []
    if "w8" in sections:
        pc = nearest("default", 8)
        log(f"per-channel W8A8 reference: {pc:.4f}")
        aq = pyquant.AutoQuant(model, calib[:1], calib, agreement, param_bw=8, output_bw=8, config="per_tensor",
                               name="mobilenet_v2_w8a8_per_tensor", adaround_kwargs={"iterations": ada_iters,
                                                                                      "max_samples": 64, "lr": ada_lr})
        res, wall = _run(aq, out / "mnv2_w8", allowed_accuracy_drop=(1.0 - pc) + 0.01)
        first = res.step("quantsim").accuracy
        rows.append(_row("MobileNetV2", "W8A8 per-tensor", res, wall, reference=100 * pc,
                         target="within 1 pt of per-channel W8A8 (reference)", met=res.accuracy >= pc - 0.01))
        notes.append(f"MobileNetV2 W8A8 per-tensor: the first simulation (BN folded, tf_enhanced) agrees on "
                     f"{100 * first:.1f}%; {res.best_step} reaches {100 * res.accuracy:.1f}% against per-channel "
                     f"{100 * pc:.1f}% ({', '.join(res.applied)})")
    if "w4" in sections:
        near_mm = nearest("default", 4, quant_scheme="tf_enhanced", param_quant_scheme="min_max")
        aq = pyquant.AutoQuant(model, calib[:1], calib, agreement, param_bw=4, output_bw=8, config="default",
                               name="mobilenet_v2_w4a8", adaround_kwargs={"iterations": ada_iters, "max_samples": 64,
                                                                   "lr": ada_lr})
        res, wall = _run(aq, out / "mnv2_w4", allowed_accuracy_drop=0.01)
        first = res.step("quantsim").accuracy
        pre = max((s.accuracy for s in res.steps if s.kind == "full" and s.status == "evaluated"
                   and s.key != "adaround"), default=float("nan"))
        rows.append(_row("MobileNetV2", "W4A8 per-channel", res, wall, reference=100 * near_mm,
                         target="ends with AdaRound, beats nearest rounding (reference: min-max nearest)",
                         met=res.best_step == "adaround" and res.accuracy > max(near_mm, first)))
        notes.append(f"MobileNetV2 W4A8: nearest rounding agrees on {100 * near_mm:.1f}% (min-max weights) / "
                     f"{100 * first:.1f}% (tf_enhanced, AutoQuant's first simulation); best without AdaRound "
                     f"{100 * pre:.1f}%; AdaRound ({ada_iters} iterations per layer, lr {ada_lr:g}, 64 samples) "
                     f"{100 * res.step('adaround').accuracy:.1f}%" if res.step('adaround').accuracy is not None
                     else "MobileNetV2 W4A8: AdaRound did not run")
    notes.append(f"MobileNetV2: {len(evalx)} real-photo crops, {n_conf} FP32-confident (agreement is over those); "
                 f"{len(calib)} calibration crops")
    return rows, notes


def fashion(quick: bool, out: Path, ada_iters: int) -> tuple[list, list]:
    from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
    from pyquant.models import fashion_cnn
    from pyquant.models.fashion_cnn import evaluate

    model = fashion_cnn()
    xtr, _ = fashion_mnist_tensors("train")
    xte, yte = fashion_mnist_tensors("test")
    if quick:
        xte, yte = xte[:2000], yte[:2000]
    aq = pyquant.AutoQuant(model, xtr[:1], xtr[:1024], lambda m: evaluate(m, xte, yte), param_bw=4, output_bw=8,
                           name="fashion_cnn_w4a8", adaround_kwargs={"iterations": ada_iters})
    res, wall = _run(aq, out / "fashion", allowed_accuracy_drop=0.01)
    row = _row("Fashion-MNIST CNN", "W4A8 per-channel", res, wall, target="drop <= 1 pt", met=res.target_met)
    return [row], [f"Fashion-MNIST: {len(xte)} test images (accuracy %), 1024 calibration images"]


def minilm(quick: bool, out: Path) -> tuple[list, list]:
    from pyquant.datasets import fortunes_dataset
    from pyquant.models import minilm as load_minilm

    tok, model = load_minilm()
    per_cat, seq_len, bs = (12, 32, 16) if quick else (30, 64, 32)
    texts, labels, names = fortunes_dataset(FORTUNE_CATEGORIES, max_per_category=per_cat, seed=0)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    idx_in_cat = torch.zeros(len(labels), dtype=torch.long)
    for c in range(len(names)):
        where = (labels == c).nonzero().flatten()
        idx_in_cat[where] = torch.arange(len(where))
    train = (idx_in_cat % 2 == 0).nonzero().flatten()
    test = (idx_in_cat % 2 == 1).nonzero().flatten()

    def batches(sel: torch.Tensor):
        # fixed-size batches: the simulation is captured (torch.export) at the dummy input's shape
        for s, k in padded_batches(sel, bs):
            yield {"input_ids": ids[s], "attention_mask": mask[s]}, k

    def embed(m, sel) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for b, k in batches(sel):
                h = m(**b)
                h = h.last_hidden_state if hasattr(h, "last_hidden_state") else (h[0] if isinstance(h, (tuple, list))
                                                                                  else h)
                w = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                outs.append(F.normalize((h * w).sum(1) / w.sum(1).clamp_min(1e-9), dim=-1)[:k])
        return torch.cat(outs)

    ref_train = embed(model, train)

    def probe(m) -> float:
        return logistic_probe_accuracy(ref_train, labels[train], embed(m, test), labels[test])

    calib = [b for b, _ in batches(train)]
    aq = pyquant.AutoQuant(model, calib[0], calib, probe, param_bw=8, output_bw=8, name="minilm_w8a8")
    # no drop allowed: the whole flow runs unless the first simulation already matches FP32
    res, wall = _run(aq, out / "minilm", allowed_accuracy_drop=0.0)
    skipped = [f"{s.key} ({s.reason})" for s in res.steps if s.status != "evaluated"]
    row = _row("all-MiniLM-L6-v2", "W8A8 per-channel", res, wall, target="runs end to end (report written)",
               met=res.report_path.exists() and res.encodings_path.exists())
    return [row], [f"MiniLM: {len(texts)} fortunes in {len(names)} categories, {seq_len} tokens, probe trained on FP32 "
                   f"embeddings of {len(train)} texts, tested on {len(test)}; calibration = the {len(train)} training "
                   f"texts; steps that do not apply: {'; '.join(skipped) or 'none'}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="folder for the results (default bench/results)")
    p.add_argument("--skip", default="", help="comma-separated: w8, w4, fashion, minilm")
    p.add_argument("--adaround-iterations", type=int, default=None)
    p.add_argument("--adaround-lr", type=float, default=1e-2,
                   help="AdaRound's learning rate (MobileNetV2): larger than its 1e-3 default, since few iterations "
                        "must move the rounding variables far enough to flip")
    p.add_argument("--keep", default=None, help="keep the AutoQuant reports in this folder (default: a temp dir)")
    a = p.parse_args(argv)
    if not require_native("bench/autoquant.py"):
        return 2
    from pyquant._assets import AssetMissingError
    skip = {s for s in a.skip.split(",") if s}
    sections = {"w8", "w4", "fashion", "minilm"} - skip
    ada_iters = a.adaround_iterations or (30 if a.quick else 300)
    out = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-autoquant-"))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name, fn in (("mobilenet", lambda: mobilenet(a.quick, sections, out, ada_iters, a.adaround_lr)),
                     ("fashion", lambda: fashion(a.quick, out, 4 * ada_iters)),
                     ("minilm", lambda: minilm(a.quick, out))):
        if name == "mobilenet" and not sections & {"w8", "w4"} or name != "mobilenet" and name not in sections:
            continue
        try:
            r, n = fn()
        except AssetMissingError as exc:
            notes.append(f"{name} skipped: {exc}")
            continue
        rows += r
        notes += n
    notes.append(f"percentages: eval_fn x 100; fp32 = eval_fn on the FP32 model; steps_evaluated = eval_fn calls; "
                 f"AutoQuant reports in {out}; {versions()} (machine shared with other work: times are indicative)")
    return publish("autoquant", a, rows, COLUMNS, title="AutoQuant end to end", notes=notes)


if __name__ == "__main__":
    sys.exit(main())
