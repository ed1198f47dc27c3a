"""What layer-by-layer reconstruction methods share (AdaRound; SeqMSE- and Hessian-based methods need the
same): walking the FP32 and the quantized model side by side to get each layer's inputs and FP32
outputs for the whole calibration set, turning layers into matrix products over rows (im2col for
convolutions), sampling the rows to keep within a memory budget, and the Gram-matrix form of a
linear layer's reconstruction loss. On a QuantSim (SeqMSE, GPTQ): its linear layers in graph order,
one staged pass over the simulation's graph that hands each layer its inputs, the inputs' Gram matrix,
the layer's output error from it, and the result and checkpoint of such a job."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._batches import call
from .._checkpoint import Checkpoint
from .._dirlock import DirectoryLock
from .._fingerprint import fingerprint
from .._layers import layers_for
from ..quant import QuantizerBase, from_scale_offset
from ..sim.layerwise_calibration import placeholder_values
from ..sim.staged import StagedRun

if TYPE_CHECKING:
    from ..sim.quantsim import QuantSim

__all__ = ["walk_layers", "walk_side_by_side", "capture", "positions", "rows_in", "rows_in_at", "rows_out",
           "apply_rows", "LayerRows", "collect_rows", "is_depthwise", "gram", "following_activation",
           "channel_first", "graph_weight_layers", "SimLayer", "sim_linear_layers", "walk_sim_layers", "input_gram", "output_mse",
           "LayerError", "LayerwiseResult", "LayerCheckpoint", "set_frozen_encoding", "weight_groups"]


class _Stop(Exception):
    pass


def _graph_inputs(gm: fx.GraphModule, c: Any) -> tuple:
    """One chunk (a tensor, a tuple of positional inputs or a dict of keyword inputs) as the graph's
    positional inputs."""
    return (c,) if isinstance(c, torch.Tensor) else _positional(gm, c)


def walk_layers(fp32: nn.Module, qmodel: nn.Module, todo: list[str], chunks: list[Any],
                run_layer: Callable[[str, Iterable[tuple]], None]) -> None:
    """Calls `run_layer(name, pairs)` for each layer of `todo` with `pairs` of (the layer's input in
    `qmodel`, its FP32 output in `fp32`) per chunk, the earlier layers of `qmodel` already changed.
    A chunk is a tensor (the one input), a tuple of positional inputs or a dict of keyword inputs.
    Models torch.fx traces run side by side node by node (two passes in all); others (torch.export
    captures, transformers models) run once per layer, stopped at the layer."""
    try:
        gm_fp, gm_q = fx.symbolic_trace(fp32), fx.symbolic_trace(qmodel)
    except Exception:  # a model fx cannot trace: one forward (stopped at the layer) per layer
        gm_fp = gm_q = None
    if gm_fp is not None:
        walk_side_by_side(gm_fp, gm_q, set(todo), chunks, run_layer)
        return
    for name in todo:
        lf, lq = fp32.get_submodule(name), qmodel.get_submodule(name)
        run_layer(name, ((capture(qmodel, lq, c, "input"), capture(fp32, lf, c, "output")) for c in chunks))


def capture(model: nn.Module, layer: nn.Module, x: Any, want: str) -> torch.Tensor:
    """The layer's input (want='input') or output during the model's forward on `x` (a tensor, a tuple of
    positional inputs or a dict of keyword inputs), stopping the forward right there."""
    got = []

    def hook(mod, args, out):
        got.append(args[0] if want == "input" else out)
        raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        call(model, (x,) if isinstance(x, torch.Tensor) else x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError("the layer did not run during the model's forward")
    return got[0].detach()


def walk_side_by_side(gm_fp: fx.GraphModule, gm_q: fx.GraphModule, todo: set, chunks: list[Any],
            run_layer) -> None:
    """Runs the FP32 graph and the quantized model's graph side by side, one node at a time over all
    chunks (pyquant.sim.staged). At a layer in `todo`, its inputs in the quantized model and its FP32
    outputs are at hand: `run_layer(name, pairs)` changes the layer, and its output is computed with
    the changed weight before the walk goes on. Two forward passes in all, instead of two per layer."""
    # activations clamp their inputs in place: a layer's FP32 output is read (by run_layer) before its
    # activation runs, and neither run is forked
    fp = StagedRun(gm_fp, [_graph_inputs(gm_fp, c) for c in chunks], inplace_activations=True)
    q = StagedRun(gm_q, [_graph_inputs(gm_q, c) for c in chunks], inplace_activations=True)
    if [(n.op, str(n.target)) for n in fp.nodes] != [(n.op, str(n.target)) for n in q.nodes]:
        raise RuntimeError("the FP32 and quantized models traced to different graphs")
    with torch.no_grad():
        for i, (nf, nq) in enumerate(zip(fp.nodes, q.nodes)):
            if nf.op == "output" or not todo:
                break
            y = fp.compute(nf)
            if nq.op == "call_module" and nq.target in todo:
                with torch.enable_grad():
                    run_layer(nq.target, list(zip(q.value(nq.args[0]), y)))
                todo = todo - {nq.target}
            q.compute(nq)
            fp.release(i)
            q.release(i)


def positions(layer: nn.Module, y_shape: torch.Size) -> int:
    if isinstance(layer, nn.Linear):
        return math.prod(y_shape[1:-1]) if len(y_shape) > 2 else 1
    return math.prod(y_shape[2:])


def rows_in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs as rows [N, P, K] (im2col for convolutions; K = in_channels/groups * kernel)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        k, st, pad, dil = (1, layer.kernel_size[0]), (1, layer.stride[0]), (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        k, st, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if layer.padding_mode != "zeros" or isinstance(pad, str):
        raise NotImplementedError("only zero padding given as numbers is supported")
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=st)  # [N, C*kh*kw, P]
    return cols.transpose(1, 2)


def rows_in_at(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`rows_in(layer, x)` gathered at output positions idx [N, keep] ([N, keep, K]), built from the
    kept positions' patches only: the full im2col of an early layer is tens of times larger."""
    g = patches_at(layer, x, idx)
    return g.transpose(2, 3).reshape(g.shape[0], g.shape[1], -1)  # unfold's (c, i, j) order


