"""Per-layer quantization error: SQNR of every quantized point of the model (each layer's output as the
next layer sees it) against FP32, with only the weights simulated and with only the activations
simulated. Errors accumulate from the input onwards, as they do on a target."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch

from .._progress import Progress
from ._data import as_batches, call, finite
from .layers import QuantizerState, layers


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def layer_sqnr(sim, data: Union[torch.Tensor, Iterable[Any]], *, max_samples: Optional[int] = 32,
               batch_size: int = 16, progress: Optional[bool] = None) -> dict[str, Any]:
    """SQNR in dB at each activation quantizer's output (the layer's output as the next layer sees it)
    against the FP32 model, for weights-only and activations-only simulation of a calibrated `sim`.

    Returns {"points": [{"name", "layer", "op_type", "weights_only_db", "activations_only_db"}, ...] in
    execution order, "samples"}; a value of None means no error at all (infinite SQNR). The FP32 values
    come from the same graph with every quantizer switched off. `sim`'s quantizer flags are restored."""
    batches = as_batches(data, batch_size, max_samples)
    owner = {q: l.name for l in layers(sim) for q in l.quantizers}
    acts = {n: q for n, q in sim.activation_quantizers.items()}
    captured: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(lambda m, inp, out, n=n: captured.__setitem__(n, out.detach()))
             for n, q in acts.items()]
    sums = {n: [0.0, 0.0, 0.0] for n in acts}  # signal, weights-only noise, activations-only noise
    bar = Progress(len(batches), "layer SQNR", progress)
    samples = 0
    try:
        with QuantizerState(sim) as state, torch.no_grad():
            for b in batches:
                state.set(params=False, activations=False)
                captured.clear()
                call(sim.model, b)
                ref = dict(captured)
                for k, (params, activations) in ((1, (True, False)), (2, (False, True))):
                    state.set(params=params, activations=activations)
                    captured.clear()
                    call(sim.model, b)
                    for n, r in ref.items():
                        y = captured.get(n)
                        if y is None or y.shape != r.shape:
                            continue
                        # float32 differences, float64 sums: no float64 copies of every activation
                        if k == 1:
                            sums[n][0] += float(r.float().square().sum(dtype=torch.float64))
                        sums[n][k] += float((r.float() - y.float()).square().sum(dtype=torch.float64))
                samples += int(next(iter(b.values())).shape[0]) if isinstance(b, dict) else int(b[0].shape[0])
                bar.update()
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    points = []
    for n in acts:
        s, nw, na = sums[n]
        if s == 0.0 and nw == 0.0 and na == 0.0:
            continue  # never reached by the data
        points.append({"name": n, "layer": owner.get(n, n), "op_type": sim.op_type(n),
                       "weights_only_db": finite(_sqnr(s, nw), 4), "activations_only_db": finite(_sqnr(s, na), 4)})
    return {"points": points, "samples": samples}
