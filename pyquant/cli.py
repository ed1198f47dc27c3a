"""The `pyquant` command: predict, explain and improve the quantized accuracy of a PyTorch model.

    pyquant demo                            MobileNetV2 at W8A8 on real photos (about a minute)
    pyquant analyze   myproject.models:build  sensitivity, per-layer error, weight ranges -> HTML report
    pyquant autoquant myproject.models:build  search post-training techniques within an accuracy budget
    pyquant amp       myproject.models:build  per-layer bit widths: the cheapest mix within an accuracy budget
    pyquant export    myproject.models:build  calibrate; write QDQ ONNX, encodings JSON and weights
    pyquant compare   myproject.models:build  the exported model against the simulation, tensor by tensor

SPEC is `package.module:function`. The module is imported from the current directory or PYTHONPATH;
the function is called with no arguments and returns either a dict

    {"model": nn.Module,            # the FP32 model (never modified)
     "dummy_input": Tensor | tuple, # one input, to trace the graph
     "data": Tensor | iterable,     # samples (split into batches) or batches: tensors, tuples,
                                    # (inputs, labels) pairs; used to calibrate and to evaluate
     "metric": callable | None,     # optional: metric(model) -> float, higher is better
     "name": str}                   # optional: file prefix for export (default: the function's name)

or a tuple (model, dummy_input, data[, metric]).

Exit codes: 0 done; 1 the run failed (an error in the model, the data or the quantization); 2 usage
error (bad arguments or SPEC); 3 a missing optional dependency or asset (the message says what to
install); 4 autoquant or amp finished but could not meet the accuracy target; 5 compare found a quantized tensor
more than one quantization step away from the simulation; 130 interrupted."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_MISSING, EXIT_TARGET_MISSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_DIFFERS = 5


class UsageError(Exception):
    """Bad arguments or SPEC (exit code 2)."""


class MissingDependency(Exception):
    """An optional package or asset is not installed (exit code 3)."""


@dataclasses.dataclass
class Spec:
    model: Any
    dummy_input: Any
    data: Any
    metric: Optional[Callable[[Any], float]]
    name: str


_SPEC_HELP = ("SPEC: package.module:function returning {'model', 'dummy_input', 'data'[, 'metric', 'name']} "
              "or (model, dummy_input, data[, metric]); see `pyquant --help`")


def load_spec(text: str) -> Spec:
    """Imports and calls a SPEC (see the module docstring); UsageError says what is wrong with it."""
    from torch import nn

    from ._batches import reusable

    mod_name, sep, fn_name = text.partition(":")
    if not sep or not mod_name or not fn_name or not all(p.isidentifier() for p in mod_name.split(".")) \
            or not fn_name.isidentifier():
        raise UsageError(f"SPEC must look like package.module:function (e.g. myproject.models:build), got {text!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # console scripts do not put the working directory on the path
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise UsageError(f"cannot import {mod_name!r} (from SPEC {text!r}): no module named {exc.name!r}. Run "
                             f"pyquant from the directory that holds it, or add that directory to PYTHONPATH") from None
        raise
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"{mod_name} has no function {fn_name!r} (SPEC {text!r}); its functions: "
                         f"{', '.join(names) or 'none'}")
    got = fn()
    if isinstance(got, dict):
        missing = [k for k in ("model", "dummy_input", "data") if got.get(k) is None]
        if missing:
            raise UsageError(f"{text}() returned a dict without {', '.join(repr(k) for k in missing)}; {_SPEC_HELP}")
        unknown = sorted(set(got) - {"model", "dummy_input", "data", "metric", "name"})
        if unknown:
            raise UsageError(f"{text}() returned unknown keys {unknown}; {_SPEC_HELP}")
        model, dummy, data, metric = got["model"], got["dummy_input"], got["data"], got.get("metric")
        name = got.get("name") or fn_name
    elif isinstance(got, (tuple, list)) and len(got) in (3, 4):
        model, dummy, data = got[:3]
        metric = got[3] if len(got) == 4 else None
        name = fn_name
    else:
        raise UsageError(f"{text}() returned {type(got).__name__}; {_SPEC_HELP}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"{text}(): 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if metric is not None and not callable(metric):
        raise UsageError(f"{text}(): 'metric' must be a callable metric(model) -> float, got {type(metric).__name__}")
    if not _plain_name(name):
        raise UsageError(f"{text}(): 'name' must be a plain file name prefix, got {name!r}")
    return Spec(model, dummy, reusable(data), metric, name)  # every command reads the data more than once


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


# ---- commands ----------------------------------------------------------------------------------
def _cmd_demo(a: argparse.Namespace) -> int:
    from . import demo
    argv = ["--per-image", str(a.per_image), "--calib", str(a.calib)]
    rc = demo.main(argv)
    return EXIT_MISSING if rc == 2 else rc  # the demo returns 2 for a missing asset


def _sim_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(quant_scheme=a.quant_scheme, param_bw=a.param_bw, output_bw=a.output_bw, config=a.config)


def _cmd_analyze(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    from .analysis import analyze, save_json
    try:
        from .viz import write_report
        from .viz._mpl import figure
        figure()  # fail now, not after minutes of analysis, when matplotlib is missing
    except ImportError as exc:
        raise MissingDependency(str(exc)) from None
    if a.metric == "spec" and spec.metric is None:
        raise UsageError(f"--metric spec: {a.spec}() returned no 'metric'")
    metric: Any = a.metric if a.metric not in (None, "spec") else (spec.metric or "sqnr")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = analyze(spec.model, spec.dummy_input, spec.data, metric, fold_bn=not a.keep_bn,
                     calib_samples=a.calib_samples, eval_samples=a.eval_samples, layer_samples=a.layer_samples,
                     batch_size=a.batch_size, sensitivity=not a.no_sensitivity, cle=not a.no_cle,
                     progress=a.progress, **_sim_kwargs(a))
    save_json(result, out / "analysis.json")
    page = write_report(result, out / "report.html", png_dir=out / "figures",
                        title=f"pyquant analysis: {spec.name} ({type(spec.model).__name__})")
    sens = result.get("sensitivity")
    if sens:
        unit = f" {sens['unit']}" if sens["unit"] else ""
        print(f"{sens['metric']}: whole model quantized {sens['quantized']}{unit}; most sensitive layers: "
              f"{', '.join(sens['ranking'][:3])}")
    wr = result.get("weight_ranges")
    if wr:
        s = wr["summary"]
        print(f"channel-range spread, max over layers: {s['max_spread_before']} before CLE, "
              f"{s['max_spread_after']} after ({s['pairs_equalized']} layer pairs)")
    print(f"report: {page}\ndata:   {out / 'analysis.json'}\nfigures: {out / 'figures'}  "
          f"[{time.perf_counter() - t0:.1f} s]")
    return EXIT_OK


def _calibrated_sim(spec: Spec, a: argparse.Namespace):
    import copy
    from ._batches import as_batches
    from .sim.quantsim import QuantSim
    model = copy.deepcopy(spec.model).eval()
    if not a.keep_bn:
        from ._warnings import ignoring_nothing_to_do
        from .techniques import fold_batchnorms
        with ignoring_nothing_to_do():
            fold_batchnorms(model, spec.dummy_input)
    sim = QuantSim(model, spec.dummy_input, **_sim_kwargs(a))
    sim.compute_encodings(as_batches(spec.data, a.batch_size, a.calib_samples), progress=a.progress)
    return sim


def _cmd_export(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingDependency("export writes ONNX, which needs the onnx package: pip install onnx "
                                "(or pip install 'pyquant[onnx]')") from None
    name = a.name or spec.name
    if not _plain_name(name):
        raise UsageError(f"--name must be a plain file name prefix (no folders), got {name!r}")
    sim = _calibrated_sim(spec, a)
    paths = sim.export(a.output, name, spec.dummy_input, encoding_version=a.encoding_version)
    if spec.metric is not None:
        print(f"metric of the simulated model: {spec.metric(sim.model):.6g}")
    for k in ("onnx", "encodings", "pth"):
        print(f"{k + ':':<10} {paths[k]}")
    return EXIT_OK


def _cmd_compare(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    if a.onnx is not None and not Path(a.onnx).is_file():
        raise UsageError(f"--onnx: no such file: {a.onnx}")
    name = a.name or spec.name
    if not _plain_name(name):
        raise UsageError(f"--name must be a plain file name prefix (no folders), got {name!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MissingDependency("compare runs the exported model with onnxruntime: pip install onnx onnxruntime "
                                "(or pip install 'pyquant[onnx]')") from None
    import json
    from ._batches import as_batches
    from ._io import atomic_write_text
    from .sim.compare import compare
    inputs = as_batches(spec.data, a.samples, a.samples, what=f"{a.spec}() data")[0]
    sim = _calibrated_sim(spec, a)
    out = Path(a.output)
    if a.onnx is None:
        onnx_path = sim.export(out, name, spec.dummy_input)["onnx"]
        print(f"exported: {onnx_path}")
    else:
        onnx_path = Path(a.onnx)
    report = compare(sim, onnx_path, inputs, mode=a.mode, optimize=a.optimize, progress=a.progress)
    print(report.summary())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    print(f"report:   {out / 'compare.json'}")
    if a.dump is not None:
        print(f"tensors:  {report.save_tensors(a.dump)}")
    return EXIT_OK if report.agrees else EXIT_DIFFERS


def _agreement_metric(spec: Spec, a: argparse.Namespace) -> Callable[[Any], float]:
    """Top-1 agreement with the FP32 model on the SPEC's data: AutoQuant's accuracy when the SPEC has
    no metric of its own (FP32 scores 1.0)."""
    import torch
    from ._batches import as_batches, call
    from .metrics import output_tensor
    batches = as_batches(spec.data, a.batch_size, a.calib_samples)
    with torch.no_grad():
        ref = [output_tensor(call(spec.model.eval(), b)).argmax(-1) for b in batches]

    def top1_agreement_with_fp32(model) -> float:
        with torch.no_grad():
            hits = sum(int((output_tensor(call(model, b)).argmax(-1) == r).sum()) for b, r in zip(batches, ref))
        return hits / sum(r.numel() for r in ref)
    return top1_agreement_with_fp32


def _cmd_autoquant(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    try:
        from .autoquant import AutoQuant
    except ImportError as exc:
        raise MissingDependency(f"this pyquant has no AutoQuant ({exc}); update pyquant") from None
    eval_fn = spec.metric
    if eval_fn is None:
        eval_fn = _agreement_metric(spec, a)
        print("no metric in the SPEC: using top-1 agreement with the FP32 model on its data (FP32 = 1.0)")
    aq = AutoQuant(spec.model, spec.dummy_input, spec.data, eval_fn, param_bw=a.param_bw, output_bw=a.output_bw,
                   config=a.config, batch_size=a.batch_size, adaround=not a.no_adaround, name=spec.name,
                   progress=a.progress)
    cache = a.cache_dir if a.cache_dir is not None else str(Path(a.output) / "cache")
    res = aq.optimize(allowed_accuracy_drop=a.allowed_drop, time_budget_s=a.time_budget, cache_dir=cache,
                      output_dir=a.output)
    print(f"accuracy {res.accuracy:.6g} (FP32 {res.fp32_accuracy:.6g}, drop {res.accuracy_drop:.4g}, allowed "
          f"{a.allowed_drop:g}): target {'met' if res.target_met else 'NOT met'}"
          + (" (time budget used up)" if res.budget_exhausted else ""))
    print(f"applied:   {', '.join(res.applied) or 'nothing'}")
    print(f"encodings: {res.encodings_path}\nreport:    {res.report_path}")
    return EXIT_OK if res.target_met else EXIT_TARGET_MISSED


def _amp_adaround(spec: Spec, a: argparse.Namespace, calib: list, checkpoint: Path) -> Optional[dict]:
    """`--adaround-iterations N`: AdaRound's weights for the --adaround-bits candidates (default: the lowest
    candidate weight width), learned on the calibration data and kept under `checkpoint` (a rerun resumes)."""
    if not a.adaround_iterations:
        if a.adaround_bits is not None:
            raise UsageError("--adaround-bits needs --adaround-iterations N (N > 0)")
        return None
    from .techniques import adaround, parse_candidates
    widths = sorted({c.weight_bits for c in parse_candidates(a.candidates)})
    bits = widths[0] if a.adaround_bits is None else a.adaround_bits
    if bits not in widths:
        raise UsageError(f"--adaround-bits {bits}: no candidate has {bits}-bit weights (candidates' weight widths: "
                         f"{widths})")
    return {bits: adaround(spec.model, spec.dummy_input, calib, param_bw=bits, iterations=a.adaround_iterations,
                           quant_scheme=a.quant_scheme, config=a.config, checkpoint_dir=checkpoint,
                           progress=a.progress)}


def _cmd_amp(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    from ._batches import as_batches
    from .techniques import mixed_precision, quantizer_groups
    name = a.name or spec.name
    if not _plain_name(name):
        raise UsageError(f"--name must be a plain file name prefix (no folders), got {name!r}")
    if a.metric == "spec" and spec.metric is None:
        raise UsageError(f"--metric spec: {a.spec}() returned no 'metric'")
    eval_fn: Any = spec.metric if a.metric == "spec" or (a.metric is None and spec.metric is not None) \
        else (a.metric or "top1_agreement")
    sim = _calibrated_sim(spec, a)
    try:
        quantizer_groups(sim, a.candidates)  # a candidate the config cannot run is a usage error
    except ValueError as exc:
        raise UsageError(f"--candidates: {exc}") from None
    out = Path(a.output)
    cache = a.cache_dir if a.cache_dir is not None else str(out / "cache")
    calib = as_batches(spec.data, a.batch_size, a.calib_samples)
    given = _amp_adaround(spec, a, calib, Path(cache) / "adaround")
    res = mixed_precision(sim, a.candidates, eval_fn, calib,
                          a.allowed_drop, eval_data=as_batches(spec.data, a.batch_size, a.eval_samples),
                          cost=a.cost, refine=a.refine, pareto_points=a.pareto_points, time_budget=a.time_budget,
                          checkpoint_dir=cache, candidate_weights=given, progress=a.progress)
    paths = res.save(sim, out, name)
    print(res.summary())
    try:
        from .viz import write_report
        page = write_report({"model": name, "mixed_precision": res.to_json(),
                             "simulation": {"param_bw": a.param_bw, "output_bw": a.output_bw,
                                            "quant_scheme": a.quant_scheme, "param_quant_scheme": a.quant_scheme,
                                            "config": a.config, "bn_folded": not a.keep_bn,
                                            "quantizers": len(sim.quantizers)},
                             "timings": {"total": res.seconds}},
                            out / "report.html", png_dir=out / "figures", title=f"pyquant amp: {name}")
        print(f"report:    {page}")
    except ImportError as exc:  # the mix is written; the page needs matplotlib
        print(f"no report ({exc})")
    print(f"encodings: {paths['encodings']}\nweights:   {paths['weights']}\nconfig:    {paths['config']}\n"
          f"result:    {paths['result']}")
    return EXIT_OK if res.target_met else EXIT_TARGET_MISSED


# ---- argument parsing ---------------------------------------------------------------------------
def _number(kind: type, ok, expected: str, bound: str):
    """An argparse type: `kind(text)` that satisfies `ok`, else an error naming the accepted range."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{bound}, got {v}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number", "must be >= 1")
