"""AutoQuant: the post-training techniques applied in order, each kept only if the user's metric says it
helps, until the quantized model is within an allowed accuracy drop of FP32.

Flow (every evaluation is one call of `eval_fn`):
  1. FP32; then QuantSim with the first calibration scheme on both sides (batch norms folded, as the
     target runs them) -- if that already meets the target, the run ends there;
  2. weights-only and activations-only simulations for each candidate scheme: they tell which side
     costs the accuracy and pick each side's scheme; then both sides with the chosen schemes;
  3. cross-layer equalization, without and with high-bias absorption; activation smoothing (models with
     norm -> Linear or value -> output projection pairs); empirical bias correction; SeqMSE / GPTQ (low-bit
     weights); AdaRound; the activation range search -- each on top of the best simulation so far, kept
     only if it beats it; the run stops as soon as FP32 - accuracy <= allowed_accuracy_drop;
  4. opt-in (`mixed_precision=`): once the target is met, each layer's bit widths chosen from candidates
     on the best simulation (`pyquant.mixed_precision`), kept when its cheaper mix still meets the target.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .._batches import as_batches
from .._dirlock import DirectoryLock
from .._fingerprint import fingerprint
from .._progress import Progress
from .._version import __version__
from .._warnings import NothingToDoWarning, ignoring_nothing_to_do
from ..sim.config import HardwareConfig, load_config
from ..sim.quantsim import QUANT_SCHEMES, QuantSim
from ..sim.state_io import read_checkpoint
from .cache import StepCache
from .report import write_reports
from .result import AutoQuantResult, StepRecord
from .steps import TECHNIQUE_STEPS, Recipe

__all__ = ["AutoQuant", "AutoQuantError", "DEFAULT_SCHEMES"]

log = logging.getLogger("pyquant.autoquant")

DEFAULT_SCHEMES = ("tf_enhanced", "min_max", "percentile", "mse")
# QuantSim calibrates weights with min/max under these schemes (they clip activation outliers only)
_WEIGHT_EQUIVALENT = {"percentile": "min_max", "entropy": "min_max", "tf": "min_max"}
_BC_METHODS = ("empirical", "analytical", None)


class AutoQuantError(RuntimeError):
    """eval_fn failed or returned something that is not a number."""


class _Skip(Exception):
    """The step does not apply to this model or data."""


def _check_bw(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
        raise ValueError(f"{name} must be an int in 2..16, got {v!r}")
    return v


class AutoQuant:
    """Finds a quantized version of `model` within an allowed accuracy drop, applying pyquant's
    post-training techniques in order and keeping each only if `eval_fn` says it helps.

    Args:
        model: the trained FP32 model. It is copied; the techniques never modify it.
        dummy_input: an input for capturing the graph (a tensor, a tuple, or a dict for HuggingFace models).
        data: unlabelled calibration data: a tensor of samples (split into batches of `batch_size`), or
            an iterable of batches -- tensors, (inputs, labels) tuples (labels are dropped) or dicts of
            keyword inputs. It is read once and kept in memory.
        eval_fn: `eval_fn(model) -> float`, the metric to keep high (accuracy, agreement with FP32, ...).
            It is called with the FP32 model and with each simulation's `sim.model`.
        param_bw / output_bw: weight and activation bit widths (2..16; defaults 8 and 8).
        config: the hardware config (QuantSim's): "default" (per-channel weights), "per_tensor",
            "strict_symmetric_int8", a JSON path or a dict.
        quant_schemes: calibration schemes to try on each side (QuantSim's names); the first is the
            baseline. Default: tf_enhanced, min_max, percentile, mse. Percentile and entropy calibrate
            weights like min_max, so the weights try each distinct calibration once.
        batch_size: samples per calibration batch when `data` is a tensor (default 32).
        bias_correction: "empirical" (default: measured on `data`), "analytical" (from the folded batch
            norms, no data) or None (not tried).
        adaround: try AdaRound as the last step (default True). `adaround_kwargs` go to
            `pyquant.adaround` (default: 1000 iterations per layer, all calibration samples).
        seq_mse / gptq: try SeqMSE / GPTQ on the best simulation so far, before AdaRound (each replaces the
            other; AdaRound replaces both). None (default): tried when param_bw <= 4, where weight rounding
            costs most. `seq_mse_kwargs` / `gptq_kwargs` go to `pyquant.seq_mse` / `pyquant.gptq`.
        replace_relu6: let cross-layer equalization swap ReLU6 for ReLU (ReLU6 blocks it); the step is
            kept only if the metric says the swapped model is better.
        smoothing_alpha: the alpha of activation smoothing (`pyquant.smooth_activations`), tried after
            equalization on models with norm -> Linear or value -> output projection pairs; None: not
            tried (default 0.5).
        range_search: try the output-aware activation range search (`pyquant.search_activation_ranges`) as
            the last step, on the calibration data (default True; the simulation's activations must be
            quantized). `range_search_kwargs` go to it (default: loss "mse", at most 256 samples).
        mixed_precision: candidates ("w4a8,w8a8,w8a16", or a list) to choose each layer's bit widths from
            once the target is met (`pyquant.mixed_precision` on the best simulation, with eval_fn and the
            calibration data; kept when the cheaper mix still meets the target). None (default): not tried.
            `mixed_precision_kwargs` go to it (e.g. cost, refine, time_budget).
        name: a name for the output files (default: the model's class name).
        progress: show a progress bar (default: on a terminal).

    `optimize()` runs the flow and returns an `AutoQuantResult`. Every evaluated step can be cached in
    a folder so that a rerun (or a run killed midway) continues where it stopped. The cache is keyed
    by the model, dummy input, data, bit widths, config, schemes and eval_fn's code (another value of
    any of them is refused, naming it); a step's own settings (AdaRound's, bias correction's method,
    replace_relu6) are kept with the step, so changing one recomputes that step and the steps built
    on it. Data that eval_fn reads from outside (its closure, globals) is not part of the key -- use a
    new cache_dir when it changes.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, data: Any, eval_fn: Callable[[nn.Module], float],
                 param_bw: int = 8, output_bw: int = 8,
                 config: Union[str, dict, HardwareConfig] = "default", *,
                 quant_schemes: Sequence[str] = DEFAULT_SCHEMES, batch_size: int = 32,
                 bias_correction: Optional[str] = "empirical", adaround: bool = True,
                 adaround_kwargs: Optional[Mapping[str, Any]] = None,
                 seq_mse: Optional[bool] = None, seq_mse_kwargs: Optional[Mapping[str, Any]] = None,
                 gptq: Optional[bool] = None, gptq_kwargs: Optional[Mapping[str, Any]] = None,
                 replace_relu6: bool = True, smoothing_alpha: Optional[float] = 0.5,
                 range_search: bool = True, range_search_kwargs: Optional[Mapping[str, Any]] = None,
                 mixed_precision: Union[str, Sequence[Any], None] = None,
                 mixed_precision_kwargs: Optional[Mapping[str, Any]] = None,
                 name: Optional[str] = None, progress: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable as eval_fn(model) -> float, got {type(eval_fn).__name__}")
        self.param_bw = _check_bw("param_bw", param_bw)
        self.output_bw = _check_bw("output_bw", output_bw)
        if isinstance(quant_schemes, str):
            quant_schemes = (quant_schemes,)
        schemes = list(dict.fromkeys(quant_schemes))
        bad = [s for s in schemes if s not in QUANT_SCHEMES]
        if not schemes or bad:
            raise ValueError(f"quant_schemes must be a non-empty list of {sorted(QUANT_SCHEMES)}, got "
                             f"{list(quant_schemes)!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if bias_correction not in _BC_METHODS:
            raise ValueError(f"bias_correction must be one of {list(_BC_METHODS)}, got {bias_correction!r}")
        self._config_spec = config
        self.config = load_config(config)  # a bad config fails here, not in the middle of the run
        self.quant_schemes = tuple(schemes)
        self.bias_correction = bias_correction
        self.adaround = bool(adaround)
        self.adaround_kwargs = {"iterations": 1000, **dict(adaround_kwargs or {})}
        for k in ("param_bw", "quant_scheme", "config", "checkpoint_dir", "progress"):
            if k in self.adaround_kwargs:
                raise ValueError(f"adaround_kwargs: {k!r} is set by AutoQuant itself")
        self._layerwise_on: dict[str, Optional[bool]] = {}
        self.layerwise_kwargs: dict[str, dict[str, Any]] = {}
        for method, on, kw in (("seq_mse", seq_mse, seq_mse_kwargs), ("gptq", gptq, gptq_kwargs)):
            if on is not None and not isinstance(on, bool):
                raise TypeError(f"{method} must be True, False or None (tried when param_bw <= 4), got {on!r}")
            self._layerwise_on[method] = on
            self.layerwise_kwargs[method] = dict(kw or {})
            for k in ("checkpoint_dir", "progress"):
                if k in self.layerwise_kwargs[method]:
                    raise ValueError(f"{method}_kwargs: {k!r} is set by AutoQuant itself")
        self.replace_relu6 = bool(replace_relu6)
        if smoothing_alpha is not None and (isinstance(smoothing_alpha, bool)
                                            or not isinstance(smoothing_alpha, (int, float))
                                            or not 0.0 <= float(smoothing_alpha) <= 1.0):
            raise ValueError(f"smoothing_alpha must be a number in [0, 1], or None to not try activation smoothing; "
                             f"got {smoothing_alpha!r}")
        self.smoothing_alpha = None if smoothing_alpha is None else float(smoothing_alpha)
        self._smoothing_pairs: Optional[int] = None
        self.range_search = bool(range_search)
        self.range_search_kwargs = {"max_samples": 256, **dict(range_search_kwargs or {})}
        for k in ("checkpoint_dir", "progress"):
            if k in self.range_search_kwargs:
                raise ValueError(f"range_search_kwargs: {k!r} is set by AutoQuant itself")
        from ..techniques import parse_candidates
        self.mixed_precision_candidates: Optional[tuple[str, ...]] = None if mixed_precision is None else tuple(
            c.name for c in parse_candidates(mixed_precision))
        self.mixed_precision_kwargs = dict(mixed_precision_kwargs or {})
        for k in ("checkpoint_dir", "progress", "eval_data", "allowed_accuracy_drop"):
            if k in self.mixed_precision_kwargs:
                raise ValueError(f"mixed_precision_kwargs: {k!r} is set by AutoQuant itself")
        self.allowed_drop: Optional[float] = None  # set by optimize(): the mixed-precision step's target
        self.progress = progress
        self.name = name or type(model).__name__
        self.eval_fn = eval_fn
        self.dummy_input = dummy_input
        self._model = copy.deepcopy(model).eval()
        # kept in memory, so that every step calibrates on exactly the same data, in the same order
        self._calib = as_batches(data, batch_size)
        self._fp_models: dict[Any, tuple[nn.Module, dict]] = {}  # cle, or (cle, "smoothing") -> model
        self._fold = self._fold_info()

    def layerwise_enabled(self, method: str) -> bool:
        """Whether the flow tries layer-wise method `method` ("seq_mse", "gptq"): as asked, or by default
        when weights have at most 4 bits."""
        on = self._layerwise_on[method]
        return self.param_bw <= 4 if on is None else on

    # ---- FP32 models ----------------------------------------------------------------------------
    def _fold_info(self) -> dict[str, Any]:
        """Folds the batch norms once, on a copy, to know whether the simulations run folded."""
        from ..techniques import fold_batchnorms
        m = copy.deepcopy(self._model)
        try:
            with ignoring_nothing_to_do():
                pairs = fold_batchnorms(m, self.dummy_input)
        except Exception as e:  # noqa: BLE001 - a model that cannot be captured is simulated as it is
            return {"folded": 0, "reason": f"batch norms not folded: {type(e).__name__}: {str(e)[:200]}"}
        n = len(pairs) + len(pairs.forward)
        self._fp_models[None] = (m, {"bn_stats": pairs.bn_stats})
        return {"folded": n, "reason": "" if n else "no batch norm to fold"}

    def _fp_model(self, cle: Optional[str]) -> tuple[nn.Module, dict]:
        """The FP32 model a recipe starts from (shared, never modified: the simulations copy it)."""
        if cle in self._fp_models:
            return self._fp_models[cle]
        if cle is None:  # the model could not be folded
            return self._model, {"bn_stats": {}}
        from ..techniques import equalize
        if self._fold["reason"].startswith("batch norms not folded"):  # the model could not be captured
            raise _Skip("equalization finds its layer pairs in the captured graph; " + self._fold["reason"])
        m = copy.deepcopy(self._model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = equalize(m, self.dummy_input, replace_relu6=self.replace_relu6,
                           absorb_high_bias=(cle == "cle+hba"))
        if not rep.pairs:
            first = next(iter(rep.skipped.items()), None)
            raise _Skip("no Conv/Linear layer pair with a positively homogeneous activation between them"
                        + (f" ({len(rep.skipped)} skipped; {first[0]}: {first[1]})" if first else ""))
        if cle == "cle+hba" and not rep.absorbed:
            raise _Skip("no high bias to absorb (no folded batch norm before a ReLU)")
        info = {"bn_stats": rep.bn_stats, "pairs": len(rep.pairs), "absorbed": len(rep.absorbed),
                "relu6_replaced": len(rep.relu6_replaced)}
        if rep.relu6_output_change is not None:
            info["relu6_output_change"] = rep.relu6_output_change
        self._fp_models[cle] = (m, info)
        return m, info

    def has_smoothing_pairs(self) -> bool:
        """Whether the model has norm -> Linear or value -> output pairs that activation smoothing scales
        (found once, in the captured graph)."""
        if self._smoothing_pairs is None:
            from ..techniques import smoothing_pairs
            try:
                self._smoothing_pairs = len(smoothing_pairs(self._model, self.dummy_input))
            except Exception:  # noqa: BLE001 - a model that cannot be captured has no pairs to smooth
                self._smoothing_pairs = 0
        return self._smoothing_pairs > 0

    def _smoothed_model(self, cle: Optional[str]) -> tuple[nn.Module, dict]:
        """The FP32 model of `cle` with its activations smoothed (shared, never modified)."""
        key = (cle, "smoothing")
        if key in self._fp_models:
            return self._fp_models[key]
        from ..techniques import smooth_activations
        base, base_info = self._fp_model(cle)
        m = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = smooth_activations(m, self._calib, alpha=self.smoothing_alpha, dummy_input=self.dummy_input,
                                     progress=self.progress)
        if not res.pairs:
            raise _Skip("no norm -> Linear or value -> output projection pair to smooth"
                        + (f" ({len(res.skipped)} skipped)" if res.skipped else ""))
        info = {**base_info, "smoothed_pairs": len(res.pairs), "smoothing_skipped": len(res.skipped)}
        self._fp_models[key] = (m, info)
        return m, info

    def _recipe_model(self, r: Recipe) -> tuple[nn.Module, dict]:
        return self._smoothed_model(r.cle) if r.smoothing else self._fp_model(r.cle)

    # ---- simulations ---------------------------------------------------------------------------
    def _new_sim(self, model: nn.Module, r: Recipe) -> QuantSim:
        sim = QuantSim(model, self.dummy_input, quant_scheme=r.act_scheme, param_quant_scheme=r.weight_scheme,
                       param_bw=self.param_bw, output_bw=self.output_bw, config=self.config)
        for n in (sim.activation_quantizers if not r.activations else ()):
            sim.enable(n, False)
        for n in (sim.param_quantizers if not r.weights else ()):
            sim.enable(n, False)
        return sim

    def _calibrate(self, sim: QuantSim, r: Recipe) -> None:
        if r.activations:
            sim.compute_encodings(self._calib, progress=False)
        else:  # weights come from the weights themselves: no need to run the data
            sim.compute_encodings(lambda m: None)

    def _correct_bias(self, sim: QuantSim, fp: nn.Module, info: dict, method: str) -> dict[str, Any]:
        from ..techniques import correct_bias, correct_bias_analytical
        if method == "empirical":
            shifts = correct_bias(sim, fp, self._calib, progress=self.progress)
        else:
            if not info.get("bn_stats"):
                raise _Skip("analytical bias correction needs folded batch norms")
            shifts = correct_bias_analytical(sim, info["bn_stats"])
        if not shifts:
            raise _Skip("no quantized Conv/Linear layer to correct")
        sim.compute_encodings(self._calib, progress=False)  # the activations moved with the biases
        return {"layers_corrected": len(shifts), "largest_shift": max(shifts.values())}

    def _build(self, r: Recipe, cache: Optional[StepCache]) -> tuple[QuantSim, dict[str, Any]]:
        """The calibrated simulation a recipe describes, and what was done to make it."""
        fp, info = self._recipe_model(r)
        opts: dict[str, Any] = {k: v for k, v in info.items() if k != "bn_stats"}
        if r.layerwise is not None:
            opts.update(self._layerwise(fp, r, cache))
            sim = opts.pop("sim")
        elif not r.adaround:
            sim = self._new_sim(fp, r)
            self._calibrate(sim, r)
        else:
            from ..techniques import adaround
            xs = self._calib
            one_tensor = isinstance(self.dummy_input, torch.Tensor) and all(
                isinstance(x, tuple) and len(x) == 1 for x in xs)
            # a single-input model's batches as one tensor of samples; others (keyword or several inputs)
            # as the batches they are
            data = torch.cat([x[0] for x in xs]) if one_tensor else xs
            res = adaround(fp, self.dummy_input, data, param_bw=self.param_bw,
                           quant_scheme=r.weight_scheme, config=self._config_spec,
                           checkpoint_dir=None if cache is None else cache.adaround_dir,
                           progress=self.progress, **self.adaround_kwargs)
            if not res.encodings:
                raise _Skip("no Conv/Linear weight to round")
            sim = self._new_sim(res.model, r)
            res.apply_to(sim)
            self._calibrate(sim, r)
            near = sum(x.mse_nearest for x in res.report)
            opts.update(layers=len(res.report), iterations=self.adaround_kwargs.get("iterations"),
                        mse_vs_nearest=(sum(x.mse_adaround for x in res.report) / near) if near > 0 else None)
        if r.bias_correction:
            opts.update(self._correct_bias(sim, fp, info, r.bias_correction))
        if r.range_search:
            opts.update(self._search_ranges(sim, r, cache))
        if r.mixed_precision:
            opts.update(self._mixed_precision(sim, cache))
        return sim, opts

    def _mixed_precision(self, sim: QuantSim, cache: Optional[StepCache]) -> dict[str, Any]:
        """Per-layer bit widths on the calibrated simulation, the cheapest mix within the run's target."""
        from ..techniques import mixed_precision
        res = mixed_precision(sim, list(self.mixed_precision_candidates), self.eval_fn, self._calib,
                              self.allowed_drop, checkpoint_dir=None if cache is None else
                              cache.layerwise_dir("mixed_precision"), progress=self.progress,
                              **self.mixed_precision_kwargs)
        counts: dict[str, int] = {}
        for c in res.mix.values():
            counts[c.name] = counts.get(c.name, 0) + 1
        return {"mix": counts, "relative_cost": res.relative_cost, "cost_model": res.cost_model,
                "evaluations": res.evaluations, "pareto": [[p.relative_cost, p.accuracy] for p in res.pareto]}

    def _search_ranges(self, sim: QuantSim, r: Recipe, cache: Optional[StepCache]) -> dict[str, Any]:
        """The activation range search on the calibrated simulation (its searched quantizers frozen)."""
        from ..techniques import search_activation_ranges
        if not r.activations:
            raise _Skip("the activations are not quantized")
        with warnings.catch_warnings():
            warnings.simplefilter("error", NothingToDoWarning)
            try:
                res = search_activation_ranges(
                    sim, self._calib, checkpoint_dir=None if cache is None else cache.layerwise_dir("range_search"),
                    progress=self.progress, **self.range_search_kwargs)
            except NothingToDoWarning as w:
                raise _Skip(str(w)) from None
        return {"quantizers_clipped": len(res.clipped), "loss_before": res.loss_before, "loss_after": res.loss_after}

    def _layerwise(self, fp: nn.Module, r: Recipe, cache: Optional[StepCache]) -> dict[str, Any]:
        """A simulation with SeqMSE or GPTQ weights (frozen encodings), then calibrated; under "sim" with what
        the method did."""
        from ..techniques import gptq, seq_mse
        if not r.weights:
            raise _Skip("the weights are not quantized")
        sim = self._new_sim(fp, r)
        run = {"seq_mse": seq_mse, "gptq": gptq}[r.layerwise]
        with warnings.catch_warnings():
            warnings.simplefilter("error", NothingToDoWarning)
            try:
                ckpt = None if cache is None else cache.layerwise_dir(r.layerwise)
                res = run(sim, self._calib, checkpoint_dir=ckpt, progress=self.progress,
                          **self.layerwise_kwargs[r.layerwise])
            except NothingToDoWarning as w:
                raise _Skip(str(w)) from None
        self._calibrate(sim, r)
        before = sum(x.mse_before for x in res.layers)
        return {"sim": sim, "layers": len(res.layers),
                "mse_vs_nearest": (sum(x.mse_after for x in res.layers) / before) if before > 0 else None}

    def _restore(self, r: Recipe, path: Path) -> QuantSim:
        """A cached step's simulation: built empty from its recipe, then its saved state loaded."""
        fp, _ = self._recipe_model(r)
        sim = self._new_sim(fp, r)
        state = read_checkpoint(path)["model"]  # tensors and plain values only: UnsafeFileError otherwise
        with torch.no_grad():  # layers that gained a bias (bias correction) need one to load into
            have = sim.model.state_dict()
            for k in state:
                mod_name = k[:-len(".bias")] if k.endswith(".bias") else (
                    k[:-len(".parametrizations.bias.original")] if k.endswith(".parametrizations.bias.original")
                    else None)
                if mod_name is not None and k not in have:
                    sim.bias(mod_name, create=True)
        sim.load_checkpoint(path)
        return sim

    # ---- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, step: str) -> float:
        try:
            v = self.eval_fn(model)
        except Exception as e:
            raise AutoQuantError(f"eval_fn raised {type(e).__name__} while evaluating step {step!r}: {e}") from e
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise AutoQuantError(f"eval_fn must return a number (higher is better); on step {step!r} it returned "
                                 f"{v!r} ({type(v).__name__})")
        v = float(v)
        if not math.isfinite(v):
            raise AutoQuantError(f"eval_fn returned {v} on step {step!r}; it must return a finite number")
        return v

    # ---- the run -------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        cfg = self._config_spec if isinstance(self._config_spec, (str, dict)) else repr(self.config)
        # what every step depends on; a step's own settings (AdaRound's iterations, ...) are kept in its
        # record instead, so changing them recomputes that step (and what it changes) only
        return {"param_bw": self.param_bw, "output_bw": self.output_bw, "config": cfg,
                "quant_schemes": list(self.quant_schemes), "batches": len(self._calib)}

    def _step_settings(self, key: str) -> dict[str, Any]:
        t = next((t for t in TECHNIQUE_STEPS if t.key == key), None)
        s = t.settings(self) if t is not None else {}
        return json.loads(json.dumps(s, default=str))  # as it reads back from the cache

    def optimize(self, allowed_accuracy_drop: float = 0.01, time_budget_s: Optional[float] = None,
                 cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None, *,
                 output_dir: Optional[Union[str, "os.PathLike[str]"]] = None) -> AutoQuantResult:
        """Runs the flow until FP32 - accuracy <= `allowed_accuracy_drop` (in eval_fn's units), or every
        step has been tried, or `time_budget_s` seconds of this call have passed (checked between
        steps; FP32 and the first simulation always run). Returns the best simulation found.

        `cache_dir`: where each finished step is saved; a rerun with the same inputs resumes from it (a
        cache made with other inputs raises `AutoQuantCacheError`); one run uses it at a time (a run in another
        process: `pyquant.DirectoryInUseError` naming its pid), and a cached simulation holding anything but
        tensors and plain values raises `pyquant.UnsafeFileError`. `output_dir`: where the encodings
        and the reports go (default: `cache_dir`, else a new temporary folder)."""
        drop = allowed_accuracy_drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not math.isfinite(drop) or drop < 0:
            raise ValueError(f"allowed_accuracy_drop must be a finite number >= 0 (in eval_fn's units), got {drop!r}")
        self.allowed_drop = float(drop)
        if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float))
                                          or not time_budget_s > 0):
            raise ValueError(f"time_budget_s must be a positive number of seconds or None, got {time_budget_s!r}")
        with contextlib.ExitStack() as held:
            cache = None
            if cache_dir is not None:
                # one run per cache_dir at a time (DirectoryInUseError names the other run's pid); the lock
                # goes when this run ends, or with its process
                held.enter_context(DirectoryLock(cache_dir, "cache_dir"))
                fp = fingerprint(model=self._model, data=self._calib, dummy_input=self.dummy_input,
                                 eval_fn=self.eval_fn, settings=self._settings())
                cache = StepCache(cache_dir, fp)
            out = Path(output_dir) if output_dir is not None else (
                Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="pyquant-autoquant-")))
            run = _Run(self, float(drop), time_budget_s, cache)
            with warnings.catch_warnings():
                # the techniques' "nothing to do" warnings become skipped steps in the report
                warnings.simplefilter("ignore", NothingToDoWarning)
                run.execute()
            return run.finish(out)


