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
    re-runs the model from its input; a model torch.fx cannot trace (captured with torch.export, such as
    a transformers model fed dicts of keyword inputs) runs once per layer instead, stopped at the layer;
  * loss = sum over channels of the squared error, mean over positions, + reg_param * sum(1 - |2h-1|^beta)
    (no regularizer during the first `warm_start` fraction; beta then falls from beta_range[0] to
    beta_range[1] along a half cosine); Adam on alpha only, through the fused kernels of pyquant.ops;
  * the reconstruction term and its gradient in the weight come from one forward over a step's rows in
    chunks (pyquant.techniques.adaround_loss), a depthwise layer's rows kept channel first
    for it; a depthwise layer with at most `positions_per_sample` output positions (a step would take
    all of them) keeps whole samples instead and steps on the next run of `batch_size` of them with a
    channels-last convolution; image models are walked channels last;
  * at the end h = (alpha >= 0): the weight sits on the grid of its frozen encoding.

With `checkpoint_dir`, every finished layer is saved (atomically); a run restarted with the same
model, data and settings (pyquant._fingerprint: every weight, every sample) continues after the last
finished layer and ends with the same weights as one that was never interrupted (each layer's
randomness comes from (seed, layer index) alone). The layer walk, row sampling and Gram matrix are
pyquant.techniques.layerwise, shared with other layer-wise methods.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._batches import Data, as_batches, batch_len
from .._checkpoint import Checkpoint
from .._deprecation import _UNSET, renamed
from .._dirlock import DirectoryLock
from .._fingerprint import fingerprint
from .._layers import layers_for
from .._progress import Progress
from ..quant.encoding import Encoding
from .adaround_loss import activation_bounds, gram_row_loss, row_loss
from .bn_fold import _fold_model
from . import layerwise
from .layerwise import (apply_rows, channel_first, collect_rows, following_activation, graph_weight_layers,
                        walk_layers)

_LAYERS = layers_for("adaround")
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
            q.adopt_grid(enc)
            q.set_encoding(enc)
            q.freeze()

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'mse nearest':>12s} {'mse adaround':>12s} {'up':>6s} {'changed':>8s} {'s':>6s}"]
        for r in self.report:
            lines.append(f"{r.name:40s} {r.mse_nearest:12.4g} {r.mse_adaround:12.4g} {r.rounded_up:6.1%} "
                         f"{r.changed_vs_nearest:8.1%} {r.seconds:6.1f}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class AdaroundSettings:
    """AdaRound's settings (see `adaround` for each), checked when made: a bad value raises ValueError
    naming the argument and its accepted range."""

    param_bw: int = 4
    iterations: int = 10_000
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    batch_size: int = 32
    max_samples: Optional[int] = None
    positions_per_sample: int = 512
    position_pool: int = 1024
    lr: float = 1e-3
    quant_scheme: str = "min_max"
    config: Any = "default"
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    skip: tuple[str, ...] = ()
    memory_mb: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        from ..sim.quantsim import QUANT_SCHEMES
        bw, it = self.param_bw, self.iterations
        if isinstance(bw, bool) or not isinstance(bw, int) or not 2 <= bw <= 16:
            raise ValueError(f"param_bw must be an int in 2..16, got {bw!r}")
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"iterations must be an int >= 0, got {it!r}")
        if not 0.0 <= float(self.warm_start) < 1.0:
            raise ValueError(f"warm_start must be in [0, 1), got {self.warm_start}")
        if len(self.beta_range) != 2 or not all(float(b) > 0 for b in self.beta_range):
            raise ValueError(f"beta_range must be two positive numbers (start, end), got {self.beta_range!r}")
        if float(self.reg_param) < 0:
            raise ValueError(f"reg_param must be >= 0, got {self.reg_param}")
        for name in ("batch_size", "positions_per_sample", "position_pool", "memory_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant_scheme must be one of {sorted(QUANT_SCHEMES)}, got {self.quant_scheme!r}")
        object.__setattr__(self, "overrides", dict(self.overrides or {}))
        object.__setattr__(self, "skip", tuple(self.skip))

    def for_layer(self, name: str) -> dict[str, Any]:
        """The settings of layer `name`, its overrides applied."""
        return {**dataclasses.asdict(self), **self.overrides.get(name, {})}


