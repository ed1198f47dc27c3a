"""Glue between the op registry and a native kernel module (pyquant._C or pyquant._C_cuda): argument
checks, memory-order handling, output allocation. _cpu.py and _cuda.py instantiate it per device."""
from __future__ import annotations

import contextlib
import functools
import math
from types import ModuleType
from typing import Callable, Optional

import torch

from . import _layout, _reference, _registry
from ._layout import DTYPE_CODE

QDQ, Q, DQ = 0, 1, 2

# The native ops' parameters, in the order the calls below pass them positionally (declared once in
# csrc/include/pyquant/op_args.h; the CUDA module's take the stream last). tests/test_native_bindings.py
# checks these against the compiled modules' signatures.
_FAKE_QUANT_FORWARD = ("op", "x", "xdt", "y", "ydt", "s", "o", "qmin", "qmax", "layout", "act_lo", "act_hi")
_FAKE_QUANT_BACKWARD = ("g", "x", "dt", "dx", "s", "o", "qmin", "qmax", "layout", "ws", "ds", "doff", "grad_scale",
                        "act_lo", "act_hi")
_MINMAX = ("x", "dt", "layout", "mn", "mx", "nonfinite")
_HISTOGRAM = ("x", "dt", "layout", "lo", "range", "nbins", "counts")
_SEARCH = ("counts", "G", "nbins", "c0", "bw", "cand_d", "cand_o", "C", "ns", "gamma", "p", "best_idx", "best_noise")
_ENTROPY_SEARCH = ("counts", "G", "nb", "nq", "best_i", "best_kl")
_ADAROUND_FORWARD = ("w", "a", "y", "s", "o", "rows", "row_len", "nscale", "qmin", "qmax", "hard")
_ADAROUND_BACKWARD = ("g", "w", "a", "da", "s", "o", "rows", "row_len", "nscale", "qmin", "qmax")
_ADAROUND_REGULARIZER = ("a", "n", "beta", "grad")
_STREAM = ("stream",)
NATIVE_PARAMS: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        "fake_quant_forward": _FAKE_QUANT_FORWARD,
        "fake_quant_backward": _FAKE_QUANT_BACKWARD,
        "minmax": _MINMAX + ("ws_f", "ws_i"),
        "histogram": _HISTOGRAM + ("ws", "ws_len"),
        "search": _SEARCH,
        "entropy_search": _ENTROPY_SEARCH,
        "max_pool_forward": ("x", "planes", "height", "width", "kh", "kw", "out", "argmax"),
        "qdq_max_pool_forward": ("x", "planes", "height", "width", "kh", "kw", "s", "o", "channels", "qmin", "qmax",
                                 "act_lo", "act_hi", "out", "argmax", "sel"),
        "max_pool_backward": ("g", "argmax", "planes", "height", "width", "kh", "kw", "dx"),
        "adaround_forward": _ADAROUND_FORWARD,
        "adaround_backward": _ADAROUND_BACKWARD,
        "adaround_regularizer": _ADAROUND_REGULARIZER,
        "first_bad_scale": ("s", "n"),
        "minmax_encoding": ("mn", "mx", "n", "qmin", "qmax", "min_scale", "symmetric", "s", "o", "k_s", "k_o",
                            "k_ot"),
        "minmax_qdq_forward": ("x", "dt", "y", "mn", "mx", "qmin", "qmax", "min_scale", "symmetric", "layout",
                               "act_lo", "act_hi", "enc"),
        "minmax_qdq_backward": ("g", "x", "dt", "dx", "enc", "qmin", "qmax", "symmetric", "layout", "ws", "dmin",
                                "dmax", "grad_scale", "act_lo", "act_hi"),
        "int32_fake_quant": ("x", "n", "s", "ns", "y", "overflow_float"),
        "minmax_scale_product": ("a_mn", "a_mx", "a_qmin", "a_qmax", "a_min_scale", "b_mn", "b_mx", "n", "b_qmin",
                                 "b_qmax", "b_min_scale", "out"),
    },
    "cuda": {
        "fake_quant_forward": _FAKE_QUANT_FORWARD + _STREAM,
        "fake_quant_backward": _FAKE_QUANT_BACKWARD + _STREAM,
        "minmax": _MINMAX + _STREAM,
        "histogram": _HISTOGRAM + _STREAM,
        "search": _SEARCH + _STREAM,
        "entropy_search": _ENTROPY_SEARCH + _STREAM,
        "adaround_forward": _ADAROUND_FORWARD + _STREAM,
        "adaround_backward": _ADAROUND_BACKWARD + _STREAM,
        "adaround_regularizer": _ADAROUND_REGULARIZER + ("ws", "value") + _STREAM,
        "adaround_regularizer_workspace": ("n",),
    },
}


