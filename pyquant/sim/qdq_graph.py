"""The QuantizeLinear/DequantizeLinear pairs of an exported QDQ ONNX graph, and which quantizer of a
QuantSim each pair stands for.

`sim.export` writes every enabled quantizer as one QuantizeLinear followed by one DequantizeLinear. The
ONNX exporter names a node after the module that ran it, so an activation quantizer (the graph-module
submodule `_pq_act_<k>`, or `_pq_w_<k>` for a weight of a torch.export graph) gives nodes named
`/_pq_act_<k>/QuantizeLinear` (`/model/_pq_act_<k>/...` for keyword inputs). A weight quantized through a
parametrization is called inside its layer, where the node names say less; its QuantizeLinear reads the
weight's initializer, which is named after the parameter (`<layer>.parametrizations.weight.original`).
"""
from __future__ import annotations

import re

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    import onnx

    from .quantsim import QuantSim

__all__ = ["ExportMismatchError", "QdqPair", "pair_quantizers", "graph_inputs", "with_outputs",
           "constants_model", "dequantize"]


class ExportMismatchError(ValueError):
    """An ONNX graph does not hold a simulation's quantizers: a quantizer has no QuantizeLinear /
    DequantizeLinear pair, the graph quantizes a tensor no enabled quantizer explains, or a pair
    quantizes a tensor of another shape."""


@dataclasses.dataclass(frozen=True)
class QdqPair:
    """One quantizer as the graph writes it."""
    quantizer: str                      # the simulation's quantizer name
    scope: str                          # the nodes' common name prefix, e.g. "/_pq_act_3"
    source: str                         # the tensor QuantizeLinear reads
    codes: str                          # QuantizeLinear's output: the integer codes
    q_scale: np.ndarray                 # QuantizeLinear's scale and zero point (what the codes are computed with)
    q_zero_point: np.ndarray
    scale: np.ndarray                   # DequantizeLinear's (what the codes mean downstream)
    zero_point: np.ndarray
    axis: Optional[int]                 # the channel axis of a per-channel pair
    constant: Optional[np.ndarray]      # the source when it is a constant of the graph (a weight)

    @property
    def is_constant(self) -> bool:
        return self.constant is not None


def _constants(graph) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph: initializers, Constant nodes' values, and Identity nodes of
    either (the exporter writes equal parameters, e.g. norm gains of ones, as one initializer that each
    parameter's name reads through an Identity)."""
    from onnx import numpy_helper
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.output) == 1:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def _channel_axis(node, scale: np.ndarray) -> Optional[int]:
    """The axis of a per-channel QuantizeLinear/DequantizeLinear (ONNX's default is 1); None per tensor."""
    if scale.size <= 1:
        return None
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 1)


def _scope(node_name: str) -> str:
    head, sep, _ = node_name.rpartition("/")
    return head if sep else node_name


def _find_pairs(graph) -> list[tuple[Any, Any]]:
    """(QuantizeLinear, its one DequantizeLinear) in graph order; a QuantizeLinear read by anything else
    comes back with None."""
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = []
    for n in graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        r = readers.get(n.output[0], [])
        out.append((n, r[0] if len(r) == 1 and r[0].op_type == "DequantizeLinear" else None))
    return out


def _module_paths(sim: "QuantSim") -> dict[int, str]:
    return {id(m): name for name, m in sim.model.named_modules(remove_duplicate=False)}


def _parameter_name(sim: "QuantSim", name: str) -> Optional[str]:
    """The qualified name in sim.model of the weight behind weight quantizer `name`."""
    w = sim.weight(name)
    return next((n for n, p in sim.model.named_parameters(remove_duplicate=False) if p is w), None)


