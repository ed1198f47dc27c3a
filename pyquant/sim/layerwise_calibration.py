"""Layer-wise calibration: the simulation's graph cut into segments, one per block of a repeated stack
(a transformer's decoder layers), calibrated one segment at a time.

For each segment, on that segment's inputs for every calibration batch: its activation quantizers observe
(histogram analyzers in two passes, a range pass then a counting pass, so that statistics gathered in
pieces -- batches, or torch.distributed ranks -- add up exactly), their encodings are computed (synced over
the ranks of a process group first), and the segment runs once more with its quantizers on, giving the
next segment its inputs as the simulation will see them. What is kept between segments is only the values
that cross the boundary (the residual stream, position tables, masks), for every batch; inside a segment one
batch runs at a time. Peak memory: the model, its quantizers, the boundary values of all batches and one
batch's activations inside one block -- the model's output (a language model's logits) is never kept.

A technique that works block by block (SeqMSE, GPTQ) hooks in with `on_segment`, called with each
segment's inputs before its quantizers calibrate."""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx

from .._batches import Batch
from .._progress import Progress

__all__ = ["Segment", "range_pass", "block_stack", "segments", "placeholder_values", "SegmentInputs", "calibrate_layerwise", "data_dependent",
           "sync_analyzers"]

_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclasses.dataclass
class Segment:
    """Consecutive graph nodes run as one piece. `block`: the block path they belong to (e.g.
    "model.layers.3"), None for what precedes the first block."""

    index: int
    block: Optional[str]
    nodes: list[fx.Node]


def _norm_path(p: str) -> str:
    """A module path as torch.export or fx records it ("L['self'].model.layers[0]", "model.layers.0")
    in dotted form."""
    p = re.sub(r"^L\['self'\]\.?", "", p)
    return re.sub(r"\[(\d+)\]", r".\1", p).strip(".")


def _node_path(gm: fx.GraphModule, n: fx.Node) -> Optional[str]:
    if n.op in ("call_module", "get_attr"):
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        v = list(stack.values())[-1]
        return _norm_path(v[0] if isinstance(v, tuple) else str(v))
    return None


def block_stack(gm: fx.GraphModule) -> Optional[str]:
    """The path of the repeated stack of blocks (e.g. "model.layers"): among the module paths the graph's
    nodes come from, the prefix followed by the most distinct integer indices (at least two); None when
    the model has no such stack. Pyquant's own quantizer modules are not counted."""
    seen: dict[str, set[int]] = {}
    for n in gm.graph.nodes:
        p = _node_path(gm, n)
        if not p or p.startswith("_pq_"):
            continue
        m = _INDEX.match(p)
        if m:
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    best = max(seen.items(), key=lambda kv: (len(kv[1]), -len(kv[0])), default=None)
    return best[0] if best is not None and len(best[1]) >= 2 else None


def segments(gm: fx.GraphModule, stack: Optional[str] = None) -> list[Segment]:
    """The graph's computing nodes (neither placeholders, attributes nor the output) cut where the block
    index of `stack` (default: `block_stack(gm)`) grows. A node outside the stack (pyquant's quantizers,
    rotary tables, the final norm and head) stays in the segment of the nodes before it, so segments
    follow the graph order and each node runs once. Raises ValueError when the graph has no such stack."""
    stack = stack if stack is not None else block_stack(gm)
    if stack is None:
        raise ValueError("layer-wise calibration needs a repeated stack of blocks (e.g. a transformer's "
                         "decoder layers); none was found in the graph: pass layerwise='<path of the stack>'")
    prefix = stack + "."
    out: list[Segment] = []
    current: Optional[int] = None
    nodes: list[fx.Node] = []
    found = False
    data = data_dependent(gm)
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output") or n not in data:
            continue  # what does not depend on the data (quantized weights) is computed where it is read
        p = _node_path(gm, n)
        idx = None
        if p and p.startswith(prefix):
            head = p[len(prefix):].split(".", 1)[0]
            idx = int(head) if head.isdigit() else None
        if idx is not None:
            found = True
        if idx is not None and (current is None or idx > current):
            if nodes:
                out.append(Segment(len(out), None if current is None else f"{prefix}{current}", nodes))
            current, nodes = idx, []
        nodes.append(n)
    if nodes:
        out.append(Segment(len(out), None if current is None else f"{prefix}{current}", nodes))
    for seg in out:
        for n in seg.nodes:
            n.meta["pq_segment"] = seg.index
    if not found:
        raise ValueError(f"layerwise={stack!r}: no graph node comes from a module under {stack!r}.<index>; "
                         f"the graph's block stack is {block_stack(gm)!r}")
    return out