def adaround(model: nn.Module, dummy_input: Any, data: Data, *, param_bw: int = 4,
             iterations: int = 10_000, reg_param: float = 0.01, beta_range: tuple[float, float] = (20.0, 2.0),
             warm_start: float = 0.2, batch_size: int = 32, max_samples: Optional[int] = None,
             positions_per_sample: int = 512, position_pool: int = 1024, lr: float = 1e-3,
             quant_scheme: str = "min_max",
             config: Union[str, dict] = "default", overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
             skip: Sequence[str] = (), checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
             memory_mb: int = 1024, seed: int = 0, progress: Optional[bool] = None,
             num_samples: Any = _UNSET) -> AdaroundResult:
    """AdaRound every Conv1d/Conv2d/ConvTranspose2d/Linear weight of `model` (a copy is made; batch
    norms are folded into it first).

    Args:
        dummy_input: an input for tracing the model: a tensor, a tuple of positional inputs or a dict of
            keyword inputs (a model torch.fx cannot trace, such as a transformers model, is captured with
            torch.export, as QuantSim captures it).
        data: unlabelled calibration data: a tensor of samples, or batches (tensors, tuples of positional
            inputs, (inputs, labels) pairs or dicts of keyword inputs).
        param_bw: weight bit width (default 4); encodings follow `config` (QuantSim's hardware config:
            per-channel symmetric weights by default) and `quant_scheme` ("min_max", "tf_enhanced", ...).
        iterations, reg_param, beta_range, warm_start, lr: the optimization (per layer).
        batch_size, positions_per_sample: a step uses batch_size * positions_per_sample rows (output
            positions), the next run of the table of pooled positions (`position_pool` per sample),
            which interleaves all samples.
        max_samples: calibration samples used (default: all of `data`); `num_samples` is its
            deprecated name.
        overrides: per-layer settings, e.g. {"features.0.0": {"iterations": 2000, "param_bw": 8}}.
        skip: layer names to leave with round-to-nearest.
        checkpoint_dir: where progress is saved after each layer; a rerun resumes there. One job uses it
            at a time (another process's: `pyquant.DirectoryInUseError`), and a state file holding anything
            but tensors and plain values is refused (`pyquant.UnsafeFileError`).
        memory_mb: budget for the kept inputs/targets of one layer; beyond it fewer positions are kept.
        seed: makes the run reproducible (and a resumed run identical to an uninterrupted one).
    """
    max_samples = renamed("num_samples", "max_samples", num_samples, _UNSET if max_samples is None else max_samples,
                          None, where="adaround")
    st = AdaroundSettings(param_bw, iterations, reg_param, tuple(beta_range), warm_start, batch_size, max_samples,
                          positions_per_sample, position_pool, lr, quant_scheme, config, overrides or {}, tuple(skip),
                          memory_mb, seed)
    fp32 = copy.deepcopy(model).eval()
    folded = list(_fold_model(fp32, dummy_input))
    qmodel = copy.deepcopy(fp32)
    dev = next((p.device for p in fp32.parameters()), torch.device("cpu"))
    chunks = [_chunk(b, dev) for b in as_batches(data, None, max_samples)]
    n_samples = sum(batch_len(c if isinstance(c, torch.Tensor) else next(iter(c.values())) if isinstance(c, dict)
                              else c[0]) for c in chunks)
    unknown = (set(st.overrides) | set(st.skip)) - {n for n, m in fp32.named_modules() if isinstance(m, _LAYERS)}
    if unknown:
        raise ValueError(f"overrides/skip name layers the model does not have (or that are not "
                         f"Conv/Linear): {sorted(unknown)}")
    gm, order, encodings, graph_nodes = _weight_encodings(fp32, dummy_input, st)

    # one job per checkpoint_dir at a time: DirectoryInUseError names the other job's pid
    lock = DirectoryLock(checkpoint_dir, "checkpoint_dir") if checkpoint_dir is not None else contextlib.nullcontext()
    with lock:
        ckpt, state = _resume(checkpoint_dir, fp32, chunks, st, n_samples, order)
        with torch.no_grad():
            for name, w in state["weights"].items():
                qmodel.get_submodule(name).weight.copy_(w.to(dev))

        report = [LayerReport(**r) for r in state["report"]]
        todo = [n for n in order if n not in state["done"]]
        bar = Progress(len(order), "adaround", progress)
        bar.n = len(order) - len(todo)
        index = {n: i for i, n in enumerate(order)}

        def run_layer(name: str, pairs: Iterable[tuple]) -> None:
            t0 = time.perf_counter()
            layer_fp, layer_q = fp32.get_submodule(name), qmodel.get_submodule(name)
            enc = encodings[f"{name}.weight"]
            if name in st.skip:
                with torch.no_grad():
                    w_cf = channel_first(layer_fp, layer_fp.weight.detach())
                    near = _nearest(_block_rows(name, w_cf, enc), *_grid_params(w_cf, enc)).reshape(w_cf.shape)
                    layer_q.weight.copy_(near.transpose(0, 1) if isinstance(layer_fp, nn.ConvTranspose2d) else near)
            else:
                r = _optimize_layer(name, index[name], layer_fp, layer_q, pairs, n_samples, enc,
                                    following_activation(gm, name, graph_nodes.get(name)), st.for_layer(name), seed)
                r.seconds = time.perf_counter() - t0
                report.append(r)
            state["done"].append(name)
            state["weights"][name] = layer_q.weight.detach().cpu().clone(memory_format=torch.contiguous_format)
            state["report"] = [dataclasses.asdict(r) for r in report]
            if ckpt is not None:
                ckpt.save(state)
            bar.update(note=name)

        if todo:
            with _channels_last(fp32, qmodel, chunks) as walk_chunks:
                walk_layers(fp32, qmodel, todo, walk_chunks, run_layer)
        bar.close()

        path = None
        if checkpoint_dir is not None:
            from ..sim.encodings import write_encodings
            path = str(Path(checkpoint_dir) / "adaround_param_encodings.json")
            write_encodings(path, {}, encodings)
        return AdaroundResult(model=qmodel, encodings=encodings, report=report, folded=folded,
                              skipped=[n for n in order if n in st.skip], encodings_path=path)


