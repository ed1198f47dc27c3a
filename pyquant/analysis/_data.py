"""Data plumbing shared by the analyses: batches as positional model inputs, a model's output as one
tensor, and JSON-safe numbers."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch

from ..sim.staged import batch_args

Batch = Union[tuple, dict]


def reusable(data: Any) -> Any:
    """`data` as something that can be read more than once: a one-shot iterator (a generator) is read into
    a list; tensors, lists and other re-iterable containers come back as they are (as does a non-iterable,
    left for the caller's own type check)."""
    if isinstance(data, torch.Tensor):
        return data
    try:
        return list(data) if iter(data) is data else data
    except TypeError:
        return data


def as_batches(data: Union[torch.Tensor, Iterable[Any]], batch_size: int = 32,
               max_samples: Optional[int] = None, what: str = "data") -> list[Batch]:
    """`data` (a tensor of samples, or an iterable of batches: tensors, tuples of tensors,
    (inputs, labels) pairs or keyword dicts) as a list of batches of positional inputs (tuples) or
    keyword inputs (dicts), at most `max_samples` samples in all; a tensor is split into batches of
    `batch_size`. The list can be walked many times (a sweep evaluates the same data again and again)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if isinstance(data, torch.Tensor):
        data = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    out: list[Batch] = []
    n = 0
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{what} must be a tensor or an iterable of batches, got {type(data).__name__}") from None
    for b in it:
        if max_samples is not None and n >= max_samples:
            break
        if isinstance(b, dict):
            args: Batch = b
            size = _batch_len(next(iter(b.values())))
        else:
            args = batch_args(b, what)
            size = _batch_len(args[0])
        if max_samples is not None and n + size > max_samples:
            keep = max_samples - n
            args = {k: v[:keep] for k, v in args.items()} if isinstance(args, dict) else \
                tuple(a[:keep] if torch.is_tensor(a) and a.dim() > 0 else a for a in args)
            size = keep
        out.append(args)
        n += size
    if not out:
        raise ValueError(f"{what} is empty: give at least one batch")
    return out


def _batch_len(x: Any) -> int:
    return int(x.shape[0]) if torch.is_tensor(x) and x.dim() > 0 else 1


def call(model: torch.nn.Module, b: Batch) -> Any:
    return model(**b) if isinstance(b, dict) else model(*b)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a metric looks at: the output itself, a `logits` field, or the first tensor of a
    tuple/list/dict output."""
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(out, dict):
        if torch.is_tensor(out.get("logits")):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if torch.is_tensor(v):
                return v
    raise TypeError(f"the model returned {type(out).__name__}; a metric needs a tensor (or a tuple/dict "
                    f"holding one)")


def finite(x: Optional[float], digits: int = 6) -> Optional[float]:
    """A float for JSON: rounded to `digits` significant digits; inf and NaN become None."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def floats(t: torch.Tensor, digits: int = 5) -> list[Optional[float]]:
    return [finite(v, digits) for v in t.detach().flatten().double().tolist()]