def data_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value depends on a graph input."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def placeholder_values(gm: fx.GraphModule, batch: Batch) -> dict[str, Any]:
    """The graph's inputs for one batch, by placeholder name: keyword inputs by their names (a
    torch.export capture names its placeholders after the forward's keywords), positional ones in order;
    inputs the batch does not give are None."""
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(batch, dict):
        unknown = sorted(set(batch) - {n.target for n in ph})
        if unknown:
            raise TypeError(f"the simulated model takes {', '.join(str(n.target) for n in ph)}; got {unknown}")
        return {n.name: batch.get(n.target) for n in ph}
    if len(batch) > len(ph):
        raise TypeError(f"the simulated model takes {len(ph)} inputs, got a batch of {len(batch)}")
    return {n.name: (batch[i] if i < len(batch) else None) for i, n in enumerate(ph)}


class SegmentInputs:
    """Each batch's boundary values (node name -> value) before a segment: what `on_segment` receives.
    `run(segment, b)` evaluates the segment's nodes on batch b and returns their values (without
    keeping them)."""

    def __init__(self, gm: fx.GraphModule, envs: list[dict[str, Any]]):
        self.gm = gm
        self.envs = envs

    def __len__(self) -> int:
        return len(self.envs)

    def run(self, seg: Segment, b: int, keep: Optional[set[str]] = None) -> dict[str, Any]:
        ev = _Evaluator(self.gm, dict(self.envs[b]))
        env = ev.env
        if keep is None:
            for n in seg.nodes:
                env[n.name] = ev.call(n)
            return env
        # each value is dropped after its last read in the segment unless a later segment reads it: one
        # batch's activations inside a block, not the whole block's, are held at a time
        last: dict[str, int] = {}
        for i, n in enumerate(seg.nodes):
            for a in _reads(n):
                last[a.name] = i
        for i, n in enumerate(seg.nodes):
            env[n.name] = ev.call(n)
            for a in _reads(n):
                if last.get(a.name) == i and a.name not in keep:
                    env.pop(a.name, None)
                    ev.const.pop(a.name, None)
            if not n.users and n.name not in keep:
                env.pop(n.name, None)
        return {k: v for k, v in env.items() if k in keep}


class _Evaluator:
    """Node values for one run: `env` (name -> value) and the data-independent values (quantized weights)
    computed on demand in `const`. A class rather than a recursive closure: a closure that refers to itself
    is a reference cycle, which would keep a run's values (a language model's logits) alive until the
    garbage collector happens to pass."""

    def __init__(self, gm: fx.GraphModule, env: dict[str, Any]):
        self.gm, self.env, self.const = gm, env, {}

    def val(self, a: fx.Node) -> Any:
        if a.name in self.env:
            return self.env[a.name]
        if a.op == "get_attr":
            obj: Any = self.gm
            for part in str(a.target).split("."):
                obj = getattr(obj, part)
            return obj
        if a.name not in self.const:
            self.const[a.name] = _call(self.gm, a, self.val)
        return self.const[a.name]

    def call(self, n: fx.Node) -> Any:
        return _call(self.gm, n, self.val)


def _reads(n: fx.Node) -> list[fx.Node]:
    """The values node `n` reads, and those its data-independent inputs read (computed on demand)."""
    out, todo = [], list(n.all_input_nodes)
    while todo:
        a = todo.pop()
        out.append(a)
        if a.op not in ("placeholder", "get_attr") and "pq_segment" not in a.meta:
            todo += a.all_input_nodes
    return out


