"""All-or-nothing loads into a simulation: a checkpoint is read as tensors and plain values only and
checked in full against the simulation (names, shapes and dtypes, flags, encoding values, the optimizer's
groups; CheckpointError naming the entry) before anything is applied, and the quantizers' state is snapshotted so that a load that still fails part-way (an encoding
that a quantizer refuses) puts every quantizer back as it was."""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .._safe_load import check_plain, load_plain
from ..ops import grid
from ..quant import Encoding, LpbqQuantizeDequantize, QuantizerBase

__all__ = ["CheckpointError", "QuantizerSnapshot", "checkpoint_state", "read_checkpoint", "check_checkpoint",
           "check_encoding_shapes"]

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


class CheckpointError(ValueError):
    """A checkpoint that is not one of this simulation, or holds invalid values; the message names the
    entry. Nothing of it has been applied."""


def read_checkpoint(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """A checkpoint file's contents, read as tensors and plain values (`pyquant.UnsafeFileError` for a file
    holding other objects) and checked for the form `checkpoint_state` writes (CheckpointError otherwise)."""
    state = load_plain(path, "checkpoint")
    where = f"checkpoint {os.fspath(path)!r}"
    if not isinstance(state, dict) or not {"model", "quantizers"} <= set(state):
        raise CheckpointError(f"{where} is not a QuantSim checkpoint (expected a dict with 'model' and "
                              f"'quantizers')")
    if not isinstance(state["model"], Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise CheckpointError(f"{where}: 'model' must map parameter names to tensors")
    if not isinstance(state["quantizers"], Mapping):
        raise CheckpointError(f"{where}: 'quantizers' must map quantizer names to their flags")
    if not isinstance(state.get("extra", {}), Mapping):
        raise CheckpointError(f"{where}: 'extra' must be a dict")
    if state.get("optimizer") is not None and not isinstance(state["optimizer"], Mapping):
        raise CheckpointError(f"{where}: 'optimizer' must be an optimizer's state dict or None")
    state.setdefault("extra", {})
    state.setdefault("optimizer", None)
    return state


def check_checkpoint(state: Mapping[str, Any], model: nn.Module, quantizers: Mapping[str, QuantizerBase],
                     optimizer: Optional[torch.optim.Optimizer], where: str) -> None:
    """Raises CheckpointError, naming the first problem, unless every part of `state` fits this simulation:
    flags for exactly its quantizers with valid values, the same state-dict names with the same shapes and
    dtypes, encodings that are finite with positive scales (a min above its max is kept: range learning can
    move it there, and the quantizer reads it as the smallest step; offset 0 when symmetric; LPBQ
    integer scales in range), and an optimizer state with the optimizer's groups and group sizes."""
    _check_all_flags(state["quantizers"], quantizers, where)
    _check_model(state["model"], model, quantizers, state["quantizers"], where)
    opt = state.get("optimizer")
    if optimizer is not None and opt is not None:
        groups, saved_groups = optimizer.param_groups, opt.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(groups) or not all(
                isinstance(g, Mapping) and isinstance(g.get("params"), list) and len(g["params"]) == len(h["params"])
                for g, h in zip(saved_groups, groups)):
            raise CheckpointError(f"{where}: the optimizer state has other parameter groups than the optimizer "
                                  f"given ({[len(h['params']) for h in groups]} parameters per group)")
        if not isinstance(opt.get("state", {}), Mapping):
            raise CheckpointError(f"{where}: the optimizer state's 'state' must be a dict")


def _check_all_flags(saved: Mapping, quantizers: Mapping[str, QuantizerBase], where: str) -> None:
    unknown = [n for n in saved if n not in quantizers]
    absent = [n for n in quantizers if n not in saved]
    if unknown or absent:
        raise CheckpointError(f"{where}: 'quantizers' does not match this simulation: flags for quantizers it "
                              f"does not have {unknown[:5]}, none for {absent[:5]}")
    for name, flags in saved.items():
        _check_flags(name, flags, quantizers[name], where)


def _check_flags(name: str, flags: Any, q: QuantizerBase, where: str) -> None:
    at = f"{where}: quantizers[{name!r}]"
    need = list(_FLAG_KEYS) + (["lsq"] if hasattr(q, "lsq_grad_scale") else [])
    if not isinstance(flags, Mapping) or not set(need) <= set(flags):
        raise CheckpointError(f"{at}: flags must be a dict with {need}")
    for k in ("enabled", "frozen", "symmetric", "strict", "unsigned", "lsq"):
        if k in flags and not isinstance(flags[k], bool):
            raise CheckpointError(f"{at}.{k}: must be True or False, got {flags[k]!r}")
    bw, sym = flags["bitwidth"], flags["symmetric"]
    strict, unsigned = flags.get("strict", False), flags.get("unsigned", False)
    if isinstance(bw, bool) or not isinstance(bw, int) or not 2 <= bw <= 16:
        raise CheckpointError(f"{at}.bitwidth: must be an integer in 2..16, got {bw!r}")
    if (strict or unsigned) and not sym:
        raise CheckpointError(f"{at}: strict and unsigned grids are symmetric; symmetric is False")
    if isinstance(q, LpbqQuantizeDequantize) and (not sym or not q.decompressed_bw - 15 <= bw < q.decompressed_bw):
        raise CheckpointError(f"{at}: an LPBQ weight is symmetric with a bit width below its decompressed_bw "
                              f"{q.decompressed_bw} (by 1..15), got bitwidth {bw}, symmetric {sym}")
    try:
        grid(bw, sym and not unsigned, strict=bool(strict and not unsigned))
    except ValueError as e:
        raise CheckpointError(f"{at}: {e}") from None
    learn, n = flags["learn"], len(q.encoding_parameters())
    if not isinstance(learn, (list, tuple)) or len(learn) != n or not all(isinstance(v, bool) for v in learn):
        raise CheckpointError(f"{at}.learn: must be {n} True/False values, got {learn!r}")


def _check_model(saved: Mapping, model: nn.Module, quantizers: Mapping[str, QuantizerBase], flags: Mapping,
                 where: str) -> None:
    have = model.state_dict()
    missing, unexpected = sorted(set(have) - set(saved)), sorted(set(saved) - set(have))
    if missing or unexpected:
        raise CheckpointError(f"{where} was saved from another model or simulation: missing keys {missing[:5]}, "
                              f"unexpected keys {unexpected[:5]}")
    for k, mine in have.items():
        t = saved[k]
        if t.shape != mine.shape or t.dtype != mine.dtype:
            raise CheckpointError(f"{where}: model[{k!r}] has {t.dtype} of shape {tuple(t.shape)}, the "
                                  f"simulation's is {mine.dtype} of shape {tuple(mine.shape)}")
    paths = {id(m): p for p, m in model.named_modules()}
    for name, q in quantizers.items():
        path = paths.get(id(q))
        if path is None:
            continue
        prefix = f"{path}." if path else ""
        if bool(saved.get(prefix + "initialized", torch.tensor(False))):  # without an encoding, nothing is used
            _check_encoding_values(saved, prefix, q, name, flags[name], where)


def _check_encoding_values(saved: Mapping, prefix: str, q: QuantizerBase, name: str, flags: Mapping,
                           where: str) -> None:
    """The encoding a quantizer would load: finite parameters, a positive scale, offset 0
    when symmetric (an asymmetric offset may be fractional: range learning trains it), LPBQ integer scales
    in 1..2^k under positive per-channel scales."""
    values = dict(q.named_parameters(recurse=False))
    for pname in values:
        if not bool(torch.isfinite(saved[prefix + pname]).all()):
            raise CheckpointError(f"{where}: model[{prefix + pname!r}] (quantizer {name!r}): the encoding has "
                                  f"non-finite values")
    at = lambda key: f"{where}: model[{prefix + key!r}] (quantizer {name!r})"  # noqa: E731
    if "scale" in values and not bool((saved[prefix + "scale"] > 0).all()):
        raise CheckpointError(f"{at('scale')}: scales must be positive, found {float(saved[prefix + 'scale'].min())}")
    if "offset" in values and flags["symmetric"] and bool((saved[prefix + "offset"] != 0).any()):
        raise CheckpointError(f"{at('offset')}: a symmetric encoding's offset is 0")
    if isinstance(q, LpbqQuantizeDequantize):
        c, n = saved[prefix + "per_channel_scale"], saved[prefix + "int_scale"]
        k = q.decompressed_bw - flags["bitwidth"]  # the checkpoint's bit width, checked against decompressed_bw
        if not bool((torch.isfinite(c) & (c > 0)).all()):
            raise CheckpointError(f"{at('per_channel_scale')}: per-channel scales must be positive and finite")
        if not bool(((n >= 1) & (n <= 2 ** k) & (n == torch.round(n))).all()):
            raise CheckpointError(f"{at('int_scale')}: integer block scales must be integers in 1..{2 ** k}")


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