def _chunk(b: Any, dev: torch.device) -> Any:
    """One batch on the model's device: a one-input batch as its tensor, more inputs as a tuple, keyword
    inputs as a dict."""
    if isinstance(b, dict):
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
    if len(b) == 1:
        return b[0].to(dev)
    return tuple(v.to(dev) if torch.is_tensor(v) else v for v in b)


@contextlib.contextmanager
def _channels_last(fp32: nn.Module, qmodel: nn.Module, chunks: list[Any]):
    """Inside the block, CPU models fed images (4-d tensors) run channels last, chunks included: their
    depthwise convolutions run faster so (MobileNetV2's forward in about 60% of the CPU time), and a
    layer's input pixels come with their channels side by side, as im2col at kept positions reads them.
    The models get their layout back at the end; the values are the same."""
    four_d = all(isinstance(c, torch.Tensor) and c.dim() == 4 and c.device.type == "cpu" for c in chunks)
    if not four_d or not any(p.dim() == 4 for p in fp32.parameters()):
        yield chunks
        return
    fp32.to(memory_format=torch.channels_last)
    qmodel.to(memory_format=torch.channels_last)
    try:
        yield [c.contiguous(memory_format=torch.channels_last) for c in chunks]
    finally:
        fp32.to(memory_format=torch.contiguous_format)
        qmodel.to(memory_format=torch.contiguous_format)


