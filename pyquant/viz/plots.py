"""Plots of a pyquant.analysis result, each returned as PNG bytes (save with save_png). They only read
the analysis data, so a saved JSON can be drawn again later without the model."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

from .._io import atomic_path
from ._mpl import figure, png_bytes

_BEFORE, _AFTER = "#c0504d", "#4f81bd"
_W, _A = "#4f81bd", "#e08e0b"


def save_png(png: bytes, path: Union[str, os.PathLike]) -> None:
    """Writes PNG bytes atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def weight_spread(cle: dict[str, Any]) -> bytes:
    """Channel-range spread (largest over smallest per-channel max |w|) of every layer, before and
    after CLE, on a log scale."""
    before, after = cle["before"], cle["after"]
    names = [n for n in before if before[n]["spread"] is not None]
    fig = figure(9, 3.4)
    ax = fig.add_subplot()
    x = range(len(names))
    ax.semilogy(x, [before[n]["spread"] for n in names], "o-", ms=3, lw=1, color=_BEFORE, label="before CLE (BN folded)")
    ax.semilogy(x, [after[n]["spread"] if n in after and after[n]["spread"] else math.nan for n in names], "o-", ms=3,
                lw=1, color=_AFTER, label="after CLE")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("channel-range spread")
    ax.set_title("Per-channel weight range spread per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return png_bytes(fig)


def channel_ranges(cle: dict[str, Any], layer: Optional[str] = None) -> bytes:
    """Per-output-channel min/max/mean of one layer's weights before and after CLE (default: the
    layer with the largest spread before CLE)."""
    before, after = cle["before"], cle["after"]
    if layer is None:
        layer = cle["summary"].get("max_spread_before_layer") or next(iter(before))
    if layer not in before:
        raise KeyError(f"no layer {layer!r} in the weight ranges; layers: {list(before)[:6]} ...")
    fig = figure(9, 3.4)
    axes = fig.subplots(1, 2, sharey=False)
    for ax, table, title, color in ((axes[0], before, "before CLE", _BEFORE), (axes[1], after, "after CLE", _AFTER)):
        d = table.get(layer)
        if d is None:
            ax.set_visible(False)
            continue
        c = range(d["channels"])
        ax.vlines(c, d["min"], d["max"], color=color, lw=1.2)
        ax.plot(c, d["mean"], ".", ms=2, color="black")
        ax.set_title(f"{_short(layer, 36)}: {title} (spread {d['spread']:.4g})" if d["spread"] else title, fontsize=9)
        ax.set_xlabel("output channel")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("weight min..max (dot: mean)")
    return png_bytes(fig)


def layer_sqnr(sqnr: dict[str, Any]) -> bytes:
    """SQNR of each layer's output vs FP32, weights-only and activations-only simulation."""
    pts = sqnr["points"]
    fig = figure(9, 3.4)
    ax = fig.add_subplot()
    x = range(len(pts))
    top = max([v for p in pts for v in (p["weights_only_db"], p["activations_only_db"]) if v is not None] or [60])
    val = lambda v: v if v is not None else top  # None: no error at all, drawn at the top
    ax.plot(x, [val(p["weights_only_db"]) for p in pts], "o-", ms=3, lw=1, color=_W, label="weights only")
    ax.plot(x, [val(p["activations_only_db"]) for p in pts], "s-", ms=3, lw=1, color=_A, label="activations only")
    ax.set_xlabel("quantized layer output (execution order)")
    ax.set_ylabel("SQNR vs FP32 (dB)")
    ax.set_title(f"Per-layer quantization error ({sqnr['samples']} samples; higher is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return png_bytes(fig)


def sensitivity(sens: dict[str, Any], top: int = 25) -> bytes:
    """The `top` most sensitive layers: metric with the layer quantized alone and left in FP32 alone."""
    rank = {r["layer"]: r for r in sens["layers"]}
    names = sens["ranking"][:top]
    unit = f" ({sens['unit']})" if sens.get("unit") else ""
    fig = figure(9, max(2.6, 0.22 * len(names) + 1.2))
    axes = fig.subplots(1, 2, sharey=True)
    y = range(len(names))
    for ax, key, title, color in ((axes[0], "enabled_alone", "only this layer quantized", _W),
                                  (axes[1], "disabled_alone", "only this layer in FP32", _A)):
        vals = [rank[n][key] for n in names]
        if all(v is None for v in vals):
            ax.set_visible(False)
            continue
        ax.barh(y, [v if v is not None else 0 for v in vals], color=color)
        ref = sens.get("quantized") if key == "disabled_alone" else None
        if ref is not None:
            ax.axvline(ref, color="black", lw=1, ls="--", label="all quantized")
            ax.legend(loc="lower right", fontsize=7)
        lo = min(v for v in vals if v is not None)
        hi = max(v for v in vals if v is not None)
        pad = (hi - lo) * 0.15 + 1e-9
        ax.set_xlim(lo - pad if sens.get("higher_is_better", True) else 0, hi + pad)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{sens['metric']}{unit}")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(list(y), [_short(n) for n in names], fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(f"Per-layer sensitivity, most sensitive first ({sens['metric']}, "
                 f"{'higher' if sens['higher_is_better'] else 'lower'} is better)", fontsize=10)
    return png_bytes(fig)


def histograms(hists: dict[str, Any], names: Optional[list[str]] = None, cols: int = 3) -> bytes:
    """Activation histograms (log counts) of `names` (default: the 9 with the most clipping) with the
    encoding's range shaded."""
    if names is None:
        names = sorted(hists, key=lambda n: -(hists[n]["clipped_fraction"] or 0.0))[:9]
    names = [n for n in names if n in hists]
    if not names:
        raise ValueError("no histograms to draw")
    rows = math.ceil(len(names) / cols)
    fig = figure(9, 2.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
            continue
        h = hists[names[i]]
        e = h["edges"]
        ax.stairs(h["counts"], e, fill=True, color="#7f7f7f")
        ax.set_yscale("log")
        ax.axvspan(h["encoding_min"], h["encoding_max"], color=_W, alpha=0.18)
        for v in (h["encoding_min"], h["encoding_max"]):
            ax.axvline(v, color=_W, lw=1)
        clip = 100 * (h["clipped_fraction"] or 0.0)
        ax.set_title(f"{_short(names[i], 30)}\nclipped {clip:.3g}%", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Activation histograms (FP32 values; shaded: the encoding's range)", fontsize=10)
    return png_bytes(fig)


def pareto(mp: dict[str, Any]) -> bytes:
    """A mixed-precision search (MixedPrecisionResult.to_json()): every evaluated mix as accuracy against
    cost relative to the starting mix, the Pareto front as a line, the target and the chosen mix marked."""
    fig = figure(7, 3.6)
    ax = fig.add_subplot()
    colors = {"start": "#555555", "sensitivity": "#9db7d5", "path": _W, "refine": _A}
    for source, color in colors.items():
        pts = [p for p in mp["points"] if p["source"] == source]
        if pts:
            ax.scatter([100 * p["relative_cost"] for p in pts], [p["accuracy"] for p in pts], s=14, color=color,
                       label=source, zorder=2)
    front = mp["pareto"]
    ax.plot([100 * p["relative_cost"] for p in front], [p["accuracy"] for p in front], "-", color="#333333", lw=1,
            drawstyle="steps-post", label="Pareto front", zorder=1)
    ax.axhline(mp["target"], color=_BEFORE, lw=1, ls="--", label=f"target {mp['target']:.6g}")
    ax.scatter([100 * mp["relative_cost"]], [mp["accuracy"]], s=80, facecolors="none", edgecolors=_BEFORE, lw=1.5,
               label="chosen", zorder=3)
    ax.set_xlabel(f"cost ({mp['cost_model']}), % of the starting mix")
    ax.set_ylabel(mp["metric"])
    ax.set_title("Mixed precision: accuracy against cost")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return png_bytes(fig)
