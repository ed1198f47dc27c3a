"""Plots and the HTML report of a pyquant.analysis result (matplotlib, imported on first use).

    from pyquant.viz import write_report
    write_report(result, "report.html", png_dir="figures")   # one offline page (+ the PNGs)

`pyquant.viz.plots` has each figure as PNG bytes (sensitivity, layer_sqnr, weight_spread,
channel_ranges, histograms) and save_png."""
from . import plots
from .report import figures, render_html, write_report

__all__ = ["plots", "figures", "render_html", "write_report"]
