"""Bias correction (Nagel et al., 2019): quantizing a layer's weights shifts the mean of its outputs by
(W_q - W) E[x]; the shift is subtracted from the layer's bias (a layer without one gets one).

- empirical: the shift is measured on calibration data against the FP32 model, layer by layer in
  execution order (each measured with the earlier ones corrected, so accumulated errors are too);
- analytical: no data; E[x] comes from the preceding batch norm's (beta, gamma) through the ReLU or
  ReLU6 between the layers, as the mean of a clipped normal distribution."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .._batches import Batch, as_batches, call
from .._layers import layers_for
from .._progress import Progress
from .._warnings import nothing_to_do
from ..sim.staged import PerChunk, StagedRun

_LAYERS = layers_for("bias_correction")


class BiasCorrectionReport(dict):
    """What bias correction did: layer name -> the largest mean output shift removed (max over
    channels), in execution order."""

    def summary(self) -> str:
        lines = [f"bias correction: {len(self)} layers corrected"]
        lines += [f"  {name}: largest shift removed {shift:.3g}" for name, shift in self.items()]
        return "\n".join(lines)


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


def _shift_view(shift: torch.Tensor, y: torch.Tensor, linear: bool) -> torch.Tensor:
    return shift.reshape(-1) if linear else shift.reshape((1, -1) + (1,) * (y.dim() - 2))


@torch.no_grad()
def _staged(sim, names: list[str], ref: dict[str, torch.Tensor], chunks: list[Batch], bar: Progress,
            apply: Callable[[str, torch.Tensor], None]) -> None:
    """Runs the simulation's graph one node at a time over every chunk (pyquant.sim.staged). When a
    layer to correct has produced its outputs for all the data, its mean shift is what the
    layer-by-layer method would measure; the bias is corrected and the kept outputs are shifted by what the
    layer's simulated bias moved (the shift, on the bias's int32 grid), so later layers see the corrected
    values without a re-run."""
    run = StagedRun(sim.model, chunks)
    wanted = set(names)
    for i, n in enumerate(run.nodes):
        if n.op == "output":
            break
        outs = run.compute(n)
        if n.op == "call_module" and n.target in wanted and isinstance(outs, PerChunk):
            linear = isinstance(sim.model.get_submodule(n.target), nn.Linear)
            total, count = None, 0
            for y in outs:
                mu = _channel_mean(y, linear)
                w = y.numel() // y.shape[-1 if linear else 1]
                total = mu * w if total is None else total + mu * w
                count += w
            shift = (total / count - ref[n.target]).float()
            layer = sim.model.get_submodule(n.target)
            before = layer.bias.detach().clone() if layer.bias is not None else 0.0
            apply(n.target, shift)
            # what the layer adds changed by this much: the shift itself, up to the int32 grid the
            # simulation keeps the bias on (layer.bias is the simulated bias, sim.bias the float one)
            moved = (layer.bias.detach() - before).float()
            wanted.discard(n.target)  # a layer called again later is corrected once, at its first call
            for c, y in enumerate(outs):
                outs[c] = y + _shift_view(moved, y, linear).to(y.dtype)
            bar.update(note=n.target)
        run.release(i)


def correct_bias(sim, fp32_model: nn.Module, data: Any, layers: Optional[Iterable[str]] = None, *,
                 method: str = "staged", batch_size: int = 32,
                 progress: Optional[bool] = None) -> BiasCorrectionReport:
    """Corrects the biases of the quantized layers of `sim` (a calibrated QuantSim) in place: layer by
    layer in execution order, each layer's mean output per channel on the calibration data, measured
    with the earlier layers already corrected, is made to match the FP32 model's.

    `data`: the calibration inputs (a tensor, split into chunks of `batch_size`, or an iterable of
    batches). ``method="staged"`` (default) runs the simulation's graph one node at a time over all
    chunks and keeps each live value for all of them: one pass over the data in all (plus one FP32
    pass), the same result as correcting layer by layer, at the memory cost of the widest live
    activations of the whole data set. ``"sequential"`` re-runs the simulation once per layer (low
    memory, slow); it also accepts `data` as a callable ``forward_fn(model)``. Returns, per layer, the
    largest mean output shift removed (max over channels)."""
    if method not in ("staged", "sequential"):
        raise ValueError(f"method must be 'staged' or 'sequential', got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    names = [n for n, m in sim.model.named_modules() if isinstance(m, _LAYERS) and f"{n}.weight" in sim.quantizers]
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"layers: {sorted(unknown)} are not quantized Conv/Linear layers of the simulation")
        names = [n for n in names if n in wanted]
    if not names:
        nothing_to_do("correct_bias: the simulation has no quantized Conv/Linear layer; nothing to do")
        return {}
    if callable(data):
        if method != "sequential":
            raise ValueError("data: a forward function works with method='sequential'; pass the calibration "
                             "inputs (a tensor or batches) for method='staged'")
        run = data
    else:
        chunks = as_batches(data, batch_size)
        if any(isinstance(c, dict) for c in chunks) and method == "staged":
            raise ValueError("data: method='staged' runs the graph on positional inputs; keyword (dict) batches "
                             "need method='sequential'")

        def run(model):
            for c in chunks:
                call(model, c)
    removed = BiasCorrectionReport()

    def apply(n: str, shift: torch.Tensor) -> None:
        with torch.no_grad():
            bias = sim.bias(n, create=True)  # the float parameter, behind the simulated int32 bias
            bias.sub_(shift.to(bias.device, bias.dtype))
        removed[n] = float(shift.abs().max())

    ref = _means(fp32_model, names, run)
    bar = Progress(len(names), "bias correction", progress)
    if method == "sequential":
        for n in names:
            apply(n, (_means(sim.model, [n], run)[n] - ref[n]).float())
            bar.update(note=n)
    else:
        _staged(sim, names, ref, chunks, bar, apply)
    bar.close()
    return removed


def _clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor, hi: float = math.inf) -> torch.Tensor:
    """E[clamp(X, 0, hi)] for X ~ N(mu, sigma^2) (hi = inf: a ReLU; 6: a ReLU6)."""
    sigma = sigma.clamp_min(1e-12)
    n = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))

    z0 = -mu / sigma
    mean_relu = mu * (1 - n.cdf(z0)) + sigma * torch.exp(n.log_prob(z0))  # E[max(X, 0)]
    if math.isinf(hi):
        return mean_relu
    # E[min(max(X, 0), hi)] = E[max(X,0)] - E[max(X - hi, 0)]
    zh = (hi - mu) / sigma
    over = (mu - hi) * (1 - n.cdf(zh)) + sigma * torch.exp(n.log_prob(zh))
    return mean_relu - over


@torch.no_grad()
def correct_bias_analytical(sim, bn_stats: dict) -> BiasCorrectionReport:
    """Analytical bias correction of the quantized layers of `sim` whose input comes from a folded batch
    norm (statistics from `fold_batchnorms(...).bn_stats`) through a ReLU or ReLU6, in place. Returns,
    per layer, the largest mean output shift removed."""
    from .cle import _pairs

    removed = BiasCorrectionReport()
    acts_allowed = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout)
    for a, b, acts in _pairs(sim.model, with_acts=True, acts_allowed=acts_allowed):
        if a not in bn_stats or f"{b}.weight" not in sim.param_quantizers:
            continue
        if not any(t in (nn.ReLU, nn.ReLU6) for t in acts):
            continue
        beta, gamma = (t.double() for t in bn_stats[a])
        ex = _clipped_normal_mean(beta, gamma, 6.0 if nn.ReLU6 in acts else math.inf)
        q = sim.param_quantizers[f"{b}.weight"]
        w = sim.weight(f"{b}.weight")
        dw = (q(w) - w).double()
        mod = sim.model.get_submodule(b)
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:  # depthwise: channel c sees input c only
            shift = dw.reshape(dw.shape[0], -1).sum(1) * ex
        else:
            shift = (dw.reshape(dw.shape[0], dw.shape[1], -1).sum(2) * ex.reshape(1, -1)).sum(1)
        shift = shift.float()
        sim.bias(b, create=True).sub_(shift)
        removed[b] = float(shift.abs().max())
    return removed
