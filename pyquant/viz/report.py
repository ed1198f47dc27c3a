"""One self-contained HTML page of a pyquant.analysis result: figures as inline base64 PNGs, styles
inline, no scripts and nothing fetched from the network, so it opens anywhere (also as an e-mail
attachment or a CI artifact) and reads without Python."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Optional, Union

from .._io import atomic_write_text
from . import plots

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#1f3b5a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
main{max-width:1000px;margin:0 auto;padding:16px 24px 40px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:16px 0;padding:14px 18px}
h2{font-size:17px;margin:0 0 8px}p.note{font-size:13px;color:#555;margin:4px 0 10px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{flex:1 1 200px;background:#fff;border:1px solid #dde1e6;
border-radius:6px;padding:10px 14px}.card b{display:block;font-size:20px;margin-top:4px}.card span{font-size:12px;color:#555}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;font-size:12.5px;width:100%}th,td{border-bottom:1px solid #e5e7ea;padding:3px 8px;
text-align:left}th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
footer{font-size:12px;color:#777;text-align:center;padding:12px}
"""


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and fmt == ".3g" and 1000 <= abs(v) < 1e7:
        return f"{v:.0f}"  # 2207, not 2.21e+03
    return format(v, fmt) if isinstance(v, (int, float)) else html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    for r in rows:
        tds = "".join(f'<td class="num">{_num(v)}</td>' if i in numeric else f"<td>{html.escape(str(v))}</td>"
                      for i, v in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figures(analysis: dict[str, Any]) -> dict[str, bytes]:
    """Every plot of the analysis as PNG bytes, by file stem (what write_report embeds)."""
    out: dict[str, bytes] = {}
    if "sensitivity" in analysis:
        out["sensitivity"] = plots.sensitivity(analysis["sensitivity"])
    if "layer_sqnr" in analysis and analysis["layer_sqnr"]["points"]:
        out["layer_sqnr"] = plots.layer_sqnr(analysis["layer_sqnr"])
    if "weight_ranges" in analysis and analysis["weight_ranges"]["before"]:
        out["weight_spread"] = plots.weight_spread(analysis["weight_ranges"])
        out["channel_ranges"] = plots.channel_ranges(analysis["weight_ranges"])
    if analysis.get("histograms"):
        out["histograms"] = plots.histograms(analysis["histograms"])
    if analysis.get("mixed_precision") and analysis["mixed_precision"]["points"]:
        out["pareto"] = plots.pareto(analysis["mixed_precision"])
    return out


def render_html(analysis: dict[str, Any], title: Optional[str] = None,
                figs: Optional[dict[str, bytes]] = None) -> str:
    """The report page as a string: a header, then one section per part of the analysis present."""
    figs = figures(analysis) if figs is None else figs
    title = title or f"pyquant analysis: {analysis.get('model', 'model')}"
    body = "".join((
        _header(analysis, title),
        "<main>",
        _cards(analysis),
        _sensitivity_section(analysis, figs),
        _layer_error_section(analysis, figs),
        _weight_ranges_section(analysis, figs),
        _histograms_section(analysis, figs),
        _mixed_precision_section(analysis, figs),
        "</main>",
        _footer(analysis),
    ))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>{body}</body></html>\n")


def _figure(figs: dict[str, bytes], key: str, alt: str) -> str:
    """The figure as an inline image, or nothing when it was not drawn."""
    return _img(figs[key], alt) if key in figs else ""


def _section(heading: str, note_html: str, content: str) -> str:
    return f'<section><h2>{heading}</h2><p class="note">{note_html}</p>{content}</section>'


def _header(analysis: dict[str, Any], title: str) -> str:
    """Title and the simulation's settings in one line."""
    sim = analysis.get("simulation", {})
    cfg = (f"W{sim.get('param_bw')}A{sim.get('output_bw')}, {sim.get('quant_scheme')} "
           f"(weights {sim.get('param_quant_scheme')}), config {sim.get('config')}, "
           f"batch norms {'folded' if sim.get('bn_folded') else 'kept'}, {sim.get('quantizers')} quantizers")
    return f"<header><h1>{html.escape(title)}</h1><p>{html.escape(cfg)}</p></header>"


def _cards(analysis: dict[str, Any]) -> str:
    """The headline numbers: the quantized model's metric, its most sensitive layers and the weight
    range spread before and after CLE (each when the analysis has it)."""
    cards = []
    sens = analysis.get("sensitivity")
    if sens:
        unit = f" {sens['unit']}" if sens.get("unit") else ""
        cards.append(("whole model quantized", f"{_num(sens['quantized'])}{unit}", f"{sens['metric']} "
                      f"({'higher' if sens['higher_is_better'] else 'lower'} is better)"))
        cards.append(("most sensitive layers", ", ".join(sens["ranking"][:3]), "keep these at higher precision first"))
    wr = analysis.get("weight_ranges")
    if wr:
        s = wr["summary"]
        cards.append(("max channel-range spread", f"{_num(s['max_spread_before'])} → {_num(s['max_spread_after'])}",
                      f"before → after CLE ({s['pairs_equalized']} layer pairs equalized)"))
    if not cards:
        return ""
    return '<div class="cards">' + "".join(
        f'<div class="card"><span>{html.escape(a)}</span><b>{html.escape(b)}</b><span>{html.escape(c)}</span></div>'
        for a, b, c in cards) + "</div>"


def _sensitivity_section(analysis: dict[str, Any], figs: dict[str, bytes]) -> str:
    """Per-layer sensitivity: the sweep's figure and its ten most sensitive layers."""
    sens = analysis.get("sensitivity")
    if not sens:
        return ""
    note = (f"The model's {html.escape(sens['metric'])} with one layer's quantizers enabled "
            f"and everything else in FP32 (left), and with one layer left in FP32 and everything else "
            f"quantized (right); {sens['evaluations']} evaluations on {sens.get('samples') or 'the'} samples "
            f"in {sens['seconds']:.1f} s, encodings computed once.")
    rows = {r["layer"]: r for r in sens["layers"]}
    table = _table(["rank", "layer", "op", "only this layer quantized", "only this layer FP32"],
                   [[rows[n]["rank"], n, rows[n]["op_type"], rows[n]["enabled_alone"],
                     rows[n]["disabled_alone"]] for n in sens["ranking"][:10]], {0, 3, 4})
    return _section("Per-layer sensitivity", note, _figure(figs, "sensitivity", "per-layer sensitivity") + table)


def _layer_error_section(analysis: dict[str, Any], figs: dict[str, bytes]) -> str:
    """Per-layer quantization error (SQNR), the ten layers with the lowest activations-only SQNR."""
    sq = analysis.get("layer_sqnr")
    if not (sq and sq["points"]):
        return ""
    note = (f"SQNR of each layer's output (as the next layer sees it) against FP32, with "
            f"only the weights or only the activations simulated; errors accumulate along the model. "
            f"{sq['samples']} samples. Lowest activations-only SQNR first.")
    worst = sorted(sq["points"], key=lambda p: p["activations_only_db"] if p["activations_only_db"] is not None
                   else float("inf"))[:10]
    table = _table(["output", "layer", "op", "weights only (dB)", "activations only (dB)"],
                   [[p["name"], p["layer"], p["op_type"], p["weights_only_db"], p["activations_only_db"]]
                    for p in worst], {3, 4})
    return _section("Per-layer quantization error", note, _figure(figs, "layer_sqnr", "per-layer SQNR") + table)


def _weight_ranges_section(analysis: dict[str, Any], figs: dict[str, bytes]) -> str:
    """Per-channel weight ranges before and after cross-layer equalization."""
    wr = analysis.get("weight_ranges")
    if not wr:
        return ""
    s = wr["summary"]
    note = (f"Spread: largest over smallest per-output-channel max |w| of a layer; per-tensor weight "
            f"quantization loses the small channels when it is large. {s['layers']} layers, "
            f"{s['pairs_equalized']} pairs equalized")
    if wr.get("relu6_replaced"):
        note += (f"; {wr['relu6_replaced']} ReLU6 replaced by ReLU for CLE (outputs moved by "
                 f"{_num(wr.get('relu6_output_change'))} relative)")
    images = (_figure(figs, "weight_spread", "channel-range spread per layer")
              + _figure(figs, "channel_ranges", "per-channel ranges"))
    table = _table(["", "before CLE", "after CLE"], [
        ["max spread", s["max_spread_before"], s["max_spread_after"]],
        ["layer with the max spread", s["max_spread_before_layer"], s["max_spread_after_layer"]],
        ["median spread, all layers", s["median_spread_before"], s["median_spread_after"]],
        ["median spread, equalized layers", s["median_spread_before_equalized_layers"],
         s["median_spread_after_equalized_layers"]]], {1, 2})
    return _section("Weight ranges before and after cross-layer equalization", f"{html.escape(note)}.",
                    images + table)


def _histograms_section(analysis: dict[str, Any], figs: dict[str, bytes]) -> str:
    """Activation histograms with their encodings' ranges, the twelve most clipped quantizers."""
    hs = analysis.get("histograms")
    if not hs:
        return ""
    note = ("FP32 activations at each activation quantizer, with the range its encoding "
            "represents; values outside are clipped. The most clipped first.")
    top = sorted(hs, key=lambda n: -(hs[n]["clipped_fraction"] or 0.0))[:12]
    table = _table(["quantizer", "data min", "data max", "encoding min", "encoding max", "clipped %"],
                   [[n, hs[n]["data_min"], hs[n]["data_max"], hs[n]["encoding_min"], hs[n]["encoding_max"],
                     100 * (hs[n]["clipped_fraction"] or 0.0)] for n in top], {1, 2, 3, 4, 5})
    return _section("Activation histograms", note, _figure(figs, "histograms", "activation histograms") + table)


def _mixed_precision_section(analysis: dict[str, Any], figs: dict[str, bytes]) -> str:
    """A mixed-precision search: accuracy against cost of every evaluated mix, the Pareto front as a table
    (cheapest first, the candidates' counts), and the chosen mix per layer."""
    mp = analysis.get("mixed_precision")
    if not mp:
        return ""
    met = "met" if mp["target_met"] else f"not met ({_num(mp['shortfall'], '.4g')} short)"
    note = (f"Each layer's weight and activation bit widths chosen from the candidates: the cheapest mix whose "
            f"{html.escape(str(mp['metric']))} stays at or above the target {_num(mp['target'], '.4g')} (FP32 "
            f"{_num(mp['fp32_accuracy'], '.4g')}): {met}; the chosen mix costs {100 * mp['relative_cost']:.1f}% of "
            f"the starting mix ({html.escape(mp['cost_model'])}). {mp['evaluations']} evaluations"
            f"{' (staged)' if mp['staged'] else ''} in {mp['seconds']:.1f} s"
            f"{'' if mp['complete'] else ', stopped by the time budget'}.")
    rows = []
    for p in mp["pareto"]:
        counts: dict[str, int] = {}
        for c in p["mix"].values():
            counts[c] = counts.get(c, 0) + 1
        rows.append([100 * p["relative_cost"], p["cost"], p["accuracy"], "yes" if p["accuracy"] >= mp["target"] else "no",
                     ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))])
    front = _table(["cost %", "cost", "accuracy", "meets target", "candidates"], rows, {0, 1, 2})
    chosen = _table(["layer", "candidate", "allowed"],
                    [[g["name"], mp["mix"][g["name"]], ", ".join(g["allowed"])] for g in mp["groups"]])
    return _section("Mixed precision", note, _figure(figs, "pareto", "accuracy against cost") + front
                    + "<h2>Chosen mix</h2>" + chosen)


def _footer(analysis: dict[str, Any]) -> str:
    """Version, analysis time, and what the page does not do."""
    from .._version import __version__
    t = analysis.get("timings", {})
    return (f"<footer>pyquant {html.escape(__version__)} · analysis in {_num(t.get('total'), '.1f')} s · "
            f"self-contained page: no scripts, no network</footer>")


def write_report(analysis: dict[str, Any], path: Union[str, os.PathLike], *, title: Optional[str] = None,
                 png_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Writes the report page to `path` (atomically) and, with `png_dir`, each figure as a PNG file
    there too. Returns the page's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figs = figures(analysis)
    if png_dir is not None:
        d = Path(png_dir)
        d.mkdir(parents=True, exist_ok=True)
        for name, png in figs.items():
            plots.save_png(png, d / f"{name}.png")
    atomic_write_text(path, render_html(analysis, title, figs))
    return path
