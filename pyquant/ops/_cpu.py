"""CPU kernels of the ops (pyquant._C), registered for the "cpu" device."""
from __future__ import annotations

from typing import Optional

from .. import _native
from ._backend import NativeBackend

backend: Optional[NativeBackend] = None


def register() -> bool:
    global backend
    C = _native.cpu_module()
    if C is None:
        return False
    # One float64 workspace per thread for the backward reduction.
    backend = NativeBackend(C, "cpu", ws_slots=C.num_threads, native_scale_check=True,
                            autograd=_native.autograd_module())
    backend.register()
    return True
