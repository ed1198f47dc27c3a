"""AdaRound: learn, layer by layer, whether each weight rounds up or down (4-bit weights without training).

    python examples/adaround.py [--quick] [--out DIR]

Round-to-nearest is the best choice for each weight alone, not for the layer's output. AdaRound optimizes
the rounding of every weight of a layer to reproduce the layer's FP32 output on calibration data, layer by
layer, then freezes the weight encodings; the activations are calibrated afterwards. A killed run resumes
from `checkpoint_dir`. Prints `nearest rounding W4A8: SQNR <dB> dB` and `AdaRound W4A8: SQNR <dB> dB`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

import pyquant as pq
from pyquant.metrics import sqnr_db

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick, calib=64)
    with torch.no_grad():
        ref = model(evalx)

    folded = copy.deepcopy(model)
    pq.fold_batchnorms(folded)
    sim = pq.QuantSim(folded, calib[:1], quant_scheme="min_max", param_bw=4, output_bw=8)
    sim.compute_encodings(calib)
    with torch.no_grad():
        print(f"{name}: nearest rounding W4A8: SQNR {sqnr_db(ref, sim.model(evalx)):.2f} dB")

    iterations = 20 if args.quick else 2000
    res = pq.adaround(model, calib[:1], calib, param_bw=4, iterations=iterations, lr=1e-2,
                      positions_per_sample=32 if args.quick else 512,
                      checkpoint_dir=Path(args.out) / "adaround_ckpt")   # killed? run again: it resumes
    print("\n".join(res.summary().splitlines()[:4]))
    sim = pq.QuantSim(res.model, calib[:1], quant_scheme="min_max", param_bw=4, output_bw=8)
    res.apply_to(sim)                                                     # frozen weight encodings
    sim.compute_encodings(calib)                                          # then the activations
    with torch.no_grad():
        print(f"{name}: AdaRound W4A8 ({iterations} iterations per layer): SQNR {sqnr_db(ref, sim.model(evalx)):.2f} dB")


if __name__ == "__main__":
    main()
