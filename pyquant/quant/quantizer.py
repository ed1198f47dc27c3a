"""Quantizer modules: QuantizeDequantize (fake quantization, for simulation and QAT), Quantize
(integer codes) and Dequantize. Built on pyquant.ops; statistics and encodings come from an analyzer
(pyquant.quant.analyzers), the encoding's trainable parametrization from pyquant.quant.range_params.

The public surface the other layers use: `set_encoding` / `get_encoding` / `has_encoding` /
`reset_encoding`, `compute_encodings()` (calibration), `encoding_parameters()`, `set_range_learning`,
`freeze` / `unfreeze`, `rescale_encoding`, `exporting()` and `state_flags` / `load_state_flags`."""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .. import ops
from .._deprecation import _UNSET, renamed
from ..ops import raw
from .analyzers import EncodingAnalyzer, MinMax
from .encoding import Encoding, OnGrid, _broadcast_to, check_grid_kind, from_scale_offset, min_scale
from .fake_quant_node import Pool, QuantizeNode, Spec, act_bounds, activate
from .range_params import RANGE_PARAMS, RangeParams

__all__ = ["QuantizerBase", "QuantizeDequantize", "Quantize", "Dequantize", "QuantizerError"]


class QuantizerError(RuntimeError):
    """A quantizer used in a state that cannot work (no encoding yet, frozen, ...)."""


def _kind(g) -> str:
    """'asym', 'sym', 'strict sym' or 'unsigned sym' of an encoding or quantizer."""
    if not g.symmetric:
        return "asym"
    return "strict sym" if g.strict else ("sym" if g.signed else "unsigned sym")


