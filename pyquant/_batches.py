"""User data as batches of model inputs: the one way every part of pyquant takes calibration and
evaluation data.

Accepted everywhere a `data` argument is: a tensor of samples (split into batches along dim 0), or an
iterable of batches (a list, a data loader) whose items are tensors, tuples of tensors (positional
inputs), ``(inputs, labels)`` pairs (integer labels are dropped) or dicts of keyword inputs
(HuggingFace models)."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Union

import torch

__all__ = ["Batch", "Data", "as_batches", "iter_batches", "batch_args", "reusable", "call", "batch_len"]

Batch = Union[tuple, dict]
"""One batch of model inputs: positional (a tuple) or keyword (a dict)."""
Data = Union[torch.Tensor, Iterable[Any]]


def batch_args(b: Any, what: str = "data") -> tuple:
    """A batch as positional model inputs: a tensor, a tuple of inputs, or (inputs, integer labels) --
    the labels are dropped."""
    if isinstance(b, torch.Tensor):
        return (b,)
    if isinstance(b, (tuple, list)):
        labelled = len(b) == 2 and torch.is_tensor(b[1]) and not b[1].is_floating_point()
        return (b[0],) if labelled else tuple(b)
    raise TypeError(f"{what}: batches must be tensors or tuples of tensors, got {type(b).__name__}")


def batch_len(x: Any) -> int:
    """Samples in one input (its dim 0; 1 for a scalar or a non-tensor)."""
    return int(x.shape[0]) if torch.is_tensor(x) and x.dim() > 0 else 1


def _size(b: Batch) -> int:
    return batch_len(next(iter(b.values()))) if isinstance(b, dict) else batch_len(b[0])


def _head(b: Batch, keep: int) -> Batch:
    if isinstance(b, dict):
        return {k: v[:keep] for k, v in b.items()}
    return tuple(a[:keep] if torch.is_tensor(a) and a.dim() > 0 else a for a in b)


def iter_batches(data: Data, batch_size: Optional[int] = 32, max_samples: Optional[int] = None,
                 what: str = "data") -> Iterator[Batch]:
    """The batches of `data` one at a time, as positional inputs (tuples) or keyword inputs (dicts), with
    at most `max_samples` samples in all (the last batch is cut short to fit); nothing is held beyond
    the current batch, so a data loader streams. A tensor is split into batches of `batch_size` (None:
    the whole tensor is one batch).

    Raises TypeError naming the argument (`what`) and the batch for anything else, and ValueError for
    bad sizes. Empty data yields nothing (`as_batches` refuses it)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or len(data) == 0:
            raise ValueError(f"{what} must hold at least one sample, got a tensor of shape {tuple(data.shape)}")
        step = batch_size or len(data)
        data = [data[i:i + step] for i in range(0, len(data), step)]
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{what} must be a tensor or an iterable of batches, got {type(data).__name__}")
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{what} must be a tensor or an iterable of batches, got {type(data).__name__}") from None
    return _batches(it, max_samples, what)


def _batches(it: Iterator[Any], max_samples: Optional[int], what: str) -> Iterator[Batch]:
    n = 0
    for i, b in enumerate(it):
        if max_samples is not None and n >= max_samples:
            return
        args: Batch = b if isinstance(b, dict) else batch_args(b, f"{what}[{i}]")
        size = _size(args)
        if max_samples is not None and n + size > max_samples:
            args, size = _head(args, max_samples - n), max_samples - n
        yield args
        n += size


def as_batches(data: Data, batch_size: Optional[int] = 32, max_samples: Optional[int] = None,
               what: str = "data") -> list[Batch]:
    """`iter_batches` as a list, which can be walked many times: every pass over it sees the same data
    in the same order. Raises ValueError for empty data."""
    out = list(iter_batches(data, batch_size, max_samples, what))
    if not out:
        raise ValueError(f"{what}: the iterable yielded no batches (it is empty); give at least one batch")
    return out


def reusable(data: Any) -> Any:
    """`data` as something that can be read more than once: a one-shot iterator (a generator) is read
    into a list; tensors, lists and other re-iterable containers come back as they are (as does a
    non-iterable, left for the caller's own type check)."""
    if isinstance(data, torch.Tensor):
        return data
    try:
        return list(data) if iter(data) is data else data
    except TypeError:
        return data


def call(model: torch.nn.Module, b: Batch) -> Any:
    """The model on one batch: keyword inputs for a dict, positional ones for a tuple."""
    return model(**b) if isinstance(b, dict) else model(*b)
