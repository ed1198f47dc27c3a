"""Pure-torch reference of every op: the registered fallback on devices without a native kernel,
and the oracle the kernels are tested against. Math in float32 (docs/design.md, "Quantization math");
reductions over the elements that share a scale in float64."""
from __future__ import annotations

import math
from typing import Optional

import torch


def expand(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A block-broadcast parameter repeated to one value per element (broadcast dims stay 1)."""
    if p.dim() != len(shape):
        return p.reshape((1,) * len(shape)) if p.numel() == 1 else p
    for d, (n, k) in enumerate(zip(shape, p.shape)):
        if k != 1 and k != n:
            p = p.repeat_interleave(n // k, dim=d)
    return p


def reduce_to(t: torch.Tensor, s_shape: torch.Size) -> torch.Tensor:
    """Sums a full-size tensor over the elements that share each scale value (float64)."""
    t = t.double()
    if len(s_shape) != t.dim():
        return t.sum().reshape(s_shape)
    split = []
    for n, k in zip(t.shape, s_shape):
        split += [k, n // k] if k != 0 else [0, 1]
    t = t.reshape(split)
    return t.sum(dim=tuple(range(1, 2 * len(s_shape), 2))).reshape(s_shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = expand(scale, x.shape)
    o = expand(offset, x.shape)
    q = torch.clamp(torch.round(x.float() / s) - o, qmin, qmax)
    return q.to(out_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = expand(scale, q.shape)
    o = expand(offset, q.shape)
    return ((q.float() + o) * s).to(out_dtype)


def _activate(x: torch.Tensor, act: Optional[tuple[float, float]]) -> torch.Tensor:
    """x in float32, clamped to the fused activation's range when there is one (NaN passes)."""
    x = x.float()
    if act is None or (act[0] == -math.inf and act[1] == math.inf):
        return x
    return torch.clamp(x, min=act[0] if act[0] > -math.inf else None, max=act[1] if act[1] < math.inf else None)


def _activation_passes(x: torch.Tensor, act: tuple[float, float]) -> torch.Tensor:
    """Where the activation's gradient is 1, with ReLU's and Hardtanh's own conventions: 0 where x <= lo,
    and where x >= hi for a finite hi; NaN passes."""
    x = x.float()
    keep = ~(x <= act[0])
    if act[1] < math.inf:
        keep &= ~(x >= act[1])
    return keep


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
                        grad_scale: float = 1.0, act: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """`act` = (lo, hi): quantize clamp(x, lo, hi) (a fused ReLU / ReLU6 / Hardtanh)."""
    s = expand(scale, x.shape)
    o = expand(offset, x.shape)
    q = torch.clamp(torch.round(_activate(x, act) / s) - o, qmin, qmax)
    return ((q + o) * s).to(x.dtype)


INT32_GRID = (-(2**31), 2**31 - 1)
"""The signed 32-bit grid integer targets keep biases and accumulators on."""


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


def minmax_encoding(mn: torch.Tensor, mx: torch.Tensor, qmin: int, qmax: int, min_scale: float, symmetric: bool,
                    factors: bool = True):
    """(scale, offset, k_s, k_o, k_ot) of a learned range: ``s = clamp((max - min) / N, min_scale)`` and,
    asymmetric, ``o = clamp(round(min / s) - qmin, -qmax, -qmin)`` (symmetric: ``o = 0``), N = qmax - qmin.
    Under autograd the offset's rounding is straight-through, so (s, o) are differentiable in min and max.
    With `factors`, the factors that carry the chain rule back by hand: ``[s unclamped] / N``,
    ``[o unclamped] / s`` and ``[o unclamped] * (min / s) / s`` (None where not formed; k_o and k_ot are
    None for a symmetric encoding)."""
    ns = qmax - qmin
    raw_s = (mx - mn) / ns
    s = torch.clamp(raw_s, min=min_scale)
    k_s = (raw_s == s) / ns if factors else None  # a clamp passes where it is inactive: raw_s == its clamp
    if symmetric:
        return s, torch.zeros_like(s), k_s, None, None
    t = mn / s
    raw_o = (_round_ste(t) if torch.is_grad_enabled() else torch.round(t)) - qmin
    o = torch.clamp(raw_o, -qmax, -qmin) + 0.0  # + 0.0: no negative zero (which torch's clamp keeps or not)
    if not factors:
        return s, o, None, None, None
    k_o = (raw_o == o) / s
    return s, o, k_s, k_o, k_o * t


def quantize_dequantize_int32(x: torch.Tensor, scale: torch.Tensor, overflow: str = "clamp") -> torch.Tensor:
    """Fake quantization on the signed 32-bit grid with offset 0: ``clamp(rint(x / s), -2^31, 2^31 - 1) * s``
    in float32 (true division, round half to even; in float32 the upper end is 2^31). `scale` broadcasts
    against `x`. `overflow="float"`: where some element lies beyond the grid, `x` unchanged."""
    q = torch.round(x.float() / scale)
    out = (torch.clamp(q, INT32_GRID[0], INT32_GRID[1]) * scale).to(x.dtype)
    if overflow == "float":
        return torch.where(((q >= INT32_GRID[0]) & (q <= INT32_GRID[1])).all(), out, x)
    return out


def fake_quant_derivatives(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int):
    """Per element of (already activated) x: whether round(x/s) - o lies on the grid, d x_hat / d scale with
    the rounding straight through -- round(x/s) - x/s inside the grid, clamp(q) + o outside -- and d x_hat /
    d offset: 0 inside, s outside."""
    s = expand(scale, x.shape)
    o = expand(offset, x.shape)
    t = x.float() / s
    r = torch.round(t)
    q = r - o
    inside = (q >= qmin) & (q <= qmax)
    return inside, torch.where(inside, r - t, torch.clamp(q, qmin, qmax) + o), torch.where(inside, 0.0, s)


def quantize_dequantize_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                                 qmin: int, qmax: int, grad_scale: float, output_mask: list[bool],
                                 act: Optional[tuple[float, float]] = None):
    """(dx, dscale, doffset); an output not asked for in `output_mask` is an empty tensor. With `act`, x is
    the activation's input: dscale/doffset see clamp(x, lo, hi) and dx is also zero where the activation is
    flat."""
    s = expand(scale, x.shape)
    g = grad.float()
    inside, d_scale, _ = fake_quant_derivatives(_activate(x, act), scale, offset, qmin, qmax)
    m = inside.float()
    empty = x.new_empty(0, dtype=torch.float32)
    dx = x.new_empty(0)
    if output_mask[0]:
        dx = g * m
        if act is not None and (act[0] > -math.inf or act[1] < math.inf):
            dx = torch.where(_activation_passes(x, act), dx, torch.zeros_like(dx))
        dx = dx.to(x.dtype)
    ds = do = empty
    if output_mask[1]:
        ds_full = g * d_scale
        ds = (reduce_to(ds_full, scale.shape) * grad_scale).float()
    if output_mask[2]:
        do_full = (g * s) * (1.0 - m)  # the kernels' arithmetic (an overflowing g * s gives NaN, as there)
        do = (reduce_to(do_full, offset.shape) * grad_scale).float()
    return dx, ds, do


