"""Activation smoothing (SmoothQuant, Xiao et al. 2022): the transformer counterpart of cross-layer
equalization. A few input channels of a transformer's Linear layers carry activation outliers, which
stretch a per-tensor activation range so far that 8 bits leave the other channels a handful of levels.
Dividing channel j of the activation by s_j and multiplying input column j of the Linear weights by s_j
keeps every product, and so the model's function, while the activation range flattens:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with max|X_j| the largest magnitude of activation channel j over the calibration data and max|W_j| the
largest magnitude in input column j over every Linear layer reading that activation.

The division is absorbed exactly, in FP32, by a layer before the activation:

* a LayerNorm or RMSNorm whose output only Linear layers read: its gain (and bias) is divided by s
  (Gemma's RMSNorm multiplies by 1 + w: the new weight is (1 + w) / s - 1);
* a value projection whose output reaches the output projection through attention only: v's output rows
  (and bias) are divided by s, o's input columns multiplied by it.
* a gated MLP's up projection, whose output times the activated gate is the down projection's input (the
  product of Llama's, Gemma's and most decoder LMs' MLPs, where the largest outliers of all sit): up's output
  rows (and bias) are divided by s, down's input columns multiplied by it. With grouped-query attention one value
  channel feeds the columns of several query heads; the scale of a value channel is applied to every
  output-projection column that reads it (the map is measured on a probe run, not read from reshapes).

Pairs come from the captured graph (pyquant.sim.graph), never from module names; a pair whose norm output
also reaches something other than the scaled Linear layers (a residual connection, the model output) is
left alone, as smoothing would not be exact there, and the result says why."""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from .._batches import Data, as_batches
from .._progress import Progress
from .._warnings import nothing_to_do
from .. import ops
from ..quant import from_range
from ..sim.graph import classify, get_attr, propagate_shapes, trace
from .smoothing_pairs import GatedPair, NormPair, ValueOutputPair, gated_pairs, norm_pairs, param_uses, value_output_pairs

__all__ = ["SmoothedPair", "SmoothingResult", "smooth_activations", "smoothing_pairs", "SCALE_RANGE"]

SCALE_RANGE = (1e-5, 1e5)
"""The smoothing factors are clamped to this range, so that no gain or weight column is pushed toward
zero or overflow by a channel that is (nearly) dead in the data or the weights."""


@dataclasses.dataclass
class SmoothedPair:
    """One smoothed pair: `source` (the norm, value or up projection that absorbs 1/s), `layers` (the Linear
    layers whose input columns were multiplied by s), `kind` ("norm", "value-output" or "up-down"), the
    range of the scales and the spread of the activation's per-channel ranges (largest per-channel max|x|
    over their median) before and after."""

    source: str
    layers: tuple[str, ...]
    kind: str
    alpha: float
    min_scale: float
    max_scale: float
    spread_before: float
    spread_after: float


@dataclasses.dataclass
class SmoothingResult:
    """What smooth_activations() did: the pairs it scaled and those it left alone ("a -> b" -> why)."""

    pairs: list[SmoothedPair]
    skipped: dict[str, str]

    def summary(self) -> str:
        return str(self)

    def __str__(self) -> str:
        lines = [f"smooth_activations: {len(self.pairs)} pairs smoothed, {len(self.skipped)} skipped"]
        for p in self.pairs:
            lines.append(f"  {p.source} -> {', '.join(p.layers)} (alpha {p.alpha:g}): scales "
                         f"{p.min_scale:.3g}..{p.max_scale:.3g}, channel-range spread "
                         f"{p.spread_before:.1f} -> {p.spread_after:.1f}")
        for pair, why in self.skipped.items():
            lines.append(f"  skipped {pair}: {why}")
        return "\n".join(lines)


def _check_alpha(alpha: Any) -> tuple[float, ...]:
    """The alpha candidates: one number, or a non-empty sequence of numbers to search, each in [0, 1]."""
    many = isinstance(alpha, (list, tuple))
    values = list(alpha) if many else [alpha]
    for a in values:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 <= float(a) <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1] (the migration strength), or a non-empty sequence "
                             f"of such numbers to search; got {alpha!r}")
    if not values:
        raise ValueError("alpha must be a number in [0, 1] (the migration strength), or a non-empty sequence "
                         "of such numbers to search; got an empty sequence")
    return tuple(float(a) for a in values)


