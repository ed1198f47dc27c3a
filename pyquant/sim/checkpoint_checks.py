"""Checks of a QuantSim checkpoint's content before any of it is loaded: the structure save_checkpoint
writes, the state dict's keys, shapes and dtypes against the simulation's, the quantizers' flags, and the
encoding values (finite; positive scales; LPBQ integer scales in range). A checkpoint that fails is
refused with CheckpointError naming the entry, and the simulation is left as it was."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..ops import grid
from ..quant import LpbqQuantizeDequantize

__all__ = ["CheckpointError", "check_checkpoint"]

_SECTIONS = ("model", "quantizers", "extra", "optimizer")
_BOOL_FLAGS = ("enabled", "frozen", "symmetric", "strict", "unsigned", "lsq")


class CheckpointError(ValueError):
    """A checkpoint whose content does not fit the simulation; the message names the entry."""


def check_checkpoint(state: Any, model: nn.Module, quantizers: Mapping[str, nn.Module], source: str) -> None:
    """Raises CheckpointError unless `state` (what torch.load returned) is a checkpoint of this simulation
    (`model`, its `quantizers` by name) with valid values."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected the dict save_checkpoint writes, got {type(state).__name__}")
    missing = [k for k in _SECTIONS if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a QuantSim checkpoint: no {', '.join(repr(k) for k in missing)}")
    if not isinstance(state["extra"], Mapping):
        raise CheckpointError(f"{source}: 'extra' must be a dict, got {type(state['extra']).__name__}")
    if state["optimizer"] is not None and not isinstance(state["optimizer"], Mapping):
        raise CheckpointError(f"{source}: 'optimizer' must be a dict or None, got {type(state['optimizer']).__name__}")
    _check_flags(state["quantizers"], quantizers, source)
    _check_model(state["model"], model, quantizers, state["quantizers"], source)


def _check_flags(saved: Any, quantizers: Mapping[str, nn.Module], source: str) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source}: 'quantizers' must be a dict of name -> flags, got {type(saved).__name__}")
    unknown = [n for n in saved if n not in quantizers]
    absent = [n for n in quantizers if n not in saved]
    if unknown or absent:
        raise CheckpointError(f"{source}: 'quantizers' does not match this simulation: unknown {unknown[:5]}, "
                              f"missing {absent[:5]}")
    for name, flags in saved.items():
        q = quantizers[name]
        where = f"{source}: quantizers[{name!r}]"
        if not isinstance(flags, Mapping):
            raise CheckpointError(f"{where}: expected a dict of flags, got {type(flags).__name__}")
        need = ["enabled", "frozen", "bitwidth", "symmetric", "learn"] + (["lsq"] if hasattr(q, "lsq_grad_scale")
                                                                            else [])
        for key in need:
            if key not in flags:
                raise CheckpointError(f"{where}: missing flag {key!r}")
        for key in _BOOL_FLAGS:
            if key in flags and not isinstance(flags[key], bool):
                raise CheckpointError(f"{where}.{key}: expected True or False, got {flags[key]!r}")
        bw = flags["bitwidth"]
        if isinstance(bw, bool) or not isinstance(bw, int) or not 2 <= bw <= 16:
            raise CheckpointError(f"{where}.bitwidth: expected an integer in 2..16, got {bw!r}")
        sym, strict, unsigned = flags["symmetric"], flags.get("strict", False), flags.get("unsigned", False)
        if (strict or unsigned) and not sym:
            raise CheckpointError(f"{where}: strict and unsigned grids are symmetric; symmetric is False")
        if isinstance(q, LpbqQuantizeDequantize):
            if not sym or not q.decompressed_bw - 15 <= bw < q.decompressed_bw:
                raise CheckpointError(f"{where}: an LPBQ weight is symmetric with a bit width below its "
                                      f"decompressed_bw {q.decompressed_bw} (by 1..15), got bitwidth {bw}, "
                                      f"symmetric {sym}")
        grid(bw, sym and not unsigned, strict=bool(strict and not unsigned))
        learn = flags["learn"]
        n_params = len(q.encoding_parameters())
        if not isinstance(learn, (list, tuple)) or len(learn) != n_params or \
                not all(isinstance(v, bool) for v in learn):
            raise CheckpointError(f"{where}.learn: expected {n_params} booleans, got {learn!r}")


