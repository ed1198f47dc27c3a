"""pyquant: model quantization for PyTorch with fused C++/CUDA kernels."""
from __future__ import annotations

from . import analysis, ops, quant
from ._dirlock import DirectoryInUseError
from ._native import native_info
from ._safe_load import UnsafeFileError
from ._version import __version__
from ._warnings import NothingToDoWarning, PyquantWarning, UnquantizedOpWarning
from .sim.quantsim import QuantSim
from .sim.state_io import CheckpointError
from .autoquant import AutoQuant, AutoQuantResult
from .sim.encodings import load_encodings, write_encodings
from .techniques import (adaround, correct_bias, correct_bias_analytical, equalize, fold_batchnorms,
                         fold_batchnorms_to_scale, gptq, mixed_precision, reestimate_batchnorm, search_activation_ranges, seq_mse,
                         smooth_activations)

__all__ = ["analysis", "ops", "quant", "native_info", "QuantSim", "CheckpointError", "AutoQuant", "AutoQuantResult", "load_encodings",
           "write_encodings", "fold_batchnorms", "fold_batchnorms_to_scale", "equalize", "adaround", "correct_bias",
           "correct_bias_analytical", "reestimate_batchnorm", "seq_mse", "gptq", "smooth_activations",
           "search_activation_ranges", "mixed_precision",
           "NothingToDoWarning", "PyquantWarning", "UnsafeFileError", "DirectoryInUseError",
           "UnquantizedOpWarning", "__version__"]