class NativeBackend:
    """Runs the fake-quant ops through `module` for tensors of one device type.

    `extra_args(x)` gives the trailing kernel arguments (the CUDA stream), `context(x)` the context
    the call runs under (the tensor's CUDA device), and `ws_slots()` how many per-thread
    workspaces the backward reduction needs. `autograd`: the C++ autograd module bound to `module`'s
    kernels, where there is one (the CPU's).
    """

    def __init__(self, module: ModuleType, device_type: str, *, ws_slots: Callable[[], int],
                 extra_args: Callable[[torch.Tensor], tuple] = lambda x: (),
                 context: Callable[[torch.Tensor], contextlib.AbstractContextManager] =
                 lambda x: contextlib.nullcontext(),
                 native_scale_check: bool = False, autograd: Optional[ModuleType] = None):
        self.m = module
        self.autograd = autograd
        self.device_type = device_type
        self.ws_slots = ws_slots
        self.extra_args = extra_args
        self.context = context
        self.native_scale_check = native_scale_check
        self.host = device_type == "cpu"

    def _check_scale(self, s: torch.Tensor, nscale: int) -> None:
        if self.native_scale_check:  # a C++ loop over the (contiguous, host) scales: no tensor ops
            bad = self.m.first_bad_scale(s.data_ptr(), nscale)
            if bad >= 0:
                raise ValueError(f"scale must be positive and finite; found {s.flatten()[bad].item()} at index {bad}")
        else:
            _layout.check_scale_values(s)

    def _forward(self, op: int, x, scale, offset, qmin, qmax, out_dtype, check: bool = True,
                 act: tuple[float, float] = _layout.NO_ACT):
        if x.numel() == 0:  # nothing to compute (a dimension of size 0 may leave no scale to lay out either)
            if check and scale.numel():
                self._check_scale(scale.contiguous(), scale.numel())
            return torch.empty_like(x, dtype=out_dtype)
        x, xk, s, o, layout, perm = _layout.prepare(self.m, x, scale, offset)
        if check:
            self._check_scale(s, layout.nscale)
        y = torch.empty_like(x, dtype=out_dtype)
        yk = y.permute(perm) if perm is not None else y
        args = (op, xk.data_ptr(), DTYPE_CODE[x.dtype], yk.data_ptr(), DTYPE_CODE[out_dtype], s.data_ptr(),
                o.data_ptr(), float(qmin), float(qmax), layout, *act)
        if self.host:  # no device context or stream to enter
            self.m.fake_quant_forward(*args)
        else:
            with self.context(x):
                self.m.fake_quant_forward(*args, *self.extra_args(x))
        return y

    def qdq(self, x, scale, offset, qmin, qmax, grad_scale=1.0, check_values=True, act_min=None, act_max=None):
        _layout.check_grid(qmin, qmax)
        _layout.check_params(x, scale, offset)
        act = _layout.check_activation(act_min, act_max)
        return self._forward(QDQ, x, scale, offset, qmin, qmax, x.dtype, check_values, act)

    def quantize(self, x, scale, offset, qmin, qmax, out_dtype):
        _layout.check_grid(qmin, qmax)
        _layout.check_params(x, scale, offset)
        _registry.check_out_dtype_for_quantize(out_dtype, qmin, qmax)
        if out_dtype != torch.float32 and _has_nan(x):
            raise ValueError("x contains NaN, which has no integer code; use out_dtype=torch.float32 to keep it")
        return self._forward(Q, x, scale, offset, qmin, qmax, out_dtype)

    def dequantize(self, q, scale, offset, out_dtype):
        _layout.check_params(q, scale, offset, x_float=False)
        _registry.check_out_dtype_for_dequantize(out_dtype)
        return self._forward(DQ, q, scale, offset, 0, 1, out_dtype)

    def qdq_backward(self, grad, x, scale, offset, qmin, qmax, grad_scale, output_mask, act_min=None, act_max=None):
        act = _layout.check_activation(act_min, act_max)
        if grad.shape != x.shape:
            raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
        if grad.dtype != x.dtype:
            grad = grad.to(x.dtype)
        need_dx, need_s, need_o = output_mask
        if x.numel() == 0:  # sums over no elements
            return (torch.empty_like(x) if need_dx else x.new_empty(0),
                    torch.zeros_like(scale) if need_s else scale.new_empty(0),
                    torch.zeros_like(offset) if need_o else offset.new_empty(0))
        x, xk, s, o, layout, perm = _layout.prepare(self.m, x, scale, offset)
        gk = grad.permute(perm) if perm is not None else grad
        if not gk.is_contiguous():
            gk = gk.contiguous()
        dev = x.device
        dx = torch.empty_like(x) if need_dx else x.new_empty(0)
        dxk = (dx.permute(perm) if perm is not None else dx) if need_dx else None
        # ds/do are written in the kernel's (memory) order, the order of s; permuted back below.
        ds = torch.empty(s.shape, dtype=torch.float32, device=dev) if need_s else scale.new_empty(0)
        do = torch.empty(o.shape, dtype=torch.float32, device=dev) if need_o else offset.new_empty(0)
        ws = None
        if need_s or need_o:
            ws = torch.empty(self.ws_slots() * 2 * layout.nscale, dtype=torch.float64, device=dev)
        args = (gk.data_ptr(), xk.data_ptr(), DTYPE_CODE[x.dtype], dxk.data_ptr() if need_dx else 0, s.data_ptr(),
                o.data_ptr(), float(qmin), float(qmax), layout, ws.data_ptr() if ws is not None else 0,
                ds.data_ptr() if need_s else 0, do.data_ptr() if need_o else 0, float(grad_scale), *act)
        if self.host:
            self.m.fake_quant_backward(*args)
        else:
            with self.context(x):
                self.m.fake_quant_backward(*args, *self.extra_args(x))
        return dx, _unpermute(ds, perm, scale), _unpermute(do, perm, offset)

    # ---- encodings of learned ranges ----
    def minmax_encoding(self, mn, mx, qmin, qmax, min_scale, symmetric, factors, one_block: bool = False):
        """`one_block`: the outputs share one allocation (and the unformed ones one empty tensor) -- for
        eager calls from inside an autograd node only; the registered op returns tensors that alias
        nothing, as the dispatcher (compile, functionalization) requires."""
        _registry.check_minmax_encoding_args(mn, mx, qmin, qmax, min_scale)
        mn, mx = mn.contiguous(), mx.contiguous()
        n = mn.numel()
        parts = 2 + (1 if factors else 0) + (2 if factors and not symmetric else 0)
        if one_block:
            out = list(torch.empty((parts,) + tuple(mn.shape), dtype=torch.float32).unbind(0))
            out += [mn.new_empty(0)] * (5 - parts)
        else:
            out = [torch.empty(mn.shape, dtype=torch.float32) for _ in range(parts)]
            out += [mn.new_empty(0) for _ in range(5 - parts)]
        s, o, k_s, k_o, k_ot = out
        self.m.minmax_encoding(mn.data_ptr(), mx.data_ptr(), n, float(qmin), float(qmax), float(min_scale),
                               bool(symmetric), s.data_ptr(), o.data_ptr(), k_s.data_ptr() if factors else 0,
                               k_o.data_ptr() if factors and not symmetric else 0,
                               k_ot.data_ptr() if factors and not symmetric else 0)
        return s, o, k_s, k_o, k_ot

    # ---- a min/max quantizer's training call, one native entry each way (CPU) ----
    def minmax_qdq_forward(self, x, mn, mx, qmin, qmax, min_scale, symmetric, act_min=None, act_max=None):
        """(y, enc, state) for a contiguous float `x` and float32 ranges `mn`/`mx` in block-broadcast form
        (or one value each): y the fake quantization of the activation's clamp of x (act_min/act_max, None:
        unbounded) with the range's encoding, enc its s, o and chain factors (5 x nscale float32,
        minmax_encoding's order), state what the backward takes back. The caller
        (pyquant.quant.fake_quant_node) gives a grid from pyquant.ops.grid."""
        _layout.check_x_dtype(x, _layout.FLOAT_DTYPES)
        act = _layout.check_activation(act_min, act_max)
        mn, mx = (t if t.is_contiguous() else t.contiguous() for t in (mn, mx))
        layout = _layout.checked_layout(self.m, tuple(x.shape), tuple(mn.shape))
        enc = torch.empty(5 * layout.nscale, dtype=torch.float32)
        y = torch.empty_like(x)
        self.m.minmax_qdq_forward(x.data_ptr(), DTYPE_CODE[x.dtype], y.data_ptr(), mn.data_ptr(), mx.data_ptr(),
                                  float(qmin), float(qmax), float(min_scale), bool(symmetric), layout, *act,
                                  enc.data_ptr())
        return y, enc, (layout, act)

    def minmax_qdq_backward(self, grad, x, enc, state, qmin, qmax, symmetric, grad_scale, need_x, range_shape):
        """(dx or None, dmin, dmax) of minmax_qdq_forward; the range gradients in `range_shape` (the min/max
        parameters' shape; None: not wanted, and both None)."""
        layout, act = state
        if grad.dtype != x.dtype:
            grad = grad.to(x.dtype)
        if not grad.is_contiguous():
            grad = grad.contiguous()
        dx = torch.empty_like(x) if need_x else None
        dmin = dmax = ws = None
        if range_shape is not None:  # made in the parameters' shape: no view per call
            dmin, dmax = torch.empty(range_shape), torch.empty(range_shape)
            ws = torch.empty(self.ws_slots() * 2 * layout.nscale, dtype=torch.float64)
        self.m.minmax_qdq_backward(grad.data_ptr(), x.data_ptr(), DTYPE_CODE[x.dtype],
                                   dx.data_ptr() if need_x else 0, enc.data_ptr(), float(qmin), float(qmax),
                                   bool(symmetric), layout, ws.data_ptr() if ws is not None else 0,
                                   dmin.data_ptr() if dmin is not None else 0,
                                   dmax.data_ptr() if dmax is not None else 0, float(grad_scale), *act)
        return dx, dmin, dmax

    def minmax_qdq(self, x, mn, mx, qmin, qmax, min_scale, symmetric, grad_scale, act_min=None, act_max=None):
        """minmax_qdq_forward's y, recorded as one C++ autograd node (pyquant._C_autograd) whose backward is
        minmax_qdq_backward: gradients of x and of the range parameters `mn`/`mx` themselves (any shape that
        right-aligns with x's, as the ops take it). None where the node does not take the call (x strided,
        empty or not a float type; ranges not contiguous float32 on the CPU; act_min >= act_max): the caller
        runs its own path, which accepts or refuses it with its own errors. A range shape that does not fit
        x's raises here, as the ops' layout check does."""
        nd, rd = x.dim(), mn.dim()
        shape = mn.shape if rd == nd else (mn.shape[rd - nd:] if rd > nd else (1,) * (nd - rd) + tuple(mn.shape))
        layout = _layout.checked_layout(self.m, tuple(x.shape), tuple(shape))
        return self.autograd.minmax_qdq(x, mn, mx, layout.address, qmin, qmax, min_scale, symmetric, grad_scale,
                                        act_min, act_max)

    # ---- a bias on the int32 grid (CPU) ----
    def int32_fake_quant(self, x, scale, overflow):
        """quantize_dequantize_int32's forward for a contiguous float32 `x` and a contiguous float32 scale of
        one value or x's shape (the caller checks the rest)."""
        y = torch.empty_like(x)
        self.m.int32_fake_quant(x.data_ptr(), x.numel(), scale.data_ptr(), scale.numel(), y.data_ptr(),
                                overflow == "float")
        return y

    def minmax_scale_product(self, a_mn, a_mx, a_qmin, a_qmax, a_min_scale, b_mn, b_mx, b_qmin, b_qmax, b_min_scale):
        """s_a * s_b, flat float32 with b's element count: the minmax_encoding scales of the range a (one
        value) and of each of b's, on the grids [qmin, qmax] with their smallest scales. Contiguous float32
        CPU tensors (the caller checks)."""
        out = torch.empty(b_mn.numel(), dtype=torch.float32)
        self.m.minmax_scale_product(a_mn.data_ptr(), a_mx.data_ptr(), float(a_qmin), float(a_qmax), float(a_min_scale),
                                    b_mn.data_ptr(), b_mx.data_ptr(), b_mn.numel(), float(b_qmin), float(b_qmax),
                                    float(b_min_scale), out.data_ptr())
        return out

    # ---- statistics ----
    def minmax(self, x, shape):
        if x.dtype not in _layout.FLOAT_DTYPES:
            raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
        shape = _registry.check_group_shape(x, shape)
        if x.numel() == 0:  # no values: every group's finite min/max is +inf/-inf
            return (torch.full(shape, float("inf"), device=x.device), torch.full(shape, -float("inf"), device=x.device),
                    torch.zeros(shape, dtype=torch.int64, device=x.device))
        x, xk, _, layout, perm = _layout.prepare_groups(self.m, x, shape, [])
        kshape = tuple(shape[d] for d in perm) if perm is not None else shape
        dev = x.device
        mn = torch.empty(kshape, dtype=torch.float32, device=dev)
        mx = torch.empty(kshape, dtype=torch.float32, device=dev)
        nf = torch.empty(kshape, dtype=torch.int64, device=dev)
        args = [xk.data_ptr(), DTYPE_CODE[x.dtype], layout, mn.data_ptr(), mx.data_ptr(), nf.data_ptr()]
        if self.device_type == "cpu":
            t = self.ws_slots()
            ws_f = torch.empty(t * 2 * layout.nscale, dtype=torch.float32)
            ws_i = torch.empty(t * layout.nscale, dtype=torch.int64)
            args += [ws_f.data_ptr(), ws_i.data_ptr()]
        with self.context(x):
            self.m.minmax(*args, *self.extra_args(x))
        like = torch.empty(shape, device="meta")
        return tuple(_unpermute(t, perm, like) for t in (mn, mx, nf))

    def histogram(self, x, lo, rng, nbins):
        _registry.check_histogram_args(x, lo, rng, nbins)
        _registry.check_range_values(rng)
        if x.numel() == 0:
            return torch.zeros(tuple(lo.shape) + (nbins,), dtype=torch.int64, device=x.device)
        x, xk, (lok, rk), layout, perm = _layout.prepare_groups(self.m, x, tuple(lo.shape), [lo, rng])
        kshape = tuple(lok.shape) + (nbins,)
        dev = x.device
        if self.device_type == "cpu":
            counts = torch.empty(kshape, dtype=torch.int64)  # the kernel writes every entry
            t = self.ws_slots()
            # Private per-thread counts (4 interleaved copies) when they are small; else the
            # threads split the groups.
            need = t * 4 * layout.nscale * nbins
            ws = torch.empty(need, dtype=torch.int64) if need <= (1 << 21) else None
            self.m.histogram(xk.data_ptr(), DTYPE_CODE[x.dtype], layout, lok.data_ptr(), rk.data_ptr(), nbins,
                             counts.data_ptr(), ws.data_ptr() if ws is not None else 0,
                             need if ws is not None else 0)
        else:
            counts = torch.empty(kshape, dtype=torch.int64, device=dev)
            with self.context(x):
                self.m.histogram(xk.data_ptr(), DTYPE_CODE[x.dtype], layout, lok.data_ptr(), rk.data_ptr(), nbins,
                                 counts.data_ptr(), *self.extra_args(x))
        if perm is not None and counts.dim() == len(perm) + 1:
            counts = counts.permute(_layout.inverse(perm) + (len(perm),)).contiguous()
        return counts.reshape(tuple(lo.shape) + (nbins,))

    def search(self, counts, c0, bw, cand_d, cand_o, ns, gamma, p):
        _registry.check_search_args(counts, c0, bw, cand_d, cand_o, ns, gamma, p)
        counts, c0, bw, cand_d, cand_o = (t.contiguous() for t in (counts, c0, bw, cand_d, cand_o))
        G, nb = counts.shape
        C = cand_d.shape[1]
        best = torch.empty(G, dtype=torch.int64, device=counts.device)
        noise = torch.empty(G, dtype=torch.float64, device=counts.device)
        with self.context(counts):
            self.m.search(counts.data_ptr(), G, nb, c0.data_ptr(), bw.data_ptr(), cand_d.data_ptr(), cand_o.data_ptr(),
                          C, float(ns), float(gamma), float(p), best.data_ptr(), noise.data_ptr(),
                          *self.extra_args(counts))
        return best, noise

    def entropy_search(self, counts, nq):
        _registry.check_entropy_args(counts, nq)
        counts = counts.contiguous()
        G, nb = counts.shape
        best = torch.empty(G, dtype=torch.int64, device=counts.device)
        kl = torch.empty(G, dtype=torch.float64, device=counts.device)
        with self.context(counts):
            self.m.entropy_search(counts.data_ptr(), G, nb, nq, best.data_ptr(), kl.data_ptr(),
                                  *self.extra_args(counts))
        return best, kl

    # ---- max pooling by window ----
    def max_pool2d_window(self, x, kernel):
        kh, kw = _registry.check_pool_args(x, kernel)
        if x.dtype != torch.float32 or not x.is_contiguous():  # the native loops take contiguous float32
            return _reference.max_pool2d_window(x, [kh, kw])
        shape = _registry.pooled_shape(x.shape, kh, kw)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        argmax = torch.empty(shape, dtype=torch.uint8, device=x.device)
        self.m.max_pool_forward(x.data_ptr(), math.prod(x.shape[:-2]), *x.shape[-2:], kh, kw, out.data_ptr(),
                                argmax.data_ptr())
        return out, argmax

    def qdq_max_pool2d(self, x, scale, offset, qmin, qmax, kernel, check_values=True, act_min=None, act_max=None):
        kh, kw, act = _registry.check_qdq_pool_args(x, scale, offset, qmin, qmax, kernel, act_min, act_max)
        s, o = scale.contiguous(), offset.contiguous()
        if check_values:
            self._check_scale(s, s.numel())
        if not hasattr(self.m, "qdq_max_pool_forward") or x.dtype != torch.float32 or not x.is_contiguous():
            # this device's fake-quant kernel, then aten's pool
            q = self._forward(QDQ, x, s, o, qmin, qmax, x.dtype, False, act)
            out, pos = _reference.max_pool2d_window(q, [kh, kw])
            return out, pos, _reference.window_values(x, pos, [kh, kw])
        shape = _registry.pooled_shape(x.shape, kh, kw)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        argmax = torch.empty(shape, dtype=torch.uint8, device=x.device)
        sel = torch.empty(shape, dtype=x.dtype, device=x.device)
        self.m.qdq_max_pool_forward(x.data_ptr(), math.prod(x.shape[:-2]), *x.shape[-2:], kh, kw, s.data_ptr(),
                                    o.data_ptr(), s.numel(), float(qmin), float(qmax), *act, out.data_ptr(),
                                    argmax.data_ptr(), sel.data_ptr())
        return out, argmax, sel

    def max_pool2d_window_backward(self, grad, argmax, kernel, input_size):
        _registry.check_unpool_args(grad, argmax, kernel, input_size)
        kh, kw = (int(k) for k in kernel)
        if grad.dtype != torch.float32 or not grad.is_contiguous() or not argmax.is_contiguous():
            return _reference.max_pool2d_window_backward(grad, argmax, [kh, kw], list(input_size))
        dx = torch.empty(list(input_size), dtype=grad.dtype, device=grad.device)
        self.m.max_pool_backward(grad.data_ptr(), argmax.data_ptr(), math.prod(input_size[:-2]), *input_size[-2:],
                                 kh, kw, dx.data_ptr())
        return dx

    # ---- AdaRound ----
    def _ada_prep(self, w, alpha, scale, offset, qmin, qmax):
        _registry.check_adaround_args(w, alpha, scale, offset, qmin, qmax)
        w, alpha = w.contiguous(), alpha.contiguous()
        s, o = scale.contiguous().reshape(-1), offset.contiguous().reshape(-1)
        if s.numel() != o.numel():  # one per row and one in all: the kernel reads both at one count
            n = s.numel() if o.numel() == 1 else o.numel()  # the per-row count (0 for an empty w)
            s, o = s.expand(n).contiguous(), o.expand(n).contiguous()
        self._check_scale(s, s.numel())
        rows = w.shape[0] if w.dim() > 0 else 1
        row_len = w.numel() // rows if rows else 0
        return w, alpha, s, o, rows, row_len

    def adaround_weight(self, w, alpha, scale, offset, qmin, qmax, hard=False):
        w, alpha, s, o, rows, row_len = self._ada_prep(w, alpha, scale, offset, qmin, qmax)
        y = torch.empty_like(w)
        with self.context(w):
            self.m.adaround_forward(w.data_ptr(), alpha.data_ptr(), y.data_ptr(), s.data_ptr(), o.data_ptr(), rows,
                                    row_len, s.numel(), float(qmin), float(qmax), bool(hard), *self.extra_args(w))
        return y

    def adaround_weight_backward(self, grad, w, alpha, scale, offset, qmin, qmax):
        w, alpha, s, o, rows, row_len = self._ada_prep(w, alpha, scale, offset, qmin, qmax)
        if grad.shape != w.shape:
            raise ValueError(f"grad must have w's shape {tuple(w.shape)}, got {tuple(grad.shape)}")
        g = grad.float().contiguous()
        da = torch.empty_like(alpha)
        with self.context(w):
            self.m.adaround_backward(g.data_ptr(), w.data_ptr(), alpha.data_ptr(), da.data_ptr(), s.data_ptr(),
                                     o.data_ptr(), rows, row_len, s.numel(), float(qmin), float(qmax),
                                     *self.extra_args(w))
        return da

    def adaround_regularizer(self, alpha, beta):
        if alpha.dtype != torch.float32:
            raise TypeError(f"alpha must be float32, got {alpha.dtype}")
        a = alpha.contiguous()
        grad = torch.empty_like(a)
        if self.device_type == "cpu":
            total = self.m.adaround_regularizer(a.data_ptr(), a.numel(), float(beta), grad.data_ptr())
            return torch.tensor(total, dtype=torch.float32), grad
        ws = torch.empty(self.m.adaround_regularizer_workspace(a.numel()), dtype=torch.float64, device=a.device)
        value = torch.empty((), dtype=torch.float64, device=a.device)
        with self.context(a):
            self.m.adaround_regularizer(a.data_ptr(), a.numel(), float(beta), grad.data_ptr(), ws.data_ptr(),
                                        value.data_ptr(), *self.extra_args(a))
        return value.float(), grad

    def register(self) -> None:
        dt = self.device_type

        def reg(name: str, fn: Callable) -> None:
            torch.library.register_kernel(f"pyquant::{name}", dt, fn, lib=_registry._lib)
            _registry.NATIVE_KERNELS[(dt, name)] = fn

        if hasattr(self.m, "adaround_forward"):
            reg("adaround_weight", self.adaround_weight)
            reg("adaround_weight_backward", self.adaround_weight_backward)
            reg("adaround_regularizer", self.adaround_regularizer)
        if hasattr(self.m, "max_pool_forward"):
            reg("max_pool2d_window", self.max_pool2d_window)
            reg("max_pool2d_window_backward", self.max_pool2d_window_backward)
        if hasattr(self.m, "minmax_encoding"):  # the CPU's
            reg("minmax_encoding", self.minmax_encoding)
            _registry.NATIVE_KERNELS[(dt, "minmax_encoding")] = functools.partial(self.minmax_encoding,
                                                                                   one_block=True)
        else:  # the reference runs (a few tensor ops on the device): called directly, as a kernel would be
            _registry.NATIVE_KERNELS[(dt, "minmax_encoding")] = _registry.reference_minmax_encoding
        if hasattr(self.m, "int32_fake_quant"):  # inside quantize_dequantize_int32's node, and an int32 bias's scale
            _registry.NATIVE_KERNELS[(dt, "int32_fake_quant")] = self.int32_fake_quant
            _registry.NATIVE_KERNELS[(dt, "minmax_scale_product")] = self.minmax_scale_product
        if hasattr(self.m, "minmax_qdq_forward"):  # fused steps inside QuantizeNode (no ops of their own)
            _registry.NATIVE_KERNELS[(dt, "minmax_qdq_forward")] = self.minmax_qdq_forward
            _registry.NATIVE_KERNELS[(dt, "minmax_qdq_backward")] = self.minmax_qdq_backward
        if self.autograd is not None:  # the same step as one C++ autograd node (replaces QuantizeNode)
            _registry.NATIVE_KERNELS[(dt, "minmax_qdq")] = self.minmax_qdq
        reg("quantize_dequantize_max_pool2d", self.qdq_max_pool2d)
        reg("entropy_search", self.entropy_search)
        reg("search", self.search)
        reg("minmax", self.minmax)
        reg("histogram", self.histogram)
        reg("quantize_dequantize", self.qdq)
        reg("quantize_dequantize_backward", self.qdq_backward)
        reg("quantize", self.quantize)
        reg("dequantize", self.dequantize)


def _has_nan(x: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether x holds a NaN, looking at a contiguous x a chunk at a time: a mask of the whole tensor would
    cost a byte per element (2 GiB beside a 2^31-element input)."""
    if x.numel() <= chunk or not x.is_contiguous():
        return bool(torch.isnan(x).any())
    return any(bool(torch.isnan(c).any()) for c in x.view(-1).split(chunk))


def _unpermute(t: torch.Tensor, perm: Optional[tuple[int, ...]], like: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return t
    if perm is not None and t.dim() == len(perm):  # (a single value is not permuted)
        t = t.permute(_layout.inverse(perm)).contiguous()
    return t if t.shape == like.shape else t.reshape(like.shape)
