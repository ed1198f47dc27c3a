"""Graph capture for QuantSim: torch.fx tracing (transformers' tracer for HuggingFace models), shape
propagation, and the classification of graph nodes into the ONNX op types the hardware config
speaks of."""
from __future__ import annotations

import operator
import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._layers import WEIGHT_AXIS  # noqa: F401 (re-exported: the weighted module types)


class UntraceableModelError(RuntimeError):
    """The model could not be captured as a graph; the message names the first call that failed."""


# Leaf module types -> ONNX op type (the hardware config's vocabulary).
MODULE_OPS: dict[type, str] = {
    nn.Conv1d: "Conv", nn.Conv2d: "Conv", nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose", nn.ConvTranspose2d: "ConvTranspose",
    nn.Linear: "Gemm", nn.Embedding: "Gather",
    nn.LayerNorm: "LayerNormalization", nn.GroupNorm: "GroupNormalization",
    nn.BatchNorm1d: "BatchNormalization", nn.BatchNorm2d: "BatchNormalization",
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.GELU: "Gelu", nn.SiLU: "Silu", nn.Sigmoid: "Sigmoid",
    nn.Tanh: "Tanh", nn.Softmax: "Softmax", nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu",
    nn.Hardswish: "HardSwish", nn.Hardsigmoid: "HardSigmoid", nn.ELU: "Elu",
    nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool", nn.AvgPool1d: "AveragePool", nn.AvgPool2d: "AveragePool",
    nn.AdaptiveAvgPool1d: "GlobalAveragePool", nn.AdaptiveAvgPool2d: "GlobalAveragePool",
    nn.AdaptiveMaxPool2d: "GlobalMaxPool", nn.Upsample: "Resize",
}

# Functions / methods -> ONNX op type.
FUNCTION_OPS: dict[Any, str] = {
    operator.add: "Add", torch.add: "Add", operator.iadd: "Add",
    operator.sub: "Sub", torch.sub: "Sub",
    operator.mul: "Mul", torch.mul: "Mul", operator.imul: "Mul",
    operator.truediv: "Div", torch.div: "Div",
    operator.matmul: "MatMul", torch.matmul: "MatMul", torch.bmm: "MatMul", torch.mm: "MatMul",
    torch.baddbmm: "MatMul", torch.einsum: "Einsum",
    torch.cat: "Concat", torch.concat: "Concat", torch.stack: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.gelu: "Gelu", F.silu: "Silu",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
    F.softmax: "Softmax", torch.softmax: "Softmax", F.log_softmax: "LogSoftmax",
    F.layer_norm: "LayerNormalization", F.linear: "Gemm", F.conv2d: "Conv", F.conv1d: "Conv",
    F.embedding: "Gather", F.hardswish: "HardSwish", F.leaky_relu: "LeakyRelu",
    F.max_pool2d: "MaxPool", F.avg_pool2d: "AveragePool", F.adaptive_avg_pool2d: "GlobalAveragePool",
    torch.mean: "ReduceMean", F.scaled_dot_product_attention: "Attention",
    torch.erf: "Erf", torch.pow: "Pow", torch.sqrt: "Sqrt", torch.exp: "Exp",
}
METHOD_OPS: dict[str, str] = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div", "matmul": "MatMul",
    "bmm": "MatMul", "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax",
    "mean": "ReduceMean", "pow": "Pow", "sqrt": "Sqrt", "exp": "Exp",
}

# Data movement: the output holds the input's values, so it needs no quantizer of its own.
PASSTHROUGH_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    operator.getitem, getattr, torch.chunk, torch.split, F.dropout, torch.narrow, torch.t,
    F.pad, torch.flip, torch.roll,
}
PASSTHROUGH_METHODS = {
    "view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "contiguous", "expand",
    "expand_as", "chunk", "split", "size", "dim", "t", "repeat", "narrow", "unbind", "type_as", "to", "float",
    "clone", "detach", "flip", "roll", "masked_fill",
}
PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)


_aten = torch.ops.aten
# Graphs captured with torch.export hold ATen ops: op type and, for weighted ops, the weight's argument
# index and channel axis.
ATEN_OPS: dict[Any, str] = {
    _aten.linear.default: "Gemm", _aten.conv1d.default: "Conv", _aten.conv2d.default: "Conv",
    _aten.convolution.default: "Conv", _aten.embedding.default: "Gather",
    _aten.layer_norm.default: "LayerNormalization", _aten.gelu.default: "Gelu", _aten.relu.default: "Relu",
    _aten.hardtanh.default: "Clip", _aten.silu.default: "Silu", _aten.sigmoid.default: "Sigmoid",
    _aten.tanh.default: "Tanh", _aten.softmax.int: "Softmax", _aten._softmax.default: "Softmax",
    _aten.add.Tensor: "Add", _aten.sub.Tensor: "Sub", _aten.mul.Tensor: "Mul", _aten.div.Tensor: "Div",
    _aten.matmul.default: "MatMul", _aten.bmm.default: "MatMul", _aten.mm.default: "MatMul",
    _aten.cat.default: "Concat", _aten.mean.dim: "ReduceMean",
    _aten.scaled_dot_product_attention.default: "Attention",
    _aten.max_pool2d.default: "MaxPool", _aten.avg_pool2d.default: "AveragePool",
    _aten.adaptive_avg_pool2d.default: "GlobalAveragePool",
}
ATEN_WEIGHTS: dict[Any, tuple[int, int]] = {  # op -> (weight argument index, channel axis)
    _aten.linear.default: (1, 0), _aten.conv1d.default: (1, 0), _aten.conv2d.default: (1, 0),
    _aten.convolution.default: (1, 0), _aten.embedding.default: (0, 0),
}
ATEN_PASSTHROUGH = {
    _aten.view.default, _aten.reshape.default, _aten.transpose.int, _aten.permute.default,
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.expand.default, _aten.slice.Tensor, _aten.select.int,
    _aten.dropout.default, _aten.clone.default, _aten.contiguous.default, _aten.flatten.using_ints,
    _aten.to.dtype, _aten.to.device, _aten.to.dtype_layout, _aten._to_copy.default, _aten.t.default,
}


