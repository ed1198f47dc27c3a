"""What a quantizer's trainable encoding parameters are: a range (min, max), from which scale and
offset are derived as calibration derives them (AIMET's parametrization), or scale and offset
themselves (LSQ-style; their gradients come straight from the fused kernel). One class each; a
quantizer holds one (`RANGE_PARAMS[name]`) and asks it, never tests the name.

The parameters live on the quantizer as ``min``/``max`` or ``scale``/``offset`` (so a state dict
names them), in the encoding's shape."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from .encoding import Encoding, min_scale

__all__ = ["RangeParams", "MinMaxRange", "ScaleOffsetRange", "RANGE_PARAMS", "minmax_to_scale_offset"]

Factors = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def minmax_to_scale_offset(mn: torch.Tensor, mx: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                           factors: bool = False) -> tuple[torch.Tensor, torch.Tensor, Factors]:
    """(scale, offset, chain factors) of a min/max range (pyquant.ops.reference.minmax_encoding, with this
    grid's smallest scale): differentiable in min and max under autograd (the offset's rounding
    straight-through); with `factors`, also the factors `minmax_grads` carries the chain rule back with."""
    s, o, *k = ops.reference.minmax_encoding(mn, mx, qmin, qmax, min_scale(qmax - qmin), symmetric, factors)
    return s, o, tuple(k)


def shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` in `shape`, without a reshape call when it already has it (a per-call cost on small layers)."""
    return t if t.shape == shape else t.reshape(shape)


def minmax_grads(shape: torch.Size, factors: Factors, ds: torch.Tensor, do: Optional[torch.Tensor],
                 need_min: bool, need_max: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(d min, d max) from the gradients of scale and offset and `minmax_to_scale_offset`'s factors:
    ``dmax = (ds - do' (min/s)/s) [s unclamped] / N`` and ``dmin = do'/s - dmax`` with
    ``do' = do [o unclamped]`` (symmetric: ``dmin = -dmax``)."""
    k_s, k_o, k_ot = factors
    ds = shaped(ds, shape)
    if k_o is None:  # symmetric: the offset is 0
        dmax = ds * k_s
        return (-dmax if need_min else None), (dmax if need_max else None)
    do = shaped(do, shape)
    # separate multiplies and adds, no fused multiply-add: the native step (minmax_qdq_backward) rounds the same
    dmax = (ds - do * k_ot).mul_(k_s)
    return ((do * k_o).sub_(dmax) if need_min else None), (dmax if need_max else None)


class RangeParams:
    """How a quantizer's encoding is parametrized (see the module docstring)."""

    name: str = ""
    names: tuple[str, str] = ("", "")
    derived: bool = False
    """Scale and offset are computed from the parameters (chain rule back to them in the backward)."""

    def create(self, q: nn.Module, shape: tuple[int, ...], symmetric: bool) -> None:
        raise NotImplementedError

    def parameters(self, q: nn.Module) -> list[nn.Parameter]:
        p = q._parameters  # read directly: Module.__getattr__ costs more than the rest of a small call
        return [p[self.names[0]], p[self.names[1]]]

    def trainable(self, q: nn.Module, symmetric: bool) -> list[nn.Parameter]:
        """The parameters that learn under range learning."""
        return self.parameters(q)

    def store(self, q: nn.Module, enc: Encoding, shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def scale_offset(self, q: nn.Module, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) from the parameters, differentiable under autograd."""
        raise NotImplementedError

    def rescale(self, q: nn.Module, k: torch.Tensor) -> bool:
        """Multiplies the encoding by per-channel factors `k` (shaped like the parameters) when that is
        exact, as folding a batch norm into the weight does; returns False (nothing changed) otherwise."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MinMaxRange(RangeParams):
    """Parameters ``min`` and ``max``: the range the encoding represents (AIMET's)."""

    name, names, derived = "minmax", ("min", "max"), True

    def create(self, q, shape, symmetric):
        q.min = nn.Parameter(torch.zeros(shape))
        q.max = nn.Parameter(torch.zeros(shape))

    def store(self, q, enc, shape):
        q.min.copy_(enc.min.reshape(shape))
        q.max.copy_(enc.max.reshape(shape))

    def scale_offset(self, q, qmin, qmax, symmetric):
        if not torch.is_grad_enabled():  # one op (native on the CPU), e.g. for a bias's int32 scale each call
            s, o, *_ = ops.eager_kernel("minmax_encoding", q.min)(q.min, q.max, qmin, qmax, min_scale(qmax - qmin),
                                                                  symmetric, False)
            return s, o
        s, o, _ = minmax_to_scale_offset(q.min, q.max, qmin, qmax, symmetric)
        return s, o

    def rescale(self, q, k):
        lo, hi = q.min * k, q.max * k  # a negative factor swaps the ends
        q.min.copy_(torch.minimum(lo, hi))
        q.max.copy_(torch.maximum(lo, hi))
        return True


class ScaleOffsetRange(RangeParams):
    """Parameters ``scale`` and ``offset`` themselves; a symmetric encoding's offset stays 0."""

    name, names, derived = "scale_offset", ("scale", "offset"), False

    def create(self, q, shape, symmetric):
        q.scale = nn.Parameter(torch.ones(shape))
        q.offset = nn.Parameter(torch.zeros(shape), requires_grad=not symmetric)

    def trainable(self, q, symmetric):
        return [q.scale] if symmetric else [q.scale, q.offset]

    def store(self, q, enc, shape):
        q.scale.copy_(enc.scale.reshape(shape))
        q.offset.copy_(enc.offset.reshape(shape))

    def scale_offset(self, q, qmin, qmax, symmetric):
        return q.scale, q.offset

    def rescale(self, q, k):
        if bool((k < 0).any()):  # a scale cannot flip sign; the caller recalibrates instead
            return False
        q.scale.mul_(k)
        return True


RANGE_PARAMS: dict[str, RangeParams] = {"minmax": MinMaxRange(), "scale_offset": ScaleOffsetRange()}
"""The parametrizations by name (QuantSim's and the quantizers' ``range_params`` argument)."""