def _call(gm: fx.GraphModule, n: fx.Node, val: Callable[[fx.Node], Any]) -> Any:
    args, kwargs = fx.node.map_arg(n.args, val), fx.node.map_arg(n.kwargs, val)
    if n.op == "call_module":
        return gm.get_submodule(str(n.target))(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    return getattr(args[0], str(n.target))(*args[1:], **kwargs)  # call_method


def _live_after(gm: fx.GraphModule, segs: list[Segment]) -> list[set[str]]:
    """For each segment, the names of values computed up to it (or graph inputs) that a later segment
    reads."""
    where = {n.name: s.index for s in segs for n in s.nodes}
    last: dict[str, int] = {}
    for s in segs:
        for n in s.nodes:
            for a in n.all_input_nodes:
                if a.name in where or a.op == "placeholder":
                    last[a.name] = max(last.get(a.name, -1), s.index)
    live: list[set[str]] = []
    for s in segs:
        live.append({k for k, j in last.items() if j > s.index and where.get(k, -1) <= s.index})
    return live


def _quantizers_by_segment(gm: fx.GraphModule, segs: list[Segment], acts: dict[int, str]) -> list[list[str]]:
    """For each segment, the names of the activation quantizers that first run in it: those its module
    calls run (a fused node holds its quantizer), and those on data-independent values it is the first to
    read."""
    where = {n: s.index for s in segs for n in s.nodes}
    first: dict[fx.Node, Optional[int]] = {}

    def first_use(n: fx.Node) -> Optional[int]:
        if n not in first:
            first[n] = where.get(n)
            if first[n] is None:
                uses = [u for u in (first_use(u) for u in n.users) if u is not None]
                first[n] = min(uses) if uses else None
        return first[n]

    out: list[list[str]] = [[] for _ in segs]
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        k = first_use(n)
        if k is None:
            continue
        for m in gm.get_submodule(str(n.target)).modules():
            name = acts.get(id(m))
            if name is not None and name not in out[k]:
                out[k].append(name)
    return out


@contextlib.contextmanager
def range_pass(analyzers: Sequence[Any]) -> Iterator[None]:
    """Inside the block, histogram analyzers only widen their range (update_range) where they would count."""
    two = [a for a in analyzers if hasattr(a, "update_range")]
    for a in two:
        a.update_stats = a.update_range
    try:
        yield
    finally:
        for a in two:
            del a.update_stats


def sync_analyzers(named: Sequence[tuple[str, Any]], process_group: Any, *, ranges: bool = False) -> None:
    """All-reduces analyzers' statistics over a torch.distributed process group, in the given order on
    every rank. `ranges`: only the ranges a range pass set (histogram analyzers; the others wait for the
    counting pass). An analyzer that saw no data on any rank is left empty (its quantizer is then disabled
    as unused); one that saw data on some ranks only is an error naming it."""
    import torch.distributed as dist
    if ranges:
        for _, a in named:
            if hasattr(a, "sync_range") and a.lo is not None:
                a.sync_range(process_group)
        return
    seen = torch.tensor([1 if a.num_batches else 0 for _, a in named], dtype=torch.int64)
    lo, hi = seen.clone(), seen.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=process_group)
    for (name, a), l, h in zip(named, lo.tolist(), hi.tolist()):
        if h == 0:
            continue
        if l == 0:
            from ..quant import CalibrationError
            raise CalibrationError(f"{name}: saw calibration data on some ranks of the process group but not on "
                                   "others; give every rank batches that reach it")
        a.sync(process_group)


def calibrate_layerwise(gm: fx.GraphModule, batches: Sequence[Batch], quantizers: dict[str, Any], *,
                        stack: Optional[str] = None, process_group: Any = None, progress: Optional[bool] = None,
                        on_segment: Optional[Callable[[Segment, SegmentInputs], None]] = None,
                        finish: Optional[Callable[[list[str]], None]] = None,
                        float_biases: Callable[[], Any] = contextlib.nullcontext) -> list[Segment]:
    """Calibrates the activation quantizers `quantizers` (name -> quantizer) of graph `gm` segment by segment
    on `batches` (see the module doc); returns the segments. `finish(names)` runs after each segment's
    quantizers got their encodings (QuantSim applies its config's range constraints there);
    `float_biases()` is a context the observing passes run in."""
    segs = segments(gm, stack)
    live = _live_after(gm, segs)
    acts = {id(q): n for n, q in quantizers.items()}
    owned = _quantizers_by_segment(gm, segs, acts)
    envs = [placeholder_values(gm, b) for b in batches]
    inputs = SegmentInputs(gm, envs)
    bar = Progress(len(segs), "calibrating block by block", progress)
    with torch.no_grad():
        for seg in segs:
            if on_segment is not None:
                on_segment(seg, inputs)
            names = owned[seg.index]
            qs = [quantizers[n] for n in names]
            named = [(n, q.encoding_analyzer) for n, q in zip(names, qs)]
            with contextlib.ExitStack() as calib:
                for q in qs:
                    calib.enter_context(q.compute_encodings(disable_if_unused=True))
                with float_biases():
                    if any(hasattr(a, "update_range") for _, a in named):
                        with range_pass([a for _, a in named]):
                            for b in range(len(envs)):
                                inputs.run(seg, b, keep=set())
                        if process_group is not None:
                            sync_analyzers(named, process_group, ranges=True)
                    for b in range(len(envs)):
                        inputs.run(seg, b, keep=set())
                if process_group is not None:
                    sync_analyzers(named, process_group)
            if finish is not None:
                finish(names)
            # the segment once more, quantizers on: the next segments' inputs as the simulation sees them
            keep = live[seg.index]
            if keep:
                for b in range(len(envs)):
                    envs[b] = inputs.run(seg, b, keep=keep)
            else:
                for b in range(len(envs)):
                    envs[b] = {}
            bar.update()
    bar.close()
    return segs