def _check_model(saved: Any, model: nn.Module, quantizers: Mapping[str, nn.Module], flags: Mapping,
                 source: str) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source}: 'model' must be a state dict, got {type(saved).__name__}")
    own = model.state_dict()
    unknown = [k for k in saved if k not in own]
    absent = [k for k in own if k not in saved]
    if unknown or absent:
        raise CheckpointError(f"{source}: 'model' does not match this simulation: unknown keys {unknown[:5]}, "
                              f"missing keys {absent[:5]}")
    for key, mine in own.items():
        t = saved[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: model[{key!r}]: expected a tensor, got {type(t).__name__}")
        if t.shape != mine.shape or t.dtype != mine.dtype:
            raise CheckpointError(f"{source}: model[{key!r}]: expected {mine.dtype} of shape {tuple(mine.shape)}, "
                                  f"got {t.dtype} of shape {tuple(t.shape)}")
    paths = {id(m): p for p, m in model.named_modules()}
    for name, q in quantizers.items():
        path = paths.get(id(q))
        if path is None:
            continue
        prefix = f"{path}." if path else ""
        if not bool(saved.get(prefix + "initialized", torch.tensor(False))):
            continue  # no encoding: its parameters are not used
        _check_encoding_values(saved, prefix, q, name, flags[name], source)


def _check_encoding_values(saved: Mapping, prefix: str, q: nn.Module, name: str, flags: Mapping,
                           source: str) -> None:
    """The encoding a quantizer would load: finite parameters, a positive scale (or min <= max), offset 0
    when symmetric (an asymmetric offset may be fractional: range learning trains it), LPBQ integer scales
    in 1..2^k with positive per-channel scales."""
    for p in q.encoding_parameters():
        pname = next(n for n, v in q.named_parameters(recurse=False) if v is p)
        t = saved[prefix + pname]
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: model[{prefix + pname!r}] (quantizer {name!r}): the encoding has "
                                  f"non-finite values")
    values = dict(q.named_parameters(recurse=False))
    if "scale" in values and not bool((saved[prefix + "scale"] > 0).all()):
        raise CheckpointError(f"{source}: model[{prefix + 'scale'!r}] (quantizer {name!r}): scales must be positive, "
                              f"found {float(saved[prefix + 'scale'].min())}")
    if "offset" in values and flags["symmetric"] and bool((saved[prefix + "offset"] != 0).any()):
        raise CheckpointError(f"{source}: model[{prefix + 'offset'!r}] (quantizer {name!r}): a symmetric encoding's "
                              f"offset is 0")
    if "min" in values and not bool((saved[prefix + "min"] <= saved[prefix + "max"]).all()):
        raise CheckpointError(f"{source}: model[{prefix + 'min'!r}] (quantizer {name!r}): min above max")
    if isinstance(q, LpbqQuantizeDequantize):
        c, n = saved[prefix + "per_channel_scale"], saved[prefix + "int_scale"]
        k = q.decompressed_bw - flags["bitwidth"]  # the checkpoint's bit width, checked against decompressed_bw
        if not bool((torch.isfinite(c) & (c > 0)).all()):
            raise CheckpointError(f"{source}: model[{prefix + 'per_channel_scale'!r}] (quantizer {name!r}): "
                                  f"per-channel scales must be positive and finite")
        if not bool(((n >= 1) & (n <= 2 ** k) & (n == torch.round(n))).all()):
            raise CheckpointError(f"{source}: model[{prefix + 'int_scale'!r}] (quantizer {name!r}): integer block "
                                  f"scales must be integers in 1..{2 ** k}")
