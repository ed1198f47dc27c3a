"""QuantSim and calibration schemes: the same model calibrated with each scheme, scored against FP32.

    python examples/calibration_schemes.py [--quick]

A calibration scheme turns what a quantizer observed into a range: `min_max` keeps the observed range,
`tf_enhanced` and `mse` choose the range with the least expected error over a histogram, `percentile`
clips the tails, `entropy` minimises the KL divergence of the histogram. Weights and activations can use
different schemes (`param_quant_scheme=`). Prints one line per scheme, `<scheme>: SQNR <dB> dB, KL <nats>`,
and the best one.
"""
from __future__ import annotations

import torch

import pyquant as pq
from pyquant.metrics import mean_kl, sqnr_db

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    pq.fold_batchnorms(model)
    with torch.no_grad():
        ref = model(evalx)

    scores = {}
    for scheme in ("min_max", "tf_enhanced", "percentile", "mse", "entropy"):
        sim = pq.QuantSim(model, calib[:1], quant_scheme=scheme, param_bw=8, output_bw=8)
        sim.compute_encodings(calib)
        with torch.no_grad():
            out = sim.model(evalx)
        scores[scheme] = sqnr_db(ref, out)
        print(f"{scheme}: SQNR {scores[scheme]:.2f} dB, KL {mean_kl(ref, out):.4f}")
    best = max(scores, key=scores.get)
    print(f"{name}: best scheme by output SQNR: {best}")


if __name__ == "__main__":
    main()
