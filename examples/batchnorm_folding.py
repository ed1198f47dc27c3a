"""Batch-norm folding: fold each BatchNorm into the layer next to it, as an integer target runs the model.

    python examples/batchnorm_folding.py [--quick]

`pq.fold_batchnorms(model)` changes the model in place (each folded BN becomes an Identity) and leaves its
FP32 outputs unchanged up to float rounding. A simulation built with its batch norms kept (for QAT) folds
them at the end with `pq.fold_batchnorms_to_scale(sim)`, which scales the weight encodings along so the
calibrated or trained ranges stay. Prints the number of folded pairs, the largest relative change of the
FP32 outputs (`max relative change: <x>`) and the number folded inside a simulation.
"""
from __future__ import annotations

import copy

import torch

import pyquant as pq

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    original = copy.deepcopy(model)

    folded = pq.fold_batchnorms(model)                # [(layer, bn), ...]; .forward, .bn_stats
    print(folded.summary().splitlines()[0])
    with torch.no_grad():
        ref, out = original(evalx), model(evalx)
    rel = float((out - ref).abs().max() / ref.abs().max())
    print(f"{name}: {len(folded)} batch norms folded, max relative change: {rel:.2e}")

    # With the batch norms kept in the simulation (e.g. for QAT), fold them afterwards, encodings scaled along:
    sim = pq.QuantSim(original, calib[:1], param_bw=8, output_bw=8, batchnorm="fold_each_step")
    sim.compute_encodings(calib)
    # ... train sim.model here (examples/qat.py) ...
    pairs = pq.fold_batchnorms_to_scale(sim)          # export requires it after batchnorm="fold_each_step"
    print(f"fold_batchnorms_to_scale: {len(pairs)} batch norms folded inside the simulation")


if __name__ == "__main__":
    main()
