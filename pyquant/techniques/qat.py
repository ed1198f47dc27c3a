"""Helpers for quantization-aware training with a QuantSim: batch-norm re-estimation.

QAT itself is plain PyTorch training of `sim.model` (see the README): fixed ranges (the default after
`compute_encodings`) or range learning (`QuantSim(..., range_learning=True)` or
`sim.set_range_learning(True)`); batch norms either folded before the simulation is built (frozen
statistics) or kept in it and folded at the end with `fold_batchnorms_to_scale(sim)`.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from .._batches import call, iter_batches
from .._layers import BATCH_NORMS
from .._progress import Progress


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data: Iterable[Any], num_batches: Optional[int] = None, *,
                         progress: Optional[bool] = None) -> int:
    """Recomputes the running mean/variance of every BatchNorm in `model` from `data` (batches of
    inputs or (inputs, labels)) with the model as it is now -- after QAT the quantized activations
    feeding a BN no longer have the statistics it learned on FP32. The statistics are exact averages
    over the batches seen (not an exponential average); the rest of the model stays in its mode and
    nothing else changes. Returns the number of batch norms updated."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.training) for m in bns]
    was_training = model.training
    stream = iter_batches(data, batch_size=None)  # (inputs, labels) batches: labels dropped
    batches = list(stream) if num_batches is None else [b for _, b in zip(range(num_batches), stream)]
    if not batches:
        raise ValueError("data: no batches to re-estimate the batch norms with")
    bar = Progress(len(batches), "batch-norm re-estimation", progress)
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        for b in batches:
            call(model, b)
            bar.update()
    finally:
        for m, mom, tr in saved:
            m.momentum = mom
            m.train(tr)
        model.train(was_training)
        bar.close()
    return len(bns)
