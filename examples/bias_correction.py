"""Bias correction: remove the shift quantization adds to each layer's mean output.

    python examples/bias_correction.py [--quick] [--out DIR]

Rounding weights shifts the mean of a layer's output; the layers after it see the shift as an error in
every sample. Empirical bias correction measures each layer's mean output per channel on calibration
data, FP32 against the simulation (earlier layers already corrected), and subtracts the difference from
the layer's bias. The analytical form needs no data: the expected input comes from the folded batch
norms' statistics. Both follow CLE on a per-tensor simulation here. Prints `<step>: SQNR <dB> dB` lines.
"""
from __future__ import annotations

from pathlib import Path

import torch

import pyquant as pq
from pyquant.metrics import sqnr_db

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    with torch.no_grad():
        ref = model(evalx)
    report = pq.equalize(model, calib[:1], replace_relu6=True)       # folded BN statistics in report.bn_stats

    def calibrated_sim() -> pq.QuantSim:
        sim = pq.QuantSim(model, calib[:1], param_bw=8, output_bw=8, config="per_tensor")
        sim.compute_encodings(calib)
        return sim

    def score(sim: pq.QuantSim) -> float:
        with torch.no_grad():
            return sqnr_db(ref, sim.model(evalx))

    sim = calibrated_sim()
    print(f"{name} CLE, per-tensor W8A8: SQNR {score(sim):.2f} dB")

    shifts = pq.correct_bias(sim, model, calib, checkpoint_dir=Path(args.out) / "bias_correction_ckpt")
    print(f"+ empirical bias correction ({len(shifts)} layers): SQNR {score(sim):.2f} dB")

    sim = calibrated_sim()
    shifts = pq.correct_bias_analytical(sim, report.bn_stats)         # no data
    print(f"+ analytical bias correction ({len(shifts)} layers): SQNR {score(sim):.2f} dB")


if __name__ == "__main__":
    main()
