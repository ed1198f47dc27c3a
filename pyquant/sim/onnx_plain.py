"""The "plain ONNX + encodings" form: the FP32 graph without any quantization node, and one encoding
per quantized tensor keyed by that tensor's name in the graph, as AIMET writes for targets that take
encodings (QNN, SNPE): an activation by the name of the output that produces it (a graph input by its
own name, a graph output by the output's name), a weight by its initializer's name (the model's
parameter name, `c1.weight`)."""
from __future__ import annotations

from typing import Optional, Sequence

import onnx
import torch
from onnx import helper

from ..quant import Encoding, from_scale_offset
from .onnx_graph import rename_tensors
from .onnx_qdq import grid_of
from .onnx_trace import Marker

__all__ = ["markers_to_plain", "marker_encoding"]


def marker_encoding(m: Marker) -> Encoding:
    """The encoding a marker carries, in its block-broadcast shape (the rank of the tensor)."""
    bw, signed, strict = grid_of(m.qmin, m.qmax)
    return from_scale_offset(torch.from_numpy(m.scale.copy()), torch.from_numpy(m.offset.copy()) + 0.0, bw,
                             signed, _block_size(m.scale.shape, m.x_shape), strict=strict)


def _block_size(scale_shape: Sequence[int], x_shape: Optional[Sequence[Optional[int]]]):
    """Elements per scale along each dimension for a per-block scale (-1: the whole dimension), None for
    per-tensor and per-channel ones."""
    varying = [d for d, k in enumerate(scale_shape) if k > 1]
    known = x_shape is not None and all(x_shape[d] is not None for d in varying)
    if len(varying) <= 1 and (not known or all(x_shape[d] == scale_shape[d] for d in varying)):
        return None
    if not known:
        raise ValueError(f"a per-block scale of shape {tuple(scale_shape)} on an input of unknown shape")
    return tuple(-1 if k == 1 else x_shape[d] // k for d, k in enumerate(scale_shape))


def markers_to_plain(model: onnx.ModelProto, found: Sequence[Marker]) -> tuple[dict[str, Encoding],
                                                                                    dict[str, Encoding]]:
    """Removes every marker of `model` (its readers read its input instead) and returns (activation
    encodings, param encodings) keyed by the graph's tensor names. A tensor quantized twice with different
    encodings cannot be described by one entry: ValueError naming it."""
    g = model.graph
    outputs = {o.name for o in g.output}
    sources = {i.name for i in g.input} | {t.name for t in g.initializer}
    # each marker's output becomes its input; a graph output keeps its name, so there the input is renamed
    # to the output's (unless the input is a graph input or a weight, which then gets an Identity)
    renames, identities = {}, set()
    for m in found:
        if m.y in outputs and m.x not in sources and m.x not in renames:
            renames[m.x] = m.y
        elif m.y in outputs:
            identities.add(m.index)
        else:
            renames[m.y] = m.x

    def final(name: str) -> str:  # follow chains (a marker reading another marker's output)
        seen = set()
        while name in renames and name not in seen:
            seen.add(name)
            name = renames[name]
        return name

    keyed: dict[str, tuple[Encoding, bool, str]] = {}
    for m in found:
        name = final(m.x)
        enc = marker_encoding(m)
        if name in keyed and not _same(keyed[name][0], enc):
            raise ValueError(f"export: tensor {name!r} is quantized with two different encodings (ONNX nodes "
                             f"{keyed[name][2]} and {m.node.name}); an encodings file holds one per tensor")
        keyed[name] = (enc, m.is_param, m.node.name)
    by_index = {m.index: m for m in found}
    nodes = []
    for i, n in enumerate(g.node):
        m = by_index.get(i)
        if m is None:
            nodes.append(n)
        elif i in identities:
            nodes.append(helper.make_node("Identity", [m.x], [m.y], name=f"{m.prefix}/Identity{m.tag}"))
    del g.node[:]
    g.node.extend(nodes)
    rename_tensors(g, {old: final(old) for old in renames})
    act = {n: e for n, (e, is_param, _) in keyed.items() if not is_param}
    par = {n: e for n, (e, is_param, _) in keyed.items() if is_param}
    return act, par


def _same(a: Encoding, b: Encoding) -> bool:
    return (a.bitwidth == b.bitwidth and a.symmetric == b.symmetric and a.scale.shape == b.scale.shape
            and torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset))
