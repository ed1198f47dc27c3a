"""Activation histograms at every activation quantizer, with the range its encoding can represent:
what the calibration kept, and how much of the FP32 distribution falls outside (is clipped)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch

from ._data import as_batches, call, finite, floats
from .layers import QuantizerState

_SAMPLE_PER_BATCH = 1 << 16


def activation_histograms(sim, data: Union[torch.Tensor, Iterable[Any]], *, bins: int = 128,
                          max_samples: Optional[int] = 32, batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """{quantizer name: {"edges", "counts", "data_min", "data_max", "encoding_min", "encoding_max",
    "bitwidth", "symmetric", "clipped_fraction", "count"}} for every calibrated activation quantizer of
    `sim`, from the FP32 values (all quantizers off) at that point.

    min/max, the element count and the clipped fraction are exact over all of `data` (up to
    `max_samples` samples); the histogram is drawn from an even subsample of at most 65536 values per
    batch, over [min(data, encoding), max(data, encoding)] in `bins` bins."""
    if not 2 <= bins <= 4096:
        raise ValueError(f"bins must be in 2..4096, got {bins}")
    batches = as_batches(data, batch_size, max_samples)
    encs = {n: q.get_encoding() for n, q in sim.activation_quantizers.items()
            if q.enabled and q.get_encoding() is not None}
    stats: dict[str, dict[str, Any]] = {n: {"min": None, "max": None, "n": 0, "lo": 0, "hi": 0, "sample": []}
                                        for n in encs}

    def observe(n: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        st, e = stats[n], encs[n]
        flat = x.reshape(-1)
        if flat.numel() == 0:
            return
        mn, mx = (float(v) for v in torch.aminmax(flat))
        if not (math.isfinite(mn) and math.isfinite(mx)):  # rare: filter only then (a copy)
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                return
            mn, mx = float(flat.min()), float(flat.max())
        st["min"] = mn if st["min"] is None else min(st["min"], mn)
        st["max"] = mx if st["max"] is None else max(st["max"], mx)
        st["n"] += flat.numel()
        st["lo"] += int((flat < float(e.min.min())).sum())
        st["hi"] += int((flat > float(e.max.max())).sum())
        step = max(1, flat.numel() // _SAMPLE_PER_BATCH)
        st["sample"].append(flat[::step].clone())

    def seen(n: str, args: tuple, kwargs: dict) -> None:
        x = args[0]
        act = kwargs.get("activation")  # a fused ReLU/ReLU6 (QuantSim(fuse_activations=True)): its output is quantized
        observe(n, torch.clamp(x, *act) if act is not None else x)

    hooks = [sim.activation_quantizers[n].register_forward_hook(
        lambda m, args, kwargs, out, n=n: seen(n, args, kwargs), with_kwargs=True) for n in encs]
    try:
        with QuantizerState(sim) as state, torch.no_grad():
            state.set(params=False, activations=False)
            for b in batches:
                call(sim.model, b)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, st in stats.items():
        if st["n"] == 0:
            continue
        e = encs[n]
        emin, emax = float(e.min.min()), float(e.max.max())
        lo, hi = min(st["min"], emin), max(st["max"], emax)
        if hi <= lo:
            hi = lo + 1.0
        sample = torch.cat(st["sample"])
        counts = torch.histc(sample, bins=bins, min=lo, max=hi)
        out[n] = {"edges": floats(torch.linspace(lo, hi, bins + 1)), "counts": [int(c) for c in counts.tolist()],
                  "data_min": finite(st["min"]), "data_max": finite(st["max"]), "encoding_min": finite(emin),
                  "encoding_max": finite(emax), "bitwidth": e.bitwidth, "symmetric": e.symmetric,
                  "clipped_fraction": finite((st["lo"] + st["hi"]) / st["n"]), "count": st["n"]}
    return out
