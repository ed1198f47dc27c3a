"""ONNX export of a QuantSim, in two forms:

* ``"qdq"``: every enabled quantizer becomes QuantizeLinear + DequantizeLinear (pyquant/sim/onnx_qdq.py
  says how each bit width and granularity is written and which opset that needs); onnxruntime runs the
  file as the simulation computes.
* ``"plain"``: the FP32 graph without quantization nodes, plus the encodings keyed by the graph's
  tensor names (pyquant/sim/onnx_plain.py), for targets that take an encodings file.

The opset is the lowest that expresses the model (its ops and, for QDQ, its quantizers) unless one is
asked for; the model is traced once per opset tried (pyquant/sim/onnx_trace.py). Files are written
atomically."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import onnx
import torch
from onnx import checker, version_converter

from .._io import atomic_path
from ..quant import Encoding
from .onnx_graph import drop_unused_constants, restore_weight_names
from .onnx_plain import markers_to_plain
from .onnx_qdq import FIRST_OPSET, LAST_OPSET, QdqForm, QdqFormError, markers_to_qdq, qdq_form
from .onnx_trace import (MARKER_DOMAIN, TORCHSCRIPT_MAX_OPSET, OpsetTooLowError, export_mode, markers,
                         trace)

if TYPE_CHECKING:
    from .quantsim import QuantSim

__all__ = ["ONNX_FORMATS", "FIRST_OPSET", "LAST_OPSET", "ExportPaths", "OnnxExport", "check_export_args",
           "build_onnx", "export_onnx", "qdq_forms", "save_onnx", "run_onnx", "export_mode"]

ONNX_FORMATS = ("qdq", "plain")


class ExportPaths(dict):
    """The written files by kind ("onnx", "encodings", "pth"), with the ONNX opset and form they have."""

    def __init__(self, paths: dict[str, Path], *, opset: int, onnx_format: str):
        super().__init__(paths)
        self.opset = opset
        self.onnx_format = onnx_format


@dataclasses.dataclass
class OnnxExport:
    """An exported model before it is written: the ONNX model, its opset, the form, and for the plain form
    the encodings keyed by the graph's tensor names (empty for QDQ, whose graph holds them)."""

    model: onnx.ModelProto
    opset: int
    onnx_format: str
    activation_encodings: dict[str, Encoding] = dataclasses.field(default_factory=dict)
    param_encodings: dict[str, Encoding] = dataclasses.field(default_factory=dict)


def check_export_args(onnx_format: Any, opset_version: Any) -> None:
    """ValueError naming the argument and what it accepts."""
    if onnx_format not in ONNX_FORMATS:
        raise ValueError(f"onnx_format must be one of {', '.join(repr(f) for f in ONNX_FORMATS)}, got {onnx_format!r}")
    if opset_version is not None and (isinstance(opset_version, bool) or not isinstance(opset_version, int)
                                      or not FIRST_OPSET <= opset_version <= LAST_OPSET):
        raise ValueError(f"opset_version must be None (the lowest opset that expresses the model) or an integer in "
                         f"{FIRST_OPSET}..{LAST_OPSET}, got {opset_version!r}")


def qdq_forms(sim: QuantSim) -> dict[str, QdqForm]:
    """The QDQ form of every enabled quantizer of `sim`, by name, known before tracing: weights from their
    weight's shape, activations per tensor or per channel (the batch size is free). QdqFormError naming
    the quantizer for one that has no form."""
    forms = {}
    for name, q in sim.quantizers.items():
        if not q.enabled:
            continue
        enc = q.get_encoding()
        if enc is None:
            continue  # exporting() raises the quantizer's own error
        x_shape = tuple(sim.weight(name).shape) if name in sim.param_quantizers else None
        scale_shape = tuple(enc.scale.shape)
        if x_shape is not None:  # right-aligned against the weight (docs/design.md 5.7)
            kept = scale_shape[max(len(scale_shape) - len(x_shape), 0):]
            scale_shape = (1,) * (len(x_shape) - len(kept)) + kept
        elif enc.granularity == "per_block":
            raise QdqFormError(f"quantizer {name!r}: a per-block activation encoding has no QuantizeLinear form "
                               f"(blocked quantization needs the input's static shape, and activations keep the "
                               f"batch size free); export it with onnx_format='plain'")
        try:
            forms[name] = qdq_form(q.bitwidth, q.signed, scale_shape, x_shape, q.strict)
        except QdqFormError as e:
            raise QdqFormError(f"quantizer {name!r}: {e}") from None
    return forms


