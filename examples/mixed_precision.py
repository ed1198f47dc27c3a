"""Mixed precision: each layer's weight/activation bit widths chosen under an accuracy target.

    python examples/mixed_precision.py [--quick] [--out DIR]

Candidates are (weight bits, activation bits) pairs; the search measures each layer group's sensitivity to
each candidate, walks a greedy path from the most to the least expensive mix, and leaves the simulation at
the cheapest mix whose top-1 agreement with FP32 stays within the allowed drop. The chosen widths, the
cost against the starting mix and the Pareto front are printed; the encodings and the hardware config the
mix runs under are written to --out. Prints `target met: <bool>`, `relative cost: <fraction>` and
`accuracy: <value>` lines.
"""
from __future__ import annotations

from pathlib import Path

import pyquant as pq

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    pq.fold_batchnorms(model, calib[:1])
    sim = pq.QuantSim(model, calib[:1], param_bw=8, output_bw=8)
    sim.compute_encodings(calib)
    res = pq.mixed_precision(sim, "w4a8,w8a8,w8a16", "top1_agreement", calib, allowed_accuracy_drop=0.02,
                             eval_data=evalx, checkpoint_dir=Path(args.out) / "amp_cache", progress=False)
    print(res.summary())
    print(f"{name}: target met: {res.target_met}")
    print(f"relative cost: {res.relative_cost:.4f}")
    print(f"accuracy: {res.accuracy:.4f} (FP32 {res.fp32_accuracy:.4f}, target {res.target:.4f})")
    paths = res.save(sim, Path(args.out) / "mixed_precision")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
