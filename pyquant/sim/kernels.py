"""The config's supported_kernels: which (activation, parameter) bit widths and dtypes a target runs each
op with. Every op's quantizers are checked against its kernels; a setting the target cannot run is an
error naming the op and what it can run, or (unsupported="nearest") moved to the nearest kernel the
target runs, with a warning. An integer kernel sets the bit widths; a float kernel leaves the op in
floating point (its quantizers disabled)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from .config import ConfigError, HardwareConfig, SupportedKernel

__all__ = ["UNSUPPORTED_MODES", "apply_supported_kernels", "describe", "runs"]

UNSUPPORTED_MODES = ("error", "nearest")


def describe(k: SupportedKernel) -> str:
    """A kernel as W<param>A<act> (F for float)."""
    w = "-" if k.param is None else f"{'F' if k.param.dtype == 'float' else ''}{k.param.bitwidth}"
    a = f"{'F' if k.activation.dtype == 'float' else ''}{k.activation.bitwidth}"
    return f"W{w}A{a}"


def runs(k: SupportedKernel, act_bw: Optional[int], param_bw: Optional[int]) -> bool:
    """Whether kernel k runs an op whose quantized activations have act_bw bits and weights param_bw
    (None: the op has no such quantizer)."""
    if act_bw is not None and (k.activation.dtype != "int" or k.activation.bitwidth != act_bw):
        return False
    if param_bw is not None and k.param is not None and (k.param.dtype != "int" or k.param.bitwidth != param_bw):
        return False
    return True


def _distance(k: SupportedKernel, act_bw: Optional[int], param_bw: Optional[int]) -> tuple:
    """How far kernel k is from the op's setting: integer kernels before float ones, then the bit-width
    difference (activations first), then the wider kernel (safer for accuracy)."""
    is_float = k.activation.dtype == "float" or (k.param is not None and k.param.dtype == "float")
    da = abs(k.activation.bitwidth - act_bw) if act_bw is not None else 0
    dp = abs(k.param.bitwidth - param_bw) if (param_bw is not None and k.param is not None) else 0
    return (is_float, da + dp, da, -k.activation.bitwidth)


def apply_supported_kernels(placements: list, cfg: HardwareConfig, unsupported: str = "error") -> list:
    """`placements` (pyquant.sim.placement.QuantizerPlacement, with their bit widths set) made to run on
    the kernels the config lists for each op."""
    if unsupported not in UNSUPPORTED_MODES:
        raise ValueError(f"unsupported_kernels must be one of {UNSUPPORTED_MODES}, got {unsupported!r}")
    by_op: dict[str, list] = {}
    for p in placements:
        if p.kind != "input":  # model inputs belong to no op
            by_op.setdefault(p.node, []).append(p)
    changed: dict[str, tuple] = {}
    moved = []
    for node, ps in by_op.items():
        op_type = ps[0].op_type
        kernels = cfg.supported_kernels(op_type)
        if not kernels:
            continue
        acts = {p.bitwidth for p in ps if not p.is_param}
        params = {p.bitwidth for p in ps if p.is_param}
        act_bw = max(acts) if acts else None
        param_bw = max(params) if params else None
        if len(acts) <= 1 and len(params) <= 1 and any(runs(k, act_bw, param_bw) for k in kernels):
            continue
        where = f"op_type.{op_type}.supported_kernels" if cfg.op_type.get(op_type) is not None and \
            cfg.op_type[op_type].supported_kernels is not None else "defaults.supported_kernels"
        have = f"W{param_bw if param_bw is not None else '-'}A{act_bw if act_bw is not None else '-'}"
        if unsupported == "error":
            raise ConfigError(f"{where}: op {node!r} ({op_type}) would run {have}, which the target does not run "
                              f"(it runs {', '.join(describe(k) for k in kernels)}); change param_bw/output_bw "
                              f"or pass unsupported_kernels='nearest'")
        k = min(kernels, key=lambda k: _distance(k, act_bw, param_bw))
        moved.append(f"{node} ({op_type}) {have} -> {describe(k)}")
        float_op = k.activation.dtype == "float"  # the op runs in floating point: its weights too
        for p in ps:
            spec = k.param if p.is_param else k.activation
            if float_op or (spec is not None and spec.dtype == "float"):
                changed[p.name] = (p.bitwidth, False)
            elif spec is not None:
                changed[p.name] = (spec.bitwidth, True)
    if moved:
        warnings.warn(f"QuantSim: {len(moved)} op(s) moved to the nearest kernel the config's supported_kernels "
                      f"list: {'; '.join(moved[:8])}{' ...' if len(moved) > 8 else ''}", RuntimeWarning, stacklevel=4)
    return [dataclasses.replace(p, bitwidth=changed[p.name][0], enabled=changed[p.name][1]) if p.name in changed
            else p for p in placements]
