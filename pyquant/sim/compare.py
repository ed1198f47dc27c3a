"""Compare a simulation with its exported QDQ ONNX model run by onnxruntime, tensor by tensor: the tool
for when the simulation does not predict the target.

Both run on the same inputs; every quantized tensor of both is kept (the simulation's quantizer
outputs; the target's QuantizeLinear codes, dequantized as its DequantizeLinear does). Two modes:

- ``end_to_end``: each side runs on its own, as a user runs it; differences accumulate downstream.
- ``lockstep``: every quantizer of the simulation hands on the target's tensor instead of its own, so each
  segment between quantizers starts from the target's values; a tensor then differs only where its own
  computation differs (the first such tensor is the op to look at, not just where a drift became visible).

The target is onnxruntime's CPU provider (`pyquant.sim.export.run_onnx`), either as written (QDQ run as
float emulation, which should reproduce the simulation up to float summation order) or optimized (its
real int8 kernels, which requantize in integer arithmetic and may round one step apart)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._batches import batch_len, call
from .._progress import Progress
from .compare_report import (ComparisonReport, OutputComparison, TensorComparison, TensorValues, sqnr_db,
                             step_distance, tensor_stats)
from .export import run_onnx
from .qdq_graph import (ExportMismatchError, QdqPair, constants_model, dequantize, graph_inputs, pair_quantizers,
                        with_outputs)

if TYPE_CHECKING:
    from .quantsim import QuantSim

__all__ = ["compare", "MODES", "ExportMismatchError"]

MODES = ("end_to_end", "lockstep")

Inputs = Union[torch.Tensor, tuple, list, dict]


def compare(sim: "QuantSim", onnx_path: Union[str, os.PathLike], inputs: Inputs, *,
            mode: str = "end_to_end", optimize: bool = False, progress: Optional[bool] = None) -> ComparisonReport:
    """Runs `sim.model` and the QDQ ONNX model `onnx_path` (written by `sim.export`) on `inputs` and
    compares every quantized tensor.

    Args:
        sim: a calibrated QuantSim.
        onnx_path: its export.
        inputs: one batch of model inputs: a tensor, a tuple of tensors (positional inputs) or a dict
            (keyword inputs, by the names the export gave them).
        mode: "end_to_end" (each side on its own) or "lockstep" (each simulated segment starts from the
            target's quantized tensors).
        optimize: run onnxruntime with its graph optimizations (its int8 kernels) instead of as written.
        progress: a progress bar on stderr (None: on a terminal).

    Returns a ComparisonReport (`summary()`, `to_json()`, `first_difference`, `save_tensors(folder)`).
    Raises ExportMismatchError when the graph does not hold this simulation's quantizers, ValueError /
    TypeError naming the input that does not match the model's inputs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(optimize, bool):
        raise TypeError(f"optimize must be True or False, got {optimize!r}")
    try:
        import onnx
        import onnxruntime  # noqa: F401  (run_onnx needs it; fail before any work)
    except ImportError as exc:
        raise ImportError(f"compare needs onnx and onnxruntime: pip install onnx onnxruntime ({exc})") from exc
    where = str(onnx_path)
    model = onnx.load(where)
    pairs = pair_quantizers(sim, model, where)
    ordered, batch = _check_inputs(model, inputs, _placeholders(sim))
    bar = Progress(len(pairs) + 1, f"compare ({mode.replace('_', ' ')})", progress)
    try:
        target, target_outs, notes = _run_target(model, where, pairs, ordered, optimize)
        bar.update(note="onnxruntime")
        replace = {n: v for n, (v, _) in target.items()} if mode == "lockstep" else None
        seen, sim_outs = _run_simulation(
            sim, batch, replace, bar, lambda n, got: _check_shape(where, pairs[n], got, target[n][0]))
    finally:
        bar.close()
    never = [n for n in pairs if n not in seen]
    if never:
        raise ExportMismatchError(f"{where}: the simulation did not call quantizers {never[:6]} on these inputs, "
                                  f"though the graph quantizes their tensors")
    report = ComparisonReport(onnx_path=where, mode=mode, optimize=optimize, samples=batch_len(ordered[0]),
                              tensors=[], outputs=[], notes=notes)
    for name, (sim_in, sim_val) in seen.items():
        tgt_val, tgt_in = target[name]
        report.tensors.append(_compare_tensor(sim, name, pairs[name], sim_in, sim_val, tgt_in, tgt_val))
        report.values[name] = TensorValues(sim_val, tgt_val, sim_in, tgt_in)
    _compare_outputs(report, model, sim_outs, target_outs)
    return report


def _check_shape(where: str, pair: QdqPair, got: torch.Tensor, want: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(want.shape):
        raise ExportMismatchError(f"{where}: {pair.scope} quantizes a {list(want.shape)} tensor, the simulation's "
                                  f"{pair.quantizer} a {list(got.shape)} one; is this the export of this simulation?")


# ---- inputs -------------------------------------------------------------------------------------
def _describe(inputs: list[tuple[str, np.dtype, list[Any]]]) -> str:
    return ", ".join(f"{n}: {dt} [{', '.join(map(str, dims))}]" for n, dt, dims in inputs)


def _placeholders(sim: "QuantSim") -> list[str]:
    return [n.target for n in sim.model.graph.nodes if n.op == "placeholder"]


def _check_inputs(model, inputs: Inputs, sim_inputs: list[str]) -> tuple[list[torch.Tensor], Any]:
    """The inputs in the graph's order (for onnxruntime) and as the batch the simulation is called
    with; errors name the input that does not fit the graph's. A dict is keyed by the graph's input
    names; the simulation gets it by keyword where those are its own argument names (keyword inputs of
    a HuggingFace model), else by position (a positional input is `input` / `input_<i>` in the graph)."""
    expected = graph_inputs(model)
    names = [n for n, _, _ in expected]
    if isinstance(inputs, dict):
        missing, unknown = [n for n in names if n not in inputs], [k for k in inputs if k not in names]
        if missing or unknown:
            raise ValueError(f"inputs: the model's inputs are {_describe(expected)}"
                             + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; not inputs of the model: {', '.join(map(str, unknown))}" if unknown else ""))
        ordered = [inputs[n] for n in names]
        batch = dict(inputs) if set(inputs) <= set(sim_inputs) else tuple(ordered)
    elif isinstance(inputs, torch.Tensor):
        ordered, batch = [inputs], (inputs,)
    elif isinstance(inputs, (tuple, list)):
        ordered, batch = list(inputs), tuple(inputs)
    else:
        raise TypeError(f"inputs must be a tensor, a tuple of tensors or a dict of named tensors, got "
                        f"{type(inputs).__name__}")
    if len(ordered) != len(expected):
        raise ValueError(f"inputs: the model takes {len(expected)} input(s) ({_describe(expected)}), got "
                         f"{len(ordered)}")
    free: dict[str, tuple[str, int]] = {}
    for x, (name, dtype, dims) in zip(ordered, expected):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs: {name!r} must be a tensor, got {type(x).__name__}")
        got = torch.empty((), dtype=x.dtype).numpy().dtype if x.dtype != torch.bfloat16 else "bfloat16"
        if got != dtype:
            raise ValueError(f"inputs: {name!r} must be {dtype}, got {got}")
        shape = list(x.shape)
        if len(shape) != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, shape)):
            raise ValueError(f"inputs: {name!r} must have shape [{', '.join(map(str, dims))}], got {shape}")
        for d, s in zip(dims, shape):
            if isinstance(d, str) and d != "?":
                first = free.setdefault(d, (name, s))
                if first[1] != s:
                    raise ValueError(f"inputs: {name!r} has {d} = {s}, {first[0]!r} has {d} = {first[1]}")
    if not ordered:
        raise ValueError("inputs: the model has no inputs to compare on")
    return ordered, batch


# ---- the target -----------------------------------------------------------------------------------
def _run_target(model, where: str, pairs: dict[str, QdqPair], ordered: list[torch.Tensor], optimize: bool):
    """{quantizer: (the target's tensor, dequantized; the target's input to its QuantizeLinear or None)},
    the target's outputs, notes."""
    acts = [p for p in pairs.values() if not p.is_constant]
    consts = [p for p in pairs.values() if p.is_constant]
    names = [p.codes for p in acts]
    dtypes = [p.q_zero_point.dtype for p in acts]
    if not optimize:
        # the QuantizeLinear inputs exist only as written: optimized, they live inside fused int8 kernels
        names += [p.source for p in acts]
        dtypes += [p.q_scale.dtype for p in acts]
    n_out = len(model.graph.output)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyquant-compare-") as tmp:
        tapped, tap_of = with_outputs(model, names, dtypes)
        _save(tapped, Path(tmp) / "tapped.onnx")
        outs = run_onnx(Path(tmp) / "tapped.onnx", *ordered, optimize=optimize)
        # by name: a tensor read twice, or already an output of the model, is one output of the tapped graph
        graph_outs, taps = outs[:n_out], dict(zip((o.name for o in tapped.graph.output), outs))
        codes: dict[str, torch.Tensor] = {}
        if consts:
            weights = Path(tmp) / "constants.onnx"
            _save(constants_model(model, consts), weights)
            codes = dict(zip((p.codes for p in consts), run_onnx(weights, optimize=False)))
        if optimize:
            plain = run_onnx(where, *ordered, optimize=True)
            if len(plain) != len(graph_outs) or any(not torch.equal(a, b) for a, b in zip(plain, graph_outs)):
                notes.append("reading the quantized tensors out of the optimized graph changed its outputs: "
                             "onnxruntime optimized it differently with them, so the dumped tensors may not be "
                             "the ones its plain run computes")
    out: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    for name, p in pairs.items():
        c = taps[tap_of[p.codes]] if not p.is_constant else codes[p.codes]
        value = torch.from_numpy(dequantize(c.numpy(), p))
        source = torch.from_numpy(np.array(p.constant)) if p.is_constant else taps.get(tap_of.get(p.source))
        out[name] = (value, source)
    return out, graph_outs, notes


def _save(model, path: Path) -> None:
    import onnx
    onnx.save(model, str(path))


# ---- the simulation ---------------------------------------------------------------------------------
def _activation(x: torch.Tensor, act: Optional[tuple[float, float]]) -> torch.Tensor:
    """A fused ReLU / ReLU6 / Hardtanh as its own op: what the exported graph feeds to QuantizeLinear."""
    if act is None:
        return x
    lo, hi = act
    return x.clamp(min=None if lo == float("-inf") else lo, max=None if hi == float("inf") else hi)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    """The model in eval mode for the block (graphs captured with torch.export have no train switch)."""
    was = model.training
    try:
        model.eval()
    except NotImplementedError:
        was = None
    try:
        yield
    finally:
        if was is not None:
            model.train(was)


def _run_simulation(sim: "QuantSim", batch: Any, replace: Optional[dict[str, torch.Tensor]], bar: Progress,
                    check: Callable[[str, torch.Tensor], None]
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """{quantizer: (its input, its output)} in the order the simulation first calls them, and the model's
    outputs. With `replace`, each quantizer hands on the given tensor instead of its output (lockstep).
    `check(name, output)` sees each quantizer's first output before anything is handed on."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(mod, args, kwargs, out):
            act = kwargs.get("activation", args[1] if len(args) > 1 else None)
            pool = kwargs.get("pool", args[2] if len(args) > 2 else None)
            if name not in seen:  # a layer run k times calls its weight quantizer k times: the same tensor
                # a fused max pool is not part of the QDQ pair: compare the quantized tensor before it
                value = out if pool is None else mod.forward(args[0], act)
                check(name, value)
                # copies: an in-place op downstream must not change what was recorded
                seen[name] = (_activation(args[0], act).detach().clone(), value.detach().clone())
                bar.update(note=name)
            if replace is not None:
                # a copy: an in-place op downstream (Hardswish(inplace=True)) must not edit the target's tensor
                t = replace[name].to(device=out.device, dtype=out.dtype, copy=True)
                return t if pool is None else F.max_pool2d(t, *pool)
            return None
        return hook

    handles = [q.register_forward_hook(hook_for(n), with_kwargs=True)
               for n, q in sim.quantizers.items() if q.enabled]
    try:
        with torch.no_grad(), _evaluating(sim.model):
            outs = call(sim.model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen, _leaves(outs)


def _leaves(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors, in the order the ONNX exporter writes them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):  # HuggingFace ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    return []


# ---- tensor by tensor -----------------------------------------------------------------------------
def _encoding_matches(q, pair: QdqPair) -> bool:
    enc = q.get_encoding()
    scale = enc.scale.detach().float().cpu().flatten().numpy()
    zp = (-enc.offset.detach().cpu().flatten()).round().to(torch.int64).numpy()

    def same(s: np.ndarray, z: np.ndarray) -> bool:
        s, z = s.astype(np.float32).flatten(), z.astype(np.int64).flatten()
        return (s.shape == scale.shape and z.shape == zp.shape and bool(np.array_equal(s, scale))
                and bool(np.array_equal(z, zp)))

    return same(pair.q_scale, pair.q_zero_point) and same(pair.scale, pair.zero_point)


def _compare_tensor(sim: "QuantSim", name: str, pair: QdqPair, sim_in: torch.Tensor, sim_val: torch.Tensor,
                    tgt_in: Optional[torch.Tensor], tgt_val: torch.Tensor) -> TensorComparison:
    q = sim.quantizer(name)
    scale = q.get_encoding().scale
    sqnr, max_steps, frac = tensor_stats(sim_val, tgt_val, scale)
    in_steps = qdq_exact = None
    if tgt_in is not None and tuple(tgt_in.shape) == tuple(sim_in.shape):
        d = step_distance(sim_in, tgt_in, scale)
        in_steps = float(d.max()) if d.numel() else 0.0
        with torch.no_grad():
            again = q(tgt_in.to(device=sim_val.device, dtype=sim_val.dtype)).cpu()
        qdq_exact = bool(((again == tgt_val) | (again.isnan() & tgt_val.isnan())).all())
    return TensorComparison(name=name, op_type=sim.op_type(name),
                            kind="weight" if name in sim.param_quantizers else "activation",
                            shape=tuple(sim_val.shape), sqnr_db=sqnr, max_steps=max_steps, frac_over_one_step=frac,
                            encoding_matches=_encoding_matches(q, pair), input_max_steps=in_steps,
                            qdq_exact=qdq_exact)


def _compare_outputs(report: ComparisonReport, model, sim_outs: list[torch.Tensor],
                     target_outs: list[torch.Tensor]) -> None:
    names = [o.name for o in model.graph.output]
    if len(sim_outs) != len(target_outs):
        report.notes.append(f"the simulation returns {len(sim_outs)} tensor(s), the graph {len(target_outs)}: "
                            f"the first {min(len(sim_outs), len(target_outs))} are compared")
    for i, (s, t) in enumerate(zip(sim_outs, target_outs)):
        s = s.detach().cpu()
        if tuple(s.shape) != tuple(t.shape):
            report.notes.append(f"output {i} ({names[i]}): the simulation's is {list(s.shape)}, the graph's "
                                f"{list(t.shape)}; not compared")
            continue
        diff = (t.double() - s.double()).abs()
        report.outputs.append(OutputComparison(index=i, name=names[i], shape=tuple(s.shape), sqnr_db=sqnr_db(s, t),
                                               max_abs_diff=float(diff.max()) if diff.numel() else 0.0))
        report.output_values.append((s, t))
