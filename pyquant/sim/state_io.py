"""All-or-nothing loads into a simulation: a checkpoint is read as tensors and plain values only and
checked in full against the simulation (names, shapes, flags, the optimizer's groups) before anything is
applied, and the quantizers' state is snapshotted so that a load that still fails part-way (an encoding
that a quantizer refuses) puts every quantizer back as it was."""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .._safe_load import check_plain, load_plain
from ..ops import grid
from ..quant import Encoding, QuantizerBase

__all__ = ["QuantizerSnapshot", "checkpoint_state", "read_checkpoint", "check_checkpoint", "check_encoding_shapes"]

_FLAG_KEYS = ("enabled", "frozen", "bitwidth", "symmetric", "learn")


class QuantizerSnapshot:
    """The state of some quantizers (their tensors and flags), to put back with `restore()`."""

    def __init__(self, quantizers: Mapping[str, QuantizerBase]):
        self._saved = {n: (q, {k: v.detach().clone() for k, v in q.state_dict().items()}, q.state_flags())
                       for n, q in quantizers.items()}

    def restore(self) -> None:
        for q, tensors, flags in self._saved.values():
            q.load_state_flags(flags)
            q.load_state_dict(tensors)


def checkpoint_state(model: nn.Module, quantizers: Mapping[str, QuantizerBase],
                     optimizer: Optional[torch.optim.Optimizer], extra: Mapping[str, Any]) -> dict[str, Any]:
    """What `QuantSim.save_checkpoint` writes: tensors and plain values only (TypeError naming an extra
    value that is neither), so that the file reads back without unpickling objects."""
    check_plain(dict(extra), "save_checkpoint's extra values")
    state = {"model": model.state_dict(),
             "quantizers": {n: q.state_flags() for n, q in quantizers.items()},
             "extra": dict(extra), "optimizer": optimizer.state_dict() if optimizer is not None else None}
    check_plain(state["model"], "the model's state dict")  # e.g. a module's non-tensor extra state
    check_plain(state["optimizer"], "the optimizer's state")
    return state


def read_checkpoint(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A checkpoint file's contents, read as tensors and plain values (`pyquant.UnsafeFileError` for a file
    holding other objects) and checked for the form `checkpoint_state` writes (ValueError otherwise)."""
    state = load_plain(path, "checkpoint")
    where = f"checkpoint {os.fspath(path)!r}"
    if not isinstance(state, dict) or not {"model", "quantizers"} <= set(state):
        raise ValueError(f"{where} is not a QuantSim checkpoint (expected a dict with 'model' and 'quantizers')")
    if not isinstance(state["model"], Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise ValueError(f"{where}: 'model' must map parameter names to tensors")
    if not isinstance(state["quantizers"], Mapping):
        raise ValueError(f"{where}: 'quantizers' must map quantizer names to their flags")
    if not isinstance(state.get("extra", {}), Mapping):
        raise ValueError(f"{where}: 'extra' must be a dict")
    if state.get("optimizer") is not None and not isinstance(state["optimizer"], Mapping):
        raise ValueError(f"{where}: 'optimizer' must be an optimizer's state dict or None")
    state.setdefault("extra", {})
    state.setdefault("optimizer", None)
    return state


def check_checkpoint(state: Mapping[str, Any], model: nn.Module, quantizers: Mapping[str, QuantizerBase],
                     optimizer: Optional[torch.optim.Optimizer], where: str) -> None:
    """Raises ValueError, naming the first problem, unless every part of `state` fits this simulation:
    the same state-dict names with the same shapes, flags of known quantizers with valid values, and an
    optimizer state with the optimizer's groups and group sizes."""
    have = model.state_dict()
    saved = state["model"]
    missing, unexpected = sorted(set(have) - set(saved)), sorted(set(saved) - set(have))
    if missing or unexpected:
        raise ValueError(f"{where} was saved from another model or simulation: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, t in saved.items():
        if tuple(t.shape) != tuple(have[k].shape):
            raise ValueError(f"{where}: {k!r} has shape {tuple(t.shape)}, the simulation's is {tuple(have[k].shape)}")
    for name, flags in state["quantizers"].items():
        q = quantizers.get(name)
        if q is None:
            raise ValueError(f"{where}: flags for quantizer {name!r}, which this simulation does not have")
        _check_flags(name, flags, q, where)
    opt = state.get("optimizer")
    if optimizer is not None and opt is not None:
        groups, saved_groups = optimizer.param_groups, opt.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(groups) or not all(
                isinstance(g, Mapping) and isinstance(g.get("params"), list) and len(g["params"]) == len(h["params"])
                for g, h in zip(saved_groups, groups)):
            raise ValueError(f"{where}: the optimizer state has other parameter groups than the optimizer given "
                             f"({[len(h['params']) for h in groups]} parameters per group)")
        if not isinstance(opt.get("state", {}), Mapping):
            raise ValueError(f"{where}: the optimizer state's 'state' must be a dict")


def _check_flags(name: str, flags: Any, q: QuantizerBase, where: str) -> None:
    if not isinstance(flags, Mapping) or not set(_FLAG_KEYS) <= set(flags):
        raise ValueError(f"{where}: quantizer {name!r}: flags must be a dict with {list(_FLAG_KEYS)}")
    for k in ("enabled", "frozen", "symmetric", "strict", "unsigned", "lsq"):
        if k in flags and not isinstance(flags[k], bool):
            raise ValueError(f"{where}: quantizer {name!r}: {k} must be True or False, got {flags[k]!r}")
    bw, sym = flags["bitwidth"], flags["symmetric"]
    if isinstance(bw, bool) or not isinstance(bw, int):
        raise ValueError(f"{where}: quantizer {name!r}: bitwidth must be an int, got {bw!r}")
    try:
        grid(bw, sym and not flags.get("unsigned", False))
    except ValueError as e:
        raise ValueError(f"{where}: quantizer {name!r}: {e}") from None
    learn, n = flags["learn"], len(q.encoding_parameters())
    if not isinstance(learn, list) or len(learn) != n or not all(isinstance(v, bool) for v in learn):
        raise ValueError(f"{where}: quantizer {name!r}: learn must be a list of {n} True/False values, got {learn!r}")


def check_encoding_shapes(encodings: Iterable[tuple[str, Encoding]], quantizers: Mapping[str, QuantizerBase],
                          where: str) -> None:
    """Raises ValueError naming the first encoding whose number of scales does not fit its quantizer's
    encoding shape (checked before any encoding is set)."""
    for name, enc in encodings:
        q = quantizers[name]
        want = max(1, math.prod(q.shape))
        if enc.scale.numel() != want:
            raise ValueError(f"{where}: {name!r} has {enc.scale.numel()} scale(s), its quantizer takes {want} "
                             f"(encoding shape {tuple(q.shape)})")
