"""Quantizer modules: QuantizeDequantize (fake quantization, for simulation and QAT), Quantize
(integer codes) and Dequantize. Built on pyquant.ops; statistics and encodings come from an
analyzer (pyquant.quant.analyzers)."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..ops import raw
from .analyzers import EncodingAnalyzer, MinMax
from .encoding import Encoding, _broadcast_to, from_scale_offset, min_scale

__all__ = ["QuantizeDequantize", "Quantize", "Dequantize", "QuantizerError"]


class QuantizerError(RuntimeError):
    """A quantizer used in a state that cannot work (no encoding yet, frozen, ...)."""


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


class _QuantizerBase(nn.Module):
    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, block_size: Optional[Sequence[int]] = None,
                 *, param_mode: str = "minmax", name: Optional[str] = None):
        super().__init__()
        ops.grid(bitwidth, symmetric)  # validates bitwidth
        if param_mode not in ("minmax", "scale_offset"):
            raise ValueError(f"param_mode must be 'minmax' or 'scale_offset', got {param_mode!r}")
        self.shape = tuple(int(v) for v in shape)
        self.bitwidth = int(bitwidth)
        self.symmetric = bool(symmetric)
        self.block_size = tuple(block_size) if block_size is not None else None
        self.param_mode = param_mode
        self.name = name
        self.encoding_analyzer = encoding_analyzer if encoding_analyzer is not None else MinMax(self.shape)
        if tuple(self.encoding_analyzer.shape) != self.shape:
            raise ValueError(f"the analyzer's shape {self.encoding_analyzer.shape} differs from the quantizer's "
                             f"{self.shape}")
        if name and self.encoding_analyzer.name is None:
            self.encoding_analyzer.name = name
        if param_mode == "minmax":
            self.min = nn.Parameter(torch.zeros(self.shape))
            self.max = nn.Parameter(torch.zeros(self.shape))
        else:
            self.scale = nn.Parameter(torch.ones(self.shape))
            self.offset = nn.Parameter(torch.zeros(self.shape), requires_grad=not self.symmetric)
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        # A host-side copy of `initialized`: reading the buffer would synchronize a GPU and break
        # torch.compile graphs on every forward. Kept in step by set_encoding/reset and state-dict loads.
        self._has_encoding = False
        self.enabled = True
        self.frozen = False
        self._calibrating = False
        self._export = False  # ONNX export: torch's fake-quant ops, which export as QuantizeLinear/DequantizeLinear

    # ---- grid ----
    @property
    def qmin(self) -> int:
        return ops.grid(self.bitwidth, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return ops.grid(self.bitwidth, self.symmetric)[1]

    def _label(self) -> str:
        return f"quantizer '{self.name}'" if self.name else type(self).__name__

    # ---- encodings ----
    def set_encoding(self, enc: Encoding) -> None:
        if enc.bitwidth != self.bitwidth or enc.symmetric != self.symmetric:
            raise ValueError(f"{self._label()}: encoding is {enc.bitwidth}-bit "
                             f"{'sym' if enc.symmetric else 'asym'}, quantizer is {self.bitwidth}-bit "
                             f"{'sym' if self.symmetric else 'asym'}")
        with torch.no_grad():
            if self.param_mode == "minmax":
                self.min.copy_(enc.min.reshape(self.shape))
                self.max.copy_(enc.max.reshape(self.shape))
            else:
                self.scale.copy_(enc.scale.reshape(self.shape))
                self.offset.copy_(enc.offset.reshape(self.shape))
            self.initialized.fill_(True)
        self._has_encoding = True

    def reset_encoding(self) -> None:
        """Forget the encoding (the quantizer must be calibrated or given one again)."""
        with torch.no_grad():
            self.initialized.fill_(False)
        self._has_encoding = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "initialized"
        if key in state_dict:
            self._has_encoding = bool(state_dict[key])

    def _scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable (scale, offset) from the parameters."""
        if self.param_mode == "scale_offset":
            return self.scale, self.offset
        qmin, qmax = self.qmin, self.qmax
        ns = qmax - qmin
        s = torch.clamp((self.max - self.min) / ns, min=min_scale(ns))
        if self.symmetric:
            return s, torch.zeros_like(s)
        o = torch.clamp(_round_ste(self.min / s) - qmin, -qmax, -qmin)
        return s, o

    def get_encoding(self) -> Optional[Encoding]:
        if not self._has_encoding:
            return None
        with torch.no_grad():
            s, o = self._scale_offset()
            return from_scale_offset(s.detach().clone(), o.detach().clone(), self.bitwidth, self.symmetric,
                                     self.block_size)

    @contextlib.contextmanager
    def compute_encodings(self) -> Iterator[None]:
        """Inside the block the quantizer only observes its inputs (returns them unchanged); on exit the
        analyzer's statistics become the encoding (unless the quantizer is frozen)."""
        self.encoding_analyzer.reset()
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False
        if not self.frozen:
            self.set_encoding(self.encoding_analyzer.compute_encodings(self.bitwidth, self.symmetric))

    def freeze(self) -> None:
        """Keep the current encoding: no range learning, no recalibration."""
        self.frozen = True
        for p in self._encoding_params():
            p.requires_grad_(False)

    def unfreeze(self) -> None:
        self.frozen = False
        for p in self._encoding_params():
            p.requires_grad_(True)
        if self.param_mode == "scale_offset" and self.symmetric:
            self.offset.requires_grad_(False)

    def _encoding_params(self) -> list[nn.Parameter]:
        return [self.min, self.max] if self.param_mode == "minmax" else [self.scale, self.offset]

    def _ready(self, x: torch.Tensor) -> bool:
        if self._calibrating:
            self.encoding_analyzer.update_stats(x)
            return False
        if not self.enabled:
            return False
        if not self._has_encoding:
            raise QuantizerError(f"{self._label()} has no encoding yet: calibrate it (with q.compute_encodings(): "
                                 f"q(data)) or set one (q.set_encoding(...))")
        return True

    def extra_repr(self) -> str:
        parts = [f"shape={self.shape}", f"bitwidth={self.bitwidth}", f"symmetric={self.symmetric}",
                 f"analyzer={type(self.encoding_analyzer).__name__}"]
        if self.block_size is not None:
            parts.append(f"block_size={self.block_size}")
        if self.name:
            parts.insert(0, f"name={self.name!r}")
        enc = self.get_encoding()
        parts.append(repr(enc) if enc is not None else "uncalibrated")
        if not self.enabled:
            parts.append("disabled")
        if self.frozen:
            parts.append("frozen")
        return ", ".join(parts)


