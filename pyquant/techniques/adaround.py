"""AdaRound (Nagel et al., 2020, "Up or down? Adaptive rounding for post-training quantization"):
layer by layer, learn whether each weight rounds up or down so that the layer's output on
calibration data matches FP32's.

Per layer, in execution order:
  * inputs come from the model whose earlier layers already carry their rounded weights (errors
    are corrected as they accumulate), targets from the FP32 model; a ReLU/ReLU6 right after the
    layer is applied to both;
  * convolutions are handled as matrix products over output positions (im2col): a random pool of
    output positions per sample is kept (`position_pool`, within `memory_mb`) in one table ordered
    position-major over a shuffled sample order, and every step takes the table's next
    `batch_size * positions_per_sample` rows -- positions of many samples at once, an unbiased sample
    of the loss of a full convolution, at a fraction of its cost and with no copy per step;
  * a layer with no activation after it (a projection, a classifier) has a loss quadratic in its
    weight: its steps use the Gram matrix of all kept rows, the exact loss of the whole pool, whenever
    that is cheaper than a step's rows;
  * the FP32 and the rounded model run side by side one graph node at a time over all samples (two
    forward passes in all, holding the live activations of every sample twice), so that no layer
    re-runs the model from its input;
  * loss = sum over channels of the squared error, mean over positions, + reg_param * sum(1 - |2h-1|^beta)
    (no regularizer during the first `warm_start` fraction; beta then falls from beta_range[0] to
    beta_range[1] along a half cosine); Adam on alpha only, through the fused kernels of pyquant.ops;
  * at the end h = (alpha >= 0): the weight sits on the grid of its frozen encoding.

With `checkpoint_dir`, every finished layer is saved (atomically); a run restarted with the same
arguments continues after the last finished layer and ends with the same weights as one that was
never interrupted (each layer's randomness comes from (seed, layer index) alone).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._io import atomic_torch_save
from .._progress import Progress
from ..quant.encoding import Encoding
from ..sim.staged import StagedRun, batch_args
from .bn_fold import fold_batchnorms

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_CKPT = "adaround_checkpoint.pt"


@dataclasses.dataclass
class LayerReport:
    name: str
    mse_nearest: float          # reconstruction loss with round-to-nearest, on the kept positions
    mse_adaround: float         # the same with the learned (hard) rounding
    rounded_up: float           # fraction of weights rounded up (h = 1)
    changed_vs_nearest: float   # fraction of weights rounded the other way than nearest rounding would
    rows: int                   # positions (rows) kept for this layer
    rows_total: int             # positions the calibration samples have
    seconds: float


@dataclasses.dataclass
class AdaroundResult:
    """`model`: a copy of the input model (batch norms folded) with the rounded weights, as FP32 values
    on each weight's grid. `encodings`: the weight encodings, by QuantSim's parameter names, to be
    loaded frozen into a QuantSim of `model` (see `apply_to`). `report`: one entry per layer."""

    model: nn.Module
    encodings: dict[str, Encoding]
    report: list[LayerReport]
    folded: list[tuple[str, str]]
    skipped: list[str]
    encodings_path: Optional[str] = None

    def apply_to(self, sim) -> None:
        """Sets and freezes the AdaRound weight encodings in a QuantSim built from `self.model`, so that
        calibrating its activations afterwards leaves the rounded weights on their grids."""
        for name, enc in self.encodings.items():
            q = sim.param_quantizers.get(name)
            if q is None:
                raise KeyError(f"the simulation has no weight quantizer {name!r}; build it from result.model")
            q.bitwidth, q.symmetric = enc.bitwidth, enc.symmetric
            q.set_encoding(enc)
            q.freeze()

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'mse nearest':>12s} {'mse adaround':>12s} {'up':>6s} {'changed':>8s} {'s':>6s}"]
        for r in self.report:
            lines.append(f"{r.name:40s} {r.mse_nearest:12.4g} {r.mse_adaround:12.4g} {r.rounded_up:6.1%} "
                         f"{r.changed_vs_nearest:8.1%} {r.seconds:6.1f}")
        return "\n".join(lines)


class _Stop(Exception):
    pass


def _chunks(data: Any, num_samples: Optional[int]) -> list[torch.Tensor]:
    out, n = [], 0
    it = [data] if isinstance(data, torch.Tensor) else data
    for b in it:
        b = batch_args(b)[0]  # AdaRound feeds single-input models
        if num_samples is not None and n + len(b) > num_samples:
            b = b[: num_samples - n]
        if len(b):
            out.append(b)
            n += len(b)
        if num_samples is not None and n >= num_samples:
            break
    if not out:
        raise ValueError("data: no calibration samples")
    return out


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, want: str) -> torch.Tensor:
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
        raise RuntimeError("adaround: the layer did not run during the model's forward")
    return got[0].detach()


def _staged(gm_fp: fx.GraphModule, gm_q: fx.GraphModule, todo: set, chunks: list[torch.Tensor],
            run_layer) -> None:
    """Runs the FP32 graph and the rounded model's graph side by side, one node at a time over all
    chunks (pyquant.sim.staged). At a layer still to round, its inputs in the rounded model and its
    FP32 outputs are at hand: the layer is optimized, and its output computed with the rounded weight
    before the walk goes on. Two forward passes in all, instead of two per layer."""
    fp, q = StagedRun(gm_fp, [(c,) for c in chunks]), StagedRun(gm_q, [(c,) for c in chunks])
    if [(n.op, str(n.target)) for n in fp.nodes] != [(n.op, str(n.target)) for n in q.nodes]:
        raise RuntimeError("adaround: the FP32 and rounded models traced to different graphs")
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


def _positions(layer: nn.Module, y_shape: torch.Size) -> int:
    if isinstance(layer, nn.Linear):
        return math.prod(y_shape[1:-1]) if len(y_shape) > 2 else 1
    return math.prod(y_shape[2:])


def _rows_in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs as rows [N, P, K] (im2col for convolutions; K = in_channels/groups * kernel)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        k, st, pad, dil = (1, layer.kernel_size[0]), (1, layer.stride[0]), (0, layer.padding[0]), (1, layer.dilation[0])
    else:
        k, st, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if layer.padding_mode != "zeros" or isinstance(pad, str):
        raise NotImplementedError("adaround: only zero padding given as numbers is supported")
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=st)  # [N, C*kh*kw, P]
    return cols.transpose(1, 2)


def _rows_in_at(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`_rows_in(layer, x)` gathered at output positions idx [N, keep] ([N, keep, K]), built from the
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


def _rows_out(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)


def _apply_rows(layer: nn.Module, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
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


def _following_act(gm: fx.GraphModule, target: str) -> Optional[nn.Module]:
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


def _fingerprint(model: nn.Module, settings: Mapping[str, Any], data: list[torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes()[:4096])
    for b in data[:2]:
        h.update(b.detach().cpu().contiguous().numpy().tobytes()[:4096])
    return h.hexdigest()


def adaround(model: nn.Module, dummy_input: Any, data: Union[torch.Tensor, Iterable], *, param_bw: int = 4,
             iterations: int = 10_000, reg_param: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0),
             warm_start: float = 0.2, batch_size: int = 32, num_samples: Optional[int] = None,
             positions_per_sample: int = 512, position_pool: int = 1024, lr: float = 1e-3,
             quant_scheme: str = "min_max",
             config: Union[str, dict] = "default", overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
             skip: Sequence[str] = (), checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
             memory_mb: int = 1024, seed: int = 0, progress: Optional[bool] = None) -> AdaroundResult:
    """AdaRound every Conv1d/Conv2d/ConvTranspose2d/Linear weight of `model` (a copy is made; batch
    norms are folded into it first).

    Args:
        dummy_input: an input for tracing the model.
        data: unlabelled calibration data: a tensor of samples, or batches (tensors or (inputs, ...)).
        param_bw: weight bit width (default 4); encodings follow `config` (QuantSim's hardware config:
            per-channel symmetric weights by default) and `quant_scheme` ("min_max", "tf_enhanced", ...).
        iterations, reg_param, beta_range, warm_start, lr: the optimization (per layer).
        batch_size, positions_per_sample: a step uses batch_size * positions_per_sample rows (output
            positions), the next run of the table of pooled positions (`position_pool` per sample),
            which interleaves all samples.
        num_samples: calibration samples used (default: all of `data`).
        overrides: per-layer settings, e.g. {"features.0.0": {"iterations": 2000, "param_bw": 8}}.
        skip: layer names to leave with round-to-nearest.
        checkpoint_dir: where progress is saved after each layer; a rerun resumes there.
        memory_mb: budget for the kept inputs/targets of one layer; beyond it fewer positions are kept.
        seed: makes the run reproducible (and a resumed run identical to an uninterrupted one).
    """
    from ..sim.quantsim import QUANT_SCHEMES, QuantSim

    if isinstance(param_bw, bool) or not isinstance(param_bw, int) or not 2 <= param_bw <= 16:
        raise ValueError(f"param_bw must be an int in 2..16, got {param_bw!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if not 0.0 <= float(warm_start) < 1.0:
        raise ValueError(f"warm_start must be in [0, 1), got {warm_start}")
    if len(beta_range) != 2 or not all(float(b) > 0 for b in beta_range):
        raise ValueError(f"beta_range must be two positive numbers (start, end), got {beta_range!r}")
    if float(reg_param) < 0:
        raise ValueError(f"reg_param must be >= 0, got {reg_param}")
    for name, v in (("batch_size", batch_size), ("positions_per_sample", positions_per_sample),
                    ("position_pool", position_pool), ("memory_mb", memory_mb)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if quant_scheme not in QUANT_SCHEMES:
        raise ValueError(f"quant_scheme must be one of {sorted(QUANT_SCHEMES)}, got {quant_scheme!r}")

    fp32 = copy.deepcopy(model).eval()
    folded = list(fold_batchnorms(fp32, dummy_input, verbose=False))
    qmodel = copy.deepcopy(fp32)
    chunks = _chunks(data, num_samples)
    dev = next((p.device for p in fp32.parameters()), torch.device("cpu"))
    chunks = [c.to(dev) for c in chunks]
    n_samples = sum(len(c) for c in chunks)

    # Weight encodings from a weights-only simulation with the requested config and scheme.
    sim = QuantSim(fp32, dummy_input, quant_scheme=quant_scheme, param_bw=param_bw, config=config)
    gm = sim.model
    overrides = dict(overrides or {})
    unknown = (set(overrides) | set(skip)) - {n for n, m in fp32.named_modules() if isinstance(m, _LAYERS)}
    if unknown:
        raise ValueError(f"overrides/skip name layers the model does not have (or that are not "
                         f"Conv/Linear): {sorted(unknown)}")
    order = [n.target for n in gm.graph.nodes
             if n.op == "call_module" and f"{n.target}.weight" in sim.param_quantizers
             and isinstance(gm.get_submodule(n.target), _LAYERS)]
    encodings: dict[str, Encoding] = {}
    with torch.no_grad():
        for name in order:
            q = sim.param_quantizers[f"{name}.weight"]
            bw = int(overrides.get(name, {}).get("param_bw", param_bw))
            if bw != q.bitwidth:
                sim.set_bitwidth(f"{name}.weight", bw)
            with q.compute_encodings():
                q(sim._weight_of(f"{name}.weight"))
            encodings[f"{name}.weight"] = q.get_encoding()

    settings = dict(param_bw=param_bw, iterations=iterations, reg_param=reg_param, beta_range=list(beta_range),
                    warm_start=warm_start, batch_size=batch_size, num_samples=n_samples,
                    positions_per_sample=positions_per_sample, position_pool=position_pool, lr=lr,
                    quant_scheme=quant_scheme, config=config,
                    overrides=overrides, skip=list(skip), memory_mb=memory_mb, seed=seed, order=order)
    state: dict[str, Any] = {"done": [], "weights": {}, "report": []}
    ckpt = Path(checkpoint_dir) / _CKPT if checkpoint_dir is not None else None
    key = _fingerprint(fp32, settings, chunks) if ckpt is not None else ""
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            state = saved
        else:
            warnings.warn(f"adaround: the checkpoint in {checkpoint_dir} was made with other settings, model or "
                          "data; starting over", stacklevel=2)
    with torch.no_grad():
        for name, w in state["weights"].items():
            qmodel.get_submodule(name).weight.copy_(w.to(dev))

    report = [LayerReport(**r) for r in state["report"]]
    todo = [n for n in order if n not in state["done"]]
    bar = Progress(len(order), "adaround", progress)
    bar.n = len(order) - len(todo)
    skipped = [n for n in order if n in set(skip)]
    index = {n: i for i, n in enumerate(order)}

    def run_layer(name: str, pairs: Iterable[tuple]) -> None:
        t0 = time.perf_counter()
        layer_fp, layer_q = fp32.get_submodule(name), qmodel.get_submodule(name)
        enc = encodings[f"{name}.weight"]
        if name in set(skip):
            with torch.no_grad():
                w_cf = _channel_first(layer_fp, layer_fp.weight.detach())
                near = _nearest(w_cf, *_grid_params(w_cf, enc))
                layer_q.weight.copy_(near.transpose(0, 1) if isinstance(layer_fp, nn.ConvTranspose2d) else near)
        else:
            cfg = {**settings, **overrides.get(name, {})}
            r = _optimize_layer(name, index[name], layer_fp, layer_q, pairs, n_samples, enc,
                                _following_act(gm, name), cfg, seed)
            r.seconds = time.perf_counter() - t0
            report.append(r)
        state["done"].append(name)
        state["weights"][name] = layer_q.weight.detach().cpu().clone()
        state["report"] = [dataclasses.asdict(r) for r in report]
        if ckpt is not None:
            state["key"] = key
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, ckpt)
        bar.update(note=name)

    if todo:
        try:
            gm_fp, gm_q = fx.symbolic_trace(fp32), fx.symbolic_trace(qmodel)
        except Exception:  # a model fx cannot trace: one forward (stopped at the layer) per layer
            gm_fp = gm_q = None
        if gm_fp is not None:
            _staged(gm_fp, gm_q, set(todo), chunks, run_layer)
        else:
            for name in todo:
                lf, lq = fp32.get_submodule(name), qmodel.get_submodule(name)
                run_layer(name, ((_capture(qmodel, lq, c, "input"), _capture(fp32, lf, c, "output"))
                                 for c in chunks))
    bar.close()

    path = None
    if checkpoint_dir is not None:
        from ..sim.encodings import write_encodings
        path = str(Path(checkpoint_dir) / "adaround_param_encodings.json")
        write_encodings(path, {}, encodings)
    return AdaroundResult(model=qmodel, encodings=encodings, report=report, folded=folded, skipped=skipped,
                          encodings_path=path)


def _gram(X: torch.Tensor, Y: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple:
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


def _gram_loss(w_hat: torch.Tensor, G: torch.Tensor, B: torch.Tensor, yy: float, rows: int) -> torch.Tensor:
    """The rows' reconstruction loss (sum over channels, mean over rows) from their Gram statistics."""
    W = w_hat.reshape(w_hat.shape[0], -1)
    return (((W @ G) * W).sum() - 2.0 * (W * B).sum() + yy) / rows


