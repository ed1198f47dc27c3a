"""`python -m pyquant.demo` (`make demo`): predict MobileNetV2's on-target accuracy.

MobileNetV2 with its ImageNet weights, batch norms folded (as an integer target runs it), simulated
at W8A8 with per-channel and per-tensor weights, calibrated with min/max and TF-enhanced on real
photos; each simulation is exported to a QDQ ONNX model and run by onnxruntime's int8 kernels, the
on-target check. Prints agreement with FP32 (top-1 on crops where FP32 is confident), mean
KL(FP32 || quantized), output SQNR, and the onnxruntime-vs-simulation agreement."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

import pyquant
from pyquant._assets import AssetMissingError
from pyquant.metrics import mean_kl, sqnr_db, top1_agreement


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-image", type=int, default=16, help="evaluation crops per photo (default 16)")
    p.add_argument("--calib", type=int, default=32, help="calibration crops (default 32)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    print("pyquant", pyquant.__version__, json.dumps(pyquant.native_info()))
    try:
        from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
        from pyquant.models import mobilenet_v2
        model = mobilenet_v2(pretrained=True)
        calib = imagenet_calibration_set(a.calib)
        evalx = imagenet_eval_set(n_per_image=a.per_image)
    except AssetMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from pyquant.sim.export import run_onnx
        import onnxruntime  # noqa: F401
    except ImportError:
        print("error: the on-target check needs onnxruntime: pip install onnx onnxruntime", file=sys.stderr)
        return 2
    from pyquant.sim.quantsim import QuantSim
    from pyquant.techniques import fold_batchnorms

    fold_batchnorms(model)
    torch.set_grad_enabled(False)
    ref = model(evalx)
    n_conf = top1_agreement(ref, ref)[1]
    print(f"\nMobileNetV2 (ImageNet weights, BN folded); {len(evalx)} evaluation crops of real photos, "
          f"{n_conf} where FP32 is confident (p > 0.5); {len(calib)} calibration crops\n")
    head = f"{'configuration':<38} {'agree%':>7} {'KL':>7} {'SQNR dB':>8} {'onnxrt agree%':>14} {'time s':>7}"
    print(head)
    print("-" * len(head))
    print(f"{'FP32':<38} {100.0:7.1f} {0.0:7.3f} {'inf':>8} {'-':>14} {'-':>7}")
    for cfg, cfg_name in (("default", "per-channel"), ("per_tensor", "per-tensor")):
        for scheme in ("min_max", "tf_enhanced"):
            t0 = time.perf_counter()
            sim = QuantSim(model, calib[:1], quant_scheme=scheme, param_bw=8, output_bw=8, config=cfg)
            sim.compute_encodings(lambda m: m(calib))
            out = sim.model(evalx)
            agree, _ = top1_agreement(ref, out)
            with tempfile.TemporaryDirectory() as d:
                paths = sim.export(d, "mobilenet_v2", calib[:1])
                ort_out = run_onnx(paths["onnx"], evalx)[0]
            on_target, _ = top1_agreement(out, ort_out)
            label = f"W8A8 {cfg_name} weights, {scheme}"
            print(f"{label:<38} {100 * agree:7.1f} {mean_kl(ref, out):7.3f} {sqnr_db(ref, out):8.2f} "
                  f"{100 * on_target:14.1f} {time.perf_counter() - t0:7.1f}")
    print(f"\nagree%: top-1 agreement with FP32 on its confident crops; onnxrt agree%: onnxruntime's int8 "
          f"execution of the exported QDQ model vs the simulation, on the simulation's confident crops. "
          f"Total {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