def _resume(checkpoint_dir: Optional[Union[str, os.PathLike]], fp32: nn.Module, chunks: list[torch.Tensor],
            st: AdaroundSettings, n_samples: int, order: list[str]) -> tuple[Optional[Checkpoint], dict[str, Any]]:
    """The checkpoint (None without checkpoint_dir) and the state to start from: the saved one when its
    fingerprint (every weight, every sample, the settings, pyquant's version) matches, else a new one."""
    state: dict[str, Any] = {"done": [], "weights": {}, "report": []}
    if checkpoint_dir is None:
        return None, state
    settings = {k: v for k, v in dataclasses.asdict(st).items() if k != "max_samples"}
    settings.update(num_samples=n_samples, order=order, beta_range=list(st.beta_range), skip=list(st.skip))
    ckpt = Checkpoint(Path(checkpoint_dir) / _CKPT, fingerprint(model=fp32, data=chunks, settings=settings))
    return ckpt, ckpt.resume(state, "adaround")


def _weight_encodings(fp32: nn.Module, dummy_input: Any, st: AdaroundSettings):
    """(graph, layers in execution order, weight encodings, graph node of each layer that runs as an op of a
    torch.export graph) from a weights-only simulation with the requested config, scheme and per-layer bit
    widths."""
    from ..sim.quantsim import QuantSim
    sim = QuantSim(fp32, dummy_input, quant_scheme=st.quant_scheme, param_bw=st.param_bw, config=st.config)
    gm = sim.model
    order = [n.target for n in gm.graph.nodes
             if n.op == "call_module" and f"{n.target}.weight" in sim.param_quantizers
             and isinstance(gm.get_submodule(n.target), _LAYERS)]
    graph_nodes = {name: node for name, node in graph_weight_layers(sim).items()
                   if isinstance(_submodule(fp32, name), _LAYERS)}
    order += list(graph_nodes)
    encodings: dict[str, Encoding] = {}
    for name in order:
        qname = f"{name}.weight"
        bw = int(st.overrides.get(name, {}).get("param_bw", st.param_bw))
        if bw != sim.param_quantizers[qname].bitwidth:
            sim.set_bitwidth(qname, bw)
        sim.calibrate_weight(qname)
        encodings[qname] = sim.param_quantizers[qname].get_encoding()
    return gm, order, encodings, graph_nodes


def _submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _grid_params(w: torch.Tensor, enc: Encoding) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    qmin, qmax = enc.qmin, enc.qmax
    s, o = enc.scale.reshape(-1).to(w.device), enc.offset.reshape(-1).to(w.device)
    return s, o, qmin, qmax


