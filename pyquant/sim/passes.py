"""Named supergroup passes: patterns a target runs as one kernel, so the outputs inside them get no
quantizer. A hardware config turns them on by name in `supergroup_pass_list` (AIMET's names); each pass
returns the graph nodes whose outputs are internal to a match."""
from __future__ import annotations

from typing import Callable, Optional

import torch.fx as fx

__all__ = ["SUPERGROUP_PASSES", "internal_nodes", "single_consumer"]

OpTypes = dict  # fx.Node -> ONNX op type (graph.node_op_type), None for anything else


def single_consumer(n: fx.Node, op_type: OpTypes) -> Optional[fx.Node]:
    """The one op that consumes n's output, skipping data movement; None if there are several."""
    while True:
        users = list(n.users)
        if len(users) != 1:
            return None
        if op_type.get(users[0]) == "Passthrough":
            n = users[0]
            continue
        return users[0]


def _is_constant(n, gm: fx.GraphModule) -> bool:
    """A value that does not depend on the model's inputs: a parameter or buffer, or a number."""
    return not isinstance(n, fx.Node) or n.op == "get_attr"


def _matmul_add(gm: fx.GraphModule, op_type: OpTypes) -> set[fx.Node]:
    """MatMul whose only consumer adds a constant (a bias): the pair is one fully connected kernel."""
    out = set()
    for n in gm.graph.nodes:
        if op_type.get(n) != "MatMul":
            continue
        add = single_consumer(n, op_type)
        if add is not None and op_type.get(add) == "Add" and len(add.args) == 2 \
                and any(_is_constant(a, gm) for a in add.args):
            out.add(n)
    return out


SUPERGROUP_PASSES: dict[str, Callable[[fx.GraphModule, OpTypes], set[fx.Node]]] = {
    "MatmulAdd": _matmul_add,
}
"""The passes pyquant runs, by the name a config's supergroup_pass_list uses."""


def internal_nodes(names: tuple[str, ...], gm: fx.GraphModule, op_type: OpTypes) -> set[fx.Node]:
    """The nodes whose outputs are inside a match of any of the named passes."""
    out: set[fx.Node] = set()
    for name in names:
        out |= SUPERGROUP_PASSES[name](gm, op_type)
    return out
