"""AdaRound on the GPU: seconds per layer-iteration on MobileNetV2's layers (batch 32 samples, 64
positions each), against the same run on the CPU cores of the same machine. Timing only: the
architecture with its random initialisation and random inputs (the weights do not change the work).

    python -m bench.adaround_gpu [--iterations N] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

import pyquant
from bench._harness import write_results


def run(device: str, iterations: int, layers: int) -> dict:
    from pyquant.models import mobilenet_v2
    torch.manual_seed(0)
    m = mobilenet_v2(pretrained=False).eval().to(device)
    x = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    names = [n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    skip = names[layers:]
    t0 = time.perf_counter()
    res = pyquant.adaround(m, x[:1], x, param_bw=4, iterations=iterations, batch_size=32, skip=skip, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per_it = [r.seconds / max(iterations, 1) for r in res.report]
    return dict(device=device, layers=len(res.report), iterations=iterations, wall_s=wall,
                ms_per_layer_iteration=1e3 * sorted(per_it)[len(per_it) // 2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--layers", type=int, default=8, help="first N layers optimized, the rest kept nearest")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rows = [run("cuda", a.iterations, a.layers), run("cpu", max(a.iterations // 10, 10), a.layers)]
    rows.append(dict(device="cpu/cuda", ms_per_layer_iteration=rows[1]["ms_per_layer_iteration"]
                     / rows[0]["ms_per_layer_iteration"]))
    write_results("adaround_gpu", rows, ["device", "layers", "iterations", "wall_s", "ms_per_layer_iteration"],
                  title="AdaRound per layer-iteration, MobileNetV2 layers (median over layers, incl. data collection)",
                  notes=["last row: CPU time over GPU time per layer-iteration"],
                  out_dir=Path(a.out) if a.out else None)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