def _activate(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # the ops a ReLU / ReLU6 / Hardtanh run, so exports and gradients are theirs
    return torch.relu(x) if lo == 0.0 and hi == float("inf") else torch.nn.functional.hardtanh(x, lo, hi)


def _act_bounds(act: Optional[tuple[float, float]]) -> tuple[Optional[float], Optional[float]]:
    # the op's act_min/act_max: None for an unbounded side
    if act is None:
        return None, None
    lo, hi = act
    return (None if lo == float("-inf") else float(lo)), (None if hi == float("inf") else float(hi))


Pool = tuple[list[int], list[int], list[int], list[int], bool]  # max_pool2d: kernel, stride, padding, dilation, ceil


def _max_pool(x: torch.Tensor, pool: Pool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, *pool)


class _Spec(NamedTuple):
    """A quantizer's constants, passed to _QuantizeNode as one argument."""
    minmax: bool
    symmetric: bool
    qmin: int
    qmax: int
    grad_scale: float
    check: bool
    act: tuple[Optional[float], Optional[float]]
    pool: Optional[Pool]
    train: bool  # autograd on at the call: the chain factors are worth forming


def _minmax_to_scale_offset(mn: torch.Tensor, mx: torch.Tensor, spec: _Spec, factors: bool = True):
    """(scale, offset, chain factors) of a min/max encoding, as _QuantizerBase's _scale_offset computes
    them. The factors carry the chain rule back to min and max (_encoding_grads):
    s = clamp((max - min) / n, min_scale) and o = clamp(round_ste(min / s) - qmin, -qmax, -qmin), so
    dmax = (ds - do' * (min / s) / s) * [s unclamped] / n and dmin = do' / s - dmax with do' = do *
    [o unclamped]; the factors are [s unclamped] / n, [o unclamped] / s and [o unclamped] * (min / s) / s."""
    ns = spec.qmax - spec.qmin
    raw_s = (mx - mn) / ns
    s = torch.clamp(raw_s, min=min_scale(ns))
    k_s = (raw_s == s) / ns if factors else None  # clamp passes where it is inactive: raw_s == its clamp
    if spec.symmetric:
        return s, torch.zeros_like(s), (k_s, None, None)
    t = mn / s
    raw_o = torch.round(t) - spec.qmin
    o = torch.clamp(raw_o, -spec.qmax, -spec.qmin)
    if not factors:
        return s, o, (None, None, None)
    k_o = (raw_o == o) / s
    return s, o, (k_s, k_o, k_o * t)


def _encoding(a: torch.Tensor, b: torch.Tensor, spec: _Spec, factors: bool = True):
    """(scale, offset, chain factors) of the parameters; called inside autograd Functions' forward, where
    autograd is off. Without `factors` (fixed ranges) the chain factors are not formed."""
    if spec.minmax:
        return _minmax_to_scale_offset(a, b, spec, factors)
    return a, b, (None, None, None)


class _QuantizeNode(torch.autograd.Function):
    """A quantizer's whole training path as one autograd node: encoding parameters (min/max or
    scale/offset) -> scale/offset -> [activation +] fake quantization [-> 2-d max pool]. Recorded op by
    op, a min/max quantizer is a dozen small autograd nodes whose bookkeeping costs as much as the kernel
    on a small layer; here the chain rule back to the parameters is written out (straight-through on the
    offset's rounding, clamps passing where they are inactive, as autograd's own rules do).

    With a pool, the node keeps for the backward only the input value each pooled maximum came from and
    its position: a pooled-size tensor instead of the full-size input, output and int64 indices of the
    separate ops, with the same values and gradients (only the summation order of the range gradients
    differs). Non-overlapping windows on the CPU take one native pass (pyquant::
    quantize_dequantize_max_pool2d)."""

    @staticmethod
    def forward(ctx, x, a, b, spec: _Spec):
        s, o, factors = _encoding(a, b, spec, spec.train and any(ctx.needs_input_grad[1:3]))
        sb, ob = _broadcast_to(s, x), _broadcast_to(o, x)
        idx = None
        pooled = False  # whether xin holds only each pooled maximum's input value
        if spec.pool is None:
            xin = x
            out = raw.quantize_dequantize(x, sb, ob, spec.qmin, spec.qmax, spec.grad_scale, spec.check,
                                                    *spec.act)
        elif _by_window(x, spec.pool) and _channelwise(sb):  # one pass, a byte per output for the argmax
            out, idx, xin = raw.quantize_dequantize_max_pool2d(x, sb, ob, spec.qmin, spec.qmax,
                                                                         spec.pool[0], spec.check, *spec.act)
            pooled = True
        else:
            q = raw.quantize_dequantize(x, sb, ob, spec.qmin, spec.qmax, spec.grad_scale, spec.check,
                                                  *spec.act)
            out, idx = _max_pool(q, spec.pool)
            # a scale that varies along H or W is indexed by the input's coordinates: keep the whole input
            pooled = _channelwise(sb)
            xin = x.flatten(-2).gather(-1, idx.flatten(-2)).reshape(out.shape) if pooled else x
        ctx.save_for_backward(xin, idx, s, o, *factors)
        ctx.spec, ctx.x_shape, ctx.pooled = spec, x.shape, pooled
        return out

    @staticmethod
    def backward(ctx, g):
        xin, idx, s, o, *factors = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_a, need_b = (bool(v) for v in ctx.needs_input_grad[:3])
        need_s = need_a or need_b
        need_o = need_s and not spec.symmetric if spec.minmax else need_b
        if spec.pool is not None and not ctx.pooled:  # the pool's backward first, at the input's size
            g = _unpool(g, idx, ctx.x_shape)
        dx, ds, do = raw.quantize_dequantize_backward(g, xin, _broadcast_to(s, xin), _broadcast_to(o, xin),
                                                                spec.qmin, spec.qmax, spec.grad_scale,
                                                                [need_x, need_s, need_o], *spec.act)
        if need_x and ctx.pooled:
            if idx.dtype == torch.uint8:
                dx = raw.max_pool2d_window_backward(dx.contiguous(), idx, spec.pool[0], list(ctx.x_shape))
            else:
                dx = _unpool(dx, idx, ctx.x_shape)
        da, db = _encoding_grads(spec, s, factors, ds, do, need_a, need_b)
        return (dx if need_x else None, da, db, None)


def _channelwise(sb: torch.Tensor) -> bool:
    """One scale, or one per channel (dim -3): the layouts the pooled quantizer kernel takes."""
    return sb.numel() == 1 or [d for d, k in enumerate(sb.shape) if k != 1] == [sb.dim() - 3]


def _encoding_grads(spec: _Spec, s: torch.Tensor, factors, ds: torch.Tensor, do: torch.Tensor, need_a: bool,
                    need_b: bool):
    """Gradients of the encoding parameters (min, max) or (scale, offset) from those of scale and offset."""
    if not (need_a or need_b):
        return None, None
    if not spec.minmax:
        return (ds.reshape(s.shape) if need_a else None), (do.reshape(s.shape) if need_b else None)
    k_s, k_o, k_ot = factors
    ds = ds.reshape(s.shape)
    if k_o is None:  # symmetric: the offset is 0
        dmax = ds * k_s
        return (-dmax if need_a else None), (dmax if need_b else None)
    do = do.reshape(s.shape)
    dmax = torch.addcmul(ds, do, k_ot, value=-1.0).mul_(k_s)
    return (torch.addcmul(-dmax, do, k_o) if need_a else None), (dmax if need_b else None)


def _by_window(x: torch.Tensor, pool: Pool) -> bool:
    """Whether a max pool is one of non-overlapping windows that cover x (pyquant's window pooling)."""
    kernel, stride, padding, dilation, ceil = pool
    return (x.dim() in (3, 4) and list(stride) == list(kernel) and not any(padding) and all(d == 1 for d in dilation)
            and (not ceil or (x.shape[-2] % kernel[0] == 0 and x.shape[-1] % kernel[1] == 0))
            and kernel[0] * kernel[1] <= 255)


def _unpool(g: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The max pool's backward from its indices alone (flat positions in each H x W plane); overlapping
    windows that pick one element add up, as in aten's."""
    planes = math.prod(shape[:-2])
    out = g.new_zeros((planes, shape[-2] * shape[-1]))
    out.scatter_add_(1, idx.reshape(planes, -1), g.reshape(planes, -1))
    return out.reshape(shape)


class QuantizeDequantize(_QuantizerBase):
    """Fake quantization ``x -> (clamp(round(x/s) - o, qmin, qmax) + o) * s`` with a learnable range.

    Args:
        shape: encoding shape, right-aligned against the input (``()`` per tensor, ``(C, 1)`` per output
            channel of a weight, ``(1, C, 1, 1)`` per channel of an NCHW activation, ``(C, K // B)`` with
            ``block_size=(1, B)`` per block).
        bitwidth: 2..16. symmetric: signed grid with offset 0, else unsigned grid with an offset.
        encoding_analyzer: statistics → encoding (default ``MinMax(shape)``).
        param_mode: ``"minmax"`` (parameters ``min``/``max``, AIMET's) or ``"scale_offset"`` (parameters
            ``scale``/``offset``; their gradients come straight from the fused kernel).
        lsq_grad_scale: scale the range gradients by ``1/sqrt(n * qmax)`` (LSQ).
    """

    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, block_size: Optional[Sequence[int]] = None,
                 *, param_mode: str = "minmax", lsq_grad_scale: bool = False, name: Optional[str] = None):
        super().__init__(shape, bitwidth, symmetric, encoding_analyzer, block_size, param_mode=param_mode, name=name)
        self.lsq_grad_scale = lsq_grad_scale

    def forward(self, x: torch.Tensor, activation: Optional[tuple[float, float]] = None,
                pool: Optional[Pool] = None) -> torch.Tensor:
        """`activation=(lo, hi)`: quantize the ReLU (0, inf) / ReLU6 / Hardtanh (lo, hi) of x; `pool`: then
        2-d max-pool the result (aten.max_pool2d_with_indices' arguments). The activation runs inside the
        fake-quant kernel and the pool keeps no full-size tensor, so a training step holds one tensor for the
        three ops (QuantSim's `fuse_activations`); the values are those of the separate ops."""
        if not self.enabled or self._calibrating or self._export:  # observe / pass / export the plain ops
            if activation is not None:
                x = _activate(x, *activation)
            out = self._export_forward(x) if self._ready(x) else x  # ready here: enabled and exporting
            return torch.nn.functional.max_pool2d(out, *pool) if pool is not None else out
        self._ready(x)  # raises without an encoding
        return self._quantize_node(x, activation, pool)

    def _spec(self, x: torch.Tensor, activation: Optional[tuple[float, float]] = None,
              pool: Optional[Pool] = None) -> _Spec:
        gs = 1.0
        if self.lsq_grad_scale:
            gs = float(1.0 / (max(x.numel() // max(math.prod(self.shape), 1), 1) * self.qmax) ** 0.5)
        minmax = self.param_mode == "minmax"
        # min/max-derived scales are clamped positive: no need to read them back (a GPU sync)
        return _Spec(minmax, self.symmetric, self.qmin, self.qmax, gs, not minmax, _act_bounds(activation), pool,
                     torch.is_grad_enabled())

    def _quantize_node(self, x: torch.Tensor, activation: Optional[tuple[float, float]] = None,
                       pool: Optional[Pool] = None) -> torch.Tensor:
        a, b = self._encoding_params()
        return _QuantizeNode.apply(x, a, b, self._spec(x, activation, pool))

    def export_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as constant tensors for ONNX export (zero point = -offset, int32)."""
        if self.bitwidth != 8:
            raise NotImplementedError(f"{self._label()}: ONNX QuantizeLinear/DequantizeLinear export supports 8-bit "
                                      f"encodings; this one is {self.bitwidth}-bit")
        enc = self.get_encoding()
        if enc is None:
            raise QuantizerError(f"{self._label()} has no encoding to export")
        return enc.scale.detach().clone(), (-enc.offset).round().to(torch.int32)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function through torch.fake_quantize_per_{tensor,channel}_affine, which the ONNX
        exporter writes as QuantizeLinear + DequantizeLinear. Scale and zero point are constants
        computed outside the traced region (see pyquant.sim.export.export_mode)."""
        s, zp = self._export_consts
        nontrivial = [d for d, k in enumerate(_broadcast_to(s, x).shape) if k > 1]
        if not nontrivial:
            return torch.fake_quantize_per_tensor_affine(x, float(s.flatten()[0]), int(zp.flatten()[0]),
                                                         self.qmin, self.qmax)
        if len(nontrivial) > 1:
            raise NotImplementedError(f"{self._label()}: per-block encodings have no opset-13 QDQ form")
        return torch.fake_quantize_per_channel_affine(x, s.flatten().contiguous(), zp.flatten().contiguous(),
                                                      nontrivial[0], self.qmin, self.qmax)


class Quantize(_QuantizerBase):
    """Integer codes ``clamp(round(x/s) - o, qmin, qmax)`` as float32 or `out_dtype` (int8, uint8, ...)."""

    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, block_size: Optional[Sequence[int]] = None,
                 *, out_dtype: torch.dtype = torch.float32, name: Optional[str] = None):
        super().__init__(shape, bitwidth, symmetric, encoding_analyzer, block_size, name=name)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready(x):
            return x
        with torch.no_grad():
            s, o = self._scale_offset()
        return raw.quantize(x, _broadcast_to(s, x), _broadcast_to(o, x), self.qmin, self.qmax,
                                      self.out_dtype)


class Dequantize(nn.Module):
    """``(q + o) * s`` with a fixed encoding (e.g. a Quantize's ``get_encoding()``)."""

    def __init__(self, encoding: Encoding, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.encoding = encoding
        self.out_dtype = out_dtype

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.encoding.dequantize(q, self.out_dtype)

    def extra_repr(self) -> str:
        return repr(self.encoding)