def pair_quantizers(sim: "QuantSim", model: "onnx.ModelProto", where: str = "the ONNX graph") -> dict[str, QdqPair]:
    """{quantizer name: its pair} for every enabled quantizer of `sim`, read from ONNX `model`.

    Raises ExportMismatchError naming the enabled quantizers without a pair and the pairs no enabled
    quantizer explains (`where` names the graph in the message)."""
    graph = model.graph
    consts = _constants(graph)
    found = _find_pairs(graph)
    by_last: dict[str, list[int]] = {}
    by_source: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(found):
        by_last.setdefault(_scope(q.name).rpartition("/")[2], []).append(i)
        if q.input[0] in consts:
            by_source.setdefault(q.input[0], []).append(i)
    paths = _module_paths(sim)
    claimed: dict[int, str] = {}
    missing: list[str] = []
    disabled: dict[int, str] = {}
    duplicates: set[int] = set()
    for name, qz in sim.quantizers.items():
        path = paths.get(id(qz), "")
        weight = ".parametrizations." in f".{path}"
        if weight:
            # a parametrized weight: the pair reads the parameter's initializer; the exporter may prefix it
            # with the module that wrapped the simulation, so a unique suffix match is accepted too
            pname = _parameter_name(sim, name) or ""
            # the export names a parametrized weight as the plain module attribute ("fc.weight")
            plain = re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", pname)
            hits = []
            for cand in dict.fromkeys((pname, plain)):
                hits = by_source.get(cand) or [i for s, ids in by_source.items() if s.endswith("." + cand)
                                               for i in ids]
                if hits:
                    break
        else:
            hits = by_last.get(path.rpartition(".")[2] if path else "", [])
        hits = [i for i in hits if i not in claimed]
        if len(hits) > 1 and not weight:
            raise ExportMismatchError(f"{where}: quantizer {name} matches {len(hits)} QuantizeLinear nodes "
                                      f"({', '.join(found[i][0].name for i in hits[:3])})")
        if not qz.enabled:
            for i in hits:
                disabled[i] = name
            continue
        if not hits or found[hits[0]][1] is None:
            missing.append(name)
            continue
        claimed[hits[0]] = name
        for i in hits[1:]:  # a layer run k times may have its weight quantized k times in the graph
            claimed[i] = name
            duplicates.add(i)
    missing.sort(key=_graph_order(sim))
    extra = [i for i in range(len(found)) if i not in claimed]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no QuantizeLinear/DequantizeLinear pair for {len(missing)} of "
                         f"{sum(q.enabled for q in sim.quantizers.values())} enabled quantizers: "
                         f"{_few(missing)}")
        if extra:
            desc = [found[i][0].name + (f" (quantizer {disabled[i]}, disabled in the simulation)" if i in disabled
                                        else "" if found[i][1] is not None else " (not followed by one "
                                        "DequantizeLinear)") for i in extra]
            parts.append(f"{len(extra)} QuantizeLinear node(s) that no enabled quantizer explains: {_few(desc)}")
        raise ExportMismatchError(f"{where} does not quantize what this simulation quantizes: {'; '.join(parts)}. "
                                  f"Is it the export of this simulation as it is now (sim.export(folder, prefix, "
                                  f"dummy_input))?")
    pairs = {}
    for i, name in sorted(claimed.items(), key=lambda kv: kv[0]):
        if i in duplicates:
            continue
        q, dq = found[i]
        try:
            pairs[name] = QdqPair(
                quantizer=name, scope=_scope(q.name), source=q.input[0], codes=q.output[0],
                q_scale=consts[q.input[1]], q_zero_point=consts[q.input[2]] if len(q.input) > 2 else np.uint8(0),
                scale=consts[dq.input[1]], zero_point=consts[dq.input[2]] if len(dq.input) > 2 else np.uint8(0),
                axis=_channel_axis(dq, consts[dq.input[1]]), constant=consts.get(q.input[0]))
        except KeyError as exc:
            raise ExportMismatchError(f"{where}: the scale or zero point of {q.name} ({exc.args[0]}) is computed "
                                      f"in the graph, not a constant; compare reads them as constants") from None
    return pairs


