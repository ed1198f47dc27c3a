"""Analysis and the report: where quantization hurts a model, as data and as one offline HTML page.

    python examples/analysis_report.py [--quick] [--out DIR]

`pyquant.analysis.analyze` measures, on one calibrated W8A8 simulation: per-channel weight ranges before
and after CLE, every layer's output SQNR with weights-only and with activations-only simulation, the
activation histograms with their encoding ranges, and per-layer sensitivity (the metric with one layer
quantized alone, and with one layer left in FP32 alone, ranked). `pyquant.viz.write_report` draws it (needs
matplotlib). Prints the five most sensitive layers, the weights-only/activations-only verdict, and the
paths of `analysis.json` and `report.html`.
"""
from __future__ import annotations

from pathlib import Path

from pyquant.analysis import analyze, load_json, save_json

from common import image_model, parse_args


def main() -> None:
    args = parse_args(__doc__)
    name, model, calib, evalx = image_model(args.quick)
    if args.quick:
        evalx = evalx[:4]                      # the sensitivity sweep evaluates the model twice per layer
    result = analyze(model, calib[:1], evalx, metric="sqnr", calib_data=calib,
                     layer_samples=4 if args.quick else 32, param_bw=8, output_bw=8)

    sens = result["sensitivity"]
    print(f"{name}: whole model quantized: {sens['quantized']:.2f} {sens['unit']} ({sens['metric']})")
    for rank, layer in enumerate(sens["ranking"][:5], 1):
        row = next(r for r in sens["layers"] if r["layer"] == layer)
        print(f"sensitive #{rank}: {layer} ({row['op_type']}): alone quantized {row['enabled_alone']:.2f}, "
              f"alone FP32 {row['disabled_alone']:.2f}")
    points = result["layer_sqnr"]["points"]       # None where a side has no quantizer at that output
    worst_w = min((p for p in points if p["weights_only_db"] is not None), key=lambda p: p["weights_only_db"])
    worst_a = min((p for p in points if p["activations_only_db"] is not None),
                  key=lambda p: p["activations_only_db"])
    side = "weights" if worst_w["weights_only_db"] < worst_a["activations_only_db"] else "activations"
    print(f"lowest weights-only SQNR {worst_w['weights_only_db']:.1f} dB at {worst_w['name']}; lowest "
          f"activations-only {worst_a['activations_only_db']:.1f} dB at {worst_a['name']}: look at the {side} first")

    out = Path(args.out) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    save_json(result, out / "analysis.json")
    assert load_json(out / "analysis.json")["schema"] == result["schema"]
    try:
        from pyquant.viz import write_report
    except ImportError as exc:
        print(f"note: no report ({exc}); pip install matplotlib")
        return
    page = write_report(result, out / "report.html", png_dir=out / "figures")
    print(f"data: {out / 'analysis.json'}")
    print(f"report: {page}")


if __name__ == "__main__":
    main()
