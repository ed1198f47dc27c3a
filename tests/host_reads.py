"""Counting host reads of tensor values during a piece of work, on any device:

- a TorchFunctionMode counts the Tensor methods that copy values to the host when Python code calls them
  (item, tolist, cpu, numpy, and the conversions bool / float / int / index, which `if t:` and `float(t)`
  run);
- a TorchDispatchMode counts the ops those reads reach (aten::item, _local_scalar_dense, is_nonzero,
  equal) where the first mode cannot see: in autograd nodes' backward, which the autograd engine runs
  outside Python's torch-function modes, and inside the Python kernels of pyquant's registered ops, which
  it re-enters (dispatching below its own key) so that their bodies are seen too."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

TENSOR_READS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy", torch.Tensor.__bool__: "__bool__", torch.Tensor.__float__: "__float__",
    torch.Tensor.__int__: "__int__", torch.Tensor.__index__: "__index__",
}
OP_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}


class MethodReads(TorchFunctionMode):
    """The torch-function half alone: it leaves the dispatcher untouched, so code that calls kernels
    directly when no dispatch mode is active (pyquant.ops.eager_kernel) runs as it does outside a test."""

    def __init__(self, counts: Counter | None = None) -> None:
        super().__init__()
        self.counts = counts if counts is not None else Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = TENSOR_READS.get(func)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _OpReads(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in OP_READS:
            self.counts[name] += 1
        elif name == "aten::_to_copy" and kwargs.get("device") is not None and torch.device(kwargs["device"]).type \
                == "cpu" and args[0].device.type != "cpu":
            self.counts["copy to host"] += 1
        if func.namespace == "pyquant":  # run the kernel with this mode active, to see inside it
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


class HostReadCounter:
    """`with HostReadCounter() as c: ...` then `c.counts` (reads by name) and `c.total`."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "HostReadCounter":
        self._stack.enter_context(MethodReads(self.counts))
        self._stack.enter_context(_OpReads(self.counts))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

