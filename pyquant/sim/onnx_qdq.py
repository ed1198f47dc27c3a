"""How one quantizer is written in ONNX as QuantizeLinear + DequantizeLinear: the integer type that holds
its grid, the granularity attributes (per tensor, per channel with `axis`, per block with `axis` and
`block_size`), and the lowest opset with all of them.

| grid                         | storage           | opset | between Q and DQ                      |
|------------------------------|-------------------|-------|---------------------------------------|
| 8-bit                        | int8 / uint8      | 13    | -                                     |
| 4-bit, 16-bit                | (u)int4, (u)int16 | 21    | -                                     |
| 2, 3, 5, 6, 7-bit            | int8 / uint8      | 13    | Clip to [qmin, qmax] (on int8/uint8)  |
| 9..15-bit                    | int16 / uint16    | 21    | Cast int32, Clip, Cast back           |
| per block (any of the above) |                   | 21    |                                       |

QuantizeLinear computes ``saturate(rint(x / s) + zp)`` on its storage type, with `zp = -offset`: the grid
pyquant's math clamps to whenever the grid is the whole type. A narrower grid is the type's range cut
down by a Clip of the integer codes, which gives the same codes as clamping to the grid directly, since
[qmin, qmax] lies inside the type's range. The Clip runs on int8/uint8 (Clip-13 and onnxruntime's CPU
kernels take them); int4 has no Clip in ONNX, so 2- and 3-bit grids use int8; onnxruntime 1.32's CPU
provider has no int16 Clip (it reports a missing Where(16) kernel), so 9- to 15-bit codes are clipped as
int32 between two Casts -- exact, as int32 holds every int16/uint16 value.

Blocked quantization (opset 21) wants the scale shaped like the input except along the block axis, so
block-broadcast scales (docs/design.md 5.7) are repeated along the other dimensions: the same values,
one per element. That needs the input's static shape, which weights have and activations with a free
batch size do not: a per-block activation encoding has no QDQ form here (the plain + encodings form
holds it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops import grid
from .onnx_graph import rename_tensors
from .onnx_trace import Marker

__all__ = ["FIRST_OPSET", "LAST_OPSET", "QdqForm", "QdqFormError", "qdq_form", "grid_of", "marker_form",
           "markers_to_qdq", "onnx_scale_zero_point", "write_qdq"]

FIRST_OPSET = 13  # per-channel QuantizeLinear (axis)
LAST_OPSET = 21   # int4/int16 QuantizeLinear and blocked quantization

# (storage bits, signed) -> ONNX element type
_STORAGE = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
            (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}


class QdqFormError(ValueError):
    """An encoding that QuantizeLinear/DequantizeLinear cannot hold as pyquant computes it."""


@dataclasses.dataclass(frozen=True)
class QdqForm:
    """The QDQ form of one encoding: storage type, granularity attributes, the integer grid and the
    lowest opset that has them all."""

    bits: int                        # bit width of the storage type (4, 8, 16)
    signed: bool
    qmin: int
    qmax: int
    axis: Optional[int]              # per channel or per block
    block_size: Optional[int]        # per block: elements per scale along `axis`
    opset: int

    @property
    def dtype(self) -> str:
        """The storage type's name, e.g. "int4" or "uint16"."""
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def onnx_type(self) -> int:
        return _STORAGE[(self.bits, self.signed)]

    @property
    def clipped(self) -> bool:
        """Whether the grid is narrower than the storage type (a Clip between Q and DQ)."""
        lo, hi = grid(self.bits, self.signed)
        return (self.qmin, self.qmax) != (lo, hi)

    @property
    def granularity(self) -> str:
        return "per_tensor" if self.axis is None else "per_channel" if self.block_size is None else "per_block"

    def describe(self) -> str:
        """e.g. "4-bit signed per-channel (QuantizeLinear to int4, opset 21)"."""
        bw = (self.qmax - self.qmin + 1).bit_length() - 1
        how = f"QuantizeLinear to {self.dtype}" + (f" clipped to [{self.qmin}, {self.qmax}]" if self.clipped else "")
        return (f"{bw}-bit {'signed' if self.signed else 'unsigned'} {self.granularity.replace('_', '-')} "
                f"({how}, opset {self.opset})")


