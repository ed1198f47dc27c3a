"""Biases as integer targets add them: on the int32 grid at scale s_x * s_w (the layer input's scale times
the weight's, per output channel where the weight is), as onnxruntime's QDQ kernels (QLinearConv, QGemm)
and other integer runtimes derive them. A parametrization of the layer's `bias`: every access returns the
bias fake-quantized that way, so the layer runs unchanged and the bias stays a trainable float parameter."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

from .. import ops
from .._layers import is_transposed
from ..ops import quantize_dequantize_int32
from ..quant import QuantizeDequantize, min_scale
from .weights import FoldedWeightQuantizer

__all__ = ["Int32Bias"]


class Int32Bias(nn.Module):
    """Parametrization of `layer.bias`: ``clamp(round(b / s), -2^31, 2^31 - 1) * s`` with ``s = s_x * s_w``
    from the input quantizer's and the weight quantizer's current encodings (the scale takes no gradient).

    The bias passes unchanged where a target keeps it in float: either quantizer disabled or without an
    encoding, an input encoding that is not per tensor, a weight encoding per block or, for a transposed
    convolution, per channel (onnxruntime wants the weight's scales along dim 0), a weight quantized with its
    batch norm folded in on every step (QAT), a bias the int32 grid cannot hold (some element beyond
    2^31 - 1 steps: 16-bit weights and activations), and while `active` is False (QuantSim turns it off
    during calibration). The quantizers are referenced, not owned: they are the simulation's modules."""

    def __init__(self, layer: nn.Module, input_quantizer: QuantizeDequantize):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not submodules: the model owns them (no duplicate state)
        object.__setattr__(self, "input_quantizer", input_quantizer)
        self.active = True
        self._export_value: Optional[torch.Tensor] = None
        self._export_float = False

    def weight_quantizer(self) -> Optional[QuantizeDequantize]:
        params = getattr(self.layer, "parametrizations", None)
        if params is None or "weight" not in params:
            return None
        wq = params.weight[0]
        return None if isinstance(wq, FoldedWeightQuantizer) else wq.q

    def scale(self) -> Optional[torch.Tensor]:
        """s_x * s_w as the bias's shape or one value (float32, no gradient), or None where the target keeps
        the bias in float."""
        qx, qw = self.input_quantizer, self.weight_quantizer()
        if (not self.active or qw is None or not (qx.enabled and qw.enabled) or not (qx.has_encoding and
                                                                                      qw.has_encoding)):
            return None
        if math.prod(qx.shape) != 1 or qw.block_size is not None:
            return None
        n = math.prod(qw.shape)
        if n != 1:
            w = self.layer.parametrizations.weight.original  # not layer.weight: that quantizes the weight again
            if is_transposed(self.layer) or n != w.shape[0]:
                return None
        native = self._native_scale(qx, qw)
        if native is not None:
            return native
        with torch.no_grad():
            sx, _ = qx.scale_offset()
            sw, _ = qw.scale_offset()
        return (sx.reshape(()) * sw.reshape(-1)).detach()

    @staticmethod
    def _native_scale(qx: QuantizeDequantize, qw: QuantizeDequantize) -> Optional[torch.Tensor]:
        """The same product in one native call (every biased layer's every call pays it) for min/max ranges
        in contiguous float32 CPU tensors; None elsewhere."""
        if not (qx.range_params == qw.range_params == "minmax"):
            return None
        (xa, xb), (wa, wb) = qx.encoding_parameters(), qw.encoding_parameters()
        fn = ops.eager_native("minmax_scale_product", wa)
        if fn is None or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                                 for t in (xa, xb, wa, wb)):
            return None
        return fn(xa, xb, qx.qmin, qx.qmax, min_scale(qx.qmax - qx.qmin), wa, wb, qw.qmin, qw.qmax,
                  min_scale(qw.qmax - qw.qmin))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if self._export_value is not None:
            return self._export_value
        if self._export_float:
            return b
        s = self.scale()
        if s is None:
            return b
        # a bias the int32 grid cannot hold (16-bit weights and activations: s_x * s_w ~ 1e-9) stays in float
        return quantize_dequantize_int32(b, s.to(b.device), overflow="float", check_values=False)

    @contextlib.contextmanager
    def exporting(self, quantized: bool) -> Iterator[None]:
        """Inside the block a trace records no ops for the bias: with `quantized` (the QDQ form) it is a
        constant, the value the simulation adds, from which a target that derives the int32 bias gets the
        same codes again; otherwise (the plain form, whose target quantizes the bias itself) it is the float
        parameter."""
        if quantized and self.scale() is not None:
            with torch.no_grad():
                self._export_value = self.forward(self.layer.parametrizations.bias.original).detach().clone()
        else:
            self._export_float = True
        try:
            yield
        finally:
            self._export_value, self._export_float = None, False
