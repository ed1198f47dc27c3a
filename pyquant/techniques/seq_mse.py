"""SeqMSE (sequential MSE): layer by layer, in graph order, choose each weight encoding group's clipping range
so that the layer's output on calibration data changes least when its weight is quantized.

Per linear layer of a QuantSim:
  * its inputs X come from the simulation itself, whose earlier layers already carry their chosen
    encodings (errors are seen as they accumulate); only their Gram matrix G = X^T X is kept (float64,
    in x in), accumulated over the calibration batches;
  * the candidates of a group (an output channel, or a block of `block_size` when the weight quantizer is
    per block) are the ranges [k/C * min, k/C * max] of the group's weights for k = C, C-1, ..., 1
    (C = `num_candidates`), encoded on the quantizer's grid as its calibration encodes a range
    (symmetric: the grid covers the larger side; asymmetric: min and max both scale);
  * a candidate's loss is the layer's output error, ||X W^T - X Q(W)^T||^2 = tr((W - Q(W)) G (W - Q(W))^T):
    for a channel its row's quadratic form in G; for a block, that of the block's own columns (the
    block's contribution to the output, G's diagonal block: blocks are chosen independently, as the
    groups of a row would otherwise interact);
  * the least-loss candidate of each group (a tie keeps the wider range) becomes the quantizer's encoding,
    frozen, so that a later `sim.compute_encodings` calibrates the activations and keeps it.

The candidates are quantized by pyquant's fake-quant op, many at once (the weight repeated along a candidate
dimension, block-broadcast scales), and chosen by pyquant.quant.least_error with the output error as its
measure. With
`checkpoint_dir`, every finished layer is saved; a rerun on a simulation built as the first was, with the
same data and settings, continues after the last finished layer.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional, Union

import torch

from .. import ops
from .._batches import Data, as_batches
from .._progress import Progress
from .._warnings import nothing_to_do
from ..quant import Encoding, QuantizerBase, from_range, least_error
from ..sim.quantsim import QuantSim
from .layerwise import (LayerError, LayerwiseResult, SimLayer, input_gram, output_mse, LayerCheckpoint,
                        set_frozen_encoding, sim_linear_layers, walk_sim_layers, weight_groups)

__all__ = ["seq_mse", "seq_mse_encoding", "SeqMseResult"]

_CHUNK_BYTES = 256 * 2**20  # candidate copies of a weight per fake-quant call (with their float64 errors)


class SeqMseResult(LayerwiseResult):
    """What `seq_mse` did: per layer, the output MSE with the calibrated (round-to-nearest) encoding and
    with the chosen one; the weight quantizers it left as they were."""

    title = "SeqMSE layer"


def _check_candidates(num_candidates: int) -> None:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")


def seq_mse_encoding(q: QuantizerBase, weight: torch.Tensor, gram: torch.Tensor, num_candidates: int = 20) -> Encoding:
    """The encoding of weight quantizer `q` (its shape, bit width, grid and block size) that gives each group
    of `weight` [out, in] the candidate range with the least output error on inputs whose Gram matrix is
    `gram` [in, in] (see the module's docstring). `q` needs no encoding of its own."""
    _check_candidates(num_candidates)
    w = weight.detach().float()
    if gram.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gram must be [{w.shape[1]}, {w.shape[1]}] for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(gram.shape)}")
    so, nb = weight_groups(q, w)
    out, cols = w.shape
    B = cols // nb
    mn, mx, _ = ops.raw.minmax(w, [so, nb])
    shape = tuple(q.shape)
    mn, mx = mn.reshape(shape), mx.reshape(shape)
    C = num_candidates
    candidates = [from_range(mn * (k / C), mx * (k / C), q.bitwidth, q.symmetric, q.block_size, signed=q.signed,
                             strict=q.strict) for k in range(C, 0, -1)]
    G = gram.to(device=w.device, dtype=torch.float64)
    # each block's own columns: G's diagonal blocks [nb, B, B] (the whole G per channel)
    Gb = G.reshape(nb, B, nb, B).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    # All candidates' errors in a few calls of the fake-quant op: the weight repeated along a leading
    # candidate dimension, each copy with its candidate's scale (block-broadcast [c, so, nb]), as many
    # candidates per call as keep the copies within _CHUNK_BYTES.
    per_call = max(1, min(C, _CHUNK_BYTES // max(w.numel() * 16, 1)))
    errors = []
    for c0 in range(0, C, per_call):
        part = candidates[c0:c0 + per_call]
        s = torch.stack([e.scale.reshape(so, nb) for e in part]).float()
        o = torch.stack([e.offset.reshape(so, nb) for e in part]).float()
        wc = w.unsqueeze(0).expand(len(part), out, cols).contiguous()
        E = (wc - ops.raw.quantize_dequantize(wc, s, o, q.qmin, q.qmax)).double().reshape(len(part), out, nb, B)
        per_row_block = torch.einsum("cobi,bij,cobj->cob", E, Gb, E)             # [c, out, nb]
        errors.extend(per_row_block.reshape(len(part), so, out // so, nb).sum(2).reshape(len(part), *shape))
    by_candidate = {id(e): err for e, err in zip(candidates, errors)}
    # least_error keeps, per group, the first candidate with the least error: the widest range on a tie
    return least_error(w, candidates, error=lambda enc: by_candidate[id(enc)])


def seq_mse(sim: QuantSim, data: Data, *, num_candidates: int = 20, batch_size: int = 8,
            max_samples: Optional[int] = None, checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
            process_group: Any = None, progress: Optional[bool] = None) -> SeqMseResult:
    """SeqMSE on the linear layers of `sim` (in place): each weight quantizer gets, per channel or block, the
    clipping range among `num_candidates` that least changes its layer's output on `data`, and is frozen.

    Args:
        sim: the simulation (of a module model traced with torch.fx, or of a torch.export capture such as a
            transformers language model). Activation quantizers without an encoding pass their input
            unchanged meanwhile; calibrate them afterwards with `sim.compute_encodings`, which keeps the
            frozen weight encodings.
        data: calibration data: a tensor of samples (split into `batch_size` samples per batch), or
            batches -- tensors, tuples of positional inputs, or dicts of keyword inputs such as
            {"input_ids": ..., "attention_mask": ...}.
        num_candidates: clipping ranges tried per group (fractions k / num_candidates of its range), >= 1.
        max_samples: samples of `data` used (default: all).
        checkpoint_dir: where each finished layer is saved; a rerun resumes there. One job uses it at a time
            (another process's: `pyquant.DirectoryInUseError`); a state file holding anything but tensors
            and plain values raises `pyquant.UnsafeFileError`.
        process_group: a torch.distributed group whose ranks each pass their share of the calibration data
            (the same call on every rank): each layer's Gram matrix is summed over the ranks, so every rank
            makes the choice one process over all the data makes (give each rank its own checkpoint_dir).
        progress: show a progress bar (None: on a terminal).

    Returns a SeqMseResult with each layer's output MSE before (calibrated encoding) and after. A weight
    quantizer that is frozen, disabled or not on a linear layer is left as it is (`result.skipped`)."""
    if not isinstance(sim, QuantSim):
        raise TypeError(f"sim must be a pyquant.QuantSim, got {type(sim).__name__}")
    _check_candidates(num_candidates)
    batches = as_batches(data, batch_size, max_samples, "data")
    layers, skipped = sim_linear_layers(sim)
    if not layers:
        nothing_to_do("seq_mse: the simulation has no linear layer with an enabled, unfrozen weight quantizer")
        return SeqMseResult([], skipped)
    settings = {"num_candidates": num_candidates, "layers": [l.name for l in layers]}
    with LayerCheckpoint(checkpoint_dir, "seq_mse", sim, batches, settings) as job:
        for name in job.done:
            saved = job.tensors(name)
            set_frozen_encoding(sim.quantizer(name), saved["scale"], saved["offset"], sim.weight(name).device)
        report = [LayerError(**r) for r in job.report]
        todo = [l for l in layers if l.name not in job.done]
        bar = Progress(len(layers), "seq_mse", progress)
        bar.n = len(layers) - len(todo)

        def run_layer(layer: SimLayer, xs: list[torch.Tensor]) -> None:
            t0 = time.perf_counter()
            q, w = sim.quantizer(layer.name), sim.weight(layer.name)
            G, rows = input_gram(xs, process_group=process_group)
            before = output_mse(w, q(w), G, rows)
            enc = seq_mse_encoding(q, w, G, num_candidates)
            set_frozen_encoding(q, enc.scale, enc.offset, w.device)
            after = output_mse(w, q(w), G, rows)
            report.append(LayerError(layer.name, before, after, rows, time.perf_counter() - t0))
            job.save(layer.name, {"scale": enc.scale.detach().cpu(), "offset": enc.offset.detach().cpu()},
                     dataclasses.asdict(report[-1]))
            bar.update(note=layer.name)

        if todo:
            walk_sim_layers(sim, batches, todo, run_layer)
        bar.close()
        return SeqMseResult(report, skipped)
