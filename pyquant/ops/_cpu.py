"""CPU kernels of the ops (pyquant._C), registered for the "cpu" device."""
from __future__ import annotations

import torch

from .. import _native
from . import _layout, _registry
from ._layout import DTYPE_CODE

_QDQ, _Q, _DQ = 0, 1, 2


def _forward(op: int, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    C = _native._cpu
    x, xk, s, o, layout, perm = _layout.prepare(C, x, scale, offset)
    bad = C.first_bad_scale(s.data_ptr(), layout.nscale)
    if bad >= 0:
        raise ValueError(f"scale must be positive and finite; found {s.flatten()[bad].item()} at index {bad}")
    y = torch.empty_like(x, dtype=out_dtype)
    yk = y.permute(perm) if perm is not None else y
    C.fake_quant_forward(op, xk.data_ptr(), DTYPE_CODE[x.dtype], yk.data_ptr(), DTYPE_CODE[out_dtype],
                         s.data_ptr(), o.data_ptr(), float(qmin), float(qmax), layout)
    return y


def qdq(x, scale, offset, qmin, qmax, grad_scale=1.0):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    return _forward(_QDQ, x, scale, offset, qmin, qmax, x.dtype)


def quantize(x, scale, offset, qmin, qmax, out_dtype):
    _layout.check_grid(qmin, qmax)
    _layout.check_params(x, scale, offset)
    _registry.check_out_dtype_for_quantize(out_dtype, qmin, qmax)
    if out_dtype != torch.float32 and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN, which has no integer code; use out_dtype=torch.float32 to keep it")
    return _forward(_Q, x, scale, offset, qmin, qmax, out_dtype)


def dequantize(q, scale, offset, out_dtype):
    _layout.check_params(q, scale, offset, x_float=False)
    _registry.check_out_dtype_for_dequantize(out_dtype)
    return _forward(_DQ, q, scale, offset, 0, 1, out_dtype)


def qdq_backward(grad, x, scale, offset, qmin, qmax, grad_scale, output_mask):
    C = _native._cpu
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    grad = grad.to(x.dtype)
    x, xk, s, o, layout, perm = _layout.prepare(C, x, scale, offset)
    if perm is not None:
        gk = grad.permute(perm)
        if not gk.is_contiguous():
            gk = gk.contiguous()
    else:
        gk = grad.contiguous()
    need_dx, need_s, need_o = (bool(v) for v in output_mask)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dxk = (dx.permute(perm) if perm is not None else dx) if need_dx else None
    # ds/do are written in the kernel's (memory) order, the order of s; permuted back below.
    ds = torch.empty(s.shape, dtype=torch.float32) if need_s else scale.new_empty(0)
    do = torch.empty(o.shape, dtype=torch.float32) if need_o else offset.new_empty(0)
    ws = torch.empty(C.num_threads() * 2 * layout.nscale, dtype=torch.float64) if (need_s or need_o) else None
    C.fake_quant_backward(gk.data_ptr(), xk.data_ptr(), DTYPE_CODE[x.dtype],
                          dxk.data_ptr() if need_dx else 0, s.data_ptr(), o.data_ptr(),
                          float(qmin), float(qmax), layout,
                          ws.data_ptr() if ws is not None else 0,
                          ds.data_ptr() if need_s else 0, do.data_ptr() if need_o else 0, float(grad_scale))
    return dx, _unpermute(ds, perm, scale), _unpermute(do, perm, offset)


def _unpermute(t: torch.Tensor, perm, like: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return t
    if perm is not None:
        t = t.permute(_layout.inverse(perm)).contiguous()
    return t.reshape(like.shape)


def register() -> bool:
    if _native.cpu_module() is None:
        return False
    lib = _registry._lib
    torch.library.register_kernel("pyquant::quantize_dequantize", "cpu", qdq, lib=lib)
    torch.library.register_kernel("pyquant::quantize_dequantize_backward", "cpu", qdq_backward, lib=lib)
    torch.library.register_kernel("pyquant::quantize", "cpu", quantize, lib=lib)
    torch.library.register_kernel("pyquant::dequantize", "cpu", dequantize, lib=lib)
    return True
