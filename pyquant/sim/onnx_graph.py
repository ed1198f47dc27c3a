"""Edits of an ONNX graph the export forms share: renaming a tensor everywhere, dropping constants
nothing reads, and giving parametrized weights their module names back."""
from __future__ import annotations

import re
from typing import Iterator, Mapping

import onnx

__all__ = ["rename_tensors", "drop_unused_constants", "restore_weight_names", "tensor_names"]

# torch.nn.utils.parametrize keeps `<module>.<name>` as `<module>.parametrizations.<name>.original`
_PARAMETRIZED = re.compile(r"^(?P<module>.+)\.parametrizations\.(?P<name>[^.]+)\.original$")


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph (If/Loop/Scan bodies), which may read the outer graph's tensors."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name of the graph and its subgraphs: inputs, outputs, initializers, node outputs."""
    names = set()
    for g in _graphs(graph):
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        names.update(t.name for t in g.initializer)
        for n in g.node:
            names.update(n.output)
    return names


def rename_tensors(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Renames tensors (old -> new) wherever they appear (producer, readers, graph inputs and outputs,
    value infos, initializers), subgraphs included, in one pass."""
    if not mapping:
        return
    for g in _graphs(graph):
        for n in g.node:
            for field in (n.input, n.output):
                for i, v in enumerate(field):
                    if v in mapping:
                        field[i] = mapping[v]
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.name in mapping:
                v.name = mapping[v.name]
        for t in g.initializer:
            if t.name in mapping:
                t.name = mapping[t.name]


def drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Removes initializers and Constant nodes that no node or graph output reads (the markers' scale and
    offset once the markers are rewritten)."""
    read = {o.name for o in graph.output}
    for g in _graphs(graph):
        for n in g.node:
            read.update(n.input)
    keep = [n for n in graph.node if n.op_type != "Constant" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def restore_weight_names(graph: onnx.GraphProto) -> dict[str, str]:
    """Initializers of parametrized weights (`c1.parametrizations.weight.original`) get the name the
    model's state dict and the encodings use (`c1.weight`), where that name is free. Returns old -> new."""
    taken = tensor_names(graph)
    renamed = {}
    for t in graph.initializer:
        m = _PARAMETRIZED.match(t.name)
        new = f"{m['module']}.{m['name']}" if m else None
        if new is not None and new not in taken:
            renamed[t.name] = new
            taken.add(new)
    rename_tensors(graph, renamed)
    return renamed
