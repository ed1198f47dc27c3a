"""One call that runs every analysis on a model and returns plain data (JSON-serialisable), which
pyquant.viz turns into plots and an HTML report."""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .._io import atomic_write_text
from .._warnings import ignoring_nothing_to_do
from ._data import as_batches, reusable
from .histograms import activation_histograms
from .layer_error import layer_sqnr
from .sensitivity import METRICS, layer_sensitivity
from .weight_ranges import cle_weight_ranges

SCHEMA = "pyquant.analysis/1"


def analyze(model: nn.Module, dummy_input: Any, data: Union[torch.Tensor, Iterable[Any]],
            metric: Union[str, Callable[[nn.Module], float]] = "sqnr", *, quant_scheme: str = "tf_enhanced",
            param_bw: int = 8, output_bw: int = 8, config: Any = "default", fold_bn: bool = True,
            calib_samples: Optional[int] = None, eval_samples: Optional[int] = None, layer_samples: int = 32,
            batch_size: int = 32, sensitivity: bool = True, cle: bool = True, histogram_bins: int = 128,
            higher_is_better: Optional[bool] = None, progress: Optional[bool] = None,
            calib_data: Union[torch.Tensor, Iterable[Any], None] = None, sim: Any = None) -> dict[str, Any]:
    """Analyzes where quantization hurts `model` and whether CLE would help; returns plain data.

    Steps (each a function of pyquant.analysis you can call alone):
      - weight ranges per output channel of every layer, before and after CLE (cle_weight_ranges);
      - a QuantSim (`quant_scheme`, `param_bw`, `output_bw`, `config`) of the model with its batch
        norms folded (`fold_bn`, as a target runs it), calibrated once on `calib_data` (default:
        `data`; the first `calib_samples` samples, default all);
      - SQNR of every layer's output against FP32 with weights-only / activations-only simulation
        (layer_sqnr, on the first `layer_samples` samples);
      - activation histograms with the encoding ranges (activation_histograms, same samples);
      - per-layer sensitivity, one layer quantized at a time and one left in FP32 at a time, ranked
        (layer_sensitivity with `metric`, on the first `eval_samples` samples; default all).

    `data`: a tensor of samples or an iterable of batches (tensors, tuples, (inputs, labels)).
    `metric`: "sqnr" (default), "top1_agreement", "kl" or a callable metric(model) -> float.
    `sim`: an already calibrated QuantSim of `model` to analyze instead (nothing is recalibrated).
    The model is never modified."""
    from ..sim.quantsim import QuantSim

    if isinstance(metric, str) and metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)} or a callable metric(model) -> float, "
                         f"got {metric!r}")
    if layer_samples < 1:
        raise ValueError(f"layer_samples must be >= 1, got {layer_samples}")
    data = reusable(data)  # the steps below read the data several times
    calib_data = reusable(calib_data) if calib_data is not None else None
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out: dict[str, Any] = {"schema": SCHEMA, "model": type(model).__name__,
                           "parameters": sum(p.numel() for p in model.parameters())}

    t = time.perf_counter()
    if cle:
        out["weight_ranges"] = cle_weight_ranges(model, dummy_input, fold_bn=fold_bn)
        timings["weight_ranges"] = time.perf_counter() - t

    t = time.perf_counter()
    if sim is None:
        m = copy.deepcopy(model).eval()
        if fold_bn:
            from ..techniques import fold_batchnorms
            with ignoring_nothing_to_do():
                fold_batchnorms(m, dummy_input)
        sim = QuantSim(m, dummy_input, quant_scheme=quant_scheme, param_bw=param_bw, output_bw=output_bw,
                       config=config)
        calib = as_batches(data if calib_data is None else calib_data, batch_size, calib_samples, what="data")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # quantizers the data never reached: reported below
            sim.compute_encodings(calib, progress=progress)
        timings["calibration"] = time.perf_counter() - t
    out["simulation"] = {"quant_scheme": sim.quant_scheme, "param_quant_scheme": sim.param_quant_scheme,
                         "param_bw": sim.param_bw, "output_bw": sim.output_bw,
                         "config": config if isinstance(config, str) else "custom", "bn_folded": fold_bn,
                         "quantizers": len(sim.quantizers),
                         "disabled": [n for n, q in sim.quantizers.items() if not q.enabled]}

    t = time.perf_counter()
    out["layer_sqnr"] = layer_sqnr(sim, data, max_samples=layer_samples, batch_size=min(batch_size, 16),
                                   progress=progress)
    timings["layer_sqnr"] = time.perf_counter() - t
    t = time.perf_counter()
    out["histograms"] = activation_histograms(sim, data, bins=histogram_bins, max_samples=layer_samples,
                                              batch_size=min(batch_size, 16))
    timings["histograms"] = time.perf_counter() - t
    if sensitivity:
        t = time.perf_counter()
        out["sensitivity"] = layer_sensitivity(sim, data, metric, higher_is_better=higher_is_better,
                                               batch_size=batch_size, max_samples=eval_samples, progress=progress)
        timings["sensitivity"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    out["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return out


def save_json(analysis: dict[str, Any], path: Union[str, os.PathLike]) -> None:
    """Writes an analysis as JSON, atomically (strict JSON: no NaN/Infinity)."""
    atomic_write_text(path, json.dumps(analysis, allow_nan=False, indent=1) + "\n")


def load_json(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Reads an analysis that `save_json` wrote; a file of another schema is a ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        a = json.load(f)
    if a.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a pyquant analysis (schema {a.get('schema')!r}, expected {SCHEMA!r})")
    return a
