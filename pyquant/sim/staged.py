"""Running a traced graph one node at a time over every chunk of a data set, keeping each live value
for all chunks. Techniques that go through a model layer by layer (bias correction, AdaRound) use it
to see each layer's inputs for the whole data set right when they need them, change the layer, and go
on -- one pass over the data instead of one per layer."""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class PerChunk(list):
    """A node's value for each chunk of the data (values that do not depend on the data are kept once)."""


class StagedRun:
    """`run.compute(node)` evaluates `node` of `gm` for every chunk (`chunks`: one tuple of positional
    model inputs per chunk) from the values already computed; `run.release(i)` drops the values no
    node after the i-th reads; `run.fork()` branches off a run that shares the values so far (an
evaluation of the rest of the graph under changed quantizers, without recomputing the common prefix).

    `inplace_activations`: a ReLU / ReLU6 / Hardtanh module whose input this run computed and nothing after
    it reads clamps that input in place (same values): over a whole data set an activation is the largest
    tensor of its stage, and a second one of its size costs memory and fresh pages. Only for a run that is
    not forked (forks share values)."""

    def __init__(self, gm: fx.GraphModule, chunks: Sequence[tuple], *, inplace_activations: bool = False):
        self.gm = gm
        self.chunks = list(chunks)
        self.nodes = list(gm.graph.nodes)
        self.env: dict[str, Any] = {}
        self.inplace_activations = inplace_activations
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
        elif self.inplace_activations and (clamp := self._inplace_clamp(n)) is not None:
            out = PerChunk(clamp(v) for v in env[n.args[0].name])
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

    def _inplace_clamp(self, n: fx.Node) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The in-place form of activation module `n`, where its input may be overwritten: a value of this
        run's (not a graph input, which is the caller's data), per chunk, read by `n` alone."""
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
            return None
        src = n.args[0]
        vals = self.env.get(src.name)
        # nothing else reads it or a view of it (one user), it is no view itself, and no gradient is recorded
        if src.op == "placeholder" or len(src.users) != 1 or not isinstance(vals, PerChunk) or \
                torch.is_grad_enabled() or any(not isinstance(v, torch.Tensor) or v._base is not None for v in vals):
            return None
        mod = self.gm.get_submodule(n.target)
        if type(mod) is nn.ReLU:
            return torch.relu_
        if type(mod) in (nn.ReLU6, nn.Hardtanh):
            lo, hi = float(mod.min_val), float(mod.max_val)
            return lambda v: F.hardtanh_(v, lo, hi)
        return None

    def release(self, i: int) -> None:
        for name in self._freed_at.get(i, ()):
            self.env.pop(name, None)

    def fork(self) -> "StagedRun":
        """A run that starts from this one's values (shared, not copied: the graph must not write into its
        inputs, see `inplace_free`) and goes on independently."""
        other = StagedRun.__new__(StagedRun)
        other.__dict__.update(self.__dict__)
        other.env = dict(self.env)
        return other

    def run_to_end(self, start: int) -> list[Any]:
        """Computes nodes `start`.. up to the output and returns the graph's output for each chunk (as the
        output node holds it: a pytree of tensors)."""
        for j in range(start, len(self.nodes)):
            n = self.nodes[j]
            if n.op == "output":
                return [fx.node.map_arg(n.args[0], lambda a, c=c: self._pick(a, c)) for c in range(len(self.chunks))]
            self.compute(n)
            self.release(j)
        raise ValueError("the graph has no output node")

    def _pick(self, a: fx.Node, c: int) -> Any:
        v = self.env[a.name]
        return v[c] if isinstance(v, PerChunk) else v


_INPLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift}


def inplace_free(gm: fx.GraphModule) -> bool:
    """True when no function or method node writes into its input, so that forks of a run can share the
    values computed before them. Modules with `inplace=True` do not count: `no_inplace_modules` switches
    them off while forks run."""
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            if n.kwargs.get("inplace") or n.target in _INPLACE_OPS:
                return False
            schema = getattr(n.target, "_schema", None)  # an aten op of a torch.export graph
            if schema is not None and schema.is_mutable:
                return False
            name = getattr(n.target, "__name__", str(n.target))
            if name.endswith("_") and not name.endswith("__"):
                return False
    return True


@contextlib.contextmanager
def no_inplace_modules(gm: fx.GraphModule) -> Iterator[None]:
    """Modules such as ReLU(inplace=True) compute out of place meanwhile (same values)."""
    mods = [m for m in gm.modules() if getattr(m, "inplace", None) is True]
    for m in mods:
        m.inplace = False
    try:
        yield
    finally:
        for m in mods:
            m.inplace = True
