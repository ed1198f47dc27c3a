"""Per-output-channel weight ranges of every Conv/Linear layer, and how cross-layer equalization
changes them. Per-tensor weight quantization suffers when one layer's channels differ widely in range
(the "spread", largest over smallest per-channel max |w|); CLE is meant to shrink it."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .._layers import layers_for, weight_axis
from .._warnings import ignoring_nothing_to_do
from ._data import finite, floats

_LAYER_TYPES = layers_for("weight_ranges")


def _channel_stats(w: torch.Tensor, axis: int) -> dict[str, Any]:
    w = w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1)
    mn, mx = w.amin(1), w.amax(1)
    absmax = torch.maximum(mx.abs(), mn.abs())
    spread = float(absmax.max() / absmax.min()) if float(absmax.min()) > 0 else float("inf")
    return {"min": floats(mn), "max": floats(mx), "mean": floats(w.mean(1)), "channels": int(w.shape[0]),
            "spread": finite(spread), "absmax": finite(float(absmax.max()))}


def weight_ranges(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer name: {"min", "max", "mean": one value per output channel, "channels", "spread",
    "absmax"}} for every Conv/ConvTranspose/Linear of `model`, in module order. "spread" is the
    largest over the smallest per-channel max |w| (None when a channel is all zeros)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _LAYER_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor):
            out[name] = _channel_stats(m.weight, weight_axis(m))
    return out


def cle_weight_ranges(model: nn.Module, dummy_input: Any, *, replace_relu6: bool = True,
                      fold_bn: bool = True) -> dict[str, Any]:
    """Weight ranges before and after `pyquant.equalize`, computed on copies (`model` is not touched).

    "before" is the model with its batch norms folded (when `fold_bn`, as a target runs it and as CLE
    starts), "after" the equalized model (`replace_relu6=True` lets CLE pass ReLU6, which MobileNet-style
    models otherwise block; the report gives how far that moved the outputs). Returns {"before",
    "after": weight_ranges(...), "pairs": [[a, b], ...], "summary": {...}, "relu6_output_change"}."""
    from ..techniques import equalize, fold_batchnorms

    before_m = copy.deepcopy(model).eval()
    if fold_bn:
        with ignoring_nothing_to_do():
            fold_batchnorms(before_m, dummy_input)
    after_m = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing to equalize" is reported in the summary instead
        rep = equalize(after_m, dummy_input, replace_relu6=replace_relu6)
    before, after = weight_ranges(before_m), weight_ranges(after_m)

    def worst(table):
        items = [(v["spread"], k) for k, v in table.items() if v["spread"] is not None]
        return max(items) if items else (None, None)

    sb, lb = worst(before)
    sa, la = worst(after)
    pair_layers = {a for a, _ in rep.pairs}
    med = lambda vals: finite(float(torch.tensor(vals).median())) if vals else None
    summary = {
        "layers": len(before), "pairs_equalized": len(rep.pairs),
        "max_spread_before": sb, "max_spread_before_layer": lb,
        "max_spread_after": sa, "max_spread_after_layer": la,
        "median_spread_before": med([before[k]["spread"] for k in before if before[k]["spread"] is not None]),
        "median_spread_after": med([after[k]["spread"] for k in after if after[k]["spread"] is not None]),
        "median_spread_before_equalized_layers": med([before[k]["spread"] for k in pair_layers
                                                      if k in before and before[k]["spread"] is not None]),
        "median_spread_after_equalized_layers": med([after[k]["spread"] for k in pair_layers
                                                     if k in after and after[k]["spread"] is not None]),
    }
    return {"before": before, "after": after, "pairs": [list(p) for p in rep.pairs], "summary": summary,
            "relu6_replaced": len(rep.relu6_replaced), "relu6_output_change": finite(rep.relu6_output_change),
            "skipped": dict(rep.skipped)}
