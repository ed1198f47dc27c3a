"""pyquant: model quantization for PyTorch with fused C++/CUDA kernels."""
from __future__ import annotations

from . import ops, quant
from ._native import native_info

__version__ = "0.1.0"
__all__ = ["ops", "quant", "native_info", "__version__"]