def build_onnx(sim: QuantSim, dummy_input: Any, *, opset_version: Optional[int] = None,
               onnx_format: str = "qdq") -> OnnxExport:
    """The ONNX model of `sim` in `onnx_format`, at `opset_version` or, when None, at the lowest opset that
    expresses it: the highest of 13, what the model's ops need and (QDQ) what each quantizer's form needs
    (int4/int16 storage and blocked quantization: 21)."""
    check_export_args(onnx_format, opset_version)
    needed, needed_by = FIRST_OPSET, None
    if onnx_format == "qdq":
        for name, form in qdq_forms(sim).items():
            if form.opset > needed:
                needed, needed_by = form.opset, (name, form)
        if opset_version is not None and opset_version < needed:
            name, form = needed_by
            raise ValueError(f"opset_version={opset_version} cannot express quantizer {name!r}: {form.describe()}; "
                             f"use opset_version >= {needed}, or None for the lowest opset that expresses the model")
    target = opset_version if opset_version is not None else needed
    model, traced = _trace_lowest(sim.model, dummy_input, min(target, TORCHSCRIPT_MAX_OPSET),
                                  explicit=opset_version is not None, int32_biases=onnx_format == "qdq")
    target = max(target, traced)
    if target > traced:
        # opset 21 (int4, int16, blocks): the exporter stops at 20; 20 -> 21 only widens types
        model = version_converter.convert_version(model, target)
        model.ir_version = max(model.ir_version, 10)  # int4 element types are IR version 10
    restore_weight_names(model.graph)
    found = markers(model)
    out = OnnxExport(model, target, onnx_format)
    if onnx_format == "qdq":
        markers_to_qdq(model, found)
    else:
        out.activation_encodings, out.param_encodings = markers_to_plain(model, found)
    drop_unused_constants(model.graph)
    for i, o in enumerate(model.opset_import):
        if o.domain == MARKER_DOMAIN:
            del model.opset_import[i]
            break
    checker.check_model(model)
    return out


def _trace_lowest(model: torch.nn.Module, dummy_input: Any, opset: int, explicit: bool,
                  int32_biases: bool = True) -> tuple[onnx.ModelProto, int]:
    """Traces at `opset`, or when not `explicit`, at the next opset the exporter names for an op it cannot
    write at `opset`. Returns the model and its opset."""
    while True:
        try:
            return trace(model, dummy_input, opset, int32_biases), opset
        except OpsetTooLowError as e:
            if explicit or e.needed is None or e.needed <= opset or e.needed > TORCHSCRIPT_MAX_OPSET:
                how = (f"use opset_version >= {e.needed}" if e.needed and e.needed <= LAST_OPSET
                       else "the model has an op the ONNX exporter cannot write")
                raise ValueError(f"opset_version={opset} cannot express the model: {e}; {how}") from e
            opset = e.needed


EXTERNAL_DATA_BYTES = 3 << 29
"""Initializers above this size (1.5 GiB) go to an external data file: one protobuf message holds at most
2 GiB, and the graph, names and attributes need room beside the weights."""


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (raw or typed data, or already external)."""
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += sum(len(getattr(t, f)) * 4 for f in ("float_data", "int32_data", "int64_data", "double_data"))
            for e in t.external_data:
                if e.key == "length":
                    total += int(e.value)
    return total


def save_onnx(model: onnx.ModelProto, path: os.PathLike, external_data: Optional[bool] = None) -> Optional[Path]:
    """Writes `model` atomically (a temporary file in the same folder, renamed over `path`). With
    `external_data` (None: when the initializers exceed EXTERNAL_DATA_BYTES) the initializers go to
    `<path>.data` beside it, which the model names by file name (onnxruntime finds it next to the model); both
    are written to a temporary folder first and renamed into place, the data before the model. Returns the
    data file's path, or None."""
    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    if not external_data:
        with atomic_path(path) as tmp:
            onnx.save(model, tmp)
        return None
    import shutil
    import tempfile
    data = path.with_name(path.name + ".data")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(model, str(tmpdir / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        for f in (tmpdir / data.name, tmpdir / path.name):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmpdir / data.name, data)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return data


def export_onnx(sim: QuantSim, path: os.PathLike, dummy_input: Any, opset_version: Optional[int] = None,
                onnx_format: str = "qdq") -> OnnxExport:
    """build_onnx, then the model written atomically to `path`."""
    out = build_onnx(sim, dummy_input, opset_version=opset_version, onnx_format=onnx_format)
    save_onnx(out.model, Path(path))
    return out


def run_onnx(path: os.PathLike, *inputs: Union[torch.Tensor, dict], optimize: bool = True) -> list[torch.Tensor]:
    """Runs an exported model with onnxruntime's CPU execution provider: with `optimize` its graph
    optimizations turn QDQ patterns into real integer kernels, as a target would (the on-target check;
    they also put Conv/Gemm biases on the int32 grid at s_x * s_w, as the simulation does by default, and
    in onnxruntime 1.32 drop a ReLU before a signed int4 QuantizeLinear, which it does not); without, every
    node runs as written: the simulation's numbers (docs/design.md 7.1). Inputs go by position, or as one
    dict by the graph's input names (the keywords a model captured from keyword inputs takes)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("the on-target check needs onnxruntime: pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        names = [i.name for i in sess.get_inputs()]
        unknown = sorted(set(inputs[0]) - set(names))
        if unknown:
            raise ValueError(f"run_onnx: the model's inputs are {names}; got {unknown}")
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs[0].items()}
    else:
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]