def _graph_order(sim: "QuantSim") -> Callable[[str], tuple[int, int]]:
    """Sort key of quantizer names: where their op sits in the simulation's graph (a weight before its
    layer's output)."""
    index = {n.name: i for i, n in enumerate(sim.model.graph.nodes)}

    def key(name: str) -> tuple[int, int]:
        p = sim.placement.get(name)
        at = index.get(p.node, len(index)) if p is not None else len(index)
        return at, 0 if name in sim.param_quantizers else 1
    return key


def _few(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def graph_inputs(model: "onnx.ModelProto") -> list[tuple[str, np.dtype, list[Any]]]:
    """(name, dtype, dims) of each graph input; a dim is an int or the name of a free dimension."""
    from onnx import helper
    inits = {t.name for t in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append((i.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return out


def _readable(graph, name: str, onnx_type: int) -> tuple[str, int]:
    """(a tensor that holds `name`'s values and onnxruntime can hand to numpy, its type): 4-bit codes are
    widened to 8 bits by a Cast appended to `graph` (exact)."""
    from onnx import TensorProto, helper
    wide = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}.get(onnx_type)
    if wide is None:
        return name, onnx_type
    out = f"{name}/as_{'int8' if wide == TensorProto.INT8 else 'uint8'}"
    graph.node.append(helper.make_node("Cast", [name], [out], name=f"{name}/widen", to=wide))
    return out, wide


def with_outputs(model: "onnx.ModelProto", names: list[str],
                 dtypes: list[np.dtype]) -> tuple["onnx.ModelProto", dict[str, str]]:
    """A copy of `model` that also returns the tensors `names` (after its own outputs), and for each
    name the output that holds it (4-bit codes come out widened to 8 bits)."""
    import onnx
    from onnx import helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    where: dict[str, str] = {}
    for n, dt in zip(names, dtypes):
        if n in where:
            continue
        out, t = _readable(m.graph, n, helper.np_dtype_to_tensor_dtype(dt))
        if out not in present:
            m.graph.output.append(helper.make_tensor_value_info(out, t, None))
            present.add(out)
        where[n] = out
    return m, where


def constants_model(model: "onnx.ModelProto", pairs: list[QdqPair]) -> "onnx.ModelProto":
    """A graph without inputs holding only the QuantizeLinear nodes of constant sources (the weights)
    and the constants they read: onnxruntime's own codes for the weights, computed apart from the graph
    under test, so that reading them out cannot change how onnxruntime optimizes that graph (it folds
    these nodes into int8 weights of its fused kernels)."""
    from onnx import helper
    want = {p.codes for p in pairs}
    nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in want]
    needed = {i for n in nodes for i in n.input}
    aliases = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] in needed]
    needed |= {n.input[0] for n in aliases}
    nodes = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in needed] + aliases + nodes
    inits = [t for t in model.graph.initializer if t.name in needed]
    g = helper.make_graph(nodes, "constants", [], [], initializer=inits)
    for p in pairs:
        out, t = _readable(g, p.codes, helper.np_dtype_to_tensor_dtype(p.q_zero_point.dtype))
        g.output.append(helper.make_tensor_value_info(out, t, None))
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def dequantize(codes: np.ndarray, pair: QdqPair) -> np.ndarray:
    """What the graph's DequantizeLinear makes of `codes`: (q - zero point) * scale in float32."""
    scale = pair.scale.astype(np.float32)
    zp = pair.zero_point.astype(np.int32)
    if pair.axis is not None and scale.ndim == 1:
        shape = [1] * codes.ndim
        shape[pair.axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    if scale.ndim == codes.ndim and scale.shape != codes.shape:  # blocked: one scale per block along the axis
        for d, (n, k) in enumerate(zip(codes.shape, scale.shape)):
            if k not in (1, n):
                scale, zp = np.repeat(scale, n // k, axis=d), np.repeat(zp, n // k, axis=d)
    return (codes.astype(np.int32) - zp).astype(np.float32) * scale
