"""ONNX QDQ export of a QuantSim: every enabled quantizer becomes QuantizeLinear + DequantizeLinear
(per-channel with `axis`, opset >= 13), written atomically."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path
from ..quant import QuantizeDequantize


@contextlib.contextmanager
def export_mode(model: torch.nn.Module):
    """Every enabled quantizer of `model` runs as the ops the exporter writes as QDQ (see
    QuantizeDequantize.exporting)."""
    with contextlib.ExitStack() as stack:
        for q in model.modules():
            if isinstance(q, QuantizeDequantize):
                stack.enter_context(q.exporting())
        yield


def export_onnx(sim, path: Path, dummy_input: Any, opset_version: int = 13) -> None:
    if opset_version < 13:
        raise ValueError(f"opset_version must be >= 13 (per-channel QuantizeLinear needs it), got {opset_version}")
    model = sim.model
    if isinstance(dummy_input, dict):
        # keyword inputs (HuggingFace models) become positional ones, in the dict's order
        input_names = list(dummy_input)
        args = tuple(dummy_input[n] for n in input_names)
        kwargs = {}
        model = _KeywordAdapter(model, input_names)
    else:
        args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
        kwargs = {}
        input_names = [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    was_training = model.training
    _set_train(model, False)
    try:
        with atomic_path(path) as tmp, export_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            dynamic = {n: {0: "batch"} for n in input_names}  # the batch size stays free
            dynamic["output"] = {0: "batch"}
            torch.onnx.export(model, args if not kwargs else (kwargs,), tmp, opset_version=opset_version,
                              input_names=input_names, output_names=["output"], do_constant_folding=True,
                              dynamic_axes=dynamic, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)
    finally:
        _set_train(model, was_training)


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


def run_onnx(path: os.PathLike, *inputs: torch.Tensor, optimize: bool = True) -> list[torch.Tensor]:
    """Runs an exported model with onnxruntime's CPU execution provider: with `optimize` its graph
    optimizations turn QDQ patterns into real int8 kernels (the on-target check of the simulation);
    without, QuantizeLinear/DequantizeLinear run as written (float emulation of the same graph)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("the on-target check needs onnxruntime: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]
