"""AdaRound: quality against nearest rounding, and wall time / peak memory against aimet-torch's
`Adaround.apply_adaround` with the same model, data and settings, in the same run.

1. MobileNetV2 (real ImageNet weights, BN folded, real-photo crops) at W4A8, per-channel symmetric
   min-max weight encodings, TF-enhanced activations: nearest rounding vs pyquant AdaRound (and AIMET's
   AdaRound when aimet_torch imports): top-1 agreement with FP32 and KL(FP32||quantized).
2. Fashion-MNIST CNN (real labels, 10k test images) at W4A8 and W3A8: FP32, nearest, AdaRound.

With AIMET (or its KL from an earlier run, `--target-kl`), MobileNetV2 gets two comparison rows: the
same-settings ratio (AIMET's wall time over pyquant's at the same iterations, samples and batch size),
and the time pyquant takes to reach AIMET's KL: pyquant rerun at each of `--reach-iterations` (fewest
first) until its KL is no worse than AIMET's, AIMET's wall time over that run's.

Each AdaRound run reports its wall time and the process's peak RSS during it (the high-water mark is
reset before each run), so that the two toolkits' memory figures do not mix.

    python -m bench.adaround                                   # dev env
    cd /work/main && /tmp/pyquant-peers/bin/python -P bench/adaround.py   # with AIMET
    python -m bench.adaround --quick
    python -m bench.adaround --iterations 300 --samples 256 --skip fashion --name adaround_full   # AIMET's full settings
"""
from __future__ import annotations

import argparse
import statistics
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

import pyquant
from pyquant.metrics import mean_kl, top1_agreement

from bench._harness import publish, require_native, versions

