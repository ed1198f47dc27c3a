"""Tracing a simulated model to ONNX with every quantizer as one marker node.

torch's TorchScript exporter writes the model. Inside `export_mode` each enabled quantizer runs as
pyquant's own fake-quant op with constant scale and offset (QuantizeDequantize.exporting), and a symbolic
registered for that op while tracing writes it as one node of the "pyquant" domain,
``QuantizeDequantize(x, scale, offset)`` with the grid as attributes `qmin` / `qmax`. The node carries
the whole encoding, so the export forms (QDQ, plain + encodings) rewrite each marker on its own and
never need to know which quantizer it came from.

The TorchScript exporter writes opsets up to 20; an opset-21 file is traced at 20 and converted with
onnx's version converter (20 -> 21 only adds types, except GroupNormalization, which the converter
rewrites and the TorchScript exporter does not emit)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..quant import QuantizeDequantize
from .bias import Int32Bias
from .onnx_graph import rename_tensors, tensor_names

__all__ = ["MARKER_DOMAIN", "MARKER_OP", "TORCHSCRIPT_MAX_OPSET", "Marker", "OpsetTooLowError", "export_mode",
           "trace", "markers", "input_names"]

MARKER_DOMAIN = "pyquant"
MARKER_OP = "QuantizeDequantize"
TORCHSCRIPT_MAX_OPSET = 20
TRACE_IN_MEMORY_BYTES = 3 << 29
"""Models with more parameter bytes than this (1.5 GiB) are exported through a temporary file."""
_OP = "pyquant::quantize_dequantize"


class OpsetTooLowError(ValueError):
    """The model has an op the requested opset cannot express; `needed` is the opset the exporter named."""

    def __init__(self, message: str, needed: Optional[int]):
        super().__init__(message)
        self.needed = needed


@contextlib.contextmanager
def export_mode(model: torch.nn.Module, int32_biases: bool = True) -> Iterator[None]:
    """Every enabled quantizer of `model` runs as the op the marker symbolic writes (see
    QuantizeDequantize.exporting), and every simulated int32 bias is a constant: the value the simulation
    adds (`int32_biases`, the QDQ form) or the float bias (the plain form; see Int32Bias.exporting)."""
    with contextlib.ExitStack() as stack:
        for q in model.modules():
            if isinstance(q, QuantizeDequantize):
                stack.enter_context(q.exporting())
            elif isinstance(q, Int32Bias):
                stack.enter_context(q.exporting(int32_biases))
        yield


def _marker_symbolic(g, x, scale, offset, qmin: int, qmax: int, grad_scale, check_values, act_min, act_max):
    if not (act_min.node().mustBeNone() and act_max.node().mustBeNone()):
        # export runs activations as their own ops; a clamp inside the quantizer would be lost
        raise RuntimeError("export: a quantizer call with a fused activation clamp has no ONNX form")
    return g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, scale, offset, qmin_i=qmin, qmax_i=qmax).setType(x.type())


@contextlib.contextmanager
def _marker_registered() -> Iterator[None]:
    from torch.onnx.symbolic_helper import parse_args  # torch.onnx loads on first use
    symbolic = parse_args("v", "v", "v", "i", "i", "v", "v", "v", "v")(_marker_symbolic)  # qmin/qmax as ints
    torch.onnx.register_custom_op_symbolic(_OP, symbolic, 1)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_OP, 1)


def input_names(dummy_input: Any) -> list[str]:
    """The ONNX graph's input names: a dict's keys (HuggingFace models), else "input" / "input_<i>"."""
    if isinstance(dummy_input, dict):
        return list(dummy_input)
    n = len(dummy_input) if isinstance(dummy_input, (tuple, list)) else 1
    return [f"input_{i}" if n > 1 else "input" for i in range(n)]


def trace(model: torch.nn.Module, dummy_input: Any, opset: int, int32_biases: bool = True) -> onnx.ModelProto:
    """`model` (a QuantSim's) as an ONNX model of `opset` (at most TORCHSCRIPT_MAX_OPSET) with one marker
    per enabled quantizer call and its int32 biases as the simulation adds them (`int32_biases`) or in
    float; batch size free. OpsetTooLowError when an op of the model needs a higher opset (with the one
    the exporter names). Keyword inputs (transformers models) also keep the sequence length free
    (`_dynamic_axes`)."""
    names = input_names(dummy_input)
    # each module's own mode, restored exactly afterwards (a QAT model may hold frozen batch norms in eval)
    modes = [(m, m.training) for m in model.modules()]
    if isinstance(dummy_input, dict):
        # keyword inputs (HuggingFace models) become positional ones, in the dict's order
        args = tuple(dummy_input[n] for n in names)
        model = _KeywordAdapter(model, names)
    else:
        args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    _set_train(model, False)
    # torch.onnx.export holds a model in one protobuf message (2 GiB at most) unless it writes a file, with
    # the weights as external data: a large model goes through a temporary folder, then back into memory.
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > TRACE_IN_MEMORY_BYTES
    tmpdir = tempfile.mkdtemp(prefix="pyquant-onnx-") if large else None
    buf: Any = os.path.join(tmpdir, "model.onnx") if large else io.BytesIO()
    try:
        with export_mode(model, int32_biases), _marker_registered(), _no_graph_dump(), _traceable_sizes(model), \
                torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            dynamic = _dynamic_axes(model, names, args)
            torch.onnx.export(model, args, buf, opset_version=opset, input_names=names, output_names=["output"],
                              do_constant_folding=True, dynamic_axes=dynamic,
                              training=torch.onnx.TrainingMode.PRESERVE, dynamo=False,
                              custom_opsets={MARKER_DOMAIN: 1})
    except (torch.onnx.errors.UnsupportedOperatorError, torch.onnx.errors.SymbolicValueError) as e:
        # the exporter says which opset has the op: "added in version 14" / "Please try opset version 14"
        m = re.search(r"(?:added in version|try opset version) (\d+)", str(e))
        if m is None:
            raise
        raise OpsetTooLowError(str(e).splitlines()[0], int(m.group(1))) from e
    finally:
        for m, was in modes:
            m.training = was
    try:
        out = onnx.load(buf) if large else onnx.load_from_string(buf.getvalue())
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if isinstance(model, _KeywordAdapter):  # the adapter's attribute is no part of the parameter names
        taken = tensor_names(out.graph)
        rename_tensors(out.graph, {t.name: t.name[len("model."):] for t in out.graph.initializer
                                   if t.name.startswith("model.") and t.name[len("model."):] not in taken})
    return out


def _dynamic_axes(model: torch.nn.Module, names: list[str], args: tuple) -> dict[str, dict[int, str]]:
    """The axes the exported graph leaves free: the batch (dim 0) of every input and of the output; for
    keyword inputs (transformers models: token ids, masks, positions) also the sequence (dim 1) of every input
    of two or more dimensions, and of the output where its dim 1 is the example's sequence length (a
    language model's logits, not a classifier's)."""
    dynamic = {n: {0: "batch"} for n in names}
    out_axes = {0: "batch"}
    if isinstance(model, _KeywordAdapter):
        seq = {a.shape[1] for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2}
        for n, a in zip(names, args):
            if isinstance(a, torch.Tensor) and a.dim() >= 2:
                dynamic[n] = {0: "batch", 1: "sequence"}
        first = model(*args)
        first = first[0] if isinstance(first, (tuple, list)) else first
        if len(seq) == 1 and isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[1] in seq:
            out_axes = {0: "batch", 1: "sequence"}
    dynamic["output"] = out_axes
    return dynamic


# A torch.export graph reads a free dimension with aten.sym_size, which the TorchScript tracer sees as a Python
# int: the exported file would hold the example's length as a constant. While tracing, the size reads and
# the ops that take sizes run as the tensor methods the tracer records as graph ops (Shape, Gather, Range).
_aten = torch.ops.aten


def _slice(x, dim=0, start=None, end=None, step=1):
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def _diff(x, n=1, dim=-1, prepend=None, append=None):
    """torch.diff as slices and a subtraction (the exporter has no symbolic for aten::diff; transformers'
    packed-sequence check computes one from the positions, which stop being a constant once sizes are free)."""
    x = torch.cat([t for t in (prepend, x, append) if t is not None], dim)
    for _ in range(n):
        x = x.narrow(dim, 1, x.size(dim) - 1) - x.narrow(dim, 0, x.size(dim) - 1)
    return x


def _cumsum(x, dim, dtype=None):
    """torch.cumsum, booleans counted as int64 (ONNX CumSum takes numbers only)."""
    return torch.cumsum(x.to(torch.int64) if x.dtype == torch.bool else x, dim, dtype=dtype)


_TRACEABLE = {
    _aten.diff.default: _diff,
    _aten.cumsum.default: _cumsum,
    _aten.sym_size.int: lambda x, d: x.size(d),
    _aten.arange.default: lambda end, **kw: torch.arange(end, **kw),
    _aten.arange.start: lambda start, end, **kw: torch.arange(start, end, **kw),
    _aten.arange.start_step: lambda start, end, step=1, **kw: torch.arange(start, end, step, **kw),
    _aten.expand.default: lambda x, size, implicit=False: x.expand(*size),
    _aten.view.default: lambda x, size: x.reshape(*size),
    _aten.reshape.default: lambda x, size: x.reshape(*size),
    _aten.new_ones.default: lambda x, size, **kw: x.new_ones(size, **kw),
    _aten.new_zeros.default: lambda x, size, **kw: x.new_zeros(size, **kw),
    _aten.full.default: lambda size, value, **kw: torch.full(size, value, **kw),
    _aten.slice.Tensor: _slice,
}


@contextlib.contextmanager
def _traceable_sizes(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the graphs of `model` that read sizes (aten.sym_size) run them, and the ops that
    consume them, as traceable tensor methods (see above); restored afterwards."""
    changed: list[tuple[torch.fx.GraphModule, torch.fx.Node, Any]] = []
    for gm in model.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        sym = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.sym_size.int}
        if not sym:
            continue
        for n in gm.graph.nodes:  # everything computed from a size (also through Python arithmetic)
            if n.op == "call_function" and any(a in sym for a in n.all_input_nodes):
                sym.add(n)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in _TRACEABLE and (
                    n.target is _aten.sym_size.int or any(a in sym for a in n.all_input_nodes)):
                changed.append((gm, n, n.target))
                n.target = _TRACEABLE[n.target]
    for gm in {id(g): g for g, _, _ in changed}.values():
        gm.recompile()
    try:
        yield
    finally:
        for gm, n, target in changed:
            n.target = target
        for gm in {id(g): g for g, _, _ in changed}.values():
            gm.recompile()