class _Run:
    """One call of optimize(): the records so far, the best full simulation, the clock."""

    def __init__(self, aq: AutoQuant, drop: float, budget: Optional[float], cache: Optional[StepCache]):
        self.aq, self.drop, self.budget, self.cache = aq, drop, budget, cache
        self.t0 = time.perf_counter()
        self.records: list[StepRecord] = []
        self.best: Optional[StepRecord] = None
        self.best_sim: Optional[QuantSim] = None
        self.fp32: Optional[float] = None
        self.stopped_before: Optional[str] = None
        n_w = len({_WEIGHT_EQUIVALENT.get(s, s) for s in aq.quant_schemes})
        n_a = len({"min_max" if s == "tf" else s for s in aq.quant_schemes})
        n_t = sum(1 for t in TECHNIQUE_STEPS if t.enabled(aq))
        self.bar = Progress(2 + n_w + n_a + 1 + n_t, "autoquant", aq.progress)

    # ---- helpers -------------------------------------------------------------------------------
    def met(self) -> bool:
        return self.best is not None and self.fp32 - self.best.accuracy <= self.drop + 1e-12

    def out_of_time(self, next_key: str) -> bool:
        if self.budget is not None and time.perf_counter() - self.t0 >= self.budget:
            self.stopped_before = next_key
            return True
        return False

    def improves(self, rec: StepRecord, kind: str) -> bool:
        """Whether an evaluated step replaces the best: a full simulation that beats it, or a mixed-precision
        mix (cheaper by construction) that still meets the target."""
        if rec.status != "evaluated":
            return False
        if kind == "mixed_precision":
            return self.fp32 - rec.accuracy <= self.drop + 1e-12
        return kind == "full" and (self.best is None or rec.accuracy > self.best.accuracy)

    def best_recipe(self) -> Recipe:
        return Recipe(**self.best.recipe)

    def step(self, key: str, title: str, kind: str, recipe: Optional[Recipe]) -> StepRecord:
        settings = self.aq._step_settings(key)
        rec = self.cache.get(key) if self.cache is not None else None
        if rec is not None and (rec.recipe != (recipe.to_json() if recipe else None) or rec.settings != settings):
            log.info("autoquant: %s: its settings or the simulation it builds on changed; recomputing", key)
            rec = None
        sim = None
        if rec is not None:
            rec.cached = True
            # whether it beats the best depends on this run's earlier steps, not the old run's
            rec.improved = self.improves(rec, kind)
        else:
            t0 = time.perf_counter()
            try:
                if kind == "fp32":
                    opts: dict[str, Any] = {}
                    acc = self.aq._evaluate(self.aq._model, key)
                else:
                    sim, opts = self.aq._build(recipe, self.cache)
                    acc = self.aq._evaluate(sim.model, key)
                rec = StepRecord(key, title, kind, "evaluated", acc, time.perf_counter() - t0, opts,
                                 recipe.to_json() if recipe else None, settings)
            except _Skip as s:
                rec = StepRecord(key, title, kind, "skipped", seconds=time.perf_counter() - t0, reason=str(s),
                                 recipe=recipe.to_json() if recipe else None, settings=settings)
            except AutoQuantError:
                raise
            except Exception as e:  # noqa: BLE001 - a technique failing on this model skips its step
                if kind in ("fp32",) or key == "quantsim":
                    raise
                msg = f"{type(e).__name__}: {str(e)[:300]}"
                warnings.warn(f"AutoQuant: step {key!r} failed and is left out: {msg}", RuntimeWarning, stacklevel=3)
                rec = StepRecord(key, title, kind, "failed", seconds=time.perf_counter() - t0, reason=msg,
                                 recipe=recipe.to_json() if recipe else None, settings=settings)
            if self.improves(rec, kind):
                rec.improved = True
                if self.cache is not None:  # state first: a record never points at a missing state
                    self.cache.save_state(key, sim)
            if self.cache is not None and rec.status != "failed":
                self.cache.put(rec)
                if rec.improved:
                    self.cache.keep_only_state(key)
        self.records.append(rec)
        if kind == "fp32" and rec.status == "evaluated":
            self.fp32 = rec.accuracy
        if rec.improved and rec.status == "evaluated":
            self.best, self.best_sim = rec, sim
        acc = f"{rec.accuracy:.4f}" if rec.accuracy is not None else rec.status
        log.info("autoquant: %s: %s%s", key, acc, " (cached)" if rec.cached else "")
        self.bar.update(note=f"{key}: {acc}")
        return rec

    # ---- the flow ------------------------------------------------------------------------------
    def execute(self) -> None:
        try:
            self._accuracy_steps()
            self._mixed_precision_step()
        finally:
            self.bar.close()

    def _mixed_precision_step(self) -> None:
        """Once the target is met: the best simulation at the cheapest mix of precisions that still meets it."""
        t = next(t for t in TECHNIQUE_STEPS if t.key == "mixed_precision")
        if not t.enabled(self.aq) or not self.met() or self.out_of_time(t.key):
            return
        best = self.best_recipe()
        self.step(t.key, t.title(self.aq, best), "mixed_precision", dataclasses.replace(best, **t.change(self.aq)))

    def _accuracy_steps(self) -> None:
        """FP32, the first simulation, the schemes and the techniques, until the target is met."""
        aq = self.aq
        self.step("fp32", "FP32 model", "fp32", None)
        s0 = aq.quant_schemes[0]
        base = Recipe(s0, s0)
        folded = f", {aq._fold['folded']} batch norms folded" if aq._fold["folded"] else ""
        self.step("quantsim", f"QuantSim W{aq.param_bw}A{aq.output_bw}, {s0}{folded}", "full", base)
        if self.met():
            return
        # which side costs the accuracy, and each side's calibration scheme
        w_cands = list(dict.fromkeys(_WEIGHT_EQUIVALENT.get(s, s) for s in aq.quant_schemes))
        if _WEIGHT_EQUIVALENT.get(s0, s0) != w_cands[0]:
            w_cands.insert(0, s0)
        a_cands = list(dict.fromkeys("min_max" if s == "tf" else s for s in aq.quant_schemes))
        w_acc: dict[str, float] = {}
        a_acc: dict[str, float] = {}
        for s in w_cands:
            key = f"weights_only/{s}"
            if self.out_of_time(key):
                return
            r = self.step(key, f"weights only, {s}", "weights_only", dataclasses.replace(base, weight_scheme=s,
                                                                                        activations=False))
            if r.accuracy is not None:
                w_acc[s] = r.accuracy
        for s in a_cands:
            key = f"activations_only/{s}"
            if self.out_of_time(key):
                return
            r = self.step(key, f"activations only, {s}", "activations_only",
                          dataclasses.replace(base, act_scheme=s, weights=False))
            if r.accuracy is not None:
                a_acc[s] = r.accuracy
        best_w = max(w_acc, key=lambda s: w_acc[s]) if w_acc else s0  # ties: the earlier candidate
        best_a = max(a_acc, key=lambda s: a_acc[s]) if a_acc else s0
        chosen = dataclasses.replace(base, weight_scheme=best_w, act_scheme=best_a)
        if chosen != base:
            if self.out_of_time("schemes"):
                return
            self.step("schemes", f"weights {best_w}, activations {best_a}", "full", chosen)
            if self.met():
                return
        # techniques, each on top of the best so far
        for t in TECHNIQUE_STEPS:
            if not t.enabled(aq) or t.key == "mixed_precision":
                continue
            if self.out_of_time(t.key):
                return
            best = self.best_recipe()
            self.step(t.key, t.title(aq, best), "full", dataclasses.replace(best, **t.change(aq)))
            if self.met():
                return

    def finish(self, out: Path) -> AutoQuantResult:
        aq = self.aq
        best = self.best
        sim = self.best_sim
        if sim is None:  # the best step came from the cache
            r = self.best_recipe()
            path = self.cache.state_path(best.key) if self.cache is not None else None
            if path is not None and path.exists():
                sim = aq._restore(r, path)
            else:
                sim, _ = aq._build(r, self.cache)
        target_met = self.fp32 - best.accuracy <= self.drop + 1e-12
        budget_hit = self.stopped_before is not None
        seconds = time.perf_counter() - self.t0
        recipe = self.best_recipe()
        applied = recipe.applied(bool(aq._fold["folded"]))
        # encodings of the chosen simulation
        from ..sim.encodings import write_encodings
        out.mkdir(parents=True, exist_ok=True)
        enc_path = out / f"{aq.name}_autoquant.encodings"
        act, par = sim.encodings()
        write_encodings(enc_path, act, par, quantizer_args={
            "activation_bitwidth": aq.output_bw, "param_bitwidth": aq.param_bw,
            "quant_scheme": recipe.act_scheme, "param_quant_scheme": recipe.weight_scheme})
        side = {}
        for k, kind in (("weights", "weights_only"), ("activations", "activations_only")):
            r0 = next((s for s in self.records if s.kind == kind and s.status == "evaluated"), None)
            if r0 is not None:
                side[k] = self.fp32 - r0.accuracy
        steps = []
        for s in self.records:
            d = s.to_json()
            d["best"] = s.key == best.key
            steps.append(d)
        summary = dict(model_name=aq.name, pyquant_version=__version__, written=time.strftime("%Y-%m-%d %H:%M:%S"),
                       param_bw=aq.param_bw, output_bw=aq.output_bw,
                       config=aq._config_spec if isinstance(aq._config_spec, (str, dict)) else "custom",
                       fp32_accuracy=self.fp32, accuracy=best.accuracy, accuracy_drop=self.fp32 - best.accuracy,
                       allowed_accuracy_drop=self.drop, target_met=target_met, best_step=best.key,
                       best_title=best.title, applied=applied, weight_scheme=recipe.weight_scheme,
                       activation_scheme=recipe.act_scheme, budget_exhausted=budget_hit,
                       time_budget_s=self.budget, stopped_before=self.stopped_before, seconds=seconds,
                       cached_steps=sum(s.cached for s in self.records), side_costs=side,
                       encodings_path=str(enc_path), batch_norms_folded=aq._fold["folded"],
                       batch_norm_note=aq._fold["reason"])
        import json
        payload = {"format": 1, "summary": summary, "steps": steps, "quantizers": _quantizer_rows(sim),
                   "encodings": json.loads(enc_path.read_text(encoding="utf-8"))}
        jp, hp = write_reports(out, f"{aq.name}_autoquant", payload)
        if budget_hit:
            warnings.warn(f"AutoQuant: the time budget ({self.budget:g} s) ran out before step "
                          f"{self.stopped_before!r}; returning the best result so far ({best.key}: "
                          f"{best.accuracy:.4f}, FP32 {self.fp32:.4f})", RuntimeWarning, stacklevel=3)
        elif not target_met:
            warnings.warn(f"AutoQuant: no step met the target (FP32 {self.fp32:.4f} - {self.drop:g}); the best is "
                          f"{best.key} at {best.accuracy:.4f}", RuntimeWarning, stacklevel=3)
        return AutoQuantResult(sim=sim, accuracy=best.accuracy, fp32_accuracy=self.fp32, allowed_accuracy_drop=self.drop,
                               target_met=target_met, best_step=best.key, applied=applied,
                               weight_scheme=recipe.weight_scheme, activation_scheme=recipe.act_scheme,
                               budget_exhausted=budget_hit, steps=list(self.records), encodings_path=enc_path,
                               report_path=hp, report_json_path=jp, output_dir=out, seconds=seconds)


def _quantizer_rows(sim: QuantSim) -> list[dict[str, Any]]:
    rows = []
    for name, q in sim.quantizers.items():
        enc = q.get_encoding() if q.enabled else None
        if enc is None:
            continue
        s, o = enc.scale.flatten(), enc.offset.flatten()
        rows.append(dict(name=name, kind="param" if name in sim.param_quantizers else "activation",
                         bitwidth=int(enc.bitwidth), symmetric=bool(enc.symmetric), granularity=enc.granularity,
                         scale=f"{float(s[0]):.6g}" if s.numel() == 1 else f"{float(s.min()):.4g}..{float(s.max()):.4g}",
                         offset=f"{int(o[0])}" if o.numel() == 1 else f"{int(o.min())}..{int(o.max())}"))
    return rows