def _nearest(w_cf: torch.Tensor, s: torch.Tensor, o: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest on the same grid (channel-first weight): pyquant's fake-quant op."""
    shape = ((-1,) if s.numel() > 1 else (1,)) + (1,) * (w_cf.dim() - 1)
    return ops.raw.quantize_dequantize(w_cf, s.reshape(shape), o.reshape(shape), qmin, qmax)


def _optimize_layer(name: str, li: int, layer_fp: nn.Module, layer_q: nn.Module, pairs: Iterable[tuple],
                    n_total: int, enc: Encoding, act: Optional[nn.Module], cfg: Mapping[str, Any],
                    seed: int) -> LayerReport:
    """Learns the rounding of one layer from (input from the rounded model, FP32 output) per chunk."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + li)
    w0 = channel_first(layer_fp, layer_fp.weight.detach())
    s, o, qmin, qmax = _grid_params(w0, enc)
    w_rows = _block_rows(name, w0, enc)
    act = act if act is not None else nn.Identity()
    rows = collect_rows(f"adaround: {name}", layer_fp, pairs, n_total, act, int(cfg["position_pool"]),
                        int(cfg["memory_mb"]), g, channel_first=activation_bounds(act) is not None,
                        whole_up_to=int(cfg["positions_per_sample"]))
    rec = _Reconstruction(layer_fp, act, rows)
    nearest = _nearest(w_rows, s, o, qmin, qmax).reshape(w0.shape)
    mse_nearest = rec.full_loss(nearest)
    alpha = _learn_rounding(w_rows, (s, o, qmin, qmax), rec, cfg, g, w0.shape)
    with torch.no_grad():
        hard = ops.raw.adaround_weight(w_rows, alpha.detach(), s, o, qmin, qmax, True).reshape(w0.shape)
        mse_ada = rec.full_loss(hard)
        up = float((alpha >= 0).float().mean())
        changed = float((hard != nearest).float().mean())
        w_store = hard.transpose(0, 1).contiguous() if rec.transposed else hard
        layer_q.weight.copy_(w_store.reshape(layer_q.weight.shape))
    return LayerReport(name=name, mse_nearest=mse_nearest, mse_adaround=mse_ada, rounded_up=up,
                       changed_vs_nearest=changed, rows=rec.kept_rows, rows_total=rec.rows_total, seconds=0.0)


def _block_rows(name: str, w0: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """The channel-first weight as rows of one scale each, as the AdaRound ops take it: itself when its
    encoding is per tensor or per output channel; a per-block [C, K] weight with blocks of B along K
    (encoding shape (C, K / B)) viewed as [C * K / B, B], one block per row."""
    n = enc.scale.numel()
    if n in (1, w0.shape[0]):
        return w0
    if w0.dim() != 2 or tuple(enc.scale.shape) != (w0.shape[0], n // w0.shape[0]) or w0.shape[1] % (n // w0.shape[0]):
        raise NotImplementedError(f"adaround: {name}: per-block encodings of shape {tuple(enc.scale.shape)} on a "
                                  f"weight of shape {tuple(w0.shape)}: only blocks along the input dimension of a "
                                  f"2-d weight are supported")
    return w0.reshape(n, -1)


def _learn_rounding(w0: torch.Tensor, grid: tuple, rec: "_Reconstruction", cfg: Mapping[str, Any],
                    g: torch.Generator, shape: Optional[torch.Size] = None) -> torch.Tensor:
    """Adam on alpha: the reconstruction loss of the soft-rounded weight, plus the rounding regularizer
    after the warm start with beta on a half cosine from beta_range[0] to beta_range[1]. `w0` is in rows of
    one scale each (`_block_rows`); `shape` the layer's weight shape when that differs."""
    s, o, qmin, qmax = grid
    alpha = ops.adaround_init_alpha(w0, s).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=float(cfg["lr"]), fused=alpha.device.type in ("cpu", "cuda"))
    iters = int(cfg["iterations"])
    warm = int(float(cfg["warm_start"]) * iters)
    b0, b1 = (float(b) for b in cfg["beta_range"])
    reg_param = float(cfg["reg_param"])
    steps = rec.steps(int(cfg["batch_size"]), int(cfg["positions_per_sample"]), g)
    for it in range(iters):
        w_soft = ops.raw.adaround_weight(w0, alpha, s, o, qmin, qmax, False)
        loss = steps(w_soft if shape is None else w_soft.reshape(shape))
        if it >= warm and reg_param > 0:
            rel = (it - warm) / max(iters - warm, 1)
            beta = b1 + 0.5 * (b0 - b1) * (1.0 + math.cos(rel * math.pi))  # cosine decay from b0 to b1
            loss = loss + reg_param * ops.raw.adaround_regularizer(alpha, beta)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return alpha