_bitwidth = _number(int, lambda v: 2 <= v <= 16, "a bit width 2..16", "bit width must be in 2..16")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)",
                    "must be in [0, 1) (0.01 = one point of accuracy)")
_seconds = _number(float, lambda v: v > 0, "seconds", "must be > 0 seconds")
_non_negative = _number(float, lambda v: v >= 0 and v != float("inf"), "a number", "must be a finite number >= 0")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number", "must be >= 0")


def _candidates(text: str) -> str:
    from .techniques import parse_candidates
    try:
        parse_candidates(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
MAX_THREADS = 4096
_threads = _number(int, lambda v: 1 <= v <= MAX_THREADS, "a whole number", f"must be in 1..{MAX_THREADS}")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .sim.quantsim import QUANT_SCHEMES

    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="pyquant", description=head + "\n\n" + rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"pyquant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, out_default: str, calibration: bool = True) -> None:
        sp.add_argument("spec", metavar="SPEC", help="package.module:function returning the model, a dummy input, "
                                                     "data and an optional metric (see `pyquant --help`)")
        g = sp.add_argument_group("simulation")
        g.add_argument("--param-bw", type=_bitwidth, default=8, help="weight bit width, 2..16 (default 8)")
        g.add_argument("--output-bw", type=_bitwidth, default=8, help="activation bit width, 2..16 (default 8)")
        g.add_argument("--config", default="default",
                       help="hardware config: default (per-channel weights), per_tensor, strict_symmetric_int8, "
                            "or a JSON file (default: default)")
        if calibration:
            g.add_argument("--quant-scheme", choices=sorted(QUANT_SCHEMES), default="tf_enhanced",
                           help="how encodings are calibrated (default tf_enhanced)")
            g.add_argument("--keep-bn", action="store_true",
                           help="simulate with batch norms as they are (default: folded, as a target runs them)")
        g.add_argument("--calib-samples", type=_positive_int, default=None,
                       help="samples of the data used for calibration (default: all)")
        g.add_argument("--batch-size", type=_positive_int, default=32,
                       help="batch size when the data is one tensor of samples (default 32)")
        sp.add_argument("-o", "--output", default=out_default, help=f"output folder (default {out_default})")
        sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: when stderr is a terminal)")
        sp.add_argument("--threads", type=_threads, default=None,
                        help="torch CPU threads (default: torch's choice; on a machine busy with other jobs, 1 "
                             "can be faster)")
        sp.add_argument("--traceback", action="store_true", help="print the full traceback when the run fails")

    d = sub.add_parser("demo", help="predict MobileNetV2's on-target accuracy at W8A8 (real weights and photos)",
                       description="MobileNetV2 with its ImageNet weights at W8A8, per-channel and per-tensor, "
                                   "min_max and tf_enhanced, checked against onnxruntime's int8 kernels.")
    d.add_argument("--per-image", type=_positive_int, default=16, help="evaluation crops per photo (default 16)")
    d.add_argument("--calib", type=_positive_int, default=32, help="calibration crops (default 32)")
    d.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    d.set_defaults(fn=_cmd_demo, traceback=False)

    an = sub.add_parser("analyze", help="where quantization hurts: sensitivity, per-layer error, weight ranges "
                                        "before/after CLE, activation histograms; an offline HTML report",
                        description="Analyzes the SPEC's model and writes OUTPUT/report.html (self-contained), "
                                    "OUTPUT/analysis.json (the data) and OUTPUT/figures/*.png.")
    common(an, "pyquant-analysis")
    an.add_argument("--metric", choices=["sqnr", "top1_agreement", "kl", "spec"], default=None,
                    help="sensitivity metric: sqnr (dB of the output vs FP32), top1_agreement, kl, or spec (the "
                         "SPEC's metric(model)); default: the SPEC's metric if it has one, else sqnr")
    an.add_argument("--eval-samples", type=_positive_int, default=128,
                    help="samples of the data evaluated per sensitivity step (default 128; the sweep's time grows with it)")
    an.add_argument("--layer-samples", type=_positive_int, default=32,
                    help="samples for the per-layer SQNR and the histograms (default 32)")
    an.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity sweep")
    an.add_argument("--no-cle", action="store_true", help="skip the weight ranges before/after CLE")
    an.set_defaults(fn=_cmd_analyze)

    aq = sub.add_parser("autoquant", help="apply post-training techniques until the accuracy drop fits a budget",
                        description="Runs AutoQuant on the SPEC's model: calibration schemes, batch-norm folding, "
                                    "CLE, bias correction and AdaRound, each kept only if it helps, until the "
                                    "accuracy is within --allowed-drop of FP32. The SPEC's metric is the accuracy "
                                    "(default: top-1 agreement with FP32 on its data). Writes the encodings and an "
                                    "HTML report to OUTPUT; exit code 4 when the target was not met.")
    common(aq, "pyquant-autoquant", calibration=False)
    aq.add_argument("--allowed-drop", type=_fraction, default=0.01,
                    help="largest accepted accuracy drop from FP32, in the metric's units (default 0.01)")
    aq.add_argument("--time-budget", type=_seconds, default=None, help="stop searching after this many seconds")
    aq.add_argument("--cache-dir", default=None,
                    help="finished steps are kept here; a rerun with the same inputs resumes (default OUTPUT/cache)")
    aq.add_argument("--no-adaround", action="store_true", help="leave AdaRound out (the slowest step)")
    aq.set_defaults(fn=_cmd_autoquant)

    am = sub.add_parser("amp", help="mixed precision: each layer's bit widths from candidates, the cheapest mix "
                                    "within an accuracy budget",
                        description="Calibrates a QuantSim of the SPEC's model, then chooses each layer's weight and "
                                    "activation bit widths from --candidates (those the config's supported_kernels "
                                    "run) so that the accuracy stays within --allowed-drop of FP32 at the least "
                                    "cost. Writes OUTPUT/NAME.encodings (at the chosen widths), OUTPUT/NAME.pth (the "
                                    "weights they go with), "
                                    "OUTPUT/NAME_config.json, OUTPUT/NAME_mixed_precision.json and OUTPUT/report.html "
                                    "(the Pareto front); exit code 4 when the target was not met.")
    common(am, "pyquant-amp")
    am.add_argument("--candidates", type=_candidates, default="w4a8,w8a8,w8a16",
                    help="comma-separated w<bits>a<bits> (or w<bits>: weights only) candidates "
                         "(default w4a8,w8a8,w8a16)")
    am.add_argument("--allowed-drop", type=_non_negative, default=0.01,
                    help="largest accepted accuracy drop from FP32, in the metric's units (default 0.01: one point "
                         "of top-1 agreement)")
    am.add_argument("--metric", choices=["top1_agreement", "cosine", "spec"], default=None,
                    help="accuracy: top1_agreement or cosine with FP32 on the data (staged, fast), or spec (the "
                         "SPEC's metric(model)); default: the SPEC's metric if it has one, else top1_agreement")
    am.add_argument("--cost", choices=["bitops", "size"], default="bitops",
                    help="what the mix minimises: bit operations (MACs x weight bits x activation bits) or weight "
                         "size (default bitops)")
    am.add_argument("--eval-samples", type=_positive_int, default=256,
                    help="samples of the data evaluated per mix (default 256)")
    am.add_argument("--refine", action="store_true", help="try further single-layer moves on the chosen mix")
    am.add_argument("--pareto-points", type=_non_negative_int, default=8,
                    help="extra points of the greedy path evaluated for the front (default 8)")
    am.add_argument("--time-budget", type=_seconds, default=None, help="stop searching after this many seconds")
    am.add_argument("--adaround-iterations", type=_non_negative_int, default=0,
                    help="learn the rounding of the --adaround-bits weights with AdaRound, this many iterations per "
                         "layer (default 0: round to nearest); a low width with learned rounding loses far less")
    am.add_argument("--adaround-bits", type=_positive_int, default=None,
                    help="the candidate weight width AdaRound learns (default: the lowest among --candidates)")
    am.add_argument("--cache-dir", default=None,
                    help="evaluations (and AdaRound's layers) are kept here; a rerun with the same inputs resumes "
                         "(default OUTPUT/cache)")
    am.add_argument("--name", default=None, help="file name prefix (default: the SPEC's name or function)")
    am.set_defaults(fn=_cmd_amp)

    ex = sub.add_parser("export", help="calibrate and write the QDQ ONNX model, encodings JSON and weights",
                        description="Calibrates a QuantSim of the SPEC's model on its data and writes "
                                    "OUTPUT/NAME.onnx (QuantizeLinear/DequantizeLinear), OUTPUT/NAME.encodings "
                                    "(AIMET-compatible) and OUTPUT/NAME.pth.")
    common(ex, "pyquant-export")
    ex.add_argument("--name", default=None, help="file name prefix (default: the SPEC's name or function)")
    ex.add_argument("--encoding-version", choices=["1.0.0", "2.0.0"], default="1.0.0",
                    help="encodings file format (default 1.0.0)")
    ex.set_defaults(fn=_cmd_export)

    cp = sub.add_parser("compare", help="run the exported model and the simulation on the same inputs; name the "
                                        "first quantized tensor that differs by more than one step",
                        description="Calibrates a QuantSim of the SPEC's model as `pyquant export` does, exports it "
                                    "(OUTPUT/NAME.onnx) or takes --onnx, runs both on the first --samples samples "
                                    "of the data and compares every quantized tensor: SQNR, the largest difference "
                                    "in quantization steps and the share of elements more than one step apart. "
                                    "Prints the table and the verdict, writes OUTPUT/compare.json; exit code 0 when "
                                    f"no tensor differs by more than one step, {EXIT_DIFFERS} when one does.")
    common(cp, "pyquant-compare")
    cp.add_argument("--onnx", default=None, metavar="PATH",
                    help="an exported QDQ model to check (default: export the simulation to OUTPUT); give the "
                         "simulation options it was exported with")
    cp.add_argument("--mode", choices=["end_to_end", "lockstep"], default="end_to_end",
                    help="end_to_end: each side runs on its own, differences accumulate (what a user sees); "
                         "lockstep: each simulated segment starts from the target's quantized tensors, so the "
                         "first differing tensor is the op that computes differently (default end_to_end)")
    cp.add_argument("--optimize", action="store_true",
                    help="run onnxruntime with its graph optimizations, i.e. its int8 kernels (default: the graph "
                         "as written, QDQ in float)")
    cp.add_argument("--samples", type=_positive_int, default=8,
                    help="samples of the data compared: the first batch, cut to this many (default 8)")
    cp.add_argument("--dump", default=None, metavar="DIR",
                    help="also write every compared tensor of both sides to DIR/tensors.npz")
    cp.add_argument("--name", default=None, help="file name prefix of the export (default: the SPEC's name)")
    cp.set_defaults(fn=_cmd_compare)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2): a code, also when called in-process
        return int(exc.code or 0)
    if getattr(a, "config", None) is not None:
        from .sim.config import ConfigError, load_config
        try:
            load_config(a.config)  # a wrong --config is a usage error, found before the SPEC is built
        except (ConfigError, OSError) as exc:
            print(f"pyquant {a.command}: error: --config: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if getattr(a, "fn", None) is None:
        parser.print_usage(sys.stderr)
        print("error: give a command, e.g. `pyquant demo` or `pyquant analyze mypackage.models:build` "
              "(`pyquant --help` explains them)",
              file=sys.stderr)
        return EXIT_USAGE
    if getattr(a, "threads", None):
        import torch
        torch.set_num_threads(a.threads)
    # warnings as one line each, without the source line that Python's default format adds
    # (restored on return: main() is also called in-process, by tests and embedding tools)
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *rest, **kw: f"pyquant {a.command}: warning: {msg}\n"
    try:
        return _run(a)
    finally:
        warnings.formatwarning = previous_format


def _run(a: argparse.Namespace) -> int:
    from ._assets import AssetMissingError
    try:
        return a.fn(a)
    except UsageError as exc:
        print(f"pyquant {a.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MissingDependency, AssetMissingError) as exc:
        print(f"pyquant {a.command}: missing: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except KeyboardInterrupt:
        print(f"\npyquant {a.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the model, data or quantization failed: report it, exit 1
        if a.traceback:
            traceback.print_exc()
        print(f"pyquant {a.command}: failed: {type(exc).__name__}: {exc}"
              + ("" if a.traceback else "\n(run again with --traceback for the full traceback)"), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