def grid_of(qmin: int, qmax: int) -> tuple[int, bool, bool]:
    """(bit width, signed, strict) of a grid [qmin, qmax] of pyquant.ops.grid; QdqFormError for any other."""
    strict = qmin < 0 and qmin == -qmax
    bw, signed = (qmax + 1).bit_length() if strict else (qmax - qmin + 1).bit_length() - 1, qmin < 0
    if not 2 <= bw <= 16 or grid(bw, signed, strict=strict) != (qmin, qmax):
        raise QdqFormError(f"the grid [{qmin}, {qmax}] is not a 2..16-bit signed, strict signed or unsigned grid")
    return bw, signed, strict


def qdq_form(bitwidth: int, signed: bool, scale_shape: Sequence[int],
             x_shape: Optional[Sequence[Optional[int]]] = None, strict: bool = False) -> QdqForm:
    """The QDQ form of an encoding of `bitwidth` on the signed (`strict`: without its most negative code)
    or unsigned grid, whose scale has the block-broadcast shape `scale_shape` against an input of shape
    `x_shape` (None, or None entries, where not known statically). One dimension of size > 1 whose
    length is not known counts as per channel."""
    qmin, qmax = grid(bitwidth, signed, strict=strict)
    # a grid narrower than its storage type is clipped, and ONNX has no int4 Clip: 8-bit storage then
    bits = bitwidth if bitwidth in (4, 8, 16) and not strict else 8 if bitwidth <= 8 else 16
    scale_shape = tuple(int(k) for k in scale_shape)
    if x_shape is not None and len(x_shape) != len(scale_shape):
        raise QdqFormError(f"a scale of shape {scale_shape} does not match an input of rank {len(x_shape)}")
    varying = [d for d, k in enumerate(scale_shape) if k > 1]
    axis = block = None
    if len(varying) == 1 and (x_shape is None or x_shape[varying[0]] in (None, scale_shape[varying[0]])):
        axis = varying[0]  # a free dimension counts as channels: a mismatch fails at run time, never silently
    elif varying:
        if x_shape is None or any(n is None for n in x_shape):
            raise QdqFormError(f"a per-block scale of shape {scale_shape} needs the input's static shape "
                               f"(blocked QuantizeLinear repeats the scale along every other dimension); "
                               f"this input's shape is {'unknown' if x_shape is None else tuple(x_shape)}")
        # the block axis: the last dimension whose blocks are longer than one element (the others are
        # repeated out, which keeps the values); elementwise scales take the last varying dimension
        longer = [d for d in varying if x_shape[d] // scale_shape[d] > 1]
        axis = (longer or varying)[-1]
        block = int(x_shape[axis]) // scale_shape[axis]
    opset = LAST_OPSET if bits != 8 or block is not None else FIRST_OPSET
    return QdqForm(bits, bool(signed), qmin, qmax, axis, block, opset)


def onnx_scale_zero_point(form: QdqForm, scale: np.ndarray, zero_point: np.ndarray,
                          x_shape: Optional[Sequence[Optional[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point in QuantizeLinear's layout: a scalar per tensor, a vector per channel, the
    input's shape with the block axis divided per block. `scale`/`zero_point` are block-broadcast."""
    if form.axis is None:
        return scale.reshape(()), zero_point.reshape(())
    if form.block_size is None:
        return scale.reshape(-1), zero_point.reshape(-1)
    for d, n in enumerate(x_shape):
        if d != form.axis and scale.shape[d] != n:
            scale = np.repeat(scale, n // scale.shape[d], axis=d)
            zero_point = np.repeat(zero_point, n // zero_point.shape[d], axis=d)
    return scale, zero_point


def write_qdq(form: QdqForm, x: str, y: str, scale: np.ndarray, zero_point: np.ndarray, prefix: str,
              tag: str = "") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing `y` = the fake quantization of tensor `x`: QuantizeLinear,
    the Clip of a narrower grid, DequantizeLinear. `scale`/`zero_point` are already in QuantizeLinear's
    layout (onnx_scale_zero_point); names start with `prefix` and end with `tag`."""
    attrs = {} if form.axis is None else {"axis": form.axis}
    if form.block_size is not None:
        attrs["block_size"] = form.block_size
    s_name, zp_name = f"{prefix}/scale{tag}", f"{prefix}/zero_point{tag}"
    inits = [numpy_helper.from_array(np.ascontiguousarray(scale, dtype=np.float32), s_name),
             helper.make_tensor(zp_name, form.onnx_type, list(zero_point.shape),
                                np.asarray(zero_point, dtype=np.int64).flatten().tolist())]
    q = f"{prefix}/QuantizeLinear{tag}_output_0"
    nodes = [helper.make_node("QuantizeLinear", [x, s_name, zp_name], [q], name=f"{prefix}/QuantizeLinear{tag}",
                              **attrs)]
    if form.clipped:
        # onnxruntime has no int16 Clip: clip 9..15-bit codes as int32 (exact for every int16/uint16 value)
        wide = form.bits == 16
        clip_type = TensorProto.INT32 if wide else form.onnx_type
        lo, hi = f"{prefix}/clip_min{tag}", f"{prefix}/clip_max{tag}"
        inits += [helper.make_tensor(lo, clip_type, [], [form.qmin]),
                  helper.make_tensor(hi, clip_type, [], [form.qmax])]
        codes = q
        if wide:
            codes = f"{prefix}/Cast{tag}_output_0"
            nodes.append(helper.make_node("Cast", [q], [codes], name=f"{prefix}/Cast{tag}", to=TensorProto.INT32))
        clipped = f"{prefix}/Clip{tag}_output_0"
        nodes.append(helper.make_node("Clip", [codes, lo, hi], [clipped], name=f"{prefix}/Clip{tag}"))
        q = clipped
        if wide:
            q = f"{prefix}/Cast{tag}_1_output_0"
            nodes.append(helper.make_node("Cast", [clipped], [q], name=f"{prefix}/Cast{tag}_1", to=form.onnx_type))
    nodes.append(helper.make_node("DequantizeLinear", [q, s_name, zp_name], [y], name=f"{prefix}/DequantizeLinear{tag}",
                                  **attrs))
    return nodes, inits


def marker_form(m: Marker) -> QdqForm:
    """The QDQ form of a traced quantizer call."""
    bw, signed, strict = grid_of(m.qmin, m.qmax)
    return qdq_form(bw, signed, m.scale.shape, m.x_shape, strict)


def markers_to_qdq(model: onnx.ModelProto, found: Sequence[Marker]) -> None:
    """Replaces every marker of `model` by its QuantizeLinear (+ Clip) + DequantizeLinear, in place,
    where the marker was (the graph stays in topological order). The model's opset must hold each form."""
    g = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    outputs = {o.name for o in g.output}
    forms, renames = {}, {}
    for m in found:
        try:
            form = marker_form(m)
        except QdqFormError as e:
            raise QdqFormError(f"ONNX node {m.node.name}: {e}") from None
        if form.opset > opset:
            raise QdqFormError(f"ONNX node {m.node.name}: {form.describe()} needs opset {form.opset}, the model "
                               f"has {opset}")
        forms[m.index] = (m, form)
        if m.y not in outputs:  # graph outputs keep their names; other tensors say what made them
            renames[m.y] = f"{m.prefix}/DequantizeLinear{m.tag}_output_0"
    rename_tensors(g, renames)
    nodes = []
    for i, n in enumerate(g.node):
        if i not in forms:
            nodes.append(n)
            continue
        m, form = forms[i]
        s, zp = onnx_scale_zero_point(form, m.scale, -m.offset, m.x_shape)
        new_nodes, inits = write_qdq(form, n.input[0], n.output[0], s, zp, m.prefix, m.tag)
        nodes.extend(new_nodes)
        g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(nodes)
