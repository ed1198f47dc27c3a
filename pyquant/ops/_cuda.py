"""CUDA kernels of the ops (pyquant._C_cuda), registered for the "cuda" device. Each call runs on
the tensor's device and its current torch stream (never the legacy default stream)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from ._backend import NativeBackend

backend: Optional[NativeBackend] = None


def _stream(x: torch.Tensor) -> tuple[int]:
    return (torch.cuda.current_stream(x.device).cuda_stream,)


def register() -> bool:
    global backend
    G = _native.cuda_module()
    if G is None:
        return False
    backend = NativeBackend(G, "cuda", ws_slots=lambda: 1, extra_args=_stream,
                            context=lambda x: torch.cuda.device(x.device))
    backend.register()
    return True
