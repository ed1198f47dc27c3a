"""Running a traced graph one node at a time over every chunk of a data set, keeping each live value
for all chunks. Techniques that go through a model layer by layer (bias correction, AdaRound) use it
to see each layer's inputs for the whole data set right when they need them, change the layer, and go
on -- one pass over the data instead of one per layer."""
from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx


class PerChunk(list):
    """A node's value for each chunk of the data (values that do not depend on the data are kept once)."""


class StagedRun:
    """`run.compute(node)` evaluates `node` of `gm` for every chunk (`chunks`: one tuple of positional
    model inputs per chunk) from the values already computed; `run.release(i)` drops the values no
    node after the i-th reads."""

    def __init__(self, gm: fx.GraphModule, chunks: Sequence[tuple]):
        self.gm = gm
        self.chunks = list(chunks)
        self.nodes = list(gm.graph.nodes)
        self.env: dict[str, Any] = {}
        self._placeholders = [n.name for n in self.nodes if n.op == "placeholder"]
        self._freed_at: dict[int, list[str]] = {}
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a.name] = i
        for name, i in last.items():
            self._freed_at.setdefault(i, []).append(name)

    def value(self, n: fx.Node) -> Any:
        return self.env[n.name]

    def compute(self, n: fx.Node) -> Any:
        env = self.env
        if n.op == "placeholder":
            k = self._placeholders.index(n.name)
            out: Any = PerChunk(c[k] if k < len(c) else None for c in self.chunks)
        elif n.op == "get_attr":
            out = self.gm
            for part in n.target.split("."):
                out = getattr(out, part)
        else:
            per = any(isinstance(env[a.name], PerChunk) for a in n.all_input_nodes)
            outs = PerChunk()
            for c in range(len(self.chunks) if per else 1):
                pick = (lambda a, c=c: env[a.name][c] if isinstance(env[a.name], PerChunk) else env[a.name])
                args, kwargs = fx.node.map_arg(n.args, pick), fx.node.map_arg(n.kwargs, pick)
                if n.op == "call_module":
                    outs.append(self.gm.get_submodule(n.target)(*args, **kwargs))
                elif n.op == "call_function":
                    outs.append(n.target(*args, **kwargs))
                else:  # call_method
                    outs.append(getattr(args[0], n.target)(*args[1:], **kwargs))
            out = outs if per else outs[0]
        env[n.name] = out
        return out

    def release(self, i: int) -> None:
        for name in self._freed_at.get(i, ()):
            self.env.pop(name, None)
