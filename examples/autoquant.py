"""AutoQuant: apply post-training techniques in order until the metric is within an allowed drop of FP32.

    python examples/autoquant.py [--quick] [--out DIR]

AutoQuant evaluates FP32, a first simulation, weights-only and activations-only simulations (which side
costs accuracy, and the best calibration scheme of each), then CLE, high-bias absorption, smoothing, bias
correction, SeqMSE/GPTQ (weights of 4 bits or fewer), AdaRound and the activation range search, keeping a
step only if `eval_fn` improves, and stops when the target is met. Every finished step is cached in
`cache_dir`, so a rerun (or a killed run) evaluates nothing twice. Here `eval_fn` is top-1 agreement with
the FP32 model on held-out images; use your own accuracy. Prints the step table, then
`best step: <step>, accuracy <a> (FP32 <f>), target met: <bool>` and the report's path.
"""
from __future__ import annotations

from pathlib import Path

import torch

import pyquant as pq
from pyquant.metrics import top1_agreement

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick, quick_evaluation=2)
    with torch.no_grad():
        ref = model(evalx)

    def eval_fn(m: torch.nn.Module) -> float:        # higher is better; called with FP32 and every simulation
        with torch.no_grad():
            return top1_agreement(ref, m(evalx), confident=None)[0]

    if args.quick:   # one scheme, no bias correction, AdaRound or range search: seconds instead of minutes
        steps = {"quant_schemes": ("tf_enhanced",), "bias_correction": None, "adaround": False, "range_search": False}
    else:
        steps = {"adaround_kwargs": {"iterations": 300, "lr": 1e-2}}
    aq = pq.AutoQuant(model, calib[:1], calib, eval_fn, param_bw=8, output_bw=8, config="per_tensor", **steps)
    out = Path(args.out)
    res = aq.optimize(allowed_accuracy_drop=0.01, time_budget_s=600, cache_dir=out / "aq_cache",
                      output_dir=out / "autoquant")
    print(res.summary())
    print(f"{name}: best step: {res.best_step}, accuracy {res.accuracy:.3f} (FP32 {eval_fn(model):.3f}), "
          f"target met: {res.target_met}")
    print(f"report: {res.report_path}")
    print(f"encodings: {res.encodings_path}")


if __name__ == "__main__":
    main()
