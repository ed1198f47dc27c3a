"""What layer-by-layer reconstruction methods share (AdaRound; SeqMSE- and Hessian-based methods need the
same): walking the FP32 and the quantized model side by side to get each layer's inputs and FP32
outputs for the whole calibration set, turning layers into matrix products over rows (im2col for
convolutions), sampling the rows to keep within a memory budget, and the Gram-matrix form of a
linear layer's reconstruction loss."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..sim.staged import StagedRun

__all__ = ["walk_layers", "walk_side_by_side", "capture", "positions", "rows_in", "rows_in_at", "rows_out",
           "apply_rows", "LayerRows", "collect_rows", "gram", "gram_loss", "following_activation",
           "channel_first"]


class _Stop(Exception):
    pass


def walk_layers(fp32: nn.Module, qmodel: nn.Module, todo: list[str], chunks: list[torch.Tensor],
                run_layer: Callable[[str, Iterable[tuple]], None]) -> None:
    """Calls `run_layer(name, pairs)` for each layer of `todo` with `pairs` of (the layer's input in
    `qmodel`, its FP32 output in `fp32`) per chunk, the earlier layers of `qmodel` already changed.
    Models torch.fx traces run side by side node by node (two passes in all); others run once per
    layer, stopped at the layer."""
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


def capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, want: str) -> torch.Tensor:
    """The layer's input (want='input') or output during model(x), stopping the forward right there."""
    got = []

    def hook(mod, args, out):
        got.append(args[0] if want == "input" else out)
        raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError("the layer did not run during the model's forward")
    return got[0].detach()


def walk_side_by_side(gm_fp: fx.GraphModule, gm_q: fx.GraphModule, todo: set, chunks: list[torch.Tensor],
            run_layer) -> None:
    """Runs the FP32 graph and the quantized model's graph side by side, one node at a time over all
    chunks (pyquant.sim.staged). At a layer in `todo`, its inputs in the quantized model and its FP32
    outputs are at hand: `run_layer(name, pairs)` changes the layer, and its output is computed with
    the changed weight before the walk goes on. Two forward passes in all, instead of two per layer."""
    fp, q = StagedRun(gm_fp, [(c,) for c in chunks]), StagedRun(gm_q, [(c,) for c in chunks])
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
    g = g.reshape(N, idx.shape[1], k[0] * k[1], C)
    return g.transpose(2, 3).reshape(N, idx.shape[1], C * k[0] * k[1])  # unfold's (c, i, j) order


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
    Transposed convolutions (`whole_samples`): X and Y hold whole samples (no im2col)."""

    X: torch.Tensor
    Y: torch.Tensor
    samples: int
    rows_total: int  # positions the calibration samples have in all
    whole_samples: bool

    @property
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """X and Y as [rows, K] and [rows, C] (not for whole samples)."""
        return self.X.reshape(-1, self.X.shape[-1]), self.Y.reshape(-1, self.Y.shape[-1])


def collect_rows(name: str, layer: nn.Module, pairs: Iterable[tuple], n_total: int, act: nn.Module,
                 position_pool: int, memory_mb: int, g: torch.Generator) -> LayerRows:
    """Keeps, per calibration sample, a random pool of at most `position_pool` output positions (fewer
    when `memory_mb` would not hold them) of (input row from the quantized model, FP32 target row after
    `act`), from `pairs` of (layer input, FP32 layer output) per chunk. `g` draws the slot order first,
    then each sample's positions: the same generator state gives the same rows."""
    dev = layer.weight.device
    transposed = isinstance(layer, nn.ConvTranspose2d)
    rows_total = 0
    X = Y = None
    xs, ys = [], []
    slots = torch.randperm(n_total, generator=g).to(dev)
    filled = 0
    with torch.no_grad():
        for xin, yfp in pairs:
            yfp = act(yfp)
            if transposed:  # no im2col: keep whole samples
                xs.append(xin)
                ys.append(yfp)
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
                    xr = (torch.gather(rows_in(layer, xc), 1, idx.unsqueeze(-1).expand(-1, -1, K))
                          if isinstance(layer, nn.Linear) else rows_in_at(layer, xc, idx))
                else:
                    xr = rows_in(layer, xc)
                if X is None:
                    X = xr.new_empty(xr.shape[1], n_total, xr.shape[2])
                    Y = yr.new_empty(yr.shape[1], n_total, yr.shape[2])
                at = slots[filled:filled + len(xr)]
                X.index_copy_(1, at, xr.transpose(0, 1))
                Y.index_copy_(1, at, yr.transpose(0, 1))
                filled += len(xr)
    if transposed:
        X, Y = torch.cat(xs), torch.cat(ys)
        return LayerRows(X, Y, X.shape[0], rows_total, True)
    if X is None or filled != n_total:
        raise RuntimeError(f"{name}: expected {n_total} samples, saw {filled}")
    return LayerRows(X, Y, n_total, rows_total, False)


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


def gram_loss(w_hat: torch.Tensor, G: torch.Tensor, B: torch.Tensor, yy: float, rows: int) -> torch.Tensor:
    """The rows' reconstruction loss (sum over channels, mean over rows) from their Gram statistics."""
    W = w_hat.reshape(w_hat.shape[0], -1)
    return (((W @ G) * W).sum() - 2.0 * (W * B).sum() + yy) / rows


def following_activation(gm: fx.GraphModule, target: str) -> Optional[nn.Module]:
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == target:
            users = list(n.users)
            # an Identity (a folded batch norm) or Dropout in between changes nothing
            while len(users) == 1 and users[0].op == "call_module" and \
                    isinstance(gm.get_submodule(users[0].target), (nn.Identity, nn.Dropout)):
                users = list(users[0].users)
            if len(users) != 1:
                return None
            u = users[0]
            if u.op == "call_module":
                m = gm.get_submodule(u.target)
                return m if isinstance(m, (nn.ReLU, nn.ReLU6)) else None
            if u.op == "call_function" and u.target in (torch.relu, F.relu):
                return nn.ReLU()
            return None
    return None


def channel_first(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The weight with output channels on dim 0 (ConvTranspose keeps them on dim 1)."""
    return w.transpose(0, 1).contiguous() if isinstance(layer, nn.ConvTranspose2d) else w.contiguous()
