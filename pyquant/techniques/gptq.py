"""GPTQ (Frantar et al., 2022, "GPTQ: accurate post-training quantization for generative pre-trained
transformers"): layer by layer, quantize a weight one input column at a time and spread each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's output
error, so that the layer's output on calibration data changes least.

Per linear layer of a QuantSim, in graph order:
  * its inputs X come from the simulation, whose earlier layers already carry their GPTQ weights; only
    H = 2 X^T X / rows is kept (in x in, accumulated in float64 over the calibration batches);
  * a column whose input is always zero (H[i, i] = 0, a dead input) gets weight 0 and H[i, i] = 1; then
    H += percdamp * mean(diag(H)) * I, and the upper Cholesky factor U of H^-1 drives the updates;
  * with `act_order`, columns go in order of decreasing H[i, i] (the inputs with most energy first);
  * column j is rounded to nearest on the layer's grid, q_j = qdq(w_j), and the error
    (w_j - q_j) / U[j, j] times U[j, j+1:] is subtracted from the remaining columns -- within a lazy batch of
    `block_columns` columns at once, the batch's accumulated errors applied to the later columns after it;
  * the grid is the weight quantizer's: per channel (or per tensor) its calibrated encoding of the original
    weight; per block of B input columns, as GPTQ with groups does, each block's range (min/max of its
    columns, encoded on the quantizer's grid) is taken from the error-updated weights when its first
    column is reached (lazy batches then hold whole blocks); with `act_order` and blocks, the
    calibrated encoding of the original weight (static blocks: the permuted order would split blocks);
  * the result goes into the simulation's FP32 weight as values on the grid, and the encoding is set on
    the weight quantizer and frozen, so that the quantizer reproduces GPTQ's integers exactly and a later
    `sim.compute_encodings` keeps them.

Rounding is pyquant's fake-quant op. With `checkpoint_dir`, every finished layer is saved; a rerun on a
simulation built as the first was, with the same data and settings, continues after the last finished
layer.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Any, Optional, Union

import torch

from .. import ops
from .._batches import Data, as_batches
from .._progress import Progress
from .._warnings import PyquantWarning, nothing_to_do
from ..quant import Encoding, QuantizerBase, from_range, from_scale_offset
from ..sim.quantsim import QuantSim
from .layerwise import (LayerError, LayerwiseResult, SimLayer, input_gram, output_mse, LayerCheckpoint,
                        set_frozen_encoding, sim_linear_layers, walk_sim_layers, weight_groups)

__all__ = ["gptq", "gptq_weight", "GptqResult"]


class GptqResult(LayerwiseResult):
    """What `gptq` did: per layer, the output MSE with round-to-nearest on the calibrated encoding and with
    GPTQ's weight; the weight quantizers it left as they were."""

    title = "GPTQ layer"


def _check_settings(percdamp: float, block_columns: int, act_order: bool) -> None:
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not math.isfinite(percdamp) \
            or percdamp < 0:
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    if isinstance(block_columns, bool) or not isinstance(block_columns, int) or block_columns < 1:
        raise ValueError(f"block_columns must be an int >= 1, got {block_columns!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be True or False, got {act_order!r}")


