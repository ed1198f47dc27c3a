"""CUDA kernels of the ops (pyquant._C_cuda), registered for the "cuda" device. Each call runs on
the tensor's device and its current torch stream."""
from __future__ import annotations

import torch

from .. import _native
from . import _layout, _registry
from ._layout import DTYPE_CODE

_QDQ, _Q, _DQ = 0, 1, 2


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _forward(op, x, scale, offset, qmin, qmax, out_dtype):
    G = _native._cuda
    x, xk, s, o, layout, perm = _layout.prepare(G, x, scale, offset)
    y = torch.empty_like(x, dtype=out_dtype)
    yk = y.permute(perm) if perm is not None else y
    with torch.cuda.device(x.device):
        G.fake_quant_forward(op, xk.data_ptr(), DTYPE_CODE[x.dtype], yk.data_ptr(), DTYPE_CODE[out_dtype],
                             s.data_ptr(), o.data_ptr(), float(qmin), float(qmax), layout, _stream(x))
    return y


def qdq(x, scale, offset, qmin, qmax, grad_scale=1.0):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    _layout.check_scale_values(scale)
    return _forward(_QDQ, x, scale, offset, qmin, qmax, x.dtype)


def quantize(x, scale, offset, qmin, qmax, out_dtype):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    _registry.check_out_dtype_for_quantize(out_dtype, qmin, qmax)
    _layout.check_scale_values(scale)
    if out_dtype != torch.float32 and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN, which has no integer code; use out_dtype=torch.float32 to keep it")
    return _forward(_Q, x, scale, offset, qmin, qmax, out_dtype)


def dequantize(q, scale, offset, out_dtype):
    _layout.check_params(q, scale, offset, x_float=False)
    _registry.check_out_dtype_for_dequantize(out_dtype)
    _layout.check_scale_values(scale)
    return _forward(_DQ, q, scale, offset, 0, 1, out_dtype)


def qdq_backward(grad, x, scale, offset, qmin, qmax, grad_scale, output_mask):
    G = _native._cuda
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    grad = grad.to(x.dtype)
    x, xk, s, o, layout, perm = _layout.prepare(G, x, scale, offset)
    gk = grad.permute(perm) if perm is not None else grad
    if not gk.is_contiguous():
        gk = gk.contiguous()
    need_dx, need_s, need_o = (bool(v) for v in output_mask)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dxk = (dx.permute(perm) if perm is not None else dx) if need_dx else None
    # ds/do are written in the kernel's (memory) order, the order of s; permuted back below.
    ds = torch.empty(s.shape, dtype=torch.float32, device=x.device) if need_s else scale.new_empty(0)
    do = torch.empty(o.shape, dtype=torch.float32, device=x.device) if need_o else offset.new_empty(0)
    ws = torch.empty(2 * layout.nscale, dtype=torch.float64, device=x.device) if (need_s or need_o) else None
    with torch.cuda.device(x.device):
        G.fake_quant_backward(gk.data_ptr(), xk.data_ptr(), DTYPE_CODE[x.dtype],
                              dxk.data_ptr() if need_dx else 0, s.data_ptr(), o.data_ptr(),
                              float(qmin), float(qmax), layout,
                              ws.data_ptr() if ws is not None else 0,
                              ds.data_ptr() if need_s else 0, do.data_ptr() if need_o else 0,
                              float(grad_scale), _stream(x))
    return dx, _unpermute(ds, perm, scale), _unpermute(do, perm, offset)


def _unpermute(t: torch.Tensor, perm, like: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return t
    if perm is not None:
        t = t.permute(_layout.inverse(perm)).contiguous()
    return t.reshape(like.shape)


def register() -> bool:
    if _native.cuda_module() is None:
        return False
    lib = _registry._lib
    torch.library.register_kernel("pyquant::quantize_dequantize", "cuda", qdq, lib=lib)
    torch.library.register_kernel("pyquant::quantize_dequantize_backward", "cuda", qdq_backward, lib=lib)
    torch.library.register_kernel("pyquant::quantize", "cuda", quantize, lib=lib)
    torch.library.register_kernel("pyquant::dequantize", "cuda", dequantize, lib=lib)
    return True
