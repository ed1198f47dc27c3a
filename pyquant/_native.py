"""Loads the compiled modules and says, once, what is missing and why.

``pyquant._C`` holds the CPU kernels and is always built; ``pyquant._C_cuda`` holds the CUDA kernels
and exists when the package was built with nvcc (``PYQUANT_CUDA=AUTO`` finding it, or ``ON``).
Without a module the ops fall back to the pure-torch reference, which is correct but slower.
``pyquant._C_autograd`` (built where torch was found at build time, ``PYQUANT_TORCH_NODE``) records a
min/max quantizer's CPU training call as one C++ autograd node over _C's kernels; it loads only beside
the torch it was built against, and without it the quantizer's Python node runs the same kernels.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any, Optional

_cpu: Optional[ModuleType] = None
_cuda: Optional[ModuleType] = None
_cpu_error: Optional[str] = None
_cuda_error: Optional[str] = None

def _load(name: str):
    """(module, None) or (None, why it is missing)."""
    import importlib
    import importlib.util
    try:
        if importlib.util.find_spec(f"pyquant.{name}") is None:
            why = ("was not built (the CUDA module needs nvcc at build time; PYQUANT_CUDA=OFF skips it)"
                   if name == "_C_cuda" else "was not built (install pyquant with `pip install -e .`)")
            return None, f"pyquant.{name} {why}"
        return importlib.import_module(f"pyquant.{name}"), None
    except ImportError as exc:  # pragma: no cover - depends on the build
        return None, f"pyquant.{name} failed to load: {exc}"


def _load_autograd():
    """(module, None) or (None, why): the C++ autograd module, bound to _C's kernels, where it was built
    against the torch that is imported."""
    import importlib.util
    if _cpu is None:
        return None, "pyquant._C_autograd needs pyquant._C"
    if importlib.util.find_spec("pyquant._C_autograd") is None:
        return None, ("pyquant._C_autograd was not built (torch was not found at build time: `make install` "
                      "passes PYQUANT_TORCH_PREFIX; PYQUANT_TORCH_NODE=OFF skips it)")
    import torch  # its libraries first: the module links them
    mod, why = _load("_C_autograd")
    if mod is None:
        return None, why
    if mod.torch_version != torch.__version__.split("+")[0]:
        return None, (f"pyquant._C_autograd was built against torch {mod.torch_version}, not the imported "
                      f"{torch.__version__}: rebuild pyquant (`pip install -e .`)")
    mod.bind(_cpu.native_table)
    return mod, None


_cpu, _cpu_error = _load("_C")
_cuda, _cuda_error = _load("_C_cuda")
_autograd, _autograd_error = _load_autograd()

_warned = False


def _warn_missing_once() -> None:
    global _warned
    if _warned or _cpu is not None:
        return
    _warned = True
    warnings.warn(
        "pyquant: the compiled CPU module pyquant._C could not be imported "
        f"({_cpu_error}); ops run on the pure-torch reference (slow). Rebuild with "
        "`pip install -e .` from a checkout.",
        RuntimeWarning,
        stacklevel=3,
    )


def cpu_module() -> Optional[ModuleType]:
    """The CPU kernel module, or None (warns once) when it was not built."""
    if _cpu is None:
        _warn_missing_once()
    return _cpu


def cuda_module() -> Optional[ModuleType]:
    """The CUDA kernel module, or None when pyquant was built without nvcc."""
    return _cuda


def autograd_module() -> Optional[ModuleType]:
    """The C++ autograd module (bound to the CPU kernels), or None where it was not built or does not fit
    the imported torch."""
    return _autograd


def native_info() -> dict[str, Any]:
    """What the native side of this install can do.

    Keys: ``cpu_module`` (bool), ``cpu_error``, ``simd`` (avx512 / avx2 / baseline), ``threads``,
    ``openmp``, ``autograd_module`` (bool: the C++ quantizer node), ``autograd_error``, ``cuda_module``
    (bool), ``cuda_error``, ``cuda_archs``, ``cuda_runtime``, ``cuda_devices`` (visible GPUs; 0 on a
    machine without one).
    """
    info: dict[str, Any] = {
        "cpu_module": _cpu is not None,
        "cpu_error": _cpu_error,
        "simd": _cpu.simd_level() if _cpu else None,
        "threads": _cpu.num_threads() if _cpu else None,
        "openmp": bool(_cpu.openmp) if _cpu else None,
        "autograd_module": _autograd is not None,
        "autograd_error": _autograd_error,
        "cuda_module": _cuda is not None,
        "cuda_error": _cuda_error,
        "cuda_archs": _cuda.archs.split(",") if _cuda else [],
        "cuda_runtime": _cuda.runtime_version() if _cuda else None,
        "cuda_devices": _cuda.device_count() if _cuda else 0,
    }
    if os.environ.get("PYQUANT_SIMD"):
        info["simd_cap"] = os.environ["PYQUANT_SIMD"]
    return info