def gptq_weight(q: QuantizerBase, weight: torch.Tensor, hessian: torch.Tensor, *, percdamp: float = 0.01,
                block_columns: int = 128, act_order: bool = False,
                name: str = "layer") -> tuple[torch.Tensor, Encoding]:
    """GPTQ of one linear layer: (the quantized weight, dequantized: values on the grid, and its encoding) for
    `weight` [out, in] on inputs whose Hessian of the squared output error is `hessian` [in, in]
    (2 X^T X / rows), on weight quantizer `q`'s grid (see the module's docstring). `q` must hold the
    calibrated encoding of `weight` unless it is per block without `act_order`. `name` names the layer
    in errors."""
    _check_settings(percdamp, block_columns, act_order)
    W = weight.detach().float().clone()
    out, cols = W.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name}: hessian must be [{cols}, {cols}] for a weight of shape {tuple(W.shape)}, "
                         f"got {tuple(hessian.shape)}")
    so, nb = weight_groups(q, W)
    B = cols // nb
    dynamic = nb > 1 and not act_order  # block ranges from the error-updated weights
    if dynamic:
        scale = torch.empty(so, nb, device=W.device)
        offset = torch.empty(so, nb, device=W.device)
    else:
        enc = q.get_encoding()
        if enc is None:
            raise ValueError(f"{name}: the weight quantizer has no encoding; calibrate it first")
        scale = enc.scale.detach().float().reshape(so, nb).to(W.device)
        offset = enc.offset.detach().float().reshape(so, nb).to(W.device)
    rows_per_group = out // so

    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(percdamp * float(torch.mean(torch.diag(H))))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"{name}: the damped Hessian is not positive definite (percdamp={percdamp}); "
                         f"use a larger percdamp or more calibration data")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky factor of H^-1

    col_block = list(range(cols)) if perm is None else perm.tolist()  # original column of each position
    Q = torch.zeros_like(W)
    step = -(-block_columns // B) * B if dynamic else block_columns  # whole blocks per lazy batch
    qmin, qmax = q.qmin, q.qmax
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            b = col_block[j] // B
            if dynamic and j % B == 0:  # a block's first column: its range from the updated weights
                mn, mx, _ = ops.raw.minmax(W1[:, i:i + B], [so, 1])
                e = from_range(mn, mx, q.bitwidth, q.symmetric, signed=q.signed, strict=q.strict)
                scale[:, b], offset[:, b] = e.scale.reshape(so), e.offset.reshape(so)
            s = scale[:, b].repeat_interleave(rows_per_group).unsqueeze(1)
            o = offset[:, b].repeat_interleave(rows_per_group).unsqueeze(1)
            w = W1[:, i:i + 1]
            qw = ops.raw.quantize_dequantize(w.contiguous(), s, o, qmin, qmax)
            Q[:, j:j + 1] = qw
            err = (w - qw) / U1[i, i]
            W1[:, i:] -= err @ U1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    enc = from_scale_offset(scale.reshape(q.shape), offset.reshape(q.shape), q.bitwidth, q.symmetric, q.block_size,
                            signed=q.signed, strict=q.strict)
    return Q.to(weight.dtype), enc


def gptq(sim: QuantSim, data: Data, *, percdamp: float = 0.01, block_columns: int = 128, act_order: bool = False,
         batch_size: int = 8, max_samples: Optional[int] = None,
         checkpoint_dir: Optional[Union[str, os.PathLike]] = None, process_group: Any = None,
         progress: Optional[bool] = None) -> GptqResult:
    """GPTQ on the linear layers of `sim` (in place): each layer's FP32 weight is replaced by GPTQ's values on
    its weight quantizer's grid, and the encoding is frozen.

    Args:
        sim: the simulation (of a module model traced with torch.fx, or of a torch.export capture such as a
            transformers language model). Activation quantizers without an encoding pass their input
            unchanged meanwhile; calibrate them afterwards with `sim.compute_encodings`, which keeps the
            frozen weight encodings.
        data: calibration data: a tensor of samples (split into `batch_size` samples per batch), or
            batches -- tensors, tuples of positional inputs, or dicts of keyword inputs such as
            {"input_ids": ..., "attention_mask": ...}.
        percdamp: dampening added to the Hessian's diagonal, as a fraction of its mean (>= 0; default 0.01).
        block_columns: columns per lazy batch of updates (>= 1; default 128): speed only.
        act_order: quantize the columns in order of decreasing Hessian diagonal.
        max_samples: samples of `data` used (default: all).
        checkpoint_dir: where each finished layer is saved; a rerun resumes there. One job uses it at a time
            (another process's: `pyquant.DirectoryInUseError`); a state file holding anything but tensors
            and plain values raises `pyquant.UnsafeFileError`.
        process_group: a torch.distributed group whose ranks each pass their share of the calibration data
            (the same call on every rank): each layer's Gram matrix is summed over the ranks, so every rank
            makes the choice one process over all the data makes (give each rank its own checkpoint_dir).
        progress: show a progress bar (None: on a terminal).

    Returns a GptqResult with each layer's output MSE with round-to-nearest (the calibrated encoding) and
    with GPTQ. A weight quantizer that is frozen, disabled or not on a linear layer is left as it is
    (`result.skipped`)."""
    if not isinstance(sim, QuantSim):
        raise TypeError(f"sim must be a pyquant.QuantSim, got {type(sim).__name__}")
    _check_settings(percdamp, block_columns, act_order)
    batches = as_batches(data, batch_size, max_samples, "data")
    layers, skipped = sim_linear_layers(sim)
    if not layers:
        nothing_to_do("gptq: the simulation has no linear layer with an enabled, unfrozen weight quantizer")
        return GptqResult([], skipped)
    settings = {"percdamp": float(percdamp), "block_columns": block_columns, "act_order": act_order,
                "layers": [l.name for l in layers]}
    with LayerCheckpoint(checkpoint_dir, "gptq", sim, batches, settings) as job:
        with torch.no_grad():
            for name in job.done:
                saved, w = job.tensors(name), sim.weight(name)
                w.copy_(saved["weight"].to(w.device, w.dtype))
                set_frozen_encoding(sim.quantizer(name), saved["scale"], saved["offset"], w.device)
        report = [LayerError(**r) for r in job.report]
        todo = [l for l in layers if l.name not in job.done]
        bar = Progress(len(layers), "gptq", progress)
        bar.n = len(layers) - len(todo)

        def run_layer(layer: SimLayer, xs: list[torch.Tensor]) -> None:
            t0 = time.perf_counter()
            q, w = sim.quantizer(layer.name), sim.weight(layer.name)
            w0 = w.detach().clone()
            G, rows = input_gram(xs, process_group=process_group)
            if rows < G.shape[0]:
                # fewer rows than columns: X^T X is singular and the error feedback fits the few rows seen,
                # which can leave the layer worse than round-to-nearest on other data
                warnings.warn(f"gptq: layer {layer.name!r} has {rows} calibration rows for {G.shape[0]} input "
                              f"columns; its Hessian is rank-deficient -- give at least {G.shape[0]} rows "
                              f"(tokens or samples) of calibration data", PyquantWarning, stacklevel=2)
            before = output_mse(w0, q(w0), G, rows)
            wq, enc = gptq_weight(q, w0, (2.0 / rows) * G, percdamp=percdamp, block_columns=block_columns,
                                  act_order=act_order, name=layer.name)
            set_frozen_encoding(q, enc.scale, enc.offset, w.device)
            # the quantizer's own output: a fixed point of it, so the simulation reproduces GPTQ's integers
            w.copy_(q(wq.to(w.dtype)))
            after = output_mse(w0, q(w), G, rows)
            report.append(LayerError(layer.name, before, after, rows, time.perf_counter() - t0))
            job.save(layer.name, {"weight": w.detach().cpu().clone(), "scale": enc.scale.detach().cpu(),
                                  "offset": enc.offset.detach().cpu()}, dataclasses.asdict(report[-1]))
            bar.update(note=layer.name)

        if todo:
            walk_sim_layers(sim, batches, todo, run_layer)
        bar.close()
        return GptqResult(report, skipped)
