"""The analysis and its report on MobileNetV2 (ImageNet weights, BN folded, W8A8 per-channel
TF-enhanced): per-layer sensitivity over 128 real-photo crops (every layer quantized alone and left in
FP32 alone, output SQNR against FP32), per-layer SQNR, activation histograms and weight ranges before
and after CLE, timed; then the HTML report, and a screenshot of it in headless Chromium when installed.

    python -m bench.analysis             # bench/results/analysis.{json,md}, analysis_mobilenet_v2.html,
                                         # docs/report.png (screenshot)
    python -m bench.analysis --quick     # 32 evaluation crops, results under *_quick
    python -m bench.analysis --threads 1 # one torch thread (a busy shared machine)

Model and data run channels-last (about 2x faster than NCHW for MobileNetV2's depthwise layers on
the CPU; the values are the same)."""
from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from bench._harness import RESULTS, report, require_native, write_results

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["step", "seconds", "detail", "target", "met"]
TARGET_S = 180.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def screenshot(page: Path, out: Path, width: int = 1100, height: int = 1500, shrink_to: int = 820) -> bool:
    """A PNG of the page's top in headless Chromium, shrunk to `shrink_to` pixels wide (False without
    Chromium)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        log("no chromium: apt-get install chromium for the report screenshot")
        return False
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "shot.png"
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={d}/profile", f"--window-size={width},{height}",
                        f"--screenshot={raw}", page.resolve().as_uri()], capture_output=True, timeout=120)
        if not raw.exists():
            return False
        from PIL import Image  # matplotlib's own dependency
        img = Image.open(raw).convert("RGB")
        img = img.resize((shrink_to, round(img.height * shrink_to / img.width)), Image.LANCZOS)
        out.parent.mkdir(parents=True, exist_ok=True)
        img.quantize(colors=128).save(out, optimize=True)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 evaluation crops")
    p.add_argument("--eval", type=int, default=128, help="evaluation crops (default 128)")
    p.add_argument("--calib", type=int, default=64, help="calibration crops (default 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice). On a machine shared with other jobs one thread "
                        "can beat two: OpenMP's barriers wait for a descheduled thread")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--screenshot", default=str(ROOT / "docs" / "report.png"),
                   help="where the report screenshot goes (default docs/report.png; '' for none)")
    a = p.parse_args(argv)
    if not require_native("bench/analysis.py"):
        return 2
    from pyquant._assets import AssetMissingError
    from pyquant.analysis import analyze, save_json
    from pyquant.datasets import imagenet_calibration_set, imagenet_eval_set
    from pyquant.datasets.images import PHOTOS
    from pyquant.models import mobilenet_v2
    from pyquant.sim.quantsim import QuantSim
    from pyquant.techniques import fold_batchnorms
    from pyquant.viz import write_report

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    n_eval = 32 if a.quick else a.eval
    cl = torch.channels_last
    try:
        base = mobilenet_v2().eval()
        calib = imagenet_calibration_set(a.calib).contiguous(memory_format=cl)
        evalx = imagenet_eval_set(n_per_image=math.ceil(n_eval / len(PHOTOS)))
    except AssetMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # an even share of every photo, then the first n_eval
    per = math.ceil(n_eval / len(PHOTOS))
    idx = [i * per + j for j in range(per) for i in range(len(PHOTOS))][:n_eval]
    evalx = evalx[sorted(idx)].contiguous(memory_format=cl)
    dummy = calib[:1]
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    model = _copy(base)
    fold_batchnorms(model)
    model = model.to(memory_format=cl)
    sim = QuantSim(model, dummy, quant_scheme="tf_enhanced", param_bw=8, output_bw=8, config="default")
    sim.compute_encodings([calib[i:i + 32] for i in range(0, len(calib), 32)], progress=True)
    t_calib = time.perf_counter() - t0
    log(f"QuantSim + calibration on {len(calib)} crops: {t_calib:.1f} s")

    t0 = time.perf_counter()
    res = analyze(base, dummy, evalx, "sqnr", sim=sim, batch_size=32, layer_samples=32, progress=True)
    t_total = time.perf_counter() - t0
    res["timings"]["calibration"] = round(t_calib, 3)
    sens, wr, sq = res["sensitivity"], res["weight_ranges"], res["layer_sqnr"]
    name = "analysis" + ("_quick" if a.quick else "")
    out_dir = Path(a.out) if a.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    page = write_report(res, out_dir / f"{name}_mobilenet_v2.html",
                        title="pyquant analysis: MobileNetV2 (ImageNet weights, W8A8 per-channel)")
    t_report = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:  # the full data (~MBs) is not kept in the repository
        save_json(res, Path(d) / "a.json")
        json_mb = (Path(d) / "a.json").stat().st_size / 1e6
    shot = Path(a.screenshot) if a.screenshot and not a.quick else None
    shot_ok = screenshot(page, shot) if shot is not None else False

    rows = [
        dict(step="QuantSim + calibration (once)", seconds=t_calib, detail=f"{len(calib)} crops"),
        dict(step="weight ranges before/after CLE", seconds=res["timings"]["weight_ranges"],
             detail=f"{wr['summary']['layers']} layers, {wr['summary']['pairs_equalized']} pairs"),
        dict(step="per-layer SQNR (weights-only, activations-only)", seconds=res["timings"]["layer_sqnr"],
             detail=f"{len(sq['points'])} outputs, {sq['samples']} crops"),
        dict(step="activation histograms", seconds=res["timings"]["histograms"],
             detail=f"{len(res['histograms'])} quantizers"),
        dict(step="sensitivity sweep", seconds=sens["seconds"],
             detail=f"{len(sens['layers'])} layers x 2 modes, {sens['evaluations']} evaluations of {sens['samples']} "
                    f"crops, staged={sens['staged']}; process CPU time {sens['cpu_seconds']:.0f} s over "
                    f"{torch.get_num_threads()} thread(s); load average at the end {os.getloadavg()[0]:.1f} on "
                    f"{os.cpu_count()} CPUs",
             target=f"< {TARGET_S:.0f} s" if not a.quick else None,
             met=(sens["seconds"] < TARGET_S) if not a.quick else None),
        dict(step="analysis total (after calibration)", seconds=t_total, detail=""),
        dict(step="HTML report (5 figures)", seconds=t_report, detail=f"{page.stat().st_size / 1e3:.0f} kB"),
        dict(step="peak resident memory of the process (GB)",
             seconds=None, detail=f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f}"),
    ]
    by = {r["layer"]: r for r in sens["layers"]}
    for n in sens["ranking"][:10]:
        r = by[n]
        rows.append(dict(step=f"sensitive #{r['rank']}: {n} ({r['op_type']})",
                         detail=f"alone quantized {r['enabled_alone']} dB; alone FP32 {r['disabled_alone']} dB"))
    s = wr["summary"]
    notes = [
        f"{len(evalx)} real-photo evaluation crops, {len(calib)} calibration crops; whole model W8A8 quantized: "
        f"output SQNR {sens['quantized']} dB against FP32",
        f"channel-range spread (max over min per-channel max|w|): largest {s['max_spread_before']} "
        f"({s['max_spread_before_layer']}) before CLE, {s['max_spread_after']} ({s['max_spread_after_layer']}) after; "
        f"median over equalized layers {s['median_spread_before_equalized_layers']} -> "
        f"{s['median_spread_after_equalized_layers']}; CLE replaced {wr['relu6_replaced']} ReLU6 by ReLU",
        f"report: {page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}"
        + (f", screenshot {shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}" if shot_ok else "")
        + f"; the analysis data as JSON is {json_mb:.1f} MB",
        "model and data channels-last; sensitivity metric: SQNR of the logits against FP32 (dB, higher is better)",
    ]
    path = write_results(name, rows, COLUMNS, title="Analysis and report on MobileNetV2 (W8A8, 128 real-photo crops)",
                         notes=notes, out_dir=out_dir)
    return report(path, rows)


def _copy(m):
    import copy
    return copy.deepcopy(m)


if __name__ == "__main__":
    sys.exit(main())