COLUMNS = ["model", "config", "method", "agreement_or_accuracy_pct", "kl", "kl_vs_nearest", "wall_s", "peak_rss_mb",
           "settings", "target", "met"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn() with its wall time and this process's peak RSS during it (MB): the kernel's high-water mark
    is reset first (/proc/self/clear_refs), so each run's peak is its own."""
    import gc
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = float("nan")
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out, wall, peak


def _predict(model, x, bs=64):
    with torch.no_grad():
        return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def _sim_logits(model, calib, evalx, bw, encodings=None):
    from pyquant.sim.quantsim import QuantSim
    # weights min-max (AdaRound's encodings), activations TF-enhanced
    sim = QuantSim(model, calib[:1], quant_scheme="tf_enhanced", param_quant_scheme="min_max", param_bw=bw,
                   output_bw=8, config="default")
    if encodings is not None:
        for name, enc in encodings.items():
            q = sim.param_quantizers[name]
            q.set_encoding(enc)
            q.freeze()
    sim.compute_encodings(lambda m: [m(calib[i:i + 32]) for i in range(0, len(calib), 32)])
    return _predict(sim.model, evalx)


def aimet_adaround(model, calib, bw, iterations, batch_size, num_samples):
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    import aimet_torch
    cfg = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    batches = [calib[i:i + batch_size] for i in range(0, num_samples, batch_size)]
    params = AdaroundParameters(batches, len(batches), default_num_iterations=iterations)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Adaround.apply_adaround(copy.deepcopy(model), calib[:1], params, path=d, filename_prefix="mnv2",
                                    default_param_bw=bw, default_quant_scheme=QuantScheme.post_training_tf,
                                    default_config_file=str(cfg))
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--no-aimet", action="store_true")
    p.add_argument("--iterations", type=int, default=None, help="AdaRound iterations per layer (MobileNetV2)")
    p.add_argument("--samples", type=int, default=None, help="calibration samples for AdaRound (MobileNetV2)")
    p.add_argument("--skip", default="", help="comma-separated: mobilenet, fashion")
    p.add_argument("--seeds", type=int, default=1, help="pyquant AdaRound runs with seeds 0..N-1 (MobileNetV2)")
    p.add_argument("--reach-iterations", default="50,100,150,200",
                   help="comma-separated iterations per layer tried, fewest first, for the time to reach AIMET's KL "
                        "(empty: no such row)")
    p.add_argument("--name", default="adaround", help="results file name under bench/results (default adaround)")
    p.add_argument("--target-kl", type=float, default=None,
                   help="AIMET's KL from an earlier run at the same settings, when aimet_torch is not installed")
    a = p.parse_args(argv)
    if not require_native("bench/adaround.py"):
        return 2
    skip = {s for s in a.skip.split(",") if s}
    have_aimet = False
    if not a.no_aimet:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import aimet_torch.adaround.adaround_weight  # noqa: F401
            have_aimet = True
        except Exception as exc:
            log(f"AIMET not available ({type(exc).__name__}: {exc})")
    torch.set_grad_enabled(True)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    from pyquant._assets import AssetMissingError

    if "mobilenet" not in skip:
        try:
            from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
            from pyquant.models import mobilenet_v2
            model = mobilenet_v2().eval()
            pyquant.fold_batchnorms(model)
            n_samples = a.samples or (32 if a.quick else 128)
            calib = imagenet_calibration_set(max(n_samples, 64))
            evalx = imagenet_eval_set(n_per_image=4 if a.quick else 32)
        except AssetMissingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        iters = a.iterations or (50 if a.quick else 500)
        settings = f"{iters} it/layer, {n_samples} samples, batch 32"
        with torch.no_grad():
            ref = _predict(model, evalx)
        n_conf = top1_agreement(ref, ref)[1]
        near = _sim_logits(model, calib, evalx, 4)
        kl_near = mean_kl(ref, near)
        rows.append(dict(model="MobileNetV2", config="W4A8 per-channel", method="nearest rounding",
                         agreement_or_accuracy_pct=100 * top1_agreement(ref, near)[0], kl=kl_near, kl_vs_nearest=1.0))
        log(f"nearest: KL {kl_near:.4f}")

        kls, walls, rsss = [], [], []
        for seed in range(a.seeds):
            def pq_run(seed=seed):
                res = pyquant.adaround(model, calib[:1], calib[:n_samples], param_bw=4, iterations=iters,
                                       batch_size=32, progress=True, seed=seed)
                return res.model.state_dict(), res.encodings

            (sd, encs), wall_k, rss_k = _measured(pq_run)
            m = copy.deepcopy(model)
            m.load_state_dict(sd)
            out = _sim_logits(m, calib, evalx, 4, encs)
            kl_k = mean_kl(ref, out)
            kls.append(kl_k), walls.append(wall_k), rsss.append(rss_k)
            rows.append(dict(model="MobileNetV2", config="W4A8 per-channel",
                             method="pyquant AdaRound" + (f" (seed {seed})" if a.seeds > 1 else ""),
                             agreement_or_accuracy_pct=100 * top1_agreement(ref, out)[0], kl=kl_k,
                             kl_vs_nearest=kl_k / kl_near, wall_s=wall_k, peak_rss_mb=rss_k, settings=settings,
                             target="KL <= 1/3 of nearest", met=kl_k <= kl_near / 3))
            log(f"pyquant adaround (seed {seed}): KL {kl_k:.4f}, {wall_k:.0f} s, {rss_k:.0f} MB")
        kl, wall, rss = statistics.mean(kls), statistics.median(walls), max(rsss)

        def pq_kl(iterations: int) -> tuple[float, float]:
            """(KL, wall time) of pyquant AdaRound (seed 0) at `iterations` per layer, other settings as above."""
            def run():
                res = pyquant.adaround(model, calib[:1], calib[:n_samples], param_bw=4, iterations=iterations,
                                       batch_size=32, progress=True, seed=0)
                return res.model.state_dict(), res.encodings
            (sd_i, encs_i), wall_i, _ = _measured(run)
            m_i = copy.deepcopy(model)
            m_i.load_state_dict(sd_i)
            return mean_kl(ref, _sim_logits(m_i, calib, evalx, 4, encs_i)), wall_i

        kl_a = wall_a = None
        if have_aimet:
            am, wall_a, rss_a = _measured(lambda: aimet_adaround(model, calib, 4, iters, 32, n_samples).state_dict())
            m = copy.deepcopy(model)
            m.load_state_dict(am)
            # AIMET's rounded weights under pyquant's simulation (its encodings are re-derived by min-max on
            # the rounded weights, which lie on the same grid)
            out_a = _sim_logits(m, calib, evalx, 4)
            kl_a = mean_kl(ref, out_a)
            rows.append(dict(model="MobileNetV2", config="W4A8 per-channel", method="AIMET 2.42 AdaRound",
                             agreement_or_accuracy_pct=100 * top1_agreement(ref, out_a)[0], kl=kl_a,
                             kl_vs_nearest=kl_a / kl_near, wall_s=wall_a, peak_rss_mb=rss_a, settings=settings))
            rows.append(dict(model="MobileNetV2", config="W4A8 per-channel", method="pyquant vs AIMET",
                             kl=kl / kl_a, wall_s=wall_a / wall, peak_rss_mb=rss / rss_a,
                             settings="kl: ratio pyquant/AIMET (pyquant: mean over its seeds); wall: AIMET/pyquant "
                                      "(speedup; pyquant: median); rss: pyquant/AIMET (pyquant: max)",
                             target="speedup >= 5x, rss ratio <= 1, KL ratio <= 1",
                             met=wall_a / wall >= 5 and rss <= rss_a and kl <= kl_a))
            log(f"AIMET adaround: KL {kl_a:.4f}, {wall_a:.0f} s, {rss_a:.0f} MB")
        elif a.target_kl is not None:
            kl_a = a.target_kl
        reach = sorted(int(v) for v in a.reach_iterations.split(",") if v.strip())
        if kl_a is not None and reach:
            hit = None
            for it in reach:
                if it >= iters:
                    break
                kl_i, wall_i = pq_kl(it)
                log(f"pyquant adaround at {it} it/layer: KL {kl_i:.4f}, {wall_i:.0f} s (target KL {kl_a:.4f})")
                if kl_i <= kl_a:
                    hit = (it, kl_i, wall_i)
                    break
            if hit is None:  # no shorter run reached it: the full-settings run is the one that does (or not)
                hit = (iters, kl, wall)
            it, kl_i, wall_i = hit
            rows.append(dict(model="MobileNetV2", config="W4A8 per-channel", method="pyquant to reach AIMET's KL",
                             kl=kl_i, kl_vs_nearest=kl_i / kl_near, wall_s=wall_i,
                             settings=f"{it} it/layer, {n_samples} samples, batch 32; AIMET's KL {kl_a:.4f}"
                                      + ("" if wall_a is not None else " (--target-kl)")
                                      + (f"; speedup AIMET/pyquant {wall_a / wall_i:.1f}x" if wall_a else ""),
                             target="KL <= AIMET's", met=kl_i <= kl_a))
        notes.append(f"MobileNetV2: {len(evalx)} real-photo crops ({n_conf} FP32-confident for agreement); "
                     f"calibration {len(calib)} crops; AdaRound on the first {n_samples}")

    if "fashion" not in skip:
        try:
            from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
            from pyquant.models import fashion_cnn
            from pyquant.models.fashion_cnn import evaluate
            from pyquant.sim.quantsim import QuantSim
            fm = fashion_cnn()
            xtr, _ = fashion_mnist_tensors("train")
            xte, yte = fashion_mnist_tensors("test")
        except AssetMissingError as exc:
            notes.append(f"Fashion-MNIST skipped: {exc}")
        else:
            if a.quick:
                xte, yte = xte[:2000], yte[:2000]
            calib = xtr[:1024]
            fp = evaluate(fm, xte, yte)
            iters_f = 200 if a.quick else 2000
            for bw in (4, 3):
                folded = copy.deepcopy(fm)
                pyquant.fold_batchnorms(folded)
                sim = QuantSim(folded, calib[:1], param_bw=bw, output_bw=8, quant_scheme="min_max")
                sim.compute_encodings(lambda m: m(calib))
                acc_n = evaluate(sim.model, xte, yte)
                t0 = time.perf_counter()
                res = pyquant.adaround(fm, calib[:1], calib, param_bw=bw, iterations=iters_f, progress=False)
                wall = time.perf_counter() - t0
                sim = QuantSim(res.model, calib[:1], param_bw=bw, output_bw=8, quant_scheme="min_max")
                res.apply_to(sim)
                sim.compute_encodings(lambda m: m(calib))
                acc = evaluate(sim.model, xte, yte)
                rows.append(dict(model="Fashion-MNIST CNN", config=f"W{bw}A8", method="FP32",
                                 agreement_or_accuracy_pct=100 * fp))
                rows.append(dict(model="Fashion-MNIST CNN", config=f"W{bw}A8", method="nearest rounding",
                                 agreement_or_accuracy_pct=100 * acc_n))
                row = dict(model="Fashion-MNIST CNN", config=f"W{bw}A8", method="pyquant AdaRound",
                           agreement_or_accuracy_pct=100 * acc, wall_s=wall,
                           settings=f"{iters_f} it/layer, 1024 samples")
                if bw == 4:
                    row.update(target="within 1 pt of FP32", met=acc >= fp - 0.01)
                rows.append(row)
                log(f"fashion W{bw}A8: fp32 {fp:.4f} nearest {acc_n:.4f} adaround {acc:.4f} ({wall:.0f} s)")
            notes.append(f"Fashion-MNIST: {len(xte)} test images, accuracy in %")
    notes.append(f"{versions()}; peak RSS: the process's high-water mark during each run, reset "
                 "before it (it includes the model, data and evaluation set already in memory)")
    return publish(a.name, a, rows, COLUMNS, title="AdaRound: quality and speed", notes=notes)


if __name__ == "__main__":
    sys.exit(main())
