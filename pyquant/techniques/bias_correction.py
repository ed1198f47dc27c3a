"""Bias correction (Nagel et al., 2019): quantizing a layer's weights shifts the mean of its outputs by
(W_q - W) E[x]; the shift is subtracted from the layer's bias (a layer without one gets one).

- empirical: the shift is measured on calibration data against the FP32 model, layer by layer in
  execution order (each measured with the earlier ones corrected, so accumulated errors are too);
- analytical: no data; E[x] comes from the preceding batch norm's (beta, gamma) through the ReLU or
  ReLU6 between the layers, as the mean of a clipped normal distribution.

With `checkpoint_dir`, empirical correction saves the FP32 pass's means and each layer's shift as it is
found; a rerun on a simulation built and calibrated as the first was, with the same data and settings,
applies the saved shifts and measures only the layers that were not finished."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from .._batches import Batch, as_batches, call
from .._checkpoint import Checkpoint
from .._dirlock import DirectoryLock
from .._fingerprint import fingerprint, model_digest
from .._layers import layers_for
from .._progress import Progress
from .._warnings import nothing_to_do
from ..sim.layerwise_calibration import placeholder_values
from ..sim.staged import PerChunk, StagedRun
from .layerwise import graph_weight_layers

_LAYERS = layers_for("bias_correction")
_CKPT = "bias_correction_checkpoint.pt"


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


def _graph_layers(sim, fp32_model: nn.Module) -> dict[str, str]:
    """The layers of a torch.export simulation (graph node running the layer -> its module path), for the
    linear and convolution ops that read a whole quantized weight and their own bias or none, whose module
    in `fp32_model` is a Conv/Linear layer."""
    gm = sim.model
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, str] = {}
    for name, node_name in graph_weight_layers(sim).items():
        node = nodes[node_name]
        b_in = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if b_in is not None and not (isinstance(b_in, fx.Node) and b_in.op == "get_attr"
                                     and b_in.target == f"{name}.bias"):
            continue
        try:
            fp_layer = fp32_model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(fp_layer, _LAYERS):
            out[node_name] = name
    return out


@torch.no_grad()
def _staged(sim, at: dict[str, str], linear: dict[str, bool], ref: dict[str, torch.Tensor], chunks: list[Batch],
            bar: Progress, apply: Callable[[str, torch.Tensor], None], saved: dict[str, torch.Tensor]) -> None:
    """Runs the simulation's graph one node at a time over every chunk (pyquant.sim.staged). When a
    layer to correct (`at`: graph node -> layer) has produced its outputs for all the data, its mean shift
    is what the layer-by-layer method would measure; the bias is corrected and the kept outputs are shifted
    by what the layer's simulated bias moved (the shift, on the bias's int32 grid), so later layers see the
    corrected values without a re-run. A layer in `saved` (a resumed run) gets its saved shift instead
    of a measured one."""
    gm = sim.model
    run = StagedRun(gm, [tuple(placeholder_values(gm, c).values()) for c in chunks])
    at = dict(at)
    for i, n in enumerate(run.nodes):
        if n.op == "output":
            break
        outs = run.compute(n)
        name = at.get(n.name)
        if name is not None and isinstance(outs, PerChunk):
            lin = linear[name]
            shift = saved.get(name)
            if shift is None:
                total, count = None, 0
                for y in outs:
                    mu = _channel_mean(y, lin)
                    w = y.numel() // y.shape[-1 if lin else 1]
                    total = mu * w if total is None else total + mu * w
                    count += w
                shift = (total / count - ref[name].to(total.device)).float()
            layer = gm.get_submodule(name)
            before = layer.bias.detach().clone() if getattr(layer, "bias", None) is not None else 0.0
            apply(name, shift)
            # what the layer adds changed by this much: the shift itself, up to the int32 grid the
            # simulation keeps the bias on (layer.bias is the simulated bias, sim.bias the float one)
            moved = (layer.bias.detach() - before).float()
            # a layer called again later is corrected once, at its first call
            at = {k: v for k, v in at.items() if v != name}
            for c, y in enumerate(outs):
                outs[c] = y + _shift_view(moved, y, lin).to(y.dtype)
            bar.update(note=name)
        run.release(i)


def correct_bias(sim, fp32_model: nn.Module, data: Any, layers: Optional[Iterable[str]] = None, *,
                 method: str = "staged", batch_size: int = 32,
                 checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                 progress: Optional[bool] = None) -> BiasCorrectionReport:
    """Corrects the biases of the quantized layers of `sim` (a calibrated QuantSim) in place: layer by
    layer in execution order, each layer's mean output per channel on the calibration data, measured
    with the earlier layers already corrected, is made to match the FP32 model's.

    `data`: the calibration inputs (a tensor, split into chunks of `batch_size`, or an iterable of
    batches: tensors, tuples of positional inputs or dicts of keyword inputs). ``method="staged"``
    (default) runs the simulation's graph one node at a time over all chunks and keeps each live value for
    all of them: one pass over the data in all (plus one FP32 pass), the same result as correcting layer
    by layer, at the memory cost of the widest live activations of the whole data set. ``"sequential"``
    re-runs the simulation once per layer (low memory, slow); it also accepts `data` as a callable
    ``forward_fn(model)``, and needs layers the simulation calls as modules (a torch.fx capture).

    Simulations captured with torch.export (transformers models) are corrected at their linear and
    convolution ops; a layer without a bias gets one (`sim.bias(layer, create=True)`). Returns, per layer,
    the largest mean output shift removed (max over channels).

    `checkpoint_dir`: where the FP32 means and each corrected layer's shift are saved (atomically, under
    the fingerprint of the simulation, `fp32_model`, the data and the settings); a rerun on a simulation
    built and calibrated as this one was resumes there and ends with the same biases, bit for bit
    ("sequential" skips the finished layers' runs; "staged" replays its one pass with the saved shifts).
    A checkpoint made for other inputs is not used (a warning names what differs)."""
    if method not in ("staged", "sequential"):
        raise ValueError(f"method must be 'staged' or 'sequential', got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    names = [n for n, m in sim.model.named_modules() if isinstance(m, _LAYERS) and f"{n}.weight" in sim.quantizers]
    modules = set(names)
    at = {n.name: n.target for n in sim.model.graph.nodes if n.op == "call_module" and n.target in modules}
    graph_at = _graph_layers(sim, fp32_model)
    names += [n for n in graph_at.values() if n not in names]
    at.update(graph_at)
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"layers: {sorted(unknown)} are not quantized Conv/Linear layers of the simulation")
        names = [n for n in names if n in wanted]
        at = {k: v for k, v in at.items() if v in wanted}
    if not names:
        nothing_to_do("correct_bias: the simulation has no quantized Conv/Linear layer; nothing to do")
        return {}
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path (str or os.PathLike) or None, "
                        f"got {type(checkpoint_dir).__name__}")
    in_graph = sorted(set(graph_at.values()) & set(names))
    if method == "sequential" and in_graph:
        raise ValueError(f"method='sequential' measures layers the simulation calls as modules; {in_graph[0]} "
                         f"(and {len(in_graph) - 1} more) run as ops of a torch.export graph: use method='staged'")
    if callable(data):
        if method != "sequential":
            raise ValueError("data: a forward function works with method='sequential'; pass the calibration "
                             "inputs (a tensor or batches) for method='staged'")
        run = data
    else:
        chunks = as_batches(data, batch_size)

        def run(model):
            for c in chunks:
                call(model, c)
        data = chunks  # what the fingerprint covers: the batches, or the forward function's code
    # one job per checkpoint_dir at a time: DirectoryInUseError names the other job's pid
    lock = DirectoryLock(checkpoint_dir, "checkpoint_dir") if checkpoint_dir is not None else contextlib.nullcontext()
    with lock:
        return _correct(sim, fp32_model, names, at, in_graph, run, data, method, batch_size, checkpoint_dir,
                        progress)


def _correct(sim, fp32_model: nn.Module, names: list[str], at: dict[str, str], in_graph: list[str],
             run: Callable[[nn.Module], Any], data: Any, method: str, batch_size: int,
             checkpoint_dir: Optional[Union[str, os.PathLike]], progress: Optional[bool]) -> BiasCorrectionReport:
    """correct_bias's work on its checked arguments (`data`: the batches, or a forward function), resumed
    from `checkpoint_dir` when it holds this job's state."""
    # the fingerprint is taken before any bias is added or changed: the state a rerun starts from too
    ckpt, state = _resume(checkpoint_dir, sim, fp32_model, data,
                          {"method": method, "batch_size": batch_size, "layers": names})
    removed = BiasCorrectionReport()
    saved: dict[str, torch.Tensor] = dict(state["shifts"])

    def apply(n: str, shift: torch.Tensor) -> None:
        with torch.no_grad():
            bias = sim.bias(n, create=True)  # the float parameter, behind the simulated int32 bias
            bias.sub_(shift.to(bias.device, bias.dtype))
        removed[n] = float(shift.abs().max())
        if n not in state["shifts"]:
            state["shifts"][n] = shift.detach().cpu().clone()
            if ckpt is not None:
                ckpt.save(state)

    for n in in_graph:  # a zero bias first, so that the graph is not changed while it runs
        sim.bias(n, create=True)
    if state["ref"] is None:
        state["ref"] = {k: v.cpu() for k, v in _means(fp32_model, names, run).items()}
        if ckpt is not None:
            ckpt.save(state)
    ref = state["ref"]
    bar = Progress(len(names), "bias correction", progress)
    if method == "sequential":
        for n in [n for n in names if n in saved]:  # shifts found before an interruption
            apply(n, saved[n])
        bar.n = len(removed)
        for n in [n for n in names if n not in saved]:
            mean = _means(sim.model, [n], run)[n]
            apply(n, (mean - ref[n].to(mean.device)).float())
            bar.update(note=n)
    else:
        linear = {n: isinstance(fp32_model.get_submodule(n), nn.Linear) for n in names}
        _staged(sim, at, linear, ref, data, bar, apply, saved)
    bar.close()
    return removed


def _resume(checkpoint_dir: Optional[Union[str, os.PathLike]], sim, fp32_model: nn.Module, data: Any,
            settings: dict[str, Any]) -> tuple[Optional[Checkpoint], dict[str, Any]]:
    """The checkpoint (None without checkpoint_dir) and the state to start from: the saved one when its
    fingerprint matches, else a new one (FP32 means not yet measured, no shift found)."""
    state: dict[str, Any] = {"ref": None, "shifts": {}}
    if checkpoint_dir is None:
        return None, state
    fp = fingerprint(model=sim.model, settings=settings, fp32_model=model_digest(fp32_model),
                     **({"forward_fn": data} if callable(data) else {"data": data}))
    ckpt = Checkpoint(Path(checkpoint_dir) / _CKPT, fp)
    return ckpt, ckpt.resume(state, "correct_bias")


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