@contextlib.contextmanager
def _no_graph_dump() -> Iterator[None]:
    """Keeps the TorchScript exporter from printing its whole graph when an op is missing from the opset
    tried (expected while looking for the lowest opset): its log is always on, as setup_onnx_logging
    tests the function `_jit_is_onnx_log_enabled` instead of its result (torch 2.7 - 2.13)."""
    log = getattr(torch._C, "_jit_onnx_log", None)
    if log is None:
        yield
        return
    torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = log


def _set_train(model: torch.nn.Module, mode: bool) -> None:
    try:
        model.train(mode)
    except NotImplementedError:  # graphs captured with torch.export have no train/eval switch
        pass


class _KeywordAdapter(torch.nn.Module):
    """Calls a model that takes keyword inputs with positional ones (the exporter passes positions)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs)))
        if hasattr(out, "to_tuple"):  # HuggingFace ModelOutput
            out = out.to_tuple()
        return out


@dataclasses.dataclass
class Marker:
    """One quantizer call in a traced graph: input `x`, output `y`, the encoding as block-broadcast
    `scale` (float32) and `offset` (integer-valued, pyquant's: -zero point) on the grid [qmin, qmax], and
    what is known of the input's shape (a weight's is static)."""

    node: onnx.NodeProto
    index: int                       # position in graph.node
    x: str
    y: str
    scale: np.ndarray
    offset: np.ndarray
    qmin: int
    qmax: int
    x_shape: Optional[tuple[Optional[int], ...]]
    is_param: bool

    @property
    def prefix(self) -> str:
        """The node's scope ("/_pq_act_0", "/c1/weight/weight.0/q"): names of what replaces it."""
        return self.node.name.rsplit("/", 1)[0] if "/" in self.node.name else f"/{self.node.name}"

    @property
    def tag(self) -> str:
        """The exporter's suffix that tells apart markers of one scope ("", "_1", ...)."""
        last = self.node.name.rsplit("/", 1)[-1]
        return last[len(MARKER_OP):] if last.startswith(MARKER_OP) else ""


def markers(model: onnx.ModelProto) -> list[Marker]:
    """The marker nodes of a traced model, in graph order, with their constants read."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in vi.type.tensor_type.shape.dim)
    initializers = {t.name for t in g.initializer}
    out = []
    for i, n in enumerate(g.node):
        if n.domain != MARKER_DOMAIN or n.op_type != MARKER_OP:
            continue
        x, s, o = n.input[:3]
        if s not in consts or o not in consts:
            raise RuntimeError(f"export: the scale or offset of ONNX node {n.name} is not a constant")
        attrs = {a.name: a.i for a in n.attribute}
        is_param = x in initializers
        x_shape = tuple(consts[x].dims) if is_param else shapes.get(x)
        out.append(Marker(n, i, x, n.output[0], numpy_helper.to_array(consts[s]).astype(np.float32),
                          numpy_helper.to_array(consts[o]).astype(np.float32), attrs["qmin"], attrs["qmax"],
                          x_shape, is_param))
    return out
