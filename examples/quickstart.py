"""Getting started: simulate a model at W8A8, measure what quantization costs, export it.

    python examples/quickstart.py [--quick] [--out DIR]

Steps: fold batch norms (as an integer target runs the model), build a QuantSim, calibrate it on a few
batches, read `sim.summary()`, compare the simulated outputs with FP32, and export the QDQ ONNX model with
its encodings. Prints `top-1 agreement with FP32: <percent>` (over all images, and over those FP32 itself
is confident about) and `exported: <path>`.
"""
from __future__ import annotations

from pathlib import Path

import torch

import pyquant as pq
from pyquant.metrics import top1_agreement

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    pq.fold_batchnorms(model)                                   # BNs into the convolutions before them

    sim = pq.QuantSim(model, calib[:1], quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim.compute_encodings(calib)                                # weights first, then activations
    summary = sim.summary()
    print("\n".join(summary.splitlines()[:8]))                  # the first quantizers; print(summary) for all
    print(f"... {len(sim.quantizers)} quantizers")

    with torch.no_grad():
        ref, out = model(evalx), sim.model(evalx)
    agreement, count = top1_agreement(ref, out, confident=None)
    print(f"{name}: top-1 agreement with FP32: {100 * agreement:.1f}% of {count} images")
    confident, n_confident = top1_agreement(ref, out, confident=0.5)   # where FP32 itself is sure
    if n_confident:
        print(f"{name}: on the {n_confident} images FP32 is confident about: {100 * confident:.1f}%")

    paths = sim.export(Path(args.out), "quickstart", calib[:1])  # .onnx (QDQ), .encodings (JSON), .pth
    print(f"exported: {paths['onnx']} (opset {paths.opset})")
    print(f"exported: {paths['encodings']}")


if __name__ == "__main__":
    main()
