"""Fake-quant forward and forward+backward: pyquant against torch's built-ins, the pure-torch
reference and torch.compile of the reference, in one process.

    python -m bench.fake_quant                 # CPU: 16M, 1M and tiny tensors
    python -m bench.fake_quant --device cuda   # GPU: 64M elements, fp32 and bf16, vs copy bandwidth
    python -m bench.fake_quant --quick         # smaller sizes, no torch.compile (a smoke run)
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import pyquant.ops as pqo
from pyquant.ops import _reference as ref

from ._harness import median_time, report, write_results

COLUMNS = ["size", "dtype", "granularity", "measure", "pyquant_ms", "clone_ms", "torch_ms", "reference_ms",
           "compiled_ref_ms", "pyquant_vs_clone", "speedup_vs_torch", "speedup_vs_reference", "target", "met"]


def _inputs(shape, axis, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0).to(device=device, dtype=dtype)
    n = shape[axis] if axis is not None else 1
    s = (torch.rand(n, generator=g) * 0.02 + 0.01).to(device)
    zp = torch.randint(0, 256, (n,), generator=g, dtype=torch.int32).to(device)
    return x, s, zp


def _torch_forward(x, s, zp, axis):
    if axis is None:
        s_f, z_i = float(s), int(zp)  # read once: the host copy is not what is being timed
        return lambda: torch.fake_quantize_per_tensor_affine(x, s_f, z_i, 0, 255)
    return lambda: torch.fake_quantize_per_channel_affine(x, s, zp, axis, 0, 255)


def _pq_forward(x, s, zp, axis):
    o = -zp.float()
    if axis is None:
        s, o = s.reshape(()), o.reshape(())
    return lambda: pqo.quantize_dequantize(x, s, o, bitwidth=8, axis=axis)


def _ref_args(x, s, zp, axis):
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = x.shape[axis]
    return s.reshape(shape), (-zp.float()).reshape(shape)


def _fwd_bwd_pq(x, s, zp, axis, g):
    xg = x.detach().clone().requires_grad_(True)
    sg = (s.reshape(()) if axis is None else s).detach().clone().requires_grad_(True)
    og = (-zp.float()).reshape(sg.shape).detach().clone().requires_grad_(True)

    def run():
        xg.grad = sg.grad = og.grad = None
        pqo.quantize_dequantize(xg, sg, og, bitwidth=8, axis=axis).backward(g)
    return run


def _fwd_bwd_torch(x, s, zp, axis, g):
    xg = x.detach().clone().requires_grad_(True)
    sg = s.detach().clone().requires_grad_(True)
    zg = zp.float().detach().clone().requires_grad_(True)

    def run():
        xg.grad = sg.grad = zg.grad = None
        if axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(xg, sg, zg, 0, 255, 1.0)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(xg, sg, zg, axis, 0, 255, 1.0)
        y.backward(g)
    return run


def _fwd_bwd_ref(x, s, zp, axis, g):
    sr, orf = _ref_args(x, s, zp, axis)

    def run():
        ref.quantize_dequantize(x, sr, orf, 0, 255)
        ref.quantize_dequantize_backward(g, x, sr, orf, 0, 255, 1.0, [True, True, True])
    return run


def cpu_rows(quick: bool, compile_ref: bool) -> list[dict[str, Any]]:
    sizes = [("16M", (4096, 4096)), ("1M", (1024, 1024))]
    if quick:
        sizes = [("1M", (1024, 1024)), ("256K", (512, 512))]
    rows = []
    for label, shape in sizes:
        big = shape[0] * shape[1] >= 8 << 20
        reps = 7 if big else 30
        for gran, axis in [("per-channel", 0), ("per-tensor", None)]:
            x, s, zp = _inputs(shape, axis, "cpu")
            t_clone = median_time(lambda: x.clone(), reps=reps * 2)
            t_pq = median_time(_pq_forward(x, s, zp, axis), reps=reps * 2)
            t_torch = median_time(_torch_forward(x, s, zp, axis), reps=reps)
            sr, orf = _ref_args(x, s, zp, axis)
            t_ref = median_time(lambda: ref.quantize_dequantize(x, sr, orf, 0, 255), reps=max(3, reps // 2))
            t_cref = None
            if compile_ref:
                torch._dynamo.reset()
                cref = torch.compile(ref.quantize_dequantize, fullgraph=True, dynamic=False)
                t_cref = median_time(lambda: cref(x, sr, orf, 0, 255), reps=reps, warmup=2)
            row = dict(size=label, dtype="float32", granularity=gran, measure="forward", pyquant_ms=t_pq * 1e3,
                       clone_ms=t_clone * 1e3, torch_ms=t_torch * 1e3, reference_ms=t_ref * 1e3,
                       compiled_ref_ms=t_cref * 1e3 if t_cref else None, pyquant_vs_clone=t_pq / t_clone,
                       speedup_vs_torch=t_torch / t_pq, speedup_vs_reference=t_ref / t_pq)
            if label == "16M":
                row.update(target="<= 1.25x clone", met=t_pq / t_clone <= 1.25)
            elif label == "1M":
                row.update(target=">= 10x torch", met=t_torch / t_pq >= 10)
            rows.append(row)

            g = torch.randn(shape, generator=torch.Generator().manual_seed(5))
            t_pq = median_time(_fwd_bwd_pq(x, s, zp, axis, g), reps=reps)
            t_torch = median_time(_fwd_bwd_torch(x, s, zp, axis, g), reps=max(3, reps // 2))
            t_ref = median_time(_fwd_bwd_ref(x, s, zp, axis, g), reps=3)
            row = dict(size=label, dtype="float32", granularity=gran, measure="forward+backward (dx, ds, do)",
                       pyquant_ms=t_pq * 1e3, clone_ms=t_clone * 1e3, torch_ms=t_torch * 1e3,
                       reference_ms=t_ref * 1e3, pyquant_vs_clone=t_pq / t_clone, speedup_vs_torch=t_torch / t_pq,
                       speedup_vs_reference=t_ref / t_pq)
            if label == "16M":
                row.update(target=">= 3x torch learnable", met=t_torch / t_pq >= 3)
            elif label == "1M":
                row.update(target=">= 10x torch learnable", met=t_torch / t_pq >= 10)
            rows.append(row)

    # Tiny tensor: per-call overhead (dispatch, checks) dominates.
    for gran, axis in [("per-channel", 1), ("per-tensor", None)]:
        x, s, zp = _inputs((1, 64, 8, 8), axis, "cpu")
        t_pq = median_time(_pq_forward(x, s, zp, axis), reps=3000, warmup=200)
        t_torch = median_time(_torch_forward(x, s, zp, axis), reps=3000, warmup=200)
        t_clone = median_time(lambda: x.clone(), reps=3000, warmup=200)
        rows.append(dict(size="tiny 1x64x8x8", dtype="float32", granularity=gran, measure="forward (per call)",
                         pyquant_ms=t_pq * 1e3, clone_ms=t_clone * 1e3, torch_ms=t_torch * 1e3,
                         pyquant_vs_clone=t_pq / t_clone, speedup_vs_torch=t_torch / t_pq,
                         target="<= 2x torch per call", met=t_pq / t_torch <= 2))
    return rows


def cuda_rows(quick: bool) -> list[dict[str, Any]]:
    n_rows, n_cols = (8192, 8192) if not quick else (2048, 2048)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        esize = torch.finfo(dtype).bits // 8
        for gran, axis in [("per-tensor", None), ("per-channel", 0)]:
            x, s, zp = _inputs((n_rows, n_cols), axis, "cuda", dtype)
            nbytes = x.numel() * esize
            t_clone = median_time(lambda: x.clone(), reps=50, device="cuda")
            copy_bw = 2 * nbytes / t_clone
            t_pq_checked = median_time(_pq_forward(x, s, zp, axis), reps=50, device="cuda")
            prev = pqo.set_value_checks(False)  # no host read of the scales: the kernel alone
            t_pq = median_time(_pq_forward(x, s, zp, axis), reps=50, device="cuda")
            pqo.set_value_checks(prev)
            xf = x.float()
            t_torch = median_time(_torch_forward(xf, s, zp, axis), reps=30, device="cuda")
            bw = 2 * nbytes / t_pq
            rows.append(dict(size=f"{x.numel() >> 20}M", dtype=str(dtype).replace("torch.", ""), granularity=gran,
                             measure="forward", pyquant_ms=t_pq * 1e3, pyquant_checked_ms=t_pq_checked * 1e3,
                             clone_ms=t_clone * 1e3,
                             torch_ms=t_torch * 1e3, pyquant_vs_clone=t_pq / t_clone,
                             speedup_vs_torch=t_torch / t_pq, target=">= 85% of copy bandwidth",
                             fraction_of_copy_bw=bw / copy_bw, met=bw / copy_bw >= 0.85))
            g = torch.randn(x.shape, device="cuda", dtype=dtype)
            sr, orf = _ref_args(x, s, zp, axis)
            sr, orf = sr.contiguous(), orf.contiguous()
            t_bwd = median_time(lambda: torch.ops.pyquant.quantize_dequantize_backward(
                g, x, sr, orf, 0, 255, 1.0, [True, True, True]), reps=50, device="cuda")
            floor_bw = 3 * nbytes / t_bwd
            t_fb = median_time(_fwd_bwd_pq(x, s, zp, axis, g), reps=30, device="cuda")
            t_fb_torch = median_time(_fwd_bwd_torch(xf, s, zp, axis, g.float()), reps=20, device="cuda")
            rows.append(dict(size=f"{x.numel() >> 20}M", dtype=str(dtype).replace("torch.", ""), granularity=gran,
                             measure="backward kernel (read x, g; write dx; reduce ds, do)", pyquant_ms=t_bwd * 1e3,
                             clone_ms=t_clone * 1e3, torch_ms=t_fb_torch * 1e3,
                             pyquant_vs_clone=t_bwd / t_clone, speedup_vs_torch=t_fb_torch / t_fb,
                             fwd_bwd_ms=t_fb * 1e3, target=">= 75% of bytes floor at copy bandwidth",
                             fraction_of_copy_bw=floor_bw / copy_bw, met=floor_bw / copy_bw >= 0.75))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, no torch.compile baseline")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baseline")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    if a.device == "cuda":
        if not torch.cuda.is_available() or not pqo.HAS_CUDA_KERNELS:
            print("no CUDA device or pyquant._C_cuda missing", file=sys.stderr)
            return 2
        rows = cuda_rows(a.quick)
        cols = COLUMNS[:4] + ["pyquant_ms", "pyquant_checked_ms", "clone_ms", "fraction_of_copy_bw", "torch_ms",
                              "fwd_bwd_ms",
                              "speedup_vs_torch", "target", "met"]
        name = "fake_quant_cuda" + ("_quick" if a.quick else "")
        title = "Fake quantization on the GPU (medians, CUDA events)"
        notes = ["torch_ms: torch.fake_quantize_* (forward rows) or the learnable op's forward+backward (backward rows), on float32",
                 "fraction_of_copy_bw: bytes moved / time, over x.clone()'s bandwidth (read + write)",
                 "pyquant_ms: with pyquant.ops.set_value_checks(False); pyquant_checked_ms: the default, which reads "
                 "the scales on the host to reject zero/NaN ones (a device synchronization per call)"]
    else:
        rows = cpu_rows(a.quick, compile_ref=not (a.quick or a.no_compile))
        cols = COLUMNS
        name = "fake_quant_cpu" + ("_quick" if a.quick else "")
        title = "Fake quantization on the CPU (medians, one process)"
        notes = ["torch: torch.fake_quantize_per_{channel,tensor}_affine for forward, "
                 "torch._fake_quantize_learnable_per_{channel,tensor}_affine for forward+backward",
                 "reference: pyquant.ops.reference (pure torch); compiled_ref: torch.compile of it",
                 "pyquant_vs_clone: time over x.clone() (one read, one freshly allocated write): the floor is 1"]
    path = write_results(name, rows, cols, title=title, notes=notes, out_dir=a.out)
    return report(path, rows)


if __name__ == "__main__":
    sys.exit(main())
