"""AutoQuant's reports: a JSON file for programs and one self-contained HTML page for people (styles
inline, the chart an SVG image in a base64 data URI: it opens offline, from anywhere, as one file)."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .._io import atomic_write_text

__all__ = ["write_reports", "accuracy_chart_svg"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:72em;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#e8f5e9;font-weight:600}tr.skipped td,tr.failed td{color:#888}
.verdict{padding:.6em 1em;border-radius:4px;margin:.8em 0}
.ok{background:#e8f5e9;border:1px solid #81c784}.bad{background:#fff3e0;border:1px solid #ffb74d}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
.small{font-size:.85em;color:#555}
"""


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def accuracy_chart_svg(steps: Sequence[Mapping[str, Any]], fp32: float, target: float) -> str:
    """A horizontal bar per evaluated step (full simulations in blue, single-side diagnostics in grey),
    with the FP32 accuracy and the target as vertical lines."""
    rows = [s for s in steps if s.get("accuracy") is not None]
    bar_h, gap, left, width, right = 18, 6, 230, 420, 70
    height = 30 + len(rows) * (bar_h + gap) + 20
    vals = [float(s["accuracy"]) for s in rows] + [fp32, target]
    lo = min(vals)
    hi = max(vals)
    # zoom on the interesting range but keep a little room under the lowest bar
    lo = max(0.0, lo - 0.05 * max(hi - lo, 1e-6)) if lo >= 0 else lo - 0.05 * (hi - lo)
    span = max(hi - lo, 1e-9)
    x = lambda v: left + (v - lo) / span * width
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + right}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{left}" y="14" fill="#555">accuracy (axis from {lo:.4g} to {hi:.4g})</text>']
    for i, s in enumerate(rows):
        y = 24 + i * (bar_h + gap)
        a = float(s["accuracy"])
        colour = "#2e7d32" if s.get("best") else ("#1976d2" if s.get("kind") == "full" else "#9e9e9e")
        if s.get("kind") == "fp32":
            colour = "#424242"
        out.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(str(s["key"]))}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{max(x(a) - left, 1):.1f}" height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{x(a) + 4:.1f}" y="{y + 13}">{a:.4f}</text>')
    y1 = 24 + len(rows) * (bar_h + gap)
    for v, colour, label in ((fp32, "#424242", "FP32"), (target, "#e65100", "target")):
        out.append(f'<line x1="{x(v):.1f}" y1="20" x2="{x(v):.1f}" y2="{y1}" stroke="{colour}" '
                   f'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x(v):.1f}" y="{y1 + 14}" fill="{colour}" text-anchor="middle">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _data_uri_svg(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _options(d: Mapping[str, Any]) -> str:
    if not d:
        return ""
    return "; ".join(f"{html.escape(str(k))}: {html.escape(json.dumps(v, default=str))}" for k, v in d.items())


def _html(p: Mapping[str, Any]) -> str:
    e = html.escape
    s = p["summary"]
    steps = p["steps"]
    ok = s["target_met"]
    verdict = (f'<div class="verdict {"ok" if ok else "bad"}"><b>Target {"met" if ok else "not met"}.</b> '
               f'{e(s["best_title"])} reaches {_fmt(s["accuracy"])} against FP32 {_fmt(s["fp32_accuracy"])} '
               f'(drop {_fmt(s["accuracy_drop"])}; allowed {_fmt(s["allowed_accuracy_drop"])}).'
               + (" <b>The time budget stopped the search early</b>: this is the best result found before it ran "
                  f"out ({e(s.get('stopped_before') or '')} and later steps were not tried)."
                  if s["budget_exhausted"] else "") + "</div>")
    facts = [("model", s.get("model_name")), ("weights / activations", f"{s['param_bw']}-bit / {s['output_bw']}-bit"),
             ("hardware config", s.get("config")), ("calibration schemes chosen",
                                                     f"weights {s['weight_scheme']}, activations {s['activation_scheme']}"),
             ("applied", ", ".join(s["applied"])), ("encodings file", s.get("encodings_path")),
             ("total time", f"{s['seconds']:.1f} s" + (f" ({s['cached_steps']} steps from the cache)"
                                                       if s.get("cached_steps") else ""))]
    if s.get("side_costs"):
        sc = s["side_costs"]
        facts.append(("which side costs accuracy",
                      f"weights alone: drop {_fmt(sc.get('weights'))}, activations alone: drop "
                      f"{_fmt(sc.get('activations'))}"))
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts if v is not None)
    chart = accuracy_chart_svg(steps, s["fp32_accuracy"], s["fp32_accuracy"] - s["allowed_accuracy_drop"])
    rows = []
    for st in steps:
        cls = "best" if st.get("best") else st["status"] if st["status"] != "evaluated" else ""
        drop = None if st.get("accuracy") is None else s["fp32_accuracy"] - st["accuracy"]
        note = st.get("reason") or ("kept: best so far" if st.get("improved") else "")
        if st.get("cached"):
            note = (note + "; " if note else "") + "from the cache"
        rows.append(f'<tr class="{cls}"><td>{e(st["key"])}</td><td>{e(st["title"])}</td><td>{e(st["status"])}</td>'
                    f'<td class="num">{_fmt(st.get("accuracy"))}</td><td class="num">{_fmt(drop)}</td>'
                    f'<td class="num">{st.get("seconds", 0.0):.1f}</td><td>{_options(st.get("options") or {})}</td>'
                    f'<td>{e(note)}</td></tr>')
    q_rows = "".join(
        f"<tr><td>{e(q['name'])}</td><td>{e(q['kind'])}</td><td class='num'>{q['bitwidth']}</td>"
        f"<td>{'sym' if q['symmetric'] else 'asym'}</td><td>{e(q['granularity'])}</td>"
        f"<td class='num'>{e(q['scale'])}</td><td class='num'>{e(q['offset'])}</td></tr>"
        for q in p.get("quantizers", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>AutoQuant report: {e(str(s.get('model_name')))}</title>
<style>{_CSS}</style></head><body>
<h1>AutoQuant report</h1>
<div class="small">pyquant {e(str(s.get('pyquant_version')))}, written {e(str(s.get('written')))}</div>
{verdict}
<table>{fact_rows}</table>
<h2>Accuracy per step</h2>
<img alt="accuracy of each evaluated step" src="{_data_uri_svg(chart)}">
<h2>Steps</h2>
<table><tr><th>step</th><th>what</th><th>status</th><th>accuracy</th><th>drop vs FP32</th><th>seconds</th>
<th>options</th><th>notes</th></tr>
{''.join(rows)}</table>
<p class="small">Full simulations quantize weights and activations and are the candidates for the result;
"weights only" and "activations only" rows quantize one side, to show which side costs accuracy and to
pick each side's calibration scheme. A technique is kept only when its simulation beats the best one so
far; the highlighted row is the result.</p>
<h2>Final encodings ({len(p.get('quantizers', []))} quantizers)</h2>
<details><summary>show every quantizer</summary>
<table><tr><th>name</th><th>kind</th><th>bits</th><th>symmetry</th><th>granularity</th><th>scale</th>
<th>offset</th></tr>{q_rows}</table></details>
<p class="small">The encodings file (<code>{e(str(s.get('encodings_path')))}</code>) holds every value, in
AIMET's 1.0.0 format.</p>
</body></html>
"""


def write_reports(out_dir: Path, prefix: str, payload: Mapping[str, Any]) -> tuple[Path, Path]:
    """Writes `<prefix>_report.json` and `<prefix>_report.html` atomically; returns (json, html)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, hp = out_dir / f"{prefix}_report.json", out_dir / f"{prefix}_report.html"
    atomic_write_text(jp, json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")
    atomic_write_text(hp, _html(payload))
    return jp, hp