def _grouped(x: torch.Tensor, g_shape) -> torch.Tensor:
    """x as [n_groups, elements_per_group] for a block-broadcast group shape."""
    g_shape = tuple(g_shape) if len(g_shape) == x.dim() else (1,) * x.dim()
    split = []
    for n, k in zip(x.shape, g_shape):
        split += [k, n // k] if k else [0, 1]
    nd = x.dim()
    t = x.reshape(split).permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    ng = 1
    for k in g_shape:
        ng *= k
    return t.reshape(ng, -1)


def minmax(x: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of the finite values (+inf/-inf if none) and the non-finite count."""
    g_shape = tuple(shape) if len(shape) == x.dim() else (1,) * x.dim()
    t = _grouped(x.float(), g_shape)
    fin = torch.isfinite(t)
    inf = torch.tensor(float("inf"), device=x.device)
    mn = torch.where(fin, t, inf).amin(dim=1) if t.shape[1] else torch.full((t.shape[0],), float("inf"))
    mx = torch.where(fin, t, -inf).amax(dim=1) if t.shape[1] else torch.full((t.shape[0],), -float("inf"))
    nf = (~fin).sum(dim=1)
    return mn.reshape(g_shape), mx.reshape(g_shape), nf.reshape(g_shape).to(torch.int64)


def hist_bin(x: torch.Tensor, lo: torch.Tensor, rng: torch.Tensor, nbins: int) -> torch.Tensor:
    """The bin rule of the histograms, element by element (float32, as the kernels compute it)."""
    t = ((x - lo) * float(nbins)) / rng
    b = torch.where(t > 0, t, torch.zeros_like(t))
    b = torch.where(b >= nbins, torch.full_like(b, nbins - 1), b)
    return b.to(torch.int64).clamp_(0, nbins - 1)


def histogram(x: torch.Tensor, lo: torch.Tensor, rng: torch.Tensor, nbins: int) -> torch.Tensor:
    """counts[*group_shape, nbins] of the finite values of each group over [lo, lo + range)."""
    g_shape = tuple(lo.shape) if lo.dim() == x.dim() else (1,) * x.dim()
    t = _grouped(x.float(), g_shape)
    ng = t.shape[0]
    lo_g = lo.reshape(ng, 1).float()
    r_g = rng.reshape(ng, 1).float()
    fin = torch.isfinite(t)
    b = hist_bin(torch.where(fin, t, lo_g.expand_as(t)), lo_g, r_g, nbins)
    idx = (torch.arange(ng, device=x.device).unsqueeze(1) * nbins + b)[fin]
    counts = torch.bincount(idx, minlength=ng * nbins)
    return counts.reshape(tuple(g_shape) + (nbins,))


def noise_terms(mid: torch.Tensor, cnt: torch.Tensor, d: torch.Tensor, o: torch.Tensor, ns: float, gamma: float,
                p: float) -> torch.Tensor:
    """The float32 per-bin error terms of candidates (d, o) (see csrc/include/pyquant/stats.h)."""
    q = torch.round(mid / d - o)
    clipped = (q < 0) | (q > ns)
    qc = torch.clamp(q, 0, ns)
    e = ((qc + o) * d - mid).abs()
    ep = e * e if p == 2.0 else torch.pow(e, p)
    t = ep * cnt
    return torch.where(clipped, t * gamma, t)


def search(counts: torch.Tensor, c0: torch.Tensor, bw: torch.Tensor, cand_d: torch.Tensor, cand_o: torch.Tensor,
           ns: int, gamma: float, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force over all bins and candidates: (index of the best candidate, its noise) per histogram."""
    G, nb = counts.shape
    i = torch.arange(nb, device=counts.device, dtype=torch.float32)
    mid = (c0.reshape(G, 1) + bw.reshape(G, 1) * i).unsqueeze(1)          # [G, 1, nb]
    cnt = counts.float().unsqueeze(1)
    t = noise_terms(mid, cnt, cand_d.unsqueeze(2), cand_o.unsqueeze(2), float(ns), float(gamma), float(p))
    noise = t.double().sum(dim=2)                                          # [G, C]
    best = noise.argmin(dim=1)
    return best, noise.gather(1, best.unsqueeze(1)).squeeze(1)


def kl_clip(h: torch.Tensor, i: int, nq: int) -> float:
    """KL divergence of clipping histogram h after its first i bins, quantized to nq levels (float64)."""
    h = h.double()
    total = float(h.sum())
    kept = float(h[:i].sum())
    if total <= 0 or kept <= 0:
        return 0.0
    p = h[:i].clone()
    p[i - 1] += total - kept
    m = i // nq
    q = torch.zeros(i, dtype=torch.float64)
    for j in range(nq):
        a, b = j * m, (i if j == nq - 1 else (j + 1) * m)
        chunk = h[a:b]
        nz = int((chunk > 0).sum())
        if nz:
            q[a:b] = (chunk > 0).double() * (float(chunk.sum()) / nz / kept)
    p = p / total
    q = torch.where((p > 0) & (q <= 0), torch.full_like(q, 1e-12), q)
    keep = p > 0
    return float((p[keep] * (torch.log(p[keep]) - torch.log(q[keep]))).sum())


def entropy_search(counts: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    G, nb = counts.shape
    best_i, best_kl = [], []
    for g in range(G):
        kls = [kl_clip(counts[g].cpu(), i, nq) for i in range(nq, nb + 1)]
        k = min(range(len(kls)), key=lambda j: (kls[j], j))
        best_i.append(nq + k)
        best_kl.append(kls[k])
    return (torch.tensor(best_i, dtype=torch.int64, device=counts.device),
            torch.tensor(best_kl, dtype=torch.float64, device=counts.device))


# ---- AdaRound (docs/design.md, 5.10): the same float32 operations, in the same order, as csrc/include/pyquant/adaround.h
_ADA_STRETCH = 1.2  # zeta - gamma, zeta = 1.1, gamma = -0.1
_ADA_GAMMA = -0.1


def _rows(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One value per output channel (dim 0) broadcast over the rest of w, or a single value."""
    return p.reshape((-1,) + (1,) * (w.dim() - 1)) if w.dim() > 0 else p.reshape(())


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def adaround_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """sigmoid in float64, rounded to float32 (as the kernels compute it)."""
    return torch.sigmoid(alpha.double()).float()


def adaround_terms(w, alpha, scale, offset, hard):
    sig = adaround_sigmoid(alpha)
    hr = sig * _f32(_ADA_STRETCH, w) + _f32(_ADA_GAMMA, w)
    h = (alpha >= 0).float() if hard else torch.clamp(hr, 0.0, 1.0)
    t = (torch.floor(w / _rows(scale, w)) + h) - _rows(offset, w)
    return sig, hr, h, t


def adaround_weight(w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int,
                    qmax: int, hard: bool = False) -> torch.Tensor:
    """(clamp(floor(w/s) + h(alpha) - o, qmin, qmax) + o) * s, h = clamp(sigmoid(alpha) * 1.2 - 0.1, 0, 1),
    or h = (alpha >= 0) when hard; scale/offset per output channel (dim 0) or single."""
    _, _, _, t = adaround_terms(w, alpha, scale, offset, hard)
    return (torch.clamp(t, qmin, qmax) + _rows(offset, w)) * _rows(scale, w)


def adaround_weight_backward(grad: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, scale: torch.Tensor,
                             offset: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    sig, hr, _, t = adaround_terms(w, alpha, scale, offset, False)
    keep = (t >= qmin) & (t <= qmax) & (hr >= 0) & (hr <= 1)
    d = ((grad * _rows(scale, w)) * _f32(_ADA_STRETCH, w)) * (sig * (1.0 - sig))
    return torch.where(keep, d, torch.zeros_like(d))


def adaround_regularizer(alpha: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(1 - |2h - 1|^beta) as a float32 scalar, its gradient in alpha); powers in float64."""
    sig = adaround_sigmoid(alpha)
    hr = sig * _f32(_ADA_STRETCH, alpha) + _f32(_ADA_GAMMA, alpha)
    h = torch.clamp(hr, 0.0, 1.0)
    d = 2.0 * h - 1.0
    ad = d.double().abs()
    p = ad.pow(float(beta) - 1.0)  # |d|^(beta-1), which gives |d|^beta too (one power, as the kernels)
    keep = (hr >= 0) & (hr <= 1) & (ad != 0)
    value = (1.0 - torch.where(keep, p * ad, ad.pow(float(beta)))).sum().float()
    dd = -float(beta) * p * torch.sign(d).double()
    g = (dd * 2.0 * float(_f32(_ADA_STRETCH, alpha)) * sig.double() * (1.0 - sig.double())).float()
    return value, torch.where(keep, g, torch.zeros_like(g))


# ---- non-overlapping max pooling (kernel == stride), window positions as uint8 -------------------
def max_pool2d_window(x: torch.Tensor, kernel: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """2-d max pool with windows kernel x kernel (stride = kernel, no padding, floor) and, for each output,
    the position of its maximum inside the window (row-major), as aten's max_pool2d picks it."""
    kh, kw = kernel
    out, idx = torch.ops.aten.max_pool2d_with_indices(x, [kh, kw], [kh, kw])
    ho, wo = out.shape[-2:]
    w = x.shape[-1]
    rows = torch.arange(ho, device=x.device).view(-1, 1) * kh
    cols = torch.arange(wo, device=x.device).view(1, -1) * kw
    return out, ((idx // w - rows) * kw + (idx % w - cols)).to(torch.uint8)


def _window_flat_index(pos: torch.Tensor, kernel: list[int], width: int) -> torch.Tensor:
    """Each window position `pos` (pooled shape) as its flat index in the input's H x W plane."""
    kh, kw = kernel
    ho, wo = pos.shape[-2:]
    k = pos.long()
    rows = torch.arange(ho, device=pos.device).view(-1, 1) * kh + k // kw
    cols = torch.arange(wo, device=pos.device).view(1, -1) * kw + k % kw
    return rows * width + cols


def max_pool2d_window_backward(grad: torch.Tensor, argmax: torch.Tensor, kernel: list[int],
                               input_size: list[int]) -> torch.Tensor:
    """The gradient at the pool's input: grad at each window's argmax position, 0 elsewhere."""
    h, w = input_size[-2:]
    planes = math.prod(input_size[:-2])
    out = grad.new_zeros((planes, h * w))
    out.scatter_(1, _window_flat_index(argmax, kernel, w).reshape(planes, -1), grad.reshape(planes, -1))
    return out.reshape(input_size)


def quantize_dequantize_max_pool2d(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
                                   kernel: list[int], act: Optional[tuple[float, float]] = None):
    """max_pool2d_window of quantize_dequantize(activation(x)): (pooled, window position of the maximum,
    the input value at that position)."""
    q = quantize_dequantize(x, scale, offset, qmin, qmax, 1.0, act)
    out, pos = max_pool2d_window(q, kernel)
    return out, pos, window_values(x, pos, kernel)


def window_values(x: torch.Tensor, pos: torch.Tensor, kernel: list[int]) -> torch.Tensor:
    """The element of x at each window's position `pos` (the pooled shape)."""
    flat = _window_flat_index(pos, kernel, x.shape[-1]).flatten(-2)
    return x.flatten(-2).gather(-1, flat).reshape(pos.shape)