def _grid_params(w: torch.Tensor, enc: Encoding) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    qmin, qmax = ops.grid(enc.bitwidth, enc.symmetric)
    s, o = enc.scale.reshape(-1).to(w.device), enc.offset.reshape(-1).to(w.device)
    return s, o, qmin, qmax


def _nearest(w_cf: torch.Tensor, s: torch.Tensor, o: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest on the same grid (channel-first weight): pyquant's fake-quant op."""
    shape = ((-1,) if s.numel() > 1 else (1,)) + (1,) * (w_cf.dim() - 1)
    return ops.raw.quantize_dequantize(w_cf, s.reshape(shape), o.reshape(shape), qmin, qmax)


def _channel_first(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    # ConvTranspose keeps output channels on dim 1; the kernels want them on dim 0
    return w.transpose(0, 1).contiguous() if isinstance(layer, nn.ConvTranspose2d) else w.contiguous()


def _optimize_layer(name: str, li: int, layer_fp: nn.Module, layer_q: nn.Module, pairs: Iterable[tuple],
                    n_total: int, enc: Encoding, act: Optional[nn.Module], cfg: Mapping[str, Any],
                    seed: int) -> LayerReport:
    """Learns the rounding of one layer from (input from the rounded model, FP32 output) per chunk."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + li)
    transposed = isinstance(layer_fp, nn.ConvTranspose2d)
    w0 = _channel_first(layer_fp, layer_fp.weight.detach())
    dev = w0.device
    s, o, qmin, qmax = _grid_params(w0, enc)
    if s.numel() not in (1, w0.shape[0]):
        raise NotImplementedError(f"adaround: {name}: per-block weight encodings are not supported")
    act = act if act is not None else nn.Identity()

    # Kept rows (positions) of inputs (from the rounded model) and targets (from FP32). Convolutions and
    # linear layers: one table of rows, position-major ([pool position, sample slot]) with the samples
    # in a random slot order, so that any contiguous run of rows spans many samples: a step takes the
    # next run, with no gathering copy per step.
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
                rows_total += len(xin) * _positions(layer_fp, yfp.shape)
                continue
            # a few samples at a time: im2col of a whole batch can be far larger than what is kept
            for k0 in range(0, len(xin), 8):
                xc, yr = xin[k0:k0 + 8], _rows_out(layer_fp, yfp[k0:k0 + 8])  # yr: [n, P, C]
                P = yr.shape[1]
                rows_total += yr.shape[0] * P
                K = layer_fp.in_features if isinstance(layer_fp, nn.Linear) else \
                    layer_fp.in_channels * math.prod(layer_fp.kernel_size)
                per_row = 4 * (K + yr.shape[2])
                keep = min(P, int(cfg["position_pool"]),
                           max(1, int(cfg["memory_mb"]) * 2**20 // max(per_row * n_total, 1)))
                if keep < P:
                    idx = torch.stack([torch.randperm(P, generator=g)[:keep] for _ in range(yr.shape[0])]).to(dev)
                    yr = torch.gather(yr, 1, idx.unsqueeze(-1).expand(-1, -1, yr.shape[2]))
                    xr = (torch.gather(_rows_in(layer_fp, xc), 1, idx.unsqueeze(-1).expand(-1, -1, K))
                          if isinstance(layer_fp, nn.Linear) else _rows_in_at(layer_fp, xc, idx))
                else:
                    xr = _rows_in(layer_fp, xc)
                if X is None:
                    X = xr.new_empty(xr.shape[1], n_total, xr.shape[2])
                    Y = yr.new_empty(yr.shape[1], n_total, yr.shape[2])
                at = slots[filled:filled + len(xr)]
                X.index_copy_(1, at, xr.transpose(0, 1))
                Y.index_copy_(1, at, yr.transpose(0, 1))
                filled += len(xr)
    if transposed:
        X, Y = torch.cat(xs), torch.cat(ys)
        n = X.shape[0]
    else:
        if X is None or filled != n_total:
            raise RuntimeError(f"adaround: {name}: expected {n_total} samples, saw {filled}")
        n = n_total
        Xr, Yr = X.reshape(-1, X.shape[-1]), Y.reshape(-1, Y.shape[-1])
    del xs, ys

    def predict(w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if transposed:
            w_t = w_hat.transpose(0, 1)
            return act(F.conv_transpose2d(x, w_t, layer_fp.bias, layer_fp.stride, layer_fp.padding,
                                          layer_fp.output_padding, layer_fp.groups, layer_fp.dilation))
        return act(_apply_rows(layer_fp, x.reshape(-1, x.shape[-1]), w_hat))

    def target(y: torch.Tensor) -> torch.Tensor:
        return y if transposed else y.reshape(-1, y.shape[-1])

    def recon(w_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = predict(w_hat, x) - target(y)
        return (d * d).sum() / (d.numel() // d.shape[1])  # sum over channels, mean over the rest

    def full_loss(w_hat: torch.Tensor) -> float:
        with torch.no_grad():
            if transposed:
                tot = sum(float(recon(w_hat, X[i:i + 64], Y[i:i + 64])) * len(X[i:i + 64]) for i in range(0, n, 64))
                return tot / max(n, 1)
            step = 8192
            tot = sum(float(recon(w_hat, Xr[i:i + step], Yr[i:i + step])) * len(Xr[i:i + step])
                      for i in range(0, Xr.shape[0], step))
            return tot / max(Xr.shape[0], 1)

    nearest = _nearest(w0, s, o, qmin, qmax)
    mse_nearest = full_loss(nearest)

    alpha = ops.adaround_init_alpha(w0, s).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=float(cfg["lr"]), fused=alpha.device.type in ("cpu", "cuda"))
    iters = int(cfg["iterations"])
    warm = int(float(cfg["warm_start"]) * iters)
    b0, b1 = (float(b) for b in cfg["beta_range"])
    reg_param = float(cfg["reg_param"])
    bs = min(int(cfg["batch_size"]), n)
    pps = int(cfg["positions_per_sample"])
    gram = None
    if not transposed:  # a step: the next run of bs * pps rows of the table (wrapping around)
        per_step = min(bs * min(pps, X.shape[0]), Xr.shape[0])
        pos = 0
        # No activation after a dense layer: the loss is a quadratic form in the weight, so every step can
        # use all kept rows exactly through their Gram matrix, at a cost that does not grow with the rows.
        if isinstance(act, nn.Identity) and (isinstance(layer_fp, nn.Linear) or layer_fp.groups == 1) \
                and Xr.shape[1] < per_step:
            gram = _gram(Xr, Yr, layer_fp.bias)
    for it in range(iters):
        w_soft = ops.raw.adaround_weight(w0, alpha, s, o, qmin, qmax, False)
        if gram is not None:
            loss = _gram_loss(w_soft, *gram)
        else:
            if transposed:
                si = torch.randint(0, n, (bs,), generator=g).to(dev)
                xb, yb = X[si], Y[si]
            else:
                if pos + per_step > Xr.shape[0]:
                    pos = 0
                xb, yb = Xr[pos:pos + per_step], Yr[pos:pos + per_step]
                pos += per_step
            loss = recon(w_soft, xb, yb)
        if it >= warm and reg_param > 0:
            rel = (it - warm) / max(iters - warm, 1)
            beta = b1 + 0.5 * (b0 - b1) * (1.0 + math.cos(rel * math.pi))  # cosine decay from b0 to b1
            loss = loss + reg_param * ops.raw.adaround_regularizer(alpha, beta)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        hard = ops.raw.adaround_weight(w0, alpha.detach(), s, o, qmin, qmax, True)
        mse_ada = full_loss(hard)
        up = float((alpha >= 0).float().mean())
        changed = float((hard != nearest).float().mean())
        w_store = hard.transpose(0, 1).contiguous() if transposed else hard
        layer_q.weight.copy_(w_store.reshape(layer_q.weight.shape))
    return LayerReport(name=name, mse_nearest=mse_nearest, mse_adaround=mse_ada, rounded_up=up,
                       changed_vs_nearest=changed, rows=int(Xr.shape[0] if not transposed else n),
                       rows_total=rows_total, seconds=0.0)