def patches_at(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The input patches of a convolution at output positions idx [N, keep]: [N, keep, kh * kw, C] (a
    position's kernel taps, each with its channels)."""
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        k, st, pad, dil = (1, layer.kernel_size[0]), (1, layer.stride[0]), (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        k, st, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    N, C, H, W = x.shape
    Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
    pixels = x.new_zeros(N, Hp, Wp, C)  # zero-padded, channels last: a pixel's channels are contiguous
    pixels[:, pad[0]:pad[0] + H, pad[1]:pad[1] + W] = x.permute(0, 2, 3, 1)
    ow_n = (Wp - dil[1] * (k[1] - 1) - 1) // st[1] + 1
    oh, ow = idx // ow_n, idx % ow_n                                              # [N, keep]
    dev = x.device
    rh = oh.unsqueeze(-1) * st[0] + torch.arange(k[0], device=dev) * dil[0]      # [N, keep, kh]
    cw = ow.unsqueeze(-1) * st[1] + torch.arange(k[1], device=dev) * dil[1]      # [N, keep, kw]
    flat = (rh.unsqueeze(-1) * Wp + cw.unsqueeze(-2)).reshape(N, -1)  # [N, keep*kh*kw] pixel indices
    g = pixels.reshape(N, Hp * Wp, C)[torch.arange(N, device=dev).unsqueeze(-1), flat]  # [N, keep*kh*kw, C]
    return g.reshape(N, idx.shape[1], k[0] * k[1], C)


def rows_out(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)


def apply_rows(layer: nn.Module, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer on input rows [R, K] with weight w: [R, out_channels]."""
    if isinstance(layer, nn.Linear) or layer.groups == 1:
        out = rows @ w.reshape(w.shape[0], -1).t()
    elif layer.groups == w.shape[0]:  # depthwise: one output per group (a batched product, no [R, G, K] temporary)
        g = layer.groups
        out = torch.einsum("rgk,gk->rg", rows.reshape(rows.shape[0], g, -1), w.reshape(g, -1))
    else:
        g = layer.groups
        r = rows.reshape(rows.shape[0], g, -1)                       # [R, G, Kg]
        wg = w.reshape(g, w.shape[0] // g, -1)                        # [G, Cg, Kg]
        out = torch.einsum("rgk,gck->rgc", r, wg).reshape(rows.shape[0], -1)
    if layer.bias is not None:
        out = out + layer.bias
    return out


@dataclasses.dataclass
class LayerRows:
    """The (input row, target row) pairs kept of one layer over the calibration samples.

    Convolutions and linear layers: X [pool positions, samples, K] and Y [pool positions, samples, C],
    position-major with the samples in a random slot order, so that any contiguous run of the flat
    rows (`flat`) spans many samples: a step takes the next run, with no gathering copy per step.
    Transposed convolutions (`whole_samples`): X and Y hold whole samples (no im2col).
    Depthwise convolutions collected `channel_first`: X [C, pool positions, samples, k] and
    Y [C, pool positions, samples], each channel's rows contiguous, in the same row order."""

    X: torch.Tensor
    Y: torch.Tensor
    samples: int
    rows_total: int  # positions the calibration samples have in all
    whole_samples: bool
    channel_first: bool = False

    @property
    def pool(self) -> int:
        """Positions kept per sample (not for whole samples)."""
        return int(self.X.shape[1] if self.channel_first else self.X.shape[0])

    @property
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """X and Y as [rows, K] and [rows, C] (not for whole samples); `channel_first`: as [C, rows, k] and
        [C, rows]."""
        if self.channel_first:
            return self.X.reshape(self.X.shape[0], -1, self.X.shape[-1]), self.Y.reshape(self.Y.shape[0], -1)
        return self.X.reshape(-1, self.X.shape[-1]), self.Y.reshape(-1, self.Y.shape[-1])


def is_depthwise(layer: nn.Module) -> bool:
    """A Conv1d/Conv2d with one output channel per group (and more than one group)."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups > 1 and layer.groups == layer.out_channels


def collect_rows(name: str, layer: nn.Module, pairs: Iterable[tuple], n_total: int, act: nn.Module,
                 position_pool: int, memory_mb: int, g: torch.Generator,
                 channel_first: bool = False, whole_up_to: int = 0) -> LayerRows:
    """Keeps, per calibration sample, a random pool of at most `position_pool` output positions (fewer
    when `memory_mb` would not hold them) of (input row from the quantized model, FP32 target row after
    `act`), from `pairs` of (layer input, FP32 layer output) per chunk. `g` draws the slot order first,
    then each sample's positions: the same generator state gives the same rows. `channel_first`: a
    depthwise layer's rows are laid out channel first (`LayerRows`); the same rows either way.
    `whole_up_to`: a depthwise Conv2d with at most this many output positions per sample keeps whole
    samples instead (`whole_samples`; every position, no im2col), in the slot order."""
    dev = layer.weight.device
    transposed = isinstance(layer, nn.ConvTranspose2d)
    channel_first = bool(channel_first) and is_depthwise(layer)
    rows_total = 0
    X = Y = None
    xs, ys = [], []
    slots = torch.randperm(n_total, generator=g).tolist()
    filled = 0
    with torch.no_grad():
        for xin, yfp in pairs:
            if not transposed and not xs and X is None and isinstance(layer, nn.Conv2d) and is_depthwise(layer) \
                    and positions(layer, yfp.shape) <= int(whole_up_to):
                transposed = True  # a small depthwise output: whole samples, as for a transposed convolution
            if transposed:  # no im2col: keep whole samples
                xs.append(xin)
                ys.append(act(yfp))
                rows_total += len(xin) * positions(layer, yfp.shape)
                continue
            # a few samples at a time: im2col of a whole batch can be far larger than what is kept
            for k0 in range(0, len(xin), 8):
                xc, yr = xin[k0:k0 + 8], rows_out(layer, yfp[k0:k0 + 8])  # yr: [n, P, C]
                P = yr.shape[1]
                rows_total += yr.shape[0] * P
                K = layer.in_features if isinstance(layer, nn.Linear) else \
                    layer.in_channels * math.prod(layer.kernel_size)
                per_row = 4 * (K + yr.shape[2])
                keep = min(P, int(position_pool),
                           max(1, int(memory_mb) * 2**20 // max(per_row * n_total, 1)))
                if keep < P:
                    idx = torch.stack([torch.randperm(P, generator=g)[:keep] for _ in range(yr.shape[0])]).to(dev)
                    yr = torch.gather(yr, 1, idx.unsqueeze(-1).expand(-1, -1, yr.shape[2]))
                    if channel_first:  # patches [n, keep, kh*kw, C]: each sample's go to X channel first in one copy
                        xr = patches_at(layer, xc, idx)
                    else:
                        xr = (torch.gather(rows_in(layer, xc), 1, idx.unsqueeze(-1).expand(-1, -1, K))
                              if isinstance(layer, nn.Linear) else rows_in_at(layer, xc, idx))
                else:
                    xr = rows_in(layer, xc)
                    if channel_first:  # [n, P, C * kh*kw] in unfold's (c, i, j) order, as patches
                        xr = xr.reshape(xr.shape[0], xr.shape[1], yr.shape[2], -1).transpose(2, 3)
                C = yr.shape[2]
                if X is None:
                    X = xr.new_empty(C, xr.shape[1], n_total, xr.shape[2]) if channel_first else \
                        xr.new_empty(xr.shape[1], n_total, xr.shape[2])
                    Y = yr.new_empty(C, yr.shape[1], n_total) if channel_first else \
                        yr.new_empty(yr.shape[1], n_total, C)
                yr = act(yr)  # elementwise: on the kept rows only
                # one sample at a time: a slice copy of whole rows, several times faster than index_copy_
                for j, slot in enumerate(slots[filled:filled + len(xr)]):
                    if channel_first:
                        X[:, :, slot] = xr[j].permute(2, 0, 1)
                        Y[:, :, slot] = yr[j].t()
                    else:
                        X[:, slot] = xr[j]
                        Y[:, slot] = yr[j]
                filled += len(xr)
    if transposed:
        X, Y = torch.cat(xs), torch.cat(ys)
        if not isinstance(layer, nn.ConvTranspose2d):  # in the slot order: a run of samples is a random batch
            order = torch.empty(n_total, dtype=torch.long)
            order[torch.tensor(slots)] = torch.arange(n_total)
            X, Y = X[order.to(X.device)], Y[order.to(Y.device)]
            if X.dim() == 4:  # channels last: a depthwise convolution's fastest layout on CPU
                X, Y = X.contiguous(memory_format=torch.channels_last), Y.contiguous(memory_format=torch.channels_last)
        return LayerRows(X, Y, X.shape[0], rows_total, True)
    if X is None or filled != n_total:
        raise RuntimeError(f"{name}: expected {n_total} samples, saw {filled}")
    return LayerRows(X, Y, n_total, rows_total, False, channel_first)


def gram(X: torch.Tensor, Y: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple:
    """Sufficient statistics of sum ||x W^T + b - y||^2 over the rows of X [R, K], Y [R, C] (b fixed),
    accumulated in float64: (G = X^T X [K, K], B = (Y - b)^T X [C, K], sum (y - b)^2, R)."""
    K, C = X.shape[1], Y.shape[1]
    G = torch.zeros(K, K, dtype=torch.float64, device=X.device)
    B = torch.zeros(C, K, dtype=torch.float64, device=X.device)
    yy = torch.zeros((), dtype=torch.float64, device=X.device)
    for i in range(0, X.shape[0], 8192):
        x, y = X[i:i + 8192].double(), Y[i:i + 8192].double()
        if bias is not None:
            y = y - bias.detach().double()
        G += x.t() @ x
        B += y.t() @ x
        yy += (y * y).sum()
    return G.float(), B.float(), float(yy), X.shape[0]


_RELU_CALLS = {torch.relu, F.relu, torch.ops.aten.relu.default}
_IDENTITY_CALLS = {torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default}


def following_activation(gm: fx.GraphModule, target: str, node: Optional[str] = None) -> Optional[nn.Module]:
    """The ReLU or ReLU6 that alone reads the output of layer `target` (a module call of `gm`; `node`: the
    graph node running it, for a layer of a torch.export graph), through folded batch norms (Identity),
    eval-mode dropout and copies; None when anything else reads it."""
    for n in gm.graph.nodes:
        if (n.op == "call_module" and n.target == target) or (node is not None and n.name == node):
            users = list(n.users)
            # an Identity (a folded batch norm) or Dropout in between changes nothing
            while len(users) == 1 and _passes_unchanged(gm, users[0]):
                users = list(users[0].users)
            if len(users) != 1:
                return None
            u = users[0]
            if u.op == "call_module":
                m = gm.get_submodule(u.target)
                return m if isinstance(m, (nn.ReLU, nn.ReLU6)) else None
            if u.op == "call_function" and u.target in _RELU_CALLS:
                return nn.ReLU()
            if u.op == "call_function" and u.target is torch.ops.aten.hardtanh.default and tuple(u.args[1:3]) == (0.0, 6.0):
                return nn.ReLU6()
            return None
    return None


def _passes_unchanged(gm: fx.GraphModule, u: fx.Node) -> bool:
    if u.op == "call_module":
        return isinstance(gm.get_submodule(u.target), (nn.Identity, nn.Dropout))
    if u.op == "call_function" and u.target is torch.ops.aten.dropout.default:
        return len(u.args) > 2 and u.args[2] is False
    return u.op == "call_function" and u.target in _IDENTITY_CALLS


def channel_first(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The weight with output channels on dim 0 (ConvTranspose keeps them on dim 1)."""
    return w.transpose(0, 1).contiguous() if isinstance(layer, nn.ConvTranspose2d) else w.contiguous()


# ---- linear layers of a QuantSim, walked in graph order ---------------------------------------------------
# The ops that run a linear layer whose weight is a graph attribute (torch.export graphs, functional calls).
_LINEAR_CALLS = {torch.ops.aten.linear.default, F.linear}
_LAYER_CALLS = _LINEAR_CALLS | {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, F.conv1d, F.conv2d}


@dataclasses.dataclass(frozen=True)
class SimLayer:
    """A linear layer of a QuantSim: `name` is its weight quantizer's name (`sim.weight(name)` is the FP32
    weight, [out_features, in_features]); `node` is the graph node that runs the layer (an nn.Linear
    module call, or an ATen/functional linear reading a graph attribute); `weight_node` is, for a graph
    attribute, the quantizer node whose output the layer reads (None for a module's parametrized
    weight)."""

    name: str
    node: str
    weight_node: Optional[str]


def sim_linear_layers(sim: "QuantSim") -> tuple[list[SimLayer], dict[str, str]]:
    """The linear layers of QuantSim `sim` whose weight quantizer is enabled and not frozen, in graph order,
    and the other weight quantizers with why they are left out (not a linear layer, read by several ops or
    as a slice, disabled, frozen, batch norm folded each step)."""
    gm = sim.model
    by_module = {id(m): n for n, m in gm.named_modules()}
    qnode_of: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            qnode_of[n.target] = n
    nodes = {n.name: n for n in gm.graph.nodes}
    layers: list[tuple[int, SimLayer]] = []
    skipped: dict[str, str] = {}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    linear_modules = layers_for("layerwise_sim")
    for name, p in sim.placement.items():
        if not p.is_param:
            continue
        q = sim.quantizer(name)
        if not q.enabled:
            skipped[name] = "its weight quantizer is disabled"
            continue
        if q.frozen:
            skipped[name] = "its encoding is frozen"
            continue
        if p.graph_weight is None:
            node = nodes[p.node]
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, linear_modules):
                skipped[name] = f"not a linear layer ({type(mod).__name__})"
            elif sim.folds_batchnorm_each_step(name):
                skipped[name] = "its batch norm is folded into the weight on every step"
            else:
                layers.append((order[node.name], SimLayer(name, node.name, None)))
            continue
        qnode = qnode_of.get(by_module.get(id(q), ""))
        readers = list(qnode.users) if qnode is not None else []
        if len(readers) != 1:
            skipped[name] = f"read by {len(readers)} ops (one linear reader is handled)"
            continue
        r = readers[0]
        if r.op != "call_function" or r.target not in _LINEAR_CALLS or \
                (r.args[1] if len(r.args) > 1 else r.kwargs.get("weight")) is not qnode:
            skipped[name] = f"not read whole by a linear op (read by {r.target})"
            continue
        layers.append((order[r.name], SimLayer(name, r.name, qnode.name)))
    return [l for _, l in sorted(layers, key=lambda t: t[0])], skipped


def graph_weight_layers(sim: "QuantSim") -> dict[str, str]:
    """The layers of QuantSim `sim` that run as ops on a graph-attribute weight (torch.export captures), in
    graph order: module path `<layer>` -> the graph node (by name) of the one linear or convolution op that
    reads weight quantizer `<layer>.weight` whole."""
    gm = sim.model
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    found = []
    for name, p in sim.placement.items():
        if not p.is_param or p.graph_weight is None or not name.endswith(".weight"):
            continue
        n = nodes[p.node]
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        if n.op == "call_function" and n.target in _LAYER_CALLS and isinstance(w, fx.Node) and len(w.users) == 1:
            found.append((order[n.name], name[:-len(".weight")], n.name))
    return {layer: node for _, layer, node in sorted(found)}


def _positional(gm: fx.GraphModule, b: Any) -> tuple:
    """A batch as the graph's positional inputs (keyword inputs by the placeholders' names)."""
    return tuple(placeholder_values(gm, b).values())


@contextlib.contextmanager
def _uncalibrated_activations_off(sim: "QuantSim") -> Iterator[None]:
    """Activation quantizers without an encoding pass their input unchanged inside the block: a layer-wise
    method usually runs before activation calibration, on the weights-only simulation."""
    off = [q for q in sim.activation_quantizers.values() if q.enabled and not q.has_encoding]
    for q in off:
        q.enabled = False
    try:
        yield
    finally:
        for q in off:
            q.enabled = True


def walk_sim_layers(sim: "QuantSim", batches: list, todo: Sequence[SimLayer],
                    run_layer: Callable[[SimLayer, list[torch.Tensor]], None]) -> None:
    """Runs QuantSim `sim`'s graph one node at a time over all `batches` (pyquant.sim.staged) and calls
    `run_layer(layer, xs)` at each layer of `todo`, with `xs` its inputs as rows [rows, in_features], one
    tensor per batch, computed by the simulation whose earlier layers are already changed. The layer's
    output is computed with its changed weight and encoding before the walk goes on: one pass over the
    data in all, holding the live activations of every batch at once (as `walk_side_by_side` does). Every
    position is a row, padded ones included. Weight quantizers without an encoding are calibrated from
    their weights first; activation quantizers without one pass their input unchanged."""
    gm = sim.model
    for name, q in sim.param_quantizers.items():
        if q.enabled and not q.has_encoding:
            sim.calibrate_weight(name)
    at = {l.node: l for l in todo}
    run = StagedRun(gm, [_positional(gm, b) for b in batches])
    with torch.no_grad(), _uncalibrated_activations_off(sim):
        for i, n in enumerate(run.nodes):
            if n.op == "output" or not at:
                break
            layer = at.pop(n.name, None)
            if layer is not None:
                x = run.value(n.args[0])
                xs = [c.reshape(-1, c.shape[-1]) for c in (x if isinstance(x, list) else [x])]
                run_layer(layer, xs)
                if layer.weight_node is not None:  # the layer reads the quantized weight computed earlier
                    run.env[layer.weight_node] = sim.quantizer(layer.name)(sim.weight(layer.name))
            run.compute(n)
            run.release(i)


def input_gram(xs: Iterable[torch.Tensor], chunk_rows: int = 8192,
               process_group: Any = None) -> tuple[torch.Tensor, int]:
    """(G = X^T X, rows) over the rows of every tensor of `xs` ([rows, K] each), accumulated in float64 a
    few thousand rows at a time: memory stays at one K x K matrix whatever the number of rows. With a
    torch.distributed `process_group`, G and the row count are summed over its ranks (each holding its share
    of the data): every rank gets the Gram matrix of all the rows."""
    G, rows = None, 0
    for x in xs:
        for i in range(0, x.shape[0], chunk_rows):
            c = x[i:i + chunk_rows].double()
            G = c.t() @ c if G is None else G.addmm_(c.t(), c)
            rows += c.shape[0]
    if G is None:
        raise ValueError("input_gram: no rows")
    if process_group is not None:
        import torch.distributed as dist
        n = torch.tensor([rows], dtype=torch.float64, device=G.device)
        dist.all_reduce(G, group=process_group)
        dist.all_reduce(n, group=process_group)
        rows = int(n.item())
    return G, rows


def output_mse(w: torch.Tensor, w_hat: torch.Tensor, G: torch.Tensor, rows: int) -> float:
    """The mean squared error per output element of a linear layer with weight `w_hat` instead of `w` on
    the rows whose Gram matrix is `G`: tr((w - w_hat) G (w - w_hat)^T) / (rows * out_features)."""
    E = (w.detach() - w_hat.detach()).double().reshape(w.shape[0], -1)
    return float(((E @ G.double()) * E).sum()) / max(rows * E.shape[0], 1)


# ---- results and resuming of layer-wise methods on a QuantSim ---------------------------------------------
@dataclasses.dataclass
class LayerError:
    """One layer's output MSE (per output element, on the calibration inputs the simulation gives it) with
    its weight quantizer's encoding before the method (round to nearest) and after it."""

    name: str
    mse_before: float
    mse_after: float
    rows: int
    seconds: float


@dataclasses.dataclass
class LayerwiseResult:
    """`layers`: one entry per layer changed, in graph order; `skipped`: weight quantizers left as they
    were, with the reason."""

    layers: list[LayerError]
    skipped: dict[str, str]

    title = "layer"

    def summary(self) -> str:
        lines = [f"{self.title:40s} {'mse before':>12s} {'mse after':>12s} {'rows':>8s} {'s':>6s}"]
        for r in self.layers:
            lines.append(f"{r.name:40s} {r.mse_before:12.4g} {r.mse_after:12.4g} {r.rows:8d} {r.seconds:6.1f}")
        if self.skipped:
            lines.append(f"left as they were: {len(self.skipped)} weight quantizer(s)")
        return "\n".join(lines)


class LayerCheckpoint:
    """The checkpoint of a layer-wise job on a QuantSim: one state file for the job (the layers done, the
    report) and one per finished layer (its tensors), so that saving a layer writes that layer only. All
    carry one fingerprint (every weight and encoding of the simulation, every batch, the settings,
    pyquant's version): another job's files are not resumed, with a warning naming what differs. Without
    `checkpoint_dir` nothing is written.

    Use it as a context manager: from construction to exit it holds `checkpoint_dir`'s lock, so a second
    job on the same folder (in another process) is refused with `pyquant.DirectoryInUseError`."""

    def __init__(self, checkpoint_dir: Optional[Union[str, os.PathLike]], prefix: str, sim: "QuantSim",
                 batches: list, settings: dict[str, Any]):
        self.done: list[str] = []
        self.report: list[dict[str, Any]] = []
        self._prefix = prefix
        self._dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._lock: Optional[DirectoryLock] = None
        if self._dir is None:
            return
        self._fp = fingerprint(model=sim.model, data=batches, settings=settings)
        self._lock = DirectoryLock(self._dir, "checkpoint_dir").acquire()
        try:
            saved = self._job().resume({"done": [], "report": []}, prefix)
        except BaseException:
            self.close()
            raise
        self.done, self.report = list(saved["done"]), list(saved["report"])

    def close(self) -> None:
        """Releases `checkpoint_dir` for other jobs."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "LayerCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _job(self) -> Checkpoint:
        return Checkpoint(self._dir / f"{self._prefix}_checkpoint.pt", self._fp)

    def _layer(self, i: int) -> Checkpoint:
        return Checkpoint(self._dir / f"{self._prefix}_layer_{i:04d}.pt", self._fp)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors saved for finished layer `name`."""
        saved, _ = self._layer(self.done.index(name)).load()
        if saved is None:
            raise RuntimeError(f"{self._prefix}: the checkpoint in {self._dir} lists layer {name!r} as done, but "
                               f"its file is missing or from another job; delete the folder to start over")
        return saved

    def save(self, name: str, tensors: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
        """Records layer `name` as done, with its tensors and report entry: the layer's file first, then the
        job's state that names it (an interruption in between recomputes the layer)."""
        self.done.append(name)
        self.report.append(report)
        if self._dir is None:
            return
        self._layer(len(self.done) - 1).save(tensors)
        self._job().save({"done": self.done, "report": self.report})


def set_frozen_encoding(q: QuantizerBase, scale: torch.Tensor, offset: torch.Tensor, device: torch.device) -> None:
    """Gives weight quantizer `q` the encoding (scale, offset) on its own grid, on `device` (its weight's),
    and freezes it, so that a later `sim.compute_encodings` keeps it."""
    q.set_encoding(from_scale_offset(scale.to(device), offset.to(device), q.bitwidth, q.symmetric, q.block_size,
                                     signed=q.signed, strict=q.strict))
    q.freeze()


def weight_groups(q: QuantizerBase, w: torch.Tensor) -> tuple[int, int]:
    """(row groups, column blocks) of weight quantizer `q`'s encoding on a 2-d weight `w` [out, in]: its
    shape right-aligned against the weight, e.g. (out, 1) per channel, (1, 1) per tensor, (out, in // B)
    per block of B along the input dimension."""
    shape = tuple(q.shape)[-2:] if len(q.shape) >= 2 else (1,) * (2 - len(q.shape)) + tuple(q.shape)
    so, nb = (int(v) for v in shape)
    if w.dim() != 2 or w.shape[0] % so or w.shape[1] % nb:
        raise ValueError(f"quantizer {q.name!r}: encoding shape {tuple(q.shape)} does not tile the weight "
                         f"{tuple(w.shape)}")
    return so, nb