class QuantizerBase(OnGrid, nn.Module):
    """What every quantizer has: an encoding shape, bit width and symmetry (and, for a symmetric one, its
    grid: `strict` drops the signed grid's most negative code; `unsigned` puts it on the unsigned grid;
    `unsigned_symmetric` chooses `unsigned` at calibration when the data is non-negative), an encoding
    analyzer for calibration, the encoding's parameters (`range_params`: "minmax" or "scale_offset"), and
    the flags `enabled` (off: the input passes unchanged) and `frozen` (the encoding stays as it is: no
    range learning, no recalibration)."""

    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, block_size: Optional[Sequence[int]] = None,
                 *, range_params: Optional[str] = None, name: Optional[str] = None, param_mode: Any = _UNSET,
                 strict: bool = False, unsigned_symmetric: bool = False):
        super().__init__()
        range_params = renamed("param_mode", "range_params", param_mode,
                               _UNSET if range_params is None else range_params, "minmax",
                               where=type(self).__name__, stacklevel=4)
        ops.grid(bitwidth, symmetric)  # validates bitwidth
        if range_params not in RANGE_PARAMS:
            raise ValueError(f"range_params must be one of {sorted(RANGE_PARAMS)}, got {range_params!r}")
        self.shape = tuple(int(v) for v in shape)
        self.bitwidth = int(bitwidth)
        self.symmetric = bool(symmetric)
        check_grid_kind(self.symmetric, None, strict)
        self._strict = bool(strict)
        self.unsigned = False
        self.unsigned_symmetric = bool(unsigned_symmetric) and self.symmetric
        self.block_size = tuple(block_size) if block_size is not None else None
        self.range_params = range_params
        self._range: RangeParams = RANGE_PARAMS[range_params]
        self.name = name
        self.encoding_analyzer = encoding_analyzer if encoding_analyzer is not None else MinMax(self.shape)
        if tuple(self.encoding_analyzer.shape) != self.shape:
            raise ValueError(f"the analyzer's shape {self.encoding_analyzer.shape} differs from the quantizer's "
                             f"{self.shape}")
        if name and self.encoding_analyzer.name is None:
            self.encoding_analyzer.name = name
        self._range.create(self, self.shape, self.symmetric)
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        # A host-side copy of `initialized`: reading the buffer would synchronize a GPU and break
        # torch.compile graphs on every forward. Kept in step by set_encoding/reset and state-dict loads.
        self._has_encoding = False
        self.enabled = True
        self.frozen = False
        self._calibrating = False
        self._export_consts: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # set while exporting

    @property
    def param_mode(self) -> str:
        """Deprecated name of `range_params`."""
        import warnings
        warnings.warn("QuantizerBase.param_mode is deprecated; use range_params", DeprecationWarning, stacklevel=2)
        return self.range_params

    @property
    def signed(self) -> bool:
        """Whether the grid is signed: symmetric, and not put on the unsigned grid."""
        return self.symmetric and not self.unsigned

    @property
    def strict(self) -> bool:
        """Whether the grid is the strict signed one (a strict quantizer on the unsigned grid is not)."""
        return self._strict and self.signed

    @strict.setter
    def strict(self, value: bool) -> None:
        self._strict = bool(value)

    def adopt_grid(self, enc: Encoding) -> None:
        """Takes `enc`'s bit width, symmetry and grid (before set_encoding of a loaded encoding)."""
        self.bitwidth, self.symmetric = enc.bitwidth, enc.symmetric
        self.strict, self.unsigned = enc.strict, enc.symmetric and not enc.signed

    def _label(self) -> str:
        return f"quantizer '{self.name}'" if self.name else type(self).__name__

    # ---- encodings ----
    @property
    def has_encoding(self) -> bool:
        """Whether the quantizer has an encoding (calibrated, set or loaded)."""
        return self._has_encoding

    def set_encoding(self, enc: Encoding) -> None:
        if (enc.bitwidth, enc.symmetric, enc.signed, enc.strict) != (self.bitwidth, self.symmetric, self.signed,
                                                                     self.strict):
            raise ValueError(f"{self._label()}: encoding is {enc.bitwidth}-bit {_kind(enc)}, quantizer is "
                             f"{self.bitwidth}-bit {_kind(self)}")
        with torch.no_grad():
            self._range.store(self, enc, self.shape)
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

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) from the encoding parameters, differentiable in them under autograd."""
        return self._range.scale_offset(self, self.qmin, self.qmax, self.symmetric)

    def get_encoding(self) -> Optional[Encoding]:
        if not self._has_encoding:
            return None
        with torch.no_grad():
            s, o = self.scale_offset()
            return from_scale_offset(s.detach().clone(), o.detach().clone(), self.bitwidth, self.symmetric,
                                     self.block_size, signed=self.signed, strict=self.strict)

    def rescale_encoding(self, k: torch.Tensor, axis: int) -> bool:
        """Multiplies a per-channel encoding along `axis` by the factors `k` (one per channel), as folding
        a batch norm into the weight does. Returns False, changing nothing, when that cannot be exact: a
        per-tensor encoding, a symmetric one with a factor <= 0, scale/offset parameters and a negative
        factor -- then recalibrate instead."""
        per_channel = len(self.shape) > axis and self.shape[axis] == k.numel() and k.numel() > 1
        if not per_channel or (self.symmetric and not bool((k > 0).all())):
            return False
        shape = [1] * len(self.shape)
        shape[axis] = -1
        with torch.no_grad():
            return self._range.rescale(self, k.reshape(shape).to(self.initialized.device))

    @contextlib.contextmanager
    def compute_encodings(self, *, disable_if_unused: bool = False) -> Iterator[None]:
        """Inside the block the quantizer only observes its inputs (returns them unchanged); on exit the
        analyzer's statistics become the encoding (unless the quantizer is frozen). A quantizer that saw
        no data raises CalibrationError then, or with `disable_if_unused` is disabled instead."""
        self.encoding_analyzer.reset()
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False
        if disable_if_unused and self.encoding_analyzer.num_batches == 0:
            self.enabled = False
            return
        if not self.frozen:
            if self.unsigned_symmetric:  # one-sided data: the whole unsigned grid
                self.unsigned = bool((self.encoding_analyzer.observed_min() >= 0).all())
            self.set_encoding(self.encoding_analyzer.compute_encodings(self.bitwidth, self.symmetric,
                                                                       signed=self.signed, strict=self.strict))

    # ---- training ----
    def encoding_parameters(self) -> list[nn.Parameter]:
        """The encoding's parameters: [min, max] or [scale, offset] (see range_params)."""
        return self._range.parameters(self)

    def set_range_learning(self, enabled: bool = True, *, lsq_grad_scale: Optional[bool] = None) -> None:
        """Range learning on (the encoding's parameters train; only a calibrated, enabled, unfrozen
        quantizer learns) or off (fixed: gradients still pass the rounding straight through).
        `lsq_grad_scale` (QuantizeDequantize) sets the LSQ gradient scale when given."""
        if lsq_grad_scale is not None and hasattr(self, "lsq_grad_scale"):
            self.lsq_grad_scale = bool(lsq_grad_scale)
        self._trainable(bool(enabled) and not self.frozen and self.enabled and self._has_encoding)

    def _trainable(self, learn: bool) -> None:
        train = {id(p) for p in self._range.trainable(self, self.symmetric)} if learn else set()
        for p in self.encoding_parameters():
            p.requires_grad_(id(p) in train)

    def freeze(self) -> None:
        """Keep the current encoding: no range learning, no recalibration."""
        self.frozen = True
        self._trainable(False)

    def unfreeze(self) -> None:
        self.frozen = False
        self._trainable(True)

    # ---- export ----
    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """Inside the block an enabled quantizer runs as one call of pyquant's own fake-quant op
        (``torch.ops.pyquant.quantize_dequantize``) with constant scale and offset: the simulation's
        function, bit for bit, at every bit width and granularity, recorded by a tracer as one node that
        an ONNX exporter can write as QuantizeLinear + DequantizeLinear (pyquant.sim.export does)."""
        if not self.enabled:
            yield
            return
        self._export_consts = self.export_constants()  # computed here, so the trace sees constants only
        try:
            yield
        finally:
            self._export_consts = None

    def export_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{self._label()}: {type(self).__name__} has no QDQ export")

    # ---- flags (checkpoints) ----
    def state_flags(self) -> dict[str, Any]:
        """The settings a state dict does not hold: enabled, frozen, bit width, symmetry, LSQ scale and
        which encoding parameters train."""
        return dict(enabled=self.enabled, frozen=self.frozen, bitwidth=self.bitwidth, symmetric=self.symmetric,
                    strict=self.strict, unsigned=self.unsigned, lsq=getattr(self, "lsq_grad_scale", False),
                    learn=[p.requires_grad for p in self.encoding_parameters()])

    def load_state_flags(self, flags: dict[str, Any]) -> None:
        self.enabled, self.frozen = bool(flags["enabled"]), bool(flags["frozen"])
        self.bitwidth, self.symmetric = int(flags["bitwidth"]), bool(flags["symmetric"])
        self.strict, self.unsigned = bool(flags.get("strict", False)), bool(flags.get("unsigned", False))
        if hasattr(self, "lsq_grad_scale"):
            self.lsq_grad_scale = bool(flags["lsq"])
        for p, r in zip(self.encoding_parameters(), flags["learn"]):
            p.requires_grad_(bool(r))

    # ---- calling ----
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
        parts = [f"shape={self.shape}", f"bitwidth={self.bitwidth}", f"symmetric={self.symmetric}"]
        parts += ["strict"] if self.strict else (["unsigned"] if self.unsigned else [])
        parts += [f"analyzer={type(self.encoding_analyzer).__name__}"]
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


