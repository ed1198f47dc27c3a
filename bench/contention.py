"""Contention: how much pyquant slows down when another PyTorch job shares the machine, against how much the
same model's FP32 forward slows down beside the same neighbour.

The neighbour is a second process running a real model's inference in a loop with torch's default threads
(all-MiniLM-L6-v2 on batches of 16 x 64 tokens; MobileNetV2 when the MiniLM asset is not installed). Each
workload is timed alone, then beside the neighbour, interleaved round by round with the FP32 forward so that
the machine's state hits both alike:

- MobileNetV2 (ImageNet weights, batch norms folded) W8A8 simulated forward on 8 real-photo crops, against
  its FP32 forward;
- the same simulation's training step (range learning, forward + backward), against FP32's training step;
- a 1M-float quantize-dequantize (torch.ops.pyquant) against torch's fake_quantize_per_tensor_affine.

Each workload runs with the kernels' default threading (OpenMP regions) and with pyquant's pool
(PYQUANT_CPU_POOL=1, csrc/cpu/thread_pool.cpp). Reported: medians alone and beside, each slowdown
(beside / alone) and pyquant's slowdown relative to its baseline's (<= 1: pyquant slows no more than the
FP32 model it simulates). Target: that ratio <= 1.1 for the
simulated forward and step.

    python -m bench.contention            # ~8 minutes
    python -m bench.contention --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python -P bench/contention.py): checkout last on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from bench._harness import interleaved_times, publish, require_native, versions

COLUMNS = ["workload", "pyquant_alone_ms", "pyquant_beside_ms", "pyquant_slowdown", "baseline", "baseline_alone_ms",
           "baseline_beside_ms", "baseline_slowdown", "relative_slowdown", "met"]

_NEIGHBOUR = textwrap.dedent("""
    import sys, time, torch
    try:
        from pyquant.models import minilm
        tok, model = minilm()
        ids = torch.randint(1000, 20000, (16, 64), generator=torch.Generator().manual_seed(0))
        run = lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids))
        what = "all-MiniLM-L6-v2 inference, 16 x 64 tokens"
    except Exception:
        from pyquant.models import mobilenet_v2
        model = mobilenet_v2().eval()
        x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        run = lambda: model(x)
        what = "MobileNetV2 inference, batch 8"
    print(what, flush=True)
    with torch.no_grad():
        while True:
            run()
""")


class Neighbour:
    """The other job: a process looping a model's inference until stopped."""

    def __enter__(self) -> "Neighbour":
        self.proc = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.what = self.proc.stdout.readline().strip() or "neighbour failed to start"
        time.sleep(2.0)  # its first iterations (allocation, warm-up) out of the way
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    if not require_native("bench/contention.py"):
        return 2
    import pyquant
    import pyquant.ops  # noqa: F401  (registers torch.ops.pyquant)
    from pyquant.datasets import imagenet_calibration_set
    from pyquant.models import mobilenet_v2
    from pyquant.techniques import fold_batchnorms

    reps = 5 if a.quick else 15
    model = mobilenet_v2().eval()
    fold_batchnorms(model)
    x = imagenet_calibration_set(8)
    sim = pyquant.QuantSim(model, x[:1], param_bw=8, output_bw=8)
    sim.compute_encodings(x, progress=False)

    def sim_forward():
        with torch.no_grad():
            sim.model(x)

    def fp32_forward():
        with torch.no_grad():
            model(x)

    train_sim = pyquant.QuantSim(model, x[:1], param_bw=8, output_bw=8)
    train_sim.compute_encodings(x, progress=False)
    train_sim.set_range_learning(True)
    train_sim.model.train()
    fp32_train = mobilenet_v2().train()
    fold_batchnorms(fp32_train.eval())
    fp32_train.train()

    def sim_step():
        train_sim.model.zero_grad(set_to_none=True)
        train_sim.model(x).square().mean().backward()

    def fp32_step():
        fp32_train.zero_grad(set_to_none=True)
        fp32_train(x).square().mean().backward()

    big = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)) * 3
    s, o = torch.tensor([0.05]), torch.tensor([-128.0])

    def pq_qdq():
        torch.ops.pyquant.quantize_dequantize(big, s, o, 0, 255)

    def torch_qdq():
        torch.fake_quantize_per_tensor_affine(big, 0.05, 128, 0, 255)

    cases = [("MobileNetV2 W8A8 simulated forward, batch 8", "FP32 forward", sim_forward, fp32_forward, 1.1),
             ("MobileNetV2 W8A8 range-learning step, batch 8", "FP32 training step", sim_step, fp32_step, 1.1),
             ("quantize-dequantize, 1M floats", "torch fake_quantize_per_tensor_affine", pq_qdq, torch_qdq, None)]
    from pyquant import _native
    C = _native.cpu_module()
    modes = [("OpenMP", False), ("pool", True)] if hasattr(C, "set_cpu_pool_enabled") else [("OpenMP", False)]
    pool_before = C.cpu_pool_enabled() if hasattr(C, "cpu_pool_enabled") else False
    rows = []
    what = "?"
    try:
        for mode, on in modes:
            if hasattr(C, "set_cpu_pool_enabled"):
                C.set_cpu_pool_enabled(on)
            alone = {}
            for name, _, f, g, _ in cases:
                t = interleaved_times([f, g], warmup=2, reps=reps)
                alone[name] = (statistics.median(t[0]), statistics.median(t[1]))
                print(f"{mode}, alone: {name}: {alone[name][0] * 1e3:.2f} ms, baseline {alone[name][1] * 1e3:.2f} ms",
                      file=sys.stderr, flush=True)
            with Neighbour() as nb:
                for name, base, f, g, target in cases:
                    t = interleaved_times([f, g], warmup=2, reps=reps)
                    pq_b, base_b = statistics.median(t[0]), statistics.median(t[1])
                    pq_a, base_a = alone[name]
                    rel = (pq_b / pq_a) / (base_b / base_a)
                    rows.append(dict(workload=f"{name} [{mode}]", pyquant_alone_ms=pq_a * 1e3,
                                     pyquant_beside_ms=pq_b * 1e3, pyquant_slowdown=pq_b / pq_a, baseline=base,
                                     baseline_alone_ms=base_a * 1e3, baseline_beside_ms=base_b * 1e3,
                                     baseline_slowdown=base_b / base_a, relative_slowdown=rel,
                                     met=None if target is None else rel <= target))
                    print(f"{mode}, beside: {name}: slowdown {pq_b / pq_a:.2f}x, baseline {base_b / base_a:.2f}x",
                          file=sys.stderr, flush=True)
                what = nb.what
    finally:
        if hasattr(C, "set_cpu_pool_enabled"):
            C.set_cpu_pool_enabled(pool_before)
    notes = [versions(), f"neighbour: a second process, {what}, torch's default threads",
             "[OpenMP]: the kernels' default threading (OpenMP regions, torch's threads); [pool]: pyquant's own "
             "pool (PYQUANT_CPU_POOL=1), helpers claim chunks",
             "relative_slowdown = pyquant's slowdown / its baseline's (<= 1.1 targeted for the simulated forward "
             "and step)"]
    return publish("contention", a, rows, COLUMNS, title="Contention: slowdown beside another PyTorch job",
                   notes=notes)


if __name__ == "__main__":
    sys.exit(main())
