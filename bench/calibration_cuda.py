"""Calibration kernels on the GPU (64M elements): per-channel / per-tensor min/max as a fraction of
copy bandwidth, histograms against torch.histc, and per-channel TF-enhanced encodings end to end.
Run by bench/gpu_check.sh:  python -m bench.calibration_cuda [--quick] [--out DIR]"""
from __future__ import annotations

import argparse
import sys

import torch

import pyquant.ops as pqo
from pyquant.quant import TfEnhanced

from ._harness import median_time, write_results

op = torch.ops.pyquant
COLUMNS = ["case", "pyquant_ms", "baseline", "baseline_ms", "speedup", "fraction_of_copy_bw", "target", "met"]


def rows(quick: bool) -> list[dict]:
    n = 2048 if quick else 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, n, device="cuda", generator=g)
    nbytes = x.numel() * 4
    t_clone = median_time(lambda: x.clone(), reps=50, device="cuda")
    copy_bw = 2 * nbytes / t_clone
    out = []
    for name, shape in (("per-channel", [n, 1]), ("per-tensor", [1, 1])):
        t = median_time(lambda: op.minmax(x, shape), reps=50, device="cuda")
        if name == "per-channel":
            tb = median_time(lambda: torch.aminmax(x, dim=1), reps=50, device="cuda")
            base = "torch.aminmax(dim=1)"
        else:
            tb = median_time(lambda: torch.aminmax(x), reps=50, device="cuda")
            base = "torch.aminmax"
        out.append(dict(case=f"min/max {name} {n}x{n}", pyquant_ms=t * 1e3, baseline=base, baseline_ms=tb * 1e3,
                        speedup=tb / t, fraction_of_copy_bw=(nbytes / t) / copy_bw, target=">= 60% of copy bw",
                        met=(nbytes / t) / copy_bw >= 0.6))
    mn, mx, _ = op.minmax(x, [1, 1])
    rng = (mx - mn).contiguous()
    t = median_time(lambda: op.histogram(x, mn, rng, 2048), reps=30, device="cuda")
    tb = median_time(lambda: torch.histc(x, 2048, float(mn), float(mx)), reps=30, device="cuda")
    out.append(dict(case=f"histogram per-tensor 2048 bins {n}x{n}", pyquant_ms=t * 1e3, baseline="torch.histc",
                    baseline_ms=tb * 1e3, speedup=tb / t, fraction_of_copy_bw=(nbytes / t) / copy_bw))
    mn, mx, _ = op.minmax(x, [n, 1])
    t = median_time(lambda: op.histogram(x, mn, (mx - mn).contiguous(), 512), reps=30, device="cuda")
    out.append(dict(case=f"histogram per-channel 512 bins {n}x{n}", pyquant_ms=t * 1e3, baseline=None,
                    fraction_of_copy_bw=(nbytes / t) / copy_bw))
    for sym in (False, True):
        def run():
            a = TfEnhanced((n, 1))
            a.update_stats(x)
            return a.compute_encodings(8, sym)
        t = median_time(run, reps=10, device="cuda")
        out.append(dict(case=f"TF-enhanced per-channel {n}x{n} {'sym' if sym else 'asym'} (update + compute)",
                        pyquant_ms=t * 1e3))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not pqo.HAS_CUDA_KERNELS:
        print("no CUDA device or pyquant._C_cuda missing", file=sys.stderr)
        return 2
    r = rows(a.quick)
    path = write_results("calibration_cuda" + ("_quick" if a.quick else ""), r, COLUMNS,
                         title="Calibration kernels on the GPU (medians, CUDA events)", out_dir=a.out,
                         notes=["fraction_of_copy_bw: bytes read / time over x.clone()'s bandwidth (read + write)"])
    print(open(path.with_suffix(".md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