class _Watch(fx.Interpreter):
    """Runs a captured graph, passing chosen nodes' outputs to callbacks and replacing others' (probes)."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, Callable[[torch.Tensor], None]],
                 replace: Optional[dict[fx.Node, Callable[[torch.Tensor], torch.Tensor]]] = None):
        super().__init__(gm)
        self.watch = watch
        self.replace = replace or {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.replace:
            out = self.replace[n](out)
        if n in self.watch:
            self.watch[n](out)
        return out

    def run_batch(self, b: Any) -> None:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        args = [b.get(n.target) for n in placeholders] if isinstance(b, dict) else list(b)
        with torch.no_grad():
            self.run(*args)


def _channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per last-dimension channel, over finite values."""
    a = x.detach().float().abs().reshape(-1, x.shape[-1])
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax(dim=0)


def _scales(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    ok = (xmax > 0) & (wmax > 0) & torch.isfinite(xmax) & torch.isfinite(wmax)
    s = xmax.clamp_min(1e-30).pow(alpha) / wmax.clamp_min(1e-30).pow(1.0 - alpha)
    return torch.where(ok, s, torch.ones_like(s)).clamp(*SCALE_RANGE)


def _w8a8_error(rows: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """Squared error of the Linear outputs on sample rows when the smoothed activation rows / s are quantized
    per tensor (8 bits, asymmetric) and the smoothed weights W * s per output channel (8 bits, symmetric):
    the quantity the alpha search minimizes."""
    x = rows / s
    ex = from_range(x.min(), x.max(), 8, symmetric=False)
    qx = ops.quantize_dequantize(x, ex.scale, ex.offset, bitwidth=8, signed=False)
    err = 0.0
    for w in weights:
        w = w.detach().float()
        ws = w * s[None, :]
        r = ws.abs().amax(dim=1)
        ew = from_range(-r, r, 8, symmetric=True)
        qw = ops.quantize_dequantize(ws, ew.scale, ew.offset, bitwidth=8, signed=True, axis=0)
        err += float((qx @ qw.T - rows @ w.T).pow(2).sum())
    return err


def _best_scales(xmax: torch.Tensor, wmax: torch.Tensor, alphas: tuple[float, ...],
                 error: Optional[Callable[[torch.Tensor], float]]) -> tuple[torch.Tensor, float]:
    """(scales, alpha): the only alpha, or the candidate whose scales give the least `error`."""
    if len(alphas) == 1 or error is None:
        return _scales(xmax, wmax, alphas[0]), alphas[0]
    tried = [(error(_scales(xmax, wmax, a)), i) for i, a in enumerate(alphas)]
    a = alphas[min(tried)[1]]  # ties: the earlier candidate
    return _scales(xmax, wmax, a), a


def _spread(r: torch.Tensor) -> float:
    return float(r.max() / r.median().clamp_min(1e-30))


def _probe_value_maps(gm: fx.GraphModule, pairs: list[ValueOutputPair], dummy: Any
                      ) -> dict[int, Optional[torch.Tensor]]:
    """For each pair (by index): o's input column -> v's output channel, measured by running the graph with
    v's output replaced by its channel number (1..C) in every position. Attention takes convex combinations
    of value rows, so each o column then holds the number of the one v channel it reads, up to the rounding
    of the softmax's sum. None where the columns do not come out as whole channel numbers, the same in
    every row (then the path is not a plain attention)."""
    seen: dict[int, torch.Tensor] = {}

    def probe(out: torch.Tensor) -> torch.Tensor:
        return torch.arange(1, out.shape[-1] + 1, dtype=out.dtype, device=out.device).expand(out.shape).contiguous()

    def keeper(i: int) -> Callable[[torch.Tensor], None]:
        def keep(t: torch.Tensor) -> None:
            seen[i] = t.detach().float().reshape(-1, t.shape[-1])
        return keep

    def run(idx: list[int]) -> None:
        _Watch(gm, {pairs[i].o.input: keeper(i) for i in idx}, {pairs[i].v.node: probe for i in idx}).run_batch(dummy)

    def read(i: int) -> Optional[torch.Tensor]:
        t = seen.pop(i, None)
        if t is None or not bool(torch.isfinite(t).all()):
            return None
        col = t.round()
        if (float((t - col).abs().max()) > 0.1 or not bool((col == col[:1]).all()) or float(col.min()) < 1
                or float(col.max()) > get_attr(gm, pairs[i].v.weight).shape[0]):
            return None
        return col[0].long() - 1

    run(list(range(len(pairs))))  # all pairs in one run
    maps = {i: read(i) for i in range(len(pairs))}
    for i in [i for i, m in maps.items() if m is None]:  # alone: another pair's probe may have upset it
        run([i])
        maps[i] = read(i)
    return maps


def _capture(model: nn.Module, dummy: Any, value_output: bool, gated_mlp: bool
             ) -> tuple[fx.GraphModule, list[NormPair], list[ValueOutputPair], list[GatedPair], dict[str, str]]:
    captured = copy.deepcopy(model).eval()  # trace() prepares the model it captures in place
    gm = trace(captured, dummy)
    propagate_shapes(gm, dummy)
    roles = classify(gm)
    uses = param_uses(gm)
    npairs, skipped = norm_pairs(gm, roles, uses)
    vpairs: list[ValueOutputPair] = []
    if value_output:
        vpairs, vskipped = value_output_pairs(gm, roles, uses)
        skipped.update(vskipped)
    gpairs: list[GatedPair] = []
    if gated_mlp:
        gpairs, gskipped = gated_pairs(gm, roles, uses)
        skipped.update(gskipped)
    return gm, npairs, vpairs, gpairs, skipped


def smoothing_pairs(model: nn.Module, dummy_input: Any, *, value_output: bool = True,
                    gated_mlp: bool = True) -> list[str]:
    """The pairs smooth_activations() would scale in `model` ("source -> layer, ..."), found in the graph
    captured with `dummy_input`; no data is run and nothing changes. (A value -> output pair whose channel
    map the probe run cannot establish is listed here and skipped by smooth_activations.)"""
    _, npairs, vpairs, gpairs, _ = _capture(model, dummy_input, value_output, gated_mlp)
    return ([f"{p.norm} -> {', '.join(u.layer for u in p.linears)}" for p in npairs]
            + [f"{p.v.layer} -> {p.o.layer}" for p in vpairs] + [f"{p.up.layer} -> {p.down.layer}" for p in gpairs])


@torch.no_grad()
def smooth_activations(model: nn.Module, data: Data, *, alpha: Union[float, Sequence[float]] = 0.5,
                       dummy_input: Optional[Any] = None, value_output: bool = True, gated_mlp: bool = True,
                       batch_size: Optional[int] = 32, max_samples: Optional[int] = None,
                       search_rows: int = 512, process_group: Any = None,
                       progress: Optional[bool] = None) -> SmoothingResult:
    """Smooths the activations read by `model`'s Linear layers in place (see the module docstring): every
    LayerNorm/RMSNorm -> Linear pair, with `value_output` every value -> output projection pair and with
    `gated_mlp` every gated MLP's up -> down projection pair.

    `data`: calibration data in any form pyquant takes (a tensor of samples, or batches: tensors, tuples,
    dicts of keyword inputs); the per-channel activation maxima are taken over all of it (at most
    `max_samples` samples), in one pass with a progress bar (`progress`; None: on a terminal). `alpha` in
    [0, 1] is the migration strength: 1 makes every activation channel's range 1 (s = max|X_j|), 0 flattens
    the weights' input columns instead (s = 1 / max|W_j|). 0.5, the SmoothQuant default, makes the two
    equal (max|X_j| / s_j = max|W_j| s_j), which suits per-tensor activations with per-output-channel
    weights: what the weights take on is spread over rows that each have their own scale. A sequence of
    alphas is searched per pair: the one whose smoothed layers, quantized as W8A8 (per-tensor activations,
    per-channel weights), reproduce the FP32 outputs best on `search_rows` activation rows sampled from the
    data wins. `dummy_input` (default: the first batch) is what the graph is captured with.
    `process_group`: a torch.distributed group whose ranks each pass their share of the data (the same call
    on every rank): the activation maxima are all-reduced (MAX) and an alpha search's errors summed over the
    ranks, so every rank smooths its model as one process over all the data does.

    The model's function is unchanged up to float32 rounding (a `1 + w` gain loses a little more where
    (1 + w) / s is far below 1). Pairs that cannot be smoothed exactly are left as they are and named in the
    result's `skipped`; a model without pairs gets a NothingToDoWarning."""
    alphas = _check_alpha(alpha)
    if isinstance(search_rows, bool) or not isinstance(search_rows, int) or search_rows < 1:
        raise ValueError(f"search_rows must be a positive int (activation rows sampled for the alpha search), "
                         f"got {search_rows!r}")
    batches = as_batches(data, batch_size, max_samples, "data")
    dummy = dummy_input if dummy_input is not None else batches[0]
    gm, npairs, vpairs, gpairs, skipped = _capture(model, dummy, value_output, gated_mlp)
    if not npairs and not vpairs and not gpairs:
        nothing_to_do("smooth_activations: no norm -> Linear, value -> output or up -> down projection pair to "
                      "smooth; the "
                      "model is unchanged" + (f" ({len(skipped)} pairs skipped, see the result)" if skipped else ""),
                      stacklevel=3)
        return SmoothingResult([], skipped)

    maps = _probe_value_maps(gm, vpairs, dummy) if vpairs else {}
    for i, m in list(maps.items()):
        if m is None:
            skipped[f"{vpairs[i].v.layer} -> {vpairs[i].o.layer}"] = (
                "the output projection's inputs are not each one value channel (a probe run did not find the map)")
    vpairs_ok = [(p, maps[i]) for i, p in enumerate(vpairs) if maps.get(i) is not None]
    if not npairs and not vpairs_ok and not gpairs:
        nothing_to_do(f"smooth_activations: no pair can be smoothed exactly ({len(skipped)} skipped, see the "
                      "result); the model is unchanged", stacklevel=3)
        return SmoothingResult([], skipped)

    # the per-channel activation maxima of every smoothed activation, over all the data
    # and, to search alpha, a random sample of activation rows (an equal share from every batch)
    stats: dict[fx.Node, torch.Tensor] = {}
    samples: dict[fx.Node, list[torch.Tensor]] = {}
    per_batch = -(-search_rows // len(batches)) if len(alphas) > 1 else 0
    gen = torch.Generator().manual_seed(0)

    def keep(node: fx.Node) -> Callable[[torch.Tensor], None]:
        def f(t: torch.Tensor) -> None:
            m = _channel_absmax(t)
            stats[node] = m if node not in stats else torch.maximum(stats[node], m)
            if per_batch:
                rows = t.detach().float().reshape(-1, t.shape[-1])
                pick = torch.randperm(rows.shape[0], generator=gen)[:per_batch].to(rows.device)
                samples.setdefault(node, []).append(rows[pick])
        return f

    watched = ([p.linears[0].input for p in npairs] + [p.o.input for p, _ in vpairs_ok]
               + [p.down.input for p in gpairs])
    runner = _Watch(gm, {n: keep(n) for n in watched})
    with Progress(len(batches), "smoothing", progress) as bar:
        for b in batches:
            runner.run_batch(b)
            bar.update()

    if process_group is not None:
        import torch.distributed as dist
        for n in watched:  # the same order on every rank
            dist.all_reduce(stats[n], op=dist.ReduceOp.MAX, group=process_group)

    def summed(err: float) -> float:
        if process_group is None:
            return err
        import torch.distributed as dist
        t = torch.tensor([err], dtype=torch.float64)
        dist.all_reduce(t, group=process_group)
        return float(t)

    done: list[SmoothedPair] = []
    for p in npairs:
        xmax = stats[p.linears[0].input]
        ws = [get_attr(model, u.weight) for u in p.linears]
        wmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in ws]).amax(dim=0)
        rows = torch.cat(samples[p.linears[0].input]).to(wmax.device) if per_batch else None
        error = (lambda sc: summed(_w8a8_error(rows, ws, sc))) if rows is not None else None
        s, a = _best_scales(xmax.to(wmax.device), wmax, alphas, error)
        _smooth_norm(model, p, s)
        done.append(_report(p.norm, tuple(u.layer for u in p.linears), "norm", a, s, xmax))
    for p, m in vpairs_ok:
        xo = stats[p.o.input]
        wo = get_attr(model, p.o.weight).detach().abs().amax(dim=0).float()
        wv = get_attr(model, p.v.weight)
        cv = wv.shape[0]
        m = m.to(wo.device)
        xmax = torch.zeros(cv, device=wo.device).scatter_reduce(0, m, xo.to(wo.device), "amax")
        wmax = torch.zeros(cv, device=wo.device).scatter_reduce(0, m, wo, "amax")
        rows = torch.cat(samples[p.o.input]).to(wo.device) if per_batch else None
        w_o = [get_attr(model, p.o.weight)]
        error = (lambda sc: summed(_w8a8_error(rows, w_o, sc[m]))) if rows is not None else None
        s, a = _best_scales(xmax, wmax, alphas, error)
        _smooth_value_output(model, p, s, m)
        done.append(_report(p.v.layer, (p.o.layer,), "value-output", a, s[m], xo))
    for p in gpairs:
        xmax = stats[p.down.input]
        w_d = [get_attr(model, p.down.weight)]
        wmax = w_d[0].detach().abs().amax(dim=0).float()
        rows = torch.cat(samples[p.down.input]).to(wmax.device) if per_batch else None
        error = (lambda sc: summed(_w8a8_error(rows, w_d, sc))) if rows is not None else None
        s, a = _best_scales(xmax.to(wmax.device), wmax, alphas, error)
        _smooth_up_down(model, p, s)
        done.append(_report(p.up.layer, (p.down.layer,), "up-down", a, s, xmax))
    return SmoothingResult(done, skipped)


def _report(source: str, layers: tuple[str, ...], kind: str, alpha: float, s: torch.Tensor,
            xmax: torch.Tensor) -> SmoothedPair:
    s = s.to(xmax.device)
    return SmoothedPair(source, layers, kind, alpha, float(s.min()), float(s.max()), _spread(xmax),
                        _spread(xmax / s))


def _smooth_norm(model: nn.Module, p: NormPair, s: torch.Tensor) -> None:
    g = get_attr(model, p.gain)
    sg = s.to(g.device, torch.float32)
    if p.gain_form == "1+w":
        g.copy_(((1.0 + g.float()) / sg - 1.0).to(g.dtype))
    else:
        g.copy_((g.float() / sg).to(g.dtype))
    if p.bias is not None:
        b = get_attr(model, p.bias)
        b.copy_((b.float() / sg).to(b.dtype))
    for u in p.linears:
        w = get_attr(model, u.weight)
        w.copy_((w.float() * sg.to(w.device)[None, :]).to(w.dtype))


def _smooth_value_output(model: nn.Module, p: ValueOutputPair, s: torch.Tensor, m: torch.Tensor) -> None:
    wv = get_attr(model, p.v.weight)
    sv = s.to(wv.device)
    wv.copy_((wv.float() / sv[:, None]).to(wv.dtype))
    if p.v.bias is not None:
        bv = get_attr(model, p.v.bias)
        bv.copy_((bv.float() / sv.to(bv.device)).to(bv.dtype))
    wo = get_attr(model, p.o.weight)
    wo.copy_((wo.float() * s.to(wo.device)[m.to(wo.device)][None, :]).to(wo.dtype))


def _smooth_up_down(model: nn.Module, p: GatedPair, s: torch.Tensor) -> None:
    wu = get_attr(model, p.up.weight)
    su = s.to(wu.device, torch.float32)
    wu.copy_((wu.float() / su[:, None]).to(wu.dtype))
    if p.up.bias is not None:
        bu = get_attr(model, p.up.bias)
        bu.copy_((bu.float() / su.to(bu.device)).to(bu.dtype))
    wd = get_attr(model, p.down.weight)
    wd.copy_((wd.float() * su.to(wd.device)[None, :]).to(wd.dtype))
