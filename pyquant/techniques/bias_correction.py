"""Empirical bias correction (Nagel et al., 2019): quantizing a layer's weights shifts the mean of its
outputs; measured on calibration data against the FP32 model, that shift is subtracted from the layer's
bias (a layer without one gets one). Layers are corrected in execution order, each measured with the
earlier ones already corrected, so errors that accumulate are corrected too."""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


def _channel_mean(y: torch.Tensor, linear: bool) -> torch.Tensor:
    if linear:
        return y.reshape(-1, y.shape[-1]).double().mean(0)
    return y.transpose(0, 1).reshape(y.shape[1], -1).double().mean(1)


def _means(model: nn.Module, names: list[str], run: Callable[[nn.Module], Any]) -> dict[str, torch.Tensor]:
    sums: dict[str, list] = {n: [None, 0] for n in names}
    hooks = []
    for n in names:
        mod = model.get_submodule(n)
        linear = isinstance(mod, nn.Linear)

        def hook(m, inp, out, n=n, linear=linear):
            mu = _channel_mean(out.detach(), linear)
            w = out.numel() // out.shape[-1 if linear else 1]
            s = sums[n]
            s[0] = mu * w if s[0] is None else s[0] + mu * w
            s[1] += w
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    return {n: s[0] / s[1] for n, s in sums.items() if s[0] is not None}


def correct_bias(sim, fp32_model: nn.Module, forward_fn: Callable[[nn.Module], Any],
                 layers: Optional[Iterable[str]] = None, progress: Optional[bool] = None) -> dict[str, float]:
    """Corrects the biases of the quantized layers of `sim` (a calibrated QuantSim) in place.

    `forward_fn(model)` runs the calibration data through a model (it is called once on the FP32 model
    and once per layer on the simulation). Returns, per layer, the largest mean output shift removed."""
    names = [n for n, m in sim.model.named_modules() if isinstance(m, _LAYERS) and f"{n}.weight" in sim.quantizers]
    if layers is not None:
        wanted = set(layers)
        names = [n for n in names if n in wanted]
    ref = _means(fp32_model, names, forward_fn)
    show = sys.stderr.isatty() if progress is None else progress
    removed: dict[str, float] = {}
    for i, n in enumerate(names, 1):
        got = _means(sim.model, [n], forward_fn)[n]
        shift = (got - ref[n]).float()
        mod = sim.model.get_submodule(n)
        with torch.no_grad():
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(shift.numel(), device=shift.device))
            mod.bias.sub_(shift.to(mod.bias.dtype))
        removed[n] = float(shift.abs().max())
        if show:
            print(f"\rbias correction {i}/{len(names)} {n}", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    return removed