def node_op_type(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The ONNX op type of a compute node, "Passthrough" for data movement, None for anything else."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, PASSTHROUGH_MODULES):
            return "Passthrough"
        for t in type(mod).__mro__:
            if t in MODULE_OPS:
                return MODULE_OPS[t]
        return None
    if node.op == "call_function":
        if node.target in PASSTHROUGH_FUNCTIONS or node.target in ATEN_PASSTHROUGH:
            return "Passthrough"
        return FUNCTION_OPS.get(node.target) or ATEN_OPS.get(node.target)
    if node.op == "call_method":
        if node.target in PASSTHROUGH_METHODS:
            return "Passthrough"
        return METHOD_OPS.get(node.target)
    return None


class _RecordingTracer(fx.Tracer):
    """A tracer that remembers what it was tracing when it failed."""

    def __init__(self):
        super().__init__()
        self.current: Optional[str] = None

    def call_module(self, m, forward, args, kwargs):
        prev = self.current
        self.current = self.path_of_module(m) or type(m).__name__
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current = prev


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and pyquant: the user's line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        f = fr.filename
        if "/torch/" in f or "/pyquant/" in f or f.startswith("<"):
            continue
        return f"{f}:{fr.lineno}: {fr.line}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _is_hf(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _export(model: nn.Module, dummy_input: Any) -> fx.GraphModule:
    """torch.export (non-strict) as a GraphModule of ATen ops with the parameters as attributes."""
    if isinstance(dummy_input, dict):
        args, kwargs = (), dict(dummy_input)
    elif isinstance(dummy_input, (tuple, list)):
        args, kwargs = tuple(dummy_input), {}
    else:
        args, kwargs = (dummy_input,), {}
    # Every dimension may vary (batch size, sequence length) unless the model pins it.
    auto = torch.export.Dim.AUTO
    dyn = lambda t: {d: auto for d in range(t.dim())} if isinstance(t, torch.Tensor) and t.dim() else None
    dynamic = ({k: dyn(v) for k, v in kwargs.items()} if kwargs else tuple(dyn(a) for a in args))
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    return ep.module()


def trace(model: nn.Module, dummy_input: Any) -> fx.GraphModule:
    """Captures `model` as a torch.fx GraphModule: symbolic tracing keeps the module structure; models it
    cannot trace (HuggingFace transformers, Python control flow on shapes) are captured with torch.export.

    Raises UntraceableModelError naming the module and source line where tracing failed."""
    tracer = _RecordingTracer()
    try:
        if _is_hf(model):
            return _export(model, dummy_input)
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear error
        if not _is_hf(model):
            try:
                return _export(model, dummy_input)
            except Exception:  # noqa: BLE001 - report the symbolic tracer's (more precise) failure
                pass
        where = tracer.current
        msg = (f"cannot capture {type(model).__name__} as a graph: the first untraceable call is "
               f"{_user_frame(exc)}")
        if where:
            msg += f" (inside module '{where}')"
        msg += f" — {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Data-dependent Python " \
               "control flow cannot be traced: move it out of forward or make it a leaf module."
        raise UntraceableModelError(msg) from exc


def propagate_shapes(gm: fx.GraphModule, dummy_input: Any) -> None:
    """Runs the graph once on `dummy_input`, recording each node's output dtype in node.meta['pq_dtype']."""
    env: dict[str, Any] = {}
    dtypes: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            dtypes[n] = out.dtype if isinstance(out, torch.Tensor) else type(out)
            return out

    with torch.no_grad():
        if isinstance(dummy_input, dict):
            args = [dummy_input[n.target] if n.target in dummy_input else None
                    for n in gm.graph.nodes if n.op == "placeholder"]
            Recorder(gm).run(*args)
        elif isinstance(dummy_input, (tuple, list)):
            Recorder(gm).run(*dummy_input)
        else:
            Recorder(gm).run(dummy_input)
    for n, dt in dtypes.items():
        n.meta["pq_dtype"] = dt
    del env


def get_attr(gm: nn.Module, target: str):
    """The attribute at dotted path `target` of `gm` (a get_attr node's value)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
