"""Quantization-aware training: accuracy on Fashion-MNIST (real labels) and the cost of a QAT step
(time and peak memory) against the FP32 step of the same model, and against aimet-torch's QAT step
with range learning when aimet_torch imports, all in one process.

1. Fashion-MNIST CNN (batch norms folded), W4A4: FP32; PTQ min-max and TF-enhanced; QAT with fixed
   ranges; QAT with range learning -- same epochs, data order, seed and optimizer.
   MiniLM W8A8 with range learning, distilled towards the FP32 sentence embeddings on fortunes texts:
   cosine similarity to FP32 on held-out texts before and after.
2. Step cost, range learning, W8A8: Fashion CNN (batch 128) and MobileNetV2 (batch 32, 224x224, random
   inputs and labels): forward + backward + Adam step, medians of interleaved rounds; memory as the
   distinct tensor storage one forward saves for the backward (parameters excluded), which is what
   grows a training step's peak.

    python -m bench.qat [--quick] [--epochs N]
    cd /work/main && /tmp/pyquant-peers/bin/python -P bench/qat.py      # with AIMET
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import pyquant
from pyquant.sim.quantsim import QuantSim

from bench._harness import report, require_native, versions, write_results

COLUMNS = ["model", "measure", "config", "value", "fp32", "ratio_vs_fp32", "aimet", "pyquant_speedup_vs_aimet",
           "target", "met"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _saved_mb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MB of distinct tensor storage that one forward saves for the backward (activations, quantized
    weight copies, masks): the memory a training step holds at its peak beyond the model itself."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def _train(model: torch.nn.Module, params: list, xtr, ytr, epochs: int, bs: int, seed: int) -> None:
    opt = torch.optim.Adam(params)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - bs + 1, bs):
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()


def fashion_accuracy(epochs: int, quick: bool, seeds: int = 3) -> list[dict[str, Any]]:
    from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
    from pyquant.models import fashion_cnn
    from pyquant.models.fashion_cnn import evaluate
    base = fashion_cnn()
    pyquant.fold_batchnorms(base)
    xtr, ytr = fashion_mnist_tensors("train")
    xte, yte = fashion_mnist_tensors("test")
    if quick:
        xtr, ytr, xte, yte = xtr[:6000], ytr[:6000], xte[:2000], yte[:2000]
    calib = xtr[:1024]
    fp = evaluate(base, xte, yte)
    rows = [dict(model="Fashion-MNIST CNN", measure="test accuracy %", config="FP32", value=100 * fp)]
    results = {}
    for label, scheme, qat, rl in (("PTQ min-max", "min_max", False, False),
                                   ("PTQ TF-enhanced", "tf_enhanced", False, False),
                                   ("QAT fixed ranges (TF-enhanced init)", "tf_enhanced", True, False),
                                   ("QAT range learning (TF-enhanced init)", "tf_enhanced", True, True)):
        accs = []
        t0 = time.perf_counter()
        for seed in range(seeds if qat else 1):  # calibration is deterministic; training depends on the seed
            torch.manual_seed(seed)
            sim = QuantSim(copy.deepcopy(base), calib[:1], quant_scheme=scheme, param_bw=4, output_bw=4,
                           range_learning=rl, fuse_activations=qat)
            sim.compute_encodings(lambda m: m(calib))
            if qat:
                groups = [{"params": sim.model_parameters(), "lr": 1e-4}]
                if rl:
                    groups.append({"params": [p for p in sim.quantizer_parameters() if p.requires_grad], "lr": 3e-3})
                _train(sim.model, groups, xtr, ytr, epochs, 128, seed=seed)
            accs.append(evaluate(sim.model, xte, yte))
        acc = statistics.mean(accs)
        results[label] = accs
        config = f"W4A4 {label}"
        if len(accs) > 1:
            config += f", mean of seeds 0-{len(accs) - 1} (" + " / ".join(f"{100 * a:.2f}" for a in accs) + ")"
        row = dict(model="Fashion-MNIST CNN", measure="test accuracy %", config=config, value=100 * acc, fp32=100 * fp)
        if rl:
            fixed = results["QAT fixed ranges (TF-enhanced init)"]
            row.update(target="within 1 pt of FP32 and above fixed-range QAT (mean, and seed by seed)",
                       met=acc >= fp - 0.01 and acc > statistics.mean(fixed)
                       and all(a > f for a, f in zip(accs, fixed)))
        rows.append(row)
        log(f"{label}: {', '.join(f'{100 * a:.2f}%' for a in accs)} ({time.perf_counter() - t0:.0f} s)")
    return rows


def minilm_distillation(steps: int, quick: bool) -> list[dict[str, Any]]:
    """MiniLM W8A8 with range learning, trained to reproduce the FP32 model's sentence embeddings
    (loss: 1 - cosine similarity) on fortunes texts; cosine similarity to FP32 on held-out texts before
    and after. Texts alternate between train and test within each category."""
    from pyquant.datasets import fortunes_dataset
    from pyquant.models import minilm
    from pyquant.models.minilm import _hidden_states
    from bench.quantsim import FORTUNE_CATEGORIES

    tok, model = minilm()
    texts, labels, _ = fortunes_dataset(FORTUNE_CATEGORIES, max_per_category=40 if quick else 120, seed=0)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    train = torch.arange(0, len(texts), 2)
    test = torch.arange(1, len(texts), 2)

    def embed(m, sel: torch.Tensor) -> torch.Tensor:
        h = _hidden_states(m(input_ids=ids[sel], attention_mask=mask[sel]))
        mm = mask[sel].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mm).sum(1) / mm.sum(1).clamp_min(1e-9), dim=-1)

    def cosine(m) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([(embed(m, b) * target[b]).sum(-1) for b in test.split(32)])

    with torch.no_grad():
        target = torch.empty(len(texts), model.config.hidden_size)
        for b in torch.arange(len(texts)).split(32):
            target[b] = embed(model, b)
    sim = QuantSim(model, {"input_ids": ids[:2], "attention_mask": mask[:2]}, quant_scheme="tf_enhanced",
                   param_bw=8, output_bw=8, range_learning=True)
    cal = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]]
    sim.compute_encodings(lambda m: [m(input_ids=ids[b], attention_mask=mask[b]) for b in cal.split(16)])
    before = cosine(sim.model)
    opt = torch.optim.Adam([{"params": sim.model_parameters(), "lr": 2e-5},
                            {"params": [p for p in sim.quantizer_parameters() if p.requires_grad], "lr": 2e-3}])
    g = torch.Generator().manual_seed(0)
    # BERT has no batch norm and its dropout stays off: the exported graph trains in eval mode
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for b in train[torch.randperm(len(train), generator=g)].split(16):
            if done == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss = (1 - (embed(sim.model, b) * target[b]).sum(-1)).mean()
            loss.backward()
            opt.step()
            done += 1
    after = cosine(sim.model)
    log(f"MiniLM distillation: cosine {float(before.mean()):.4f} -> {float(after.mean()):.4f} "
        f"({steps} steps, {time.perf_counter() - t0:.0f} s)")
    cfg = (f"W8A8 range learning, Adam (weights lr 2e-5, ranges 2e-3), {steps} steps of 16 texts "
           f"({len(train)} train / {len(test)} held-out texts, 64 tokens)")
    return [dict(model="MiniLM (fortunes)", measure="mean cosine to FP32 embeddings, held-out", config=cfg,
                 value=float(after.mean()), fp32=1.0, aimet=None,
                 target=f"above PTQ ({float(before.mean()):.4f})", met=bool(after.mean() > before.mean())),
            dict(model="MiniLM (fortunes)", measure="min cosine to FP32 embeddings, held-out", config=cfg,
                 value=float(after.min()), fp32=1.0, target=f"PTQ: {float(before.min()):.4f}",
                 met=bool(after.min() > before.min()))]


class _Aimet:
    def __init__(self, enabled: bool):
        self.ok = False
        if not enabled:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from aimet_torch.common.defs import QuantScheme
                from aimet_torch.quantsim import QuantizationSimModel
            self.QuantScheme, self.QSM = QuantScheme, QuantizationSimModel
            self.ok = True
        except Exception as exc:
            log(f"AIMET not available ({type(exc).__name__}: {exc})")

    def sim(self, model, dummy, calib_fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = self.QSM(copy.deepcopy(model), dummy,
                         quant_scheme=self.QuantScheme.training_range_learning_with_tf_init,
                         default_output_bw=8, default_param_bw=8)
            s.compute_encodings(lambda m, _: calib_fn(m), None)
        return s.model


def step_cost(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, aimet: _Aimet,
              rounds: int) -> list[dict[str, Any]]:
    x, y = x.clone(), y.clone()  # own storage (a slice would count its whole data set as saved memory)
    models: dict[str, torch.nn.Module] = {"fp32": copy.deepcopy(model)}
    variants = {"pyquant": ("minmax", True), "pyquant_unfused": ("minmax", False),
                "pyquant_so": ("scale_offset", True)}
    for k, (mode, fuse) in variants.items():
        sim = QuantSim(copy.deepcopy(model), x[:1], quant_scheme="tf_enhanced", range_learning=True,
                       fuse_activations=fuse, range_params=mode)
        sim.compute_encodings(lambda m: m(x))
        models[k] = sim.model
    if aimet.ok:
        models["aimet"] = aimet.sim(model, x[:1], lambda m: m(x))
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-5) for k, m in models.items()}

    def step(k: str) -> Callable[[], None]:
        m, opt = models[k], opts[k]

        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return run

    for m in models.values():
        m.train()
    times: dict[str, list[float]] = {k: [] for k in models}
    for k in models:  # warm-up
        step(k)()
        step(k)()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(rounds):
        for k in models:
            sync()
            t0 = time.perf_counter()
            step(k)()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: _saved_mb(models[k], x, y) for k in models}
    rows = []
    for k, (mode, fuse) in variants.items():
        cfg = (f"W8A8 range learning ({'min/max' if mode == 'minmax' else 'scale/offset'}"
               f"{', fused activations' if fuse else ', unfused'})")
        rows.append(dict(model=name, measure="train step ms (fwd+bwd+Adam)", config=cfg,
                         value=1e3 * med[k], fp32=1e3 * med["fp32"], ratio_vs_fp32=med[k] / med["fp32"],
                         aimet=1e3 * med["aimet"] if "aimet" in med else None,
                         pyquant_speedup_vs_aimet=med["aimet"] / med[k] if "aimet" in med else None,
                         target="<= 1.5x FP32" + (", >= 3x faster than AIMET" if "aimet" in med else ""),
                         met=med[k] / med["fp32"] <= 1.5 and ("aimet" not in med or med["aimet"] / med[k] >= 3)))
        rows.append(dict(model=name, measure="memory saved for backward by one forward, MB", config=cfg,
                         value=peak[k], fp32=peak["fp32"], ratio_vs_fp32=peak[k] / max(peak["fp32"], 1e-9),
                         aimet=peak.get("aimet"), target="<= 1.3x FP32", met=peak[k] <= 1.3 * peak["fp32"]))
        log(f"{name} ({mode}): step {1e3 * med[k]:.1f} ms vs FP32 {1e3 * med['fp32']:.1f} ms"
            + (f", AIMET {1e3 * med['aimet']:.1f} ms" if "aimet" in med else "")
            + f"; saved {peak[k]:.0f} MB vs FP32 {peak['fp32']:.0f} MB")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--no-aimet", action="store_true")
    p.add_argument("--minilm-steps", type=int, default=150, help="distillation steps for MiniLM")
    p.add_argument("--seeds", type=int, default=3, help="training seeds for the Fashion-MNIST QAT accuracy")
    p.add_argument("--name", default="qat", help="results file name (bench/results/<name>.md)")
    p.add_argument("--skip", default="", help="comma-separated: accuracy, minilm, fashion_step, mobilenet_step")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the MobileNetV2 step cost on the GPU only")
    a = p.parse_args(argv)
    if a.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        a.skip += ",accuracy,minilm,fashion_step"
    if not require_native("bench/qat.py"):
        return 2
    skip = {s for s in a.skip.split(",") if s}
    aimet = _Aimet(not a.no_aimet)
    rows: list[dict[str, Any]] = []
    epochs = a.epochs or (1 if a.quick else 2)
    if "accuracy" not in skip:
        rows += fashion_accuracy(epochs, a.quick, a.seeds)
    if "minilm" not in skip:
        rows += minilm_distillation(20 if a.quick else a.minilm_steps, a.quick)
    g = torch.Generator().manual_seed(0)
    if "fashion_step" not in skip:
        from pyquant.models import fashion_cnn
        m = fashion_cnn()
        pyquant.fold_batchnorms(m)
        from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
        xtr, ytr = fashion_mnist_tensors("train")
        rows += step_cost("Fashion-MNIST CNN, batch 128", m, xtr[:128], ytr[:128], aimet, 5 if a.quick else 20)
    if "mobilenet_step" not in skip:
        from pyquant.models import mobilenet_v2
        m = mobilenet_v2(pretrained=False).eval()
        pyquant.fold_batchnorms(m)
        x = torch.randn(8 if a.quick else 32, 3, 224, 224, generator=g)
        y = torch.randint(0, 1000, (len(x),), generator=g)
        m, x, y = m.to(a.device), x.to(a.device), y.to(a.device)
        rows += step_cost(f"MobileNetV2, batch {len(x)}", m, x, y, aimet, 3 if a.quick else 7)
    notes = [versions()
             + (f"; Fashion-MNIST QAT: Adam, weights lr 1e-4, quantizer ranges lr 3e-3, batch 128, {epochs} epoch(s) "
                f"over the training set, fuse_activations=True, seeds 0-{a.seeds - 1} (initialisation and data order)"
                if "accuracy" not in skip else ""),
             "AIMET 2.42 in the same process (range learning with TF-enhanced initialisation in every toolkit; "
             "AIMET's QuantizationSimModel with training_range_learning_with_tf_init)" if aimet.ok else
             "AIMET not run (no aimet_torch here)"]
    if not {"fashion_step", "mobilenet_step"} <= skip:
        notes.append("step cost: pyquant's QuantSim with fuse_activations=True unless the row says unfused: each "
                     "ReLU/ReLU6 clamped inside its quantizer's fake-quant kernel, quantizer -> 2x2 max pool in one "
                     "native pass keeping a pooled-size tensor and a byte per output, and the single-channel input's "
                     "quantizer run with its conv (no input gradient); values and gradients those of the separate ops")
    name = a.name + ("_cuda" if a.device == "cuda" else "") + ("_quick" if a.quick else "")
    path = write_results(name, rows, COLUMNS, title="Quantization-aware training", notes=notes,
                         out_dir=Path(a.out) if a.out else None)
    return report(path, rows)


if __name__ == "__main__":
    sys.exit(main())
