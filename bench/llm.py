"""Decoder LMs end to end: Gemma-3-270M on held-out Wikipedia summaries, pyquant beside AIMET and NVIDIA
ModelOpt in one process (the peer environment), at the same settings wherever they run them.

Rows (perplexity, ratio to FP32, calibration/technique seconds):
- FP32;
- W8A16 (8-bit per-channel weights, 16-bit per-tensor activations), and with an 8-bit KV cache;
- W4A16 with per-block weights (blocks of 64 along the input dimension): round to nearest, SeqMSE, GPTQ, and
  LPBQ (4-bit integer block scales under an 8-bit per-channel float scale, round to nearest);
- W8A8 with per-tensor 8-bit activations, plain and with activation smoothing, on every op output (pyquant's
  default config) and on the Linear layers' inputs only (int8 GEMMs, as ModelOpt quantizes);
- AIMET 2.42's QuantizationSimModel at W8A16, W4A16 block 64, W8A8 (and its apply_seq_mse, timed at the
  same candidates); ModelOpt 0.47's W4A16 block 128 (round to nearest and AWQ) and W8A8 (plain and
  SmoothQuant), which quantize only the Linear layers' inputs and weights.
And peak resident memory (separate processes): the FP32 model, and a simulation built on the model in place
and calibrated block by block.

    python -m bench.llm                      # 40 evaluation windows of 512 tokens, 8 calibration windows
    python -m bench.llm --quick              # 2 + 2 windows of 128 tokens (a smoke run)
    python -m bench.llm --only w8a16,w4      # rows whose key starts with one of these
    /tmp/pyquant-peers/bin/python -P bench/llm.py     # with AIMET and ModelOpt (peer environment)

Finished rows are kept in bench/results/llm.partial.json (with their settings) and not recomputed by the
next run unless --fresh: an interrupted run resumes. The checkpoint is Q4_K_M 4-bit blocks dequantized to
float32: its weights already sit on a 4-bit grid, so weight-only figures are optimistic; the activations
are the real model's. Writes bench/results/llm.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if __package__ in (None, ""):  # run as a file (python -P bench/llm.py): checkout last on sys.path, so the
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # installed pyquant (with its native module) wins

import pyquant  # noqa: E402
from bench._harness import RESULTS, publish, require_native  # noqa: E402
from pyquant._io import atomic_write_text  # noqa: E402

COLUMNS = ["key", "tool", "setting", "perplexity", "vs_fp32", "target", "met", "calib_s", "technique_s", "note"]


def log(msg: str) -> None:
    print(f"[llm] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def vm(field: str) -> float:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the assets ---------------------------------------------------------------------------------------------
class Assets:
    def __init__(self, quick: bool, windows: int, calib: int):
        from pyquant.datasets import token_windows, wiki_text
        from pyquant.models import gemma3_270m
        self.length = 128 if quick else 512
        n_eval, n_cal = (2, 2) if quick else (windows, calib)
        with quiet():
            self.tok, self.model = gemma3_270m()
        self.model.config.use_cache = False
        self.ev = token_windows(self.tok, wiki_text("evaluation"), self.length, n_eval)
        self.cal = token_windows(self.tok, wiki_text("calibration"), self.length, n_cal)
        self.batches = [{"input_ids": self.cal[i:i + 1]} for i in range(len(self.cal))]
        self.fp32_state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        """The FP32 weights back (techniques that work in place change them)."""
        with torch.no_grad():
            sd = self.model.state_dict()
            for k, v in self.fp32_state.items():
                sd[k].copy_(v)


def perplexity(model: torch.nn.Module, ev: torch.Tensor) -> float:
    from pyquant.metrics import perplexity as ppl
    with torch.no_grad(), quiet():
        return ppl(model, ev, progress=False)


# ---- pyquant rows ---------------------------------------------------------------------------------------
def pq_sim(a: Assets, *, param_bw: int, output_bw: int, weights: str = "tf_enhanced", acts: str = "tf_enhanced",
           **kw: Any):
    with quiet():
        return pyquant.QuantSim(a.model, a.batches[0], quant_scheme=acts, param_quant_scheme=weights,
                                param_bw=param_bw, output_bw=output_bw, **kw)


def pq_rows(a: Assets) -> dict[str, Callable[[], dict[str, Any]]]:
    rows: dict[str, Callable[[], dict[str, Any]]] = {}

    def calibrated(setting: str, build: Callable[[], Any], technique: Optional[Callable[[Any], Any]] = None,
                   before: Optional[Callable[[], Any]] = None) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            a.restore()
            t_tech = None
            if before is not None:  # on the FP32 model (smoothing)
                t = time.perf_counter()
                with quiet():
                    before()
                t_tech = time.perf_counter() - t
            t = time.perf_counter()
            sim = build()
            calib = time.perf_counter() - t
            if technique is not None:
                t = time.perf_counter()
                with quiet():
                    technique(sim)
                t_tech = (t_tech or 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            with quiet():
                sim.compute_encodings(a.batches, progress=False)
            calib += time.perf_counter() - t
            p = perplexity(sim.model, a.ev)
            del sim
            a.restore()
            return dict(tool="pyquant", setting=setting, perplexity=p, calib_s=calib, technique_s=t_tech)
        return run

    rows["w8a16"] = calibrated("W8A16 (per-channel weights)", lambda: pq_sim(a, param_bw=8, output_bw=16))
    if _accepts("kv_bw"):
        rows["w8a16_kv8"] = calibrated("W8A16 + 8-bit KV cache",
                                       lambda: pq_sim(a, param_bw=8, output_bw=16, kv_bw=8))
    # the residual stream (Gemma's reaches 1e5) on one 16-bit per-tensor grid is most of W8A16's loss; a target
    # that runs only the matrix products in integers keeps it in float
    rows["w8a16_linear"] = calibrated("W8A16, Linear inputs only (16-bit GEMM inputs, 8-bit weights, the rest in "
                                      "float)", lambda: pq_sim(a, param_bw=8, output_bw=16, config=LINEAR_INPUTS))
    w4 = dict(param_bw=4, output_bw=16, weights="min_max", block_size=64)

    def w4_sim(table_bw: int = 8, **kw: Any):
        sim = pq_sim(a, **w4, **kw)
        if table_bw == 4:
            return sim
        vocab = a.model.config.vocab_size
        for n, p in sim.placement.items():  # the (tied) embedding / head table stays at 8 bits, as LLM recipes keep it
            if p.is_param and p.weight_shape is not None and vocab in p.weight_shape:
                sim.set_bitwidth(n, 8)
        return sim

    rows["w4a16_b64_rtn"] = calibrated("W4A16 block 64, round to nearest", w4_sim)
    rows["w4a16_b64_seqmse"] = calibrated("W4A16 block 64, SeqMSE (20 candidates)", w4_sim,
                                          lambda s: pyquant.seq_mse(s, a.batches, num_candidates=20,
                                                                    progress=False))
    rows["w4a16_b64_gptq"] = calibrated("W4A16 block 64, GPTQ", w4_sim,
                                        lambda s: pyquant.gptq(s, a.batches, progress=False))
    # LPBQ against float block scales with every weight at 4 bits, the tied table too (an LPBQ quantizer's bit
    # width stays below its decompressed width, so the table cannot go to 8 bits there)
    rows["w4a16_b64_rtn_all4"] = calibrated("W4A16 block 64, round to nearest, the embedding / head table at 4 bits "
                                            "too", lambda: w4_sim(table_bw=4))
    rows["w4a16_b64_lpbq"] = calibrated("W4A16 block 64 LPBQ (4-bit integer block scales, 8-bit), round to nearest, "
                                        "the table at 4 bits too", lambda: w4_sim(table_bw=4, decompressed_bw=8))
    rows["w8a8"] = calibrated("W8A8 (per-tensor 8-bit activations)", lambda: pq_sim(a, param_bw=8, output_bw=8))
    def exported() -> dict[str, Any]:
        """The W4A16 block-64 simulation exported (QDQ, int4 per-block weights, opset 21) and run by onnxruntime."""
        import tempfile
        a.restore()
        sim = w4_sim()
        t = time.perf_counter()
        with quiet():
            sim.compute_encodings(a.batches, progress=False)
        calib = time.perf_counter() - t
        p_sim = perplexity(sim.model, a.ev)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            with quiet(), torch.no_grad():
                paths = sim.export(d, "gemma_w4a16", {"input_ids": a.ev[:1]}, opset_version=21)
            t_export = time.perf_counter() - t
            size = sum(f.stat().st_size for f in Path(d).iterdir() if f.name.startswith("gemma_w4a16.onnx"))
            p_ort = onnx_perplexity(paths["onnx"], a.ev)
        del sim
        return dict(tool="pyquant + onnxruntime", setting="W4A16 block 64 exported: QDQ ONNX (int4 per-block "
                    "weights, opset 21) run by onnxruntime", perplexity=p_ort, calib_s=calib,
                    note=f"simulation {p_sim:.4g}, onnxruntime / simulation = {p_ort / p_sim:.4f}; export "
                         f"{t_export:.0f} s, {size / 2**20:.0f} MiB", ort_vs_sim=p_ort / p_sim, sim_perplexity=p_sim)

    rows["onnx_w4a16_b64"] = exported
    alphas = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    smooth = lambda: pyquant.smooth_activations(a.model, a.batches, alpha=alphas, progress=False)  # noqa: E731
    rows["w8a8_smooth"] = calibrated("W8A8 + activation smoothing (alpha searched per pair in 0.3..0.8)",
                                     lambda: pq_sim(a, param_bw=8, output_bw=8), before=smooth)
    linear_only = lambda: pq_sim(a, param_bw=8, output_bw=8, config=LINEAR_INPUTS)  # noqa: E731
    rows["w8a8_linear"] = calibrated("W8A8, Linear inputs only (int8 GEMMs, the rest in float)", linear_only)
    rows["w8a8_linear_smooth"] = calibrated("W8A8, Linear inputs only + activation smoothing (alpha searched per "
                                            "pair in 0.3..0.8)", linear_only, before=smooth)
    return rows


LINEAR_INPUTS = {
    "defaults": {"ops": {"is_output_quantized": "False", "is_symmetric": "False"},
                 "params": {"is_quantized": "True", "is_symmetric": "True"}, "per_channel_quantization": "True"},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Gemm": {"is_input_quantized": "True"}},
    "supergroups": [], "model_input": {"is_input_quantized": "False"}, "model_output": {},
}
"""A hardware config for targets that run only the matrix products in int8 (TensorRT-LLM's SmoothQuant
GEMMs, ModelOpt's INT8 configs): per-tensor 8-bit inputs and per-channel 8-bit weights of every Linear,
nothing else quantized."""


def onnx_perplexity(path: Path, ev: torch.Tensor) -> float:
    """Perplexity of an exported LM run by onnxruntime's CPU kernels as written (one session)."""
    import math

    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    nll, count = 0.0, 0
    for w in ev:
        ids = w[None]
        logits = torch.from_numpy(sess.run(None, {name: ids.numpy()})[0])
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll -= float(lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def _accepts(arg: str) -> bool:
    import inspect
    return arg in inspect.signature(pyquant.QuantSim.__init__).parameters


# ---- AIMET ----------------------------------------------------------------------------------------------
class Logits(torch.nn.Module):
    """A transformers LM as input_ids -> logits, without a cache (what AIMET's sim and ModelOpt's loop run)."""

    def __init__(self, m: torch.nn.Module):
        super().__init__()
        self.m = m

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


def aimet_rows(a: Assets) -> tuple[dict[str, Callable[[], dict[str, Any]]], str]:
    try:
        with quiet():
            import aimet_torch
            from aimet_torch.common.defs import QuantScheme
            from aimet_torch.quantsim import QuantizationSimModel
            from aimet_torch.v2.quantsim.config_utils import (set_blockwise_quantization_for_weights,
                                                              set_grouped_blockwise_quantization_for_weights)
            from aimet_torch.v2.seq_mse import apply_seq_mse
    except Exception as exc:  # noqa: BLE001 - not installed here
        return {}, f"AIMET not run ({type(exc).__name__}: {exc})"
    from importlib.metadata import version
    logging.getLogger().setLevel(logging.ERROR)
    cfg = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"

    def sim(param_bw: int, output_bw: int, scheme=QuantScheme.post_training_tf_enhanced):
        with quiet():
            return QuantizationSimModel(Logits(a.model), a.cal[:1], quant_scheme=scheme, default_param_bw=param_bw,
                                        default_output_bw=output_bw, config_file=str(cfg))

    def calibrate(s) -> None:
        def fwd(m, _=None):
            with torch.no_grad():
                for b in a.batches:
                    m(b["input_ids"])
        with quiet():
            s.compute_encodings(fwd)

    def row(setting: str, build: Callable[[], Any], blocks: Optional[Callable[[Any], None]] = None,
            seq: bool = False):
        def run() -> dict[str, Any]:
            a.restore()
            t = time.perf_counter()
            s = build()
            if blocks is not None:
                blocks(s)
            t_tech = None
            if seq:
                t1 = time.perf_counter()
                with quiet():
                    apply_seq_mse(s, [b["input_ids"] for b in a.batches], num_candidates=20)
                t_tech = time.perf_counter() - t1
            calibrate(s)
            calib = time.perf_counter() - t - (t_tech or 0)
            p = perplexity(s.model, a.ev)
            del s
            a.restore()
            return dict(tool=f"AIMET {version('aimet-torch')}", setting=setting, perplexity=p, calib_s=calib,
                        technique_s=t_tech)
        return run

    from aimet_torch.v2.quantization.affine import QuantizeDequantize

    def decoder_linears(s) -> list:
        return [m for n, m in s.model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]

    def eight_bit_table(s) -> None:  # the tied embedding / head at 8 bits per row, as pyquant's W4 rows
        for n, m in s.model.named_modules():  # (AIMET leaves Gemma's scaled embedding unquantized)
            if (isinstance(m, (torch.nn.Embedding, torch.nn.Linear)) and ("embed_tokens" in n or "lm_head" in n)
                    and hasattr(m, "param_quantizers")):
                w = m.weight
                m.param_quantizers["weight"] = QuantizeDequantize((w.shape[0], 1), 8, True)

    def b64(s) -> None:
        set_blockwise_quantization_for_weights(s, decoder_linears(s), 4, True, (1, 64))
        eight_bit_table(s)

    def lpbq(s) -> None:
        set_grouped_blockwise_quantization_for_weights(s, decoder_linears(s), 4, True, 8, (1, 64), (1, -1))
        eight_bit_table(s)
    rows = {
        "aimet_w8a16": row("W8A16 (per-channel weights)", lambda: sim(8, 16)),
        "aimet_w4a16_b64_rtn": row("W4A16 block 64", lambda: sim(4, 16, QuantScheme.post_training_tf), b64),
        "aimet_w4a16_b64_seqmse": row("W4A16 block 64, apply_seq_mse (20 candidates)",
                                      lambda: sim(4, 16, QuantScheme.post_training_tf), b64, seq=True),
        "aimet_w4a16_b64_lpbq": row("W4A16 block 64 LPBQ (8-bit)", lambda: sim(4, 16, QuantScheme.post_training_tf),
                                    lpbq),
        "aimet_w8a8": row("W8A8 (per-tensor 8-bit activations)", lambda: sim(8, 8)),
    }
    return rows, f"AIMET {version('aimet-torch')}"


# ---- ModelOpt -------------------------------------------------------------------------------------------
def modelopt_rows(a: Assets) -> tuple[dict[str, Callable[[], dict[str, Any]]], str]:
    try:
        with quiet():
            import copy
            import modelopt.torch.quantization as mtq
    except Exception as exc:  # noqa: BLE001
        return {}, f"ModelOpt not run ({type(exc).__name__}: {exc})"
    from importlib.metadata import version

    def row(setting: str, cfg_name: str):
        def run() -> dict[str, Any]:
            a.restore()
            cfg = getattr(mtq, cfg_name)
            m = Logits(copy.deepcopy(a.model))

            def loop(model):
                with torch.no_grad():
                    for b in a.batches:
                        model(b["input_ids"])
            t = time.perf_counter()
            with quiet():
                q = mtq.quantize(m, cfg, forward_loop=loop)
            calib = time.perf_counter() - t
            p = perplexity(q, a.ev)
            del q, m
            return dict(tool=f"ModelOpt {version('nvidia-modelopt')}", setting=f"{setting} ({cfg_name})",
                        perplexity=p, calib_s=calib)
        return run

    return {
        "modelopt_w4a16_b128_rtn": row("W4A16 block 128, round to nearest", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"),
        "modelopt_w4a16_b128_awq": row("W4A16 block 128, AWQ", "INT4_AWQ_CFG"),
        "modelopt_w8a8": row("W8A8, Linear inputs only", "INT8_DEFAULT_CFG"),
        "modelopt_w8a8_smoothquant": row("W8A8 + SmoothQuant, Linear inputs only", "INT8_SMOOTHQUANT_CFG"),
    }, f"ModelOpt {version('nvidia-modelopt')}"


# ---- memory (separate processes) ------------------------------------------------------------------------
def memory_probe(kind: str, quick: bool, calib: int) -> dict[str, Any]:
    """Run in a child process: resident memory of the FP32 model (kind 'fp32': loaded, then one evaluation
    window) or of a simulation built on it in place and calibrated block by block (kind 'sim')."""
    torch.manual_seed(0)
    a = Assets(quick, 1, calib)
    del a.fp32_state
    import gc
    gc.collect()
    out: dict[str, Any] = {"model_mib": sum(p.numel() * p.element_size() for p in a.model.parameters()) / 2**20,
                           "rss_loaded_mib": vm("VmRSS")}
    if kind == "fp32":
        perplexity(a.model, a.ev[:1])
    else:
        kw = {"in_place": True} if _accepts("in_place") else {}
        out["in_place"] = bool(kw)
        with quiet():
            sim = pyquant.QuantSim(a.model, a.batches[0], param_bw=8, output_bw=16, **kw)
        out["rss_sim_mib"] = vm("VmRSS")
        from pyquant.sim.layerwise_calibration import segments
        segs = segments(sim.model)
        out["segments"] = len(segs)
        out["largest_segment_nodes"] = max(len(s.nodes) for s in segs)
        with quiet():
            sim.compute_encodings(a.batches, layerwise=True, progress=False)
        cfg = a.model.config
        out["block_activations_mib"] = (len(a.batches) * a.length * 4 *
                                         (cfg.hidden_size * 4 + cfg.intermediate_size * 3)) / 2**20
    out["peak_mib"] = vm("VmHWM")
    return out


def memory_rows(quick: bool, calib: int, saved: Optional[str] = None) -> list[dict[str, Any]]:
    """The memory row from two probe processes (or from `saved`, the probes' JSON of an earlier run at the same
    settings: {"fp32": ..., "sim": ...})."""
    res = json.loads(Path(saved).read_text()) if saved else {}
    for kind in ("fp32", "sim"):
        if kind in res:
            continue
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--memory-probe", kind, "--calib", str(calib)]
        cmd += ["--quick"] if quick else []
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if p.returncode != 0:
            log(f"memory probe {kind} failed: {p.stderr[-2000:]}")
            return []
        res[kind] = json.loads(p.stdout.strip().splitlines()[-1])
    fp, sm = res["fp32"], res["sim"]
    bound = 1.3 * fp["peak_mib"] + sm["block_activations_mib"]
    note = (f"FP32: model {fp['model_mib']:.0f} MiB, resident after loading {fp['rss_loaded_mib']:.0f} MiB, peak "
            f"with one evaluation window {fp['peak_mib']:.0f} MiB; simulation (in place: {sm.get('in_place')}): "
            f"resident after construction {sm['rss_sim_mib']:.0f} MiB, peak through layer-wise calibration on "
            f"{calib} windows {sm['peak_mib']:.0f} MiB; one block's calibration activations (residual stream, "
            f"attention and MLP, all windows) {sm['block_activations_mib']:.0f} MiB; bound 1.3 x FP32 peak + that = "
            f"{bound:.0f} MiB")
    return [dict(key="memory", tool="pyquant", setting="peak resident memory, MiB (FP32 | simulation)",
                 perplexity=None, vs_fp32=sm["peak_mib"] / fp["peak_mib"], target=f"<= {bound:.0f} MiB",
                 met=sm["peak_mib"] <= bound, note=note, fp32=fp, sim=sm)]


# ---- targets -----------------------------------------------------------------------------------------------
def judge(rows: dict[str, dict[str, Any]]) -> None:
    fp = rows["fp32"]["perplexity"]
    for r in rows.values():
        if r.get("perplexity") is not None and r["key"] != "memory":
            r["vs_fp32"] = r["perplexity"] / fp

    def target(key: str, text: str, ok: Optional[bool]) -> None:
        if key in rows:
            rows[key]["target"], rows[key]["met"] = text, ok

    g = lambda k: rows.get(k, {}).get("perplexity")  # noqa: E731
    for k in ("w8a16", "w8a16_linear"):
        if g(k):
            target(k, "<= 1.01x FP32", g(k) <= 1.01 * fp)
    if rows.get("onnx_w4a16_b64", {}).get("ort_vs_sim"):
        r = rows["onnx_w4a16_b64"]
        r["target"], r["met"] = "onnxruntime within 1% of the simulation", abs(r["ort_vs_sim"] - 1) <= 0.01
    if g("w8a16_kv8") and g("w8a16"):
        target("w8a16_kv8", "<= 1.01x W8A16", g("w8a16_kv8") <= 1.01 * g("w8a16"))
    rtn = g("w4a16_b64_rtn")
    for k in ("w4a16_b64_seqmse", "w4a16_b64_gptq"):
        if rtn and g(k):
            target(k, "closes >= half of round-to-nearest's gap", (rtn - g(k)) >= 0.5 * (rtn - fp))
    if g("w4a16_b64_rtn_all4") and g("w4a16_b64_lpbq"):
        # LPBQ's integer block scales may only cost accuracy: lower perplexity than float scales passes
        target("w4a16_b64_lpbq", "<= 1.01x per-block float scales (w4a16_b64_rtn_all4)",
               g("w4a16_b64_lpbq") <= 1.01 * g("w4a16_b64_rtn_all4"))
    for k in ("w8a8_smooth", "w8a8_linear_smooth"):
        if g(k):
            target(k, "<= 1.10x FP32", g(k) <= 1.10 * fp)
    for key, base in (("w8a16", "aimet_w8a16"), ("w4a16_b64_rtn", "aimet_w4a16_b64_rtn")):
        if key in rows and base in rows and rows[key].get("calib_s") and rows[base].get("calib_s"):
            rows[key]["note"] = ((rows[key].get("note") or "") +
                                 f" calibration {rows[base]['calib_s'] / rows[key]['calib_s']:.1f}x faster than AIMET's")
    if "w4a16_b64_seqmse" in rows and "aimet_w4a16_b64_seqmse" in rows:
        a_t, p_t = rows["aimet_w4a16_b64_seqmse"].get("technique_s"), rows["w4a16_b64_seqmse"].get("technique_s")
        if a_t and p_t:
            rows["w4a16_b64_seqmse"]["note"] = ((rows["w4a16_b64_seqmse"].get("note") or "") +
                                                f" SeqMSE {a_t / p_t:.1f}x faster than AIMET's apply_seq_mse")


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 evaluation / 2 calibration windows of 128 tokens")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens (default 40)")
    p.add_argument("--calib", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--only", default=None, help="comma-separated row-key prefixes to run, in this order (default: all)")
    p.add_argument("--no-peers", action="store_true", help="skip AIMET and ModelOpt")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--memory-json", default=None, help="the memory probes' results of an earlier run (JSON)")
    p.add_argument("--fresh", action="store_true", help="recompute rows kept from an earlier run")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--memory-probe", choices=("fp32", "sim"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.windows < 1 or a.calib < 1:
        p.error(f"--windows and --calib must be >= 1, got {a.windows} and {a.calib}")
    if a.memory_probe:
        print(json.dumps(memory_probe(a.memory_probe, a.quick, a.calib)))
        return 0
    if not require_native("bench/llm.py"):
        return 2
    from pyquant._assets import AssetMissingError
    torch.manual_seed(0)
    t_start = time.perf_counter()
    try:
        assets = Assets(a.quick, a.windows, a.calib)
    except AssetMissingError as exc:
        print(exc, file=sys.stderr)
        return 2
    out_dir = Path(a.out) if a.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    partial_path = out_dir / f"llm{'_quick' if a.quick else ''}.partial.json"
    settings = {"windows": len(assets.ev), "length": assets.length, "calib": len(assets.cal),
                "pyquant": pyquant.__version__}
    kept: dict[str, Any] = {}
    if partial_path.exists() and not a.fresh:
        old = json.loads(partial_path.read_text())
        if old.get("settings") == settings:  # failed rows are tried again
            kept = {k: r for k, r in old["rows"].items() if r.get("perplexity") is not None}
            log(f"resuming: {len(kept)} rows from {partial_path}")
    plan: dict[str, Callable[[], dict[str, Any]]] = {
        "fp32": lambda: dict(tool="torch", setting="FP32", perplexity=perplexity(assets.model, assets.ev))}
    plan.update(pq_rows(assets))
    labels = [f"pyquant {pyquant.__version__}"]
    if not a.no_peers:
        for rows_of in (aimet_rows, modelopt_rows):
            r, label = rows_of(assets)
            plan.update(r)
            labels.append(label)
    every = list(plan)
    only = [s for s in (a.only or "").split(",") if s]
    if only:  # in the order --only gives (each prefix's rows in plan order), FP32 first
        order = ["fp32"] + [k for s in only for k in plan if k.startswith(s) and k != "fp32"]
        plan = {k: plan[k] for k in dict.fromkeys(order)}
    # rows kept from earlier runs stay in the results (and the resume file) even when --only skips them
    done: dict[str, dict[str, Any]] = dict(kept)
    for key, run in plan.items():
        if key in kept:
            continue
        log(f"{key} ...")
        t = time.perf_counter()
        try:
            row = run()
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            row = dict(tool=key.split("_")[0], setting=key, perplexity=None, note=f"{type(exc).__name__}: {exc}"[:300])
        row["key"], row["row_s"] = key, time.perf_counter() - t
        done[key] = row
        log(f"{key}: {row.get('perplexity')} ({row['row_s']:.0f} s)")
        atomic_write_text(partial_path, json.dumps({"settings": settings, "rows": done}, indent=1, default=str))
    done = {k: done[k] for k in sorted(done, key=lambda k: every.index(k) if k in every else len(every))}
    judge(done)
    rows = list(done.values())
    if not a.no_memory:
        rows += memory_rows(a.quick, len(assets.cal), a.memory_json)
    notes = [
        ", ".join(labels) + f"; torch {torch.__version__}, {torch.get_num_threads()} threads",
        "Gemma-3-270M (`pyquant.models.gemma3_270m()`): the Q4_K_M GGUF dequantized to float32, so its weights "
        "already lie on 4-bit blocks and weight-only figures are optimistic; activations are the real model's",
        f"text: `pyquant.datasets.wiki_text()`, {len(assets.ev)} evaluation windows of {assets.length} tokens "
        f"(evaluation split), {len(assets.cal)} calibration windows (calibration split); perplexity = exp(mean "
        "next-token NLL) (`pyquant.metrics.perplexity`); vs_fp32 = perplexity / FP32's",
        "pyquant: QuantSim, config 'default' (symmetric weights, asymmetric per-tensor activations on every op "
        "output), tf_enhanced activations; W4 rows min_max (round to nearest) weights per block of 64 input "
        "columns for the decoder's Linear layers, the tied embedding / head table at 8 bits per row (ModelOpt leaves "
        "it in float). AIMET: QuantizationSimModel with default_config_per_channel.json, the same schemes and bit widths, "
        "set_blockwise_quantization_for_weights / set_grouped_blockwise_quantization_for_weights on every Linear. "
        "ModelOpt: mtq.quantize with the named config (only Linear inputs and weights are quantized)",
        "calib_s: simulation construction + calibration; technique_s: the technique itself (SeqMSE, GPTQ, "
        "smoothing); single runs on a shared 2-core machine, so only ratios within one run mean much",
        f"this invocation {time.perf_counter() - t_start:.0f} s; the rows' own times (row_s in the JSON, rows kept "
        f"from earlier invocations included) add up to {sum(r.get('row_s') or 0 for r in done.values()):.0f} s",
    ]
    return publish("llm", a, rows, COLUMNS, title="Gemma-3-270M under quantization: pyquant, AIMET and ModelOpt "
                   "(held-out Wikipedia summaries)", notes=notes)


if __name__ == "__main__":
    sys.exit(main())