@functools.lru_cache(maxsize=None, typed=True)
def _grid(bitwidth: int, signed: bool, strict: bool) -> tuple[int, int, float]:
    """(qmin, qmax, smallest scale) of a grid, validated once per grid: a quantizer looks it up per call."""
    qmin, qmax = ops.grid(bitwidth, signed, strict=strict)
    return qmin, qmax, min_scale(qmax - qmin)


class QuantizeDequantize(QuantizerBase):
    """Fake quantization ``x -> (clamp(round(x/s) - o, qmin, qmax) + o) * s`` with a learnable range.

    Args:
        shape: encoding shape, right-aligned against the input (``()`` per tensor, ``(C, 1)`` per output
            channel of a weight, ``(1, C, 1, 1)`` per channel of an NCHW activation, ``(C, K // B)`` with
            ``block_size=(1, B)`` per block).
        bitwidth: 2..16. symmetric: signed grid with offset 0, else unsigned grid with an offset.
        encoding_analyzer: statistics → encoding (default ``MinMax(shape)``).
        range_params: the encoding's trainable parameters: ``"minmax"`` (default; ``min``/``max``, AIMET's) or
            ``"scale_offset"`` (``scale``/``offset``; their gradients come straight from the fused kernel).
            ``param_mode`` is its deprecated name.
        lsq_grad_scale: scale the range gradients by ``1/sqrt(n * qmax)`` (LSQ).
        strict: a symmetric quantizer on the strict signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``.
        unsigned_symmetric: a symmetric quantizer whose calibration data is non-negative (after a ReLU)
            takes the unsigned grid ``[0, 2^b-1]``, offset still 0.
    """

    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, block_size: Optional[Sequence[int]] = None,
                 *, range_params: Optional[str] = None, lsq_grad_scale: bool = False, name: Optional[str] = None,
                 param_mode: Any = _UNSET, strict: bool = False, unsigned_symmetric: bool = False):
        super().__init__(shape, bitwidth, symmetric, encoding_analyzer, block_size, range_params=range_params,
                         name=name, param_mode=param_mode, strict=strict, unsigned_symmetric=unsigned_symmetric)
        self.lsq_grad_scale = lsq_grad_scale

    def forward(self, x: torch.Tensor, activation: Optional[tuple[float, float]] = None,
                pool: Optional[Pool] = None) -> torch.Tensor:
        """`activation=(lo, hi)`: quantize the ReLU (0, inf) / ReLU6 / Hardtanh (lo, hi) of x; `pool`: then
        2-d max-pool the result (aten.max_pool2d_with_indices' arguments). The activation runs inside the
        fake-quant kernel and the pool keeps no full-size tensor, so a training step holds one tensor for the
        three ops (QuantSim's `fuse_activations`); the values are those of the separate ops."""
        if not self.enabled or self._calibrating or self._export_consts is not None:  # observe / pass / export
            if activation is not None:
                x = activate(x, *activation)
            out = self._export_forward(x) if self._ready(x) else x  # ready here: enabled and exporting
            return torch.nn.functional.max_pool2d(out, *pool) if pool is not None else out
        self._ready(x)  # raises without an encoding
        return self._quantize_node(x, activation, pool)

    def _spec(self, x: torch.Tensor, activation: Optional[tuple[float, float]] = None,
              pool: Optional[Pool] = None) -> Spec:
        qmin, qmax, _ = _grid(self.bitwidth, self.signed, self.strict)
        derived = self._range.derived
        # min/max-derived scales are clamped positive: nothing to check. Scale parameters are checked by the
        # kernel on the CPU (a native loop) and by a device-side assertion elsewhere: never read on the host.
        host = x.is_cpu
        return Spec(derived, self.symmetric, qmin, qmax, self._grad_scale(x, qmax), not derived and host,
                    act_bounds(activation), pool, torch.is_grad_enabled(), not derived and not host)

    def _grad_scale(self, x: torch.Tensor, qmax: int) -> float:
        if not self.lsq_grad_scale:
            return 1.0
        return float(1.0 / (max(x.numel() // max(math.prod(self.shape), 1), 1) * qmax) ** 0.5)

    def _quantize_node(self, x: torch.Tensor, activation: Optional[tuple[float, float]] = None,
                       pool: Optional[Pool] = None) -> torch.Tensor:
        a, b = self.encoding_parameters()
        if pool is None and self._range.derived:  # min/max: one C++ autograd node, where there is one for x
            node = ops.eager_native("minmax_qdq", x)
            if node is not None:
                qmin, qmax, smin = _grid(self.bitwidth, self.signed, self.strict)
                lo, hi = act_bounds(activation)
                y = node(x, a, b, qmin, qmax, smin, self.symmetric, self._grad_scale(x, qmax), lo, hi)
                if y is not None:
                    return y
        return QuantizeNode.apply(x, a, b, self._spec(x, activation, pool))

    def export_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of the encoding as constant tensors in the encoding's shape: zero point =
        -offset as int32, on the quantizer's grid [qmin, qmax]. Which file formats can hold them (bit
        width, granularity) is the exporter's to say."""
        enc = self.get_encoding()
        if enc is None:
            raise QuantizerError(f"{self._label()} has no encoding to export")
        return enc.scale.detach().clone(), (-enc.offset).round().to(torch.int32)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as one call of the registered op with the constant scale and offset in
        block-broadcast form (computed outside the traced region, see `exporting`): a trace shows one
        node per quantizer, whose constant inputs say everything about the encoding."""
        s, zp = self._export_consts
        scale = _broadcast_to(s, x).to(device=x.device, dtype=torch.float32)
        offset = _broadcast_to((-zp).to(torch.float32), x).to(x.device)  # integer negation: no -0.0
        return raw.quantize_dequantize(x, scale, offset, self.qmin, self.qmax)


class Quantize(QuantizerBase):
    """Integer codes ``clamp(round(x/s) - o, qmin, qmax)`` as float32 or `out_dtype` (int8, uint8, ...)."""

    def __init__(self, shape: Sequence[int] = (), bitwidth: int = 8, symmetric: bool = False,
                 encoding_analyzer: Optional[EncodingAnalyzer] = None, block_size: Optional[Sequence[int]] = None,
                 *, out_dtype: torch.dtype = torch.float32, name: Optional[str] = None, strict: bool = False,
                 unsigned_symmetric: bool = False):
        super().__init__(shape, bitwidth, symmetric, encoding_analyzer, block_size, name=name, strict=strict,
                         unsigned_symmetric=unsigned_symmetric)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready(x):
            return x
        with torch.no_grad():
            s, o = self.scale_offset()
        return raw.quantize(x, _broadcast_to(s, x), _broadcast_to(o, x), self.qmin, self.qmax, self.out_dtype)


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