class _Reconstruction:
    """A layer's reconstruction loss on its kept rows: sum over channels of the squared error after the
    activation, mean over positions. Dense and depthwise layers followed by a clamp (ReLU, ReLU6, none)
    compute it with its gradient in one pass over a step's rows (pyquant.techniques.adaround_loss); a
    depthwise layer's rows are kept channel first for that ([C, rows, k], [C, rows])."""

    def __init__(self, layer: nn.Module, act: nn.Module, rows):
        self.layer, self.act, self.rows_total = layer, act, rows.rows_total
        self.whole = rows.whole_samples
        self.transposed = isinstance(layer, nn.ConvTranspose2d)
        self.samples = rows.samples
        self.bounds = activation_bounds(act)
        self.depthwise = False
        if self.whole:
            self.X, self.Y = rows.X, rows.Y
            return
        self.pool = rows.pool
        self.depthwise = rows.channel_first  # rows [C, rows, k], targets [C, rows]
        self.Xr, self.Yr = rows.flat
        self.fused = self.bounds is not None and (self.depthwise or isinstance(layer, nn.Linear) or layer.groups == 1)

    @property
    def kept_rows(self) -> int:
        if self.transposed:
            return int(self.samples)
        if self.whole:  # every position of every sample
            return int(self.samples * self.Y[0, 0].numel())
        return int(self.Xr.shape[1] if self.depthwise else self.Xr.shape[0])

    def predict(self, w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.transposed:
            return self.act(F.conv_transpose2d(x, w_hat.transpose(0, 1), layer.bias, layer.stride, layer.padding,
                                               layer.output_padding, layer.groups, layer.dilation))
        if self.whole:  # a depthwise convolution on whole samples
            return self.act(F.conv2d(x, w_hat.reshape(layer.weight.shape), layer.bias, layer.stride, layer.padding,
                                     layer.dilation, layer.groups))
        return self.act(apply_rows(layer, x.reshape(-1, x.shape[-1]), w_hat))

    def loss(self, w_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss on rows x, y in this layer's row layout, or on whole samples (a transposed convolution, a
        small depthwise one)."""
        if not self.whole and self.fused:
            return row_loss(w_hat.reshape(w_hat.shape[0], -1), x, y, self.layer.bias, self.bounds, self.depthwise)
        d = self.predict(w_hat, x) - (y if self.whole else y.reshape(-1, y.shape[-1]))
        return (d * d).sum() / (d.numel() // d.shape[1])  # sum over channels, mean over the rest

    def _run(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows a..b of the table."""
        if self.depthwise:
            return self.Xr[:, a:b], self.Yr[:, a:b]
        return self.Xr[a:b], self.Yr[a:b]

    def full_loss(self, w_hat: torch.Tensor) -> float:
        """The loss over all kept rows, in chunks."""
        with torch.no_grad():
            if self.whole:
                X, Y, n = self.X, self.Y, self.samples
                tot = sum(float(self.loss(w_hat, X[i:i + 64], Y[i:i + 64])) * len(X[i:i + 64])
                          for i in range(0, n, 64))
                return tot / max(n, 1)
            step, n = 8192, self.kept_rows
            tot = sum(float(self.loss(w_hat, *self._run(i, i + step))) * (min(i + step, n) - i)
                      for i in range(0, n, step))
            return tot / max(n, 1)

    def steps(self, batch_size: int, positions_per_sample: int, g: torch.Generator):
        """The loss of one optimization step as a function of the soft weight. Dense layers: the next run
        of batch_size * positions_per_sample rows of the table (wrapping around) -- or, with no activation
        after a dense layer, the exact loss of all kept rows through their Gram matrix whenever that is
        cheaper; transposed convolutions: batch_size random whole samples."""
        bs = min(batch_size, self.samples)
        if self.whole and not self.transposed:  # depthwise, whole samples: the next run of samples
            X, Y, n = self.X, self.Y, self.samples
            at = [0]

            def next_samples(w_soft):
                if at[0] + bs > n:
                    at[0] = 0
                a = at[0]
                at[0] += bs
                return self.loss(w_soft, X[a:a + bs], Y[a:a + bs])
            return next_samples
        if self.transposed:
            X, Y, n, dev = self.X, self.Y, self.samples, self.layer.weight.device

            def sampled(w_soft):
                si = torch.randint(0, n, (bs,), generator=g).to(dev)
                return self.loss(w_soft, X[si], Y[si])
            return sampled
        layer, n = self.layer, self.kept_rows
        per_step = min(bs * min(positions_per_sample, self.pool), n)
        # No activation after a dense layer: the loss is a quadratic form in the weight, so every step can
        # use all kept rows exactly through their Gram matrix, at a cost that does not grow with the rows.
        if isinstance(self.act, nn.Identity) and not self.depthwise and \
                (isinstance(layer, nn.Linear) or layer.groups == 1) and self.Xr.shape[1] < per_step:
            stats = layerwise.gram(self.Xr, self.Yr, layer.bias)
            return lambda w_soft: gram_row_loss(w_soft, *stats)
        pos = [0]

        def next_run(w_soft):
            if pos[0] + per_step > n:
                pos[0] = 0
            xb, yb = self._run(pos[0], pos[0] + per_step)
            pos[0] += per_step
            return self.loss(w_soft, xb, yb)
        return next_run
