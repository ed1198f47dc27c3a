"""Export and the on-target check: write the QDQ ONNX model, run it with onnxruntime, find a mismatching layer.

    python examples/export_and_compare.py [--quick] [--out DIR]

`sim.export` writes `<prefix>.onnx` (every quantizer as QuantizeLinear/DequantizeLinear), `<prefix>.encodings`
(AIMET-compatible JSON) and `<prefix>.pth` (FP32 weights). `pyquant.sim.compare.compare` runs the file
with onnxruntime beside the simulation and measures every quantized tensor in quantization steps: with
`optimize=True` onnxruntime uses its integer kernels, as a target would; `mode="lockstep"` feeds each
simulated segment the target's own tensors, so the first tensor that differs is the op that computes
differently. Prints `agrees: True|False`, the first differing tensor (or none) and the share of tensors
more than one step off.
"""
from __future__ import annotations

from pathlib import Path

import onnx

import pyquant as pq
from pyquant.sim.compare import compare

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    pq.fold_batchnorms(model)
    sim = pq.QuantSim(model, calib[:1], param_bw=8, output_bw=8)
    sim.compute_encodings(calib)

    paths = sim.export(Path(args.out), "model_w8a8", calib[:1], encoding_version="1.0.0")
    graph = onnx.load(str(paths["onnx"])).graph
    qdq = sum(1 for n in graph.node if n.op_type == "QuantizeLinear")
    print(f"exported: {paths['onnx']} (opset {paths.opset}, {qdq} QuantizeLinear nodes)")

    x = evalx[:4]
    for mode in ("end_to_end", "lockstep"):
        report = compare(sim, paths["onnx"], x, mode=mode, optimize=True)
        first = report.first_difference
        share = len(report.differing) / max(len(report.tensors), 1)
        print(f"{mode}: agrees: {report.agrees}, first tensor > 1 step off: "
              f"{first.name if first is not None else 'none'}, {100 * share:.1f}% of "
              f"{len(report.tensors)} tensors > 1 step off")
    print(report.summary().splitlines()[0])


if __name__ == "__main__":
    main()
