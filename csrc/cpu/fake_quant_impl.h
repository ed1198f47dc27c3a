// The CPU fake-quant loops, written once over an instruction-set wrapper `Isa` (simd.h) and
// included by one translation unit per SIMD level. Threads split the tensor into contiguous
// element ranges; each range is walked row by row so the scale lookup costs one division per
// row, not per element.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include "pyquant/fake_quant.h"
#include "pyquant/type_dispatch.h"
#include "kernel_table.h"
#include "parallel.h"
#include "simd.h"

namespace pq {
namespace PQ_ISA_NS {

using Isa = PQ_ISA_TYPE;
using cpu::pick_threads;
using cpu::parallel_ranges;
using cpu::walk;

// Outputs larger than this bypass the cache (streaming stores): they would not stay in it anyway
// and a regular store first reads the line it writes. Smaller ones are kept: in a training step the
// next layer reads them right away, and streaming 8-32 MB activations past the cache made the
// convolutions reading them slower (MobileNetV2's QAT step, profiled).
constexpr int64_t kStreamBytes = int64_t(64) << 20;

template <FqOp OP, bool ACT = false>
inline float op_scalar(float x, float s, float o, float qmin, float qmax, const ActClamp& act = ActClamp()) {
  if constexpr (ACT) x = act.apply(x);
  if constexpr (OP == FqOp::QDQ) return fake_quant_one(x, s, o, qmin, qmax);
  else if constexpr (OP == FqOp::Q) return quantize_one(x, s, o, qmin, qmax);
  else return dequantize_one(x, s, o);
}

template <class Tin, class Tout>
constexpr bool has_vec() {
  return Isa::W > 1 && VecType<Tin>::value && VecType<Tout>::value;
}

// ---------------------------------------------------------------- forward
// ACT: clamp x to the activation's range first (QDQ of a float input only).
template <FqOp OP, class Tin, class Tout, bool ACT>
void forward_typed(const Tin* x, Tout* y, const float* s, const float* o, float qmin, float qmax,
                   const QLayout& L, const ActClamp& act, int max_threads) {
  const int nt = pick_threads(L.numel, max_threads);
  const bool stream = L.numel * int64_t(sizeof(Tout)) >= kStreamBytes;
  parallel_ranges(L.numel, nt, [&](int, int64_t b, int64_t e) {
    walk(L, b, e, [&](int64_t off, int64_t n, int64_t k, bool per_elem) {
      const Tin* xp = x + off;
      Tout* yp = y + off;
      int64_t t = 0;
      if constexpr (has_vec<Tin, Tout>()) {
        using V = typename Isa::V;
        constexpr int W = Isa::W;
        const V lo = Isa::set1(qmin), hi = Isa::set1(qmax);
        const V alo = Isa::set1(act.lo), ahi = Isa::set1(act.hi);
        auto vop = [&](V xv, V sv, V ov) -> V {
          if constexpr (ACT) xv = Isa::clamp(xv, alo, ahi);
          if constexpr (OP == FqOp::DQ) return Isa::mul(Isa::add(xv, ov), sv);
          else if constexpr (OP == FqOp::Q) return quantize_vec<Isa>(xv, sv, ov, lo, hi);
          else return fake_quant_vec<Isa>(xv, sv, ov, lo, hi);
        };
        if (per_elem) {
          for (; t + W <= n; t += W)
            Isa::store(yp + t, vop(Isa::load(xp + t), Isa::load(s + k + t), Isa::load(o + k + t)));
        } else {
          const V sv = Isa::set1(s[k]), ov = Isa::set1(o[k]);
          const float sk = s[k], ok = o[k];
          if (stream) {
            constexpr uintptr_t align = W * sizeof(Tout);
            for (; t < n && (reinterpret_cast<uintptr_t>(yp + t) % align) != 0; ++t)
              Elem<Tout>::store(yp + t, op_scalar<OP, ACT>(Elem<Tin>::load(xp + t), sk, ok, qmin, qmax, act));
            for (; t + 2 * W <= n; t += 2 * W) {
              V a = Isa::load(xp + t), c = Isa::load(xp + t + W);
              Isa::stream(yp + t, vop(a, sv, ov));
              Isa::stream(yp + t + W, vop(c, sv, ov));
            }
            for (; t + W <= n; t += W) Isa::stream(yp + t, vop(Isa::load(xp + t), sv, ov));
          } else {
            for (; t + 2 * W <= n; t += 2 * W) {
              V a = Isa::load(xp + t), c = Isa::load(xp + t + W);
              Isa::store(yp + t, vop(a, sv, ov));
              Isa::store(yp + t + W, vop(c, sv, ov));
            }
            for (; t + W <= n; t += W) Isa::store(yp + t, vop(Isa::load(xp + t), sv, ov));
          }
        }
      }
      if (per_elem) {
        for (; t < n; ++t)
          Elem<Tout>::store(yp + t, op_scalar<OP, ACT>(Elem<Tin>::load(xp + t), s[k + t], o[k + t], qmin, qmax, act));
      } else {
        const float sk = s[k], ok = o[k];
        for (; t < n; ++t)
          Elem<Tout>::store(yp + t, op_scalar<OP, ACT>(Elem<Tin>::load(xp + t), sk, ok, qmin, qmax, act));
      }
    });
    if constexpr (Isa::W > 1) {
      if (stream) Isa::fence();
    }
  });
}

// ---------------------------------------------------------------- backward
// One pass: writes dx (when wanted) and accumulates ds/do per scale into a per-thread float64
// workspace `ws` of shape [threads][2][nscale], reduced at the end.
// ACT: x is the activation's input; ds/do see the clamped value and dx is also masked by the
// activation's gradient.
template <class T, bool NEED_DX, bool NEED_SO, bool ACT>
void backward_typed(const T* g, const T* x, T* dx, const float* s, const float* o, float qmin, float qmax,
                    const QLayout& L, const ActClamp& act, double* ws, float* ds, float* doff, float grad_scale,
                    int max_threads) {
  const int nt = pick_threads(L.numel, max_threads);
  const int64_t ns = L.nscale;
  const bool stream = NEED_DX && L.numel * int64_t(sizeof(T)) >= kStreamBytes;
  if (NEED_SO) std::fill(ws, ws + int64_t(nt) * 2 * ns, 0.0);
  parallel_ranges(L.numel, nt, [&](int tid, int64_t b, int64_t e) {
    double* wds = ws + int64_t(tid) * 2 * ns;
    double* wdo = wds + ns;
    walk(L, b, e, [&](int64_t off, int64_t n, int64_t k, bool per_elem) {
      const T* gp = g + off;
      const T* xp = x + off;
      T* dxp = NEED_DX ? dx + off : nullptr;
      int64_t t = 0;
      if constexpr (has_vec<T, T>()) {
        using V = typename Isa::V;
        constexpr int W = Isa::W;
        const V lo = Isa::set1(qmin), hi = Isa::set1(qmax), one = Isa::set1(1.0f);
        const V alo = Isa::set1(act.lo), ahi = Isa::set1(act.hi), zero = Isa::set1(0.0f);
        const bool hi_finite = act.hi < INFINITY;
        // Element terms for one vector; the same formulas as fake_quant_grad<ACT>.
        auto terms = [&](V gv, V xv, V sv, V ov, V& dxv, V& dsv, V& dov) {
          V xin = xv;
          if constexpr (ACT) xv = Isa::clamp(xv, alo, ahi);
          V tq = Isa::div(xv, sv);
          V r = Isa::rint(tq);
          V q = Isa::sub(r, ov);
          auto m = Isa::inside(q, lo, hi);
          V mf = Isa::mask_to_one(m);
          if constexpr (NEED_DX) {
            dxv = Isa::mul(gv, mf);
            if constexpr (ACT) dxv = Isa::select(Isa::act_passes(xin, alo, ahi, hi_finite), dxv, zero);
          }
          (void)xin;
          if constexpr (NEED_SO) {
            V qc = Isa::clamp(q, lo, hi);
            dsv = Isa::mul(gv, Isa::select(m, Isa::sub(r, tq), Isa::add(qc, ov)));
            dov = Isa::mul(Isa::mul(gv, sv), Isa::sub(one, mf));
          }
        };
        alignas(64) float tmp_s[W], tmp_o[W];
        if (per_elem) {
          for (; t + W <= n; t += W) {
            V dxv, dsv, dov;
            terms(Isa::load(gp + t), Isa::load(xp + t), Isa::load(s + k + t), Isa::load(o + k + t), dxv, dsv, dov);
            if constexpr (NEED_DX) Isa::store(dxp + t, dxv);
            if constexpr (NEED_SO) {
              Isa::to_array(tmp_s, dsv);
              Isa::to_array(tmp_o, dov);
              for (int l = 0; l < W; ++l) { wds[k + t + l] += tmp_s[l]; wdo[k + t + l] += tmp_o[l]; }
            }
          }
        } else {
          const V sv = Isa::set1(s[k]), ov = Isa::set1(o[k]);
          V acc_s = Isa::set1(0.0f), acc_o = Isa::set1(0.0f);
          // Float lanes are flushed into float64 every kFlush vectors to bound rounding error.
          constexpr int kFlush = 64;
          int since = 0;
          auto flush = [&]() {
            if constexpr (NEED_SO) {
              Isa::to_array(tmp_s, acc_s);
              Isa::to_array(tmp_o, acc_o);
              double a = 0.0, c = 0.0;
              for (int l = 0; l < W; ++l) { a += tmp_s[l]; c += tmp_o[l]; }
              wds[k] += a;
              wdo[k] += c;
              acc_s = Isa::set1(0.0f);
              acc_o = Isa::set1(0.0f);
            }
            since = 0;
          };
          constexpr uintptr_t align = W * sizeof(T);
          if (stream) {
            for (; t < n && (reinterpret_cast<uintptr_t>(dxp + t) % align) != 0; ++t) {
              FqGrad gr = fake_quant_grad<ACT>(Elem<T>::load(gp + t), Elem<T>::load(xp + t), s[k], o[k], qmin, qmax, act);
              Elem<T>::store(dxp + t, gr.dx);
              if constexpr (NEED_SO) { wds[k] += gr.ds; wdo[k] += gr.doff; }
            }
          }
          for (; t + W <= n; t += W) {
            V dxv, dsv, dov;
            terms(Isa::load(gp + t), Isa::load(xp + t), sv, ov, dxv, dsv, dov);
            if constexpr (NEED_DX) {
              if (stream) Isa::stream(dxp + t, dxv);
              else Isa::store(dxp + t, dxv);
            }
            if constexpr (NEED_SO) {
              acc_s = Isa::add(acc_s, dsv);
              acc_o = Isa::add(acc_o, dov);
              if (++since == kFlush) flush();
            }
          }
          if (since) flush();
        }
      }
      for (; t < n; ++t) {
        const int64_t kk = per_elem ? k + t : k;
        FqGrad gr = fake_quant_grad<ACT>(Elem<T>::load(gp + t), Elem<T>::load(xp + t), s[kk], o[kk], qmin, qmax, act);
        if constexpr (NEED_DX) Elem<T>::store(dxp + t, gr.dx);
        if constexpr (NEED_SO) { wds[kk] += gr.ds; wdo[kk] += gr.doff; }
      }
    });
    if constexpr (Isa::W > 1) {
      if (stream) Isa::fence();
    }
  });
  if (NEED_SO) {
    for (int64_t kk = 0; kk < ns; ++kk) {
      double a = 0.0, c = 0.0;
      for (int tt = 0; tt < nt; ++tt) { a += ws[int64_t(tt) * 2 * ns + kk]; c += ws[int64_t(tt) * 2 * ns + ns + kk]; }
      if (ds) ds[kk] = float(a * double(grad_scale));
      if (doff) doff[kk] = float(c * double(grad_scale));
    }
  }
}

// ---------------------------------------------------------------- entry points
const char* fake_quant_forward(const FakeQuantForwardArgs& a, int nt) {
  const ActClamp act = act_clamp(a);
  return dispatch_fq_op(a.op, [&](auto op) {
    constexpr FqOp OP = tag_type<decltype(op)>::value;
    return dispatch_dtype(AllTypes{}, a.xdt, [&](auto in) {
      using Tin = tag_type<decltype(in)>;
      return dispatch_dtype(AllTypes{}, a.ydt, [&](auto out) {
        using Tout = tag_type<decltype(out)>;
        const Tin* x = static_cast<const Tin*>(a.x);
        Tout* y = static_cast<Tout*>(a.y);
        // the activation is fused for QDQ of a float input into its own dtype only
        if constexpr (OP == FqOp::QDQ && VecType<Tin>::value && std::is_same_v<Tin, Tout>) {
          if (act.on()) return forward_typed<OP, Tin, Tout, true>(x, y, a.s, a.o, a.qmin, a.qmax, a.layout, act, nt);
        }
        forward_typed<OP, Tin, Tout, false>(x, y, a.s, a.o, a.qmin, a.qmax, a.layout, act, nt);
      });
    });
  });
}

template <class T, bool ACT>
void backward_a(const T* gp, const T* xp, T* dxp, const float* s, const float* o, float qmin, float qmax,
                const QLayout& L, const ActClamp& act, double* ws, float* ds, float* doff, float gs, int nt) {
  const bool so = ds != nullptr || doff != nullptr;
  if (dxp && so) backward_typed<T, true, true, ACT>(gp, xp, dxp, s, o, qmin, qmax, L, act, ws, ds, doff, gs, nt);
  else if (dxp) backward_typed<T, true, false, ACT>(gp, xp, dxp, s, o, qmin, qmax, L, act, ws, ds, doff, gs, nt);
  else if (so) backward_typed<T, false, true, ACT>(gp, xp, dxp, s, o, qmin, qmax, L, act, ws, ds, doff, gs, nt);
}

// Gradients exist for float types only.
const char* fake_quant_backward(const FakeQuantBackwardArgs& a, int nt) {
  const ActClamp act = act_clamp(a);
  return dispatch_dtype(FloatTypes{}, a.dt, [&](auto tag) {
    using T = tag_type<decltype(tag)>;
    const T* g = static_cast<const T*>(a.g);
    const T* x = static_cast<const T*>(a.x);
    T* dx = static_cast<T*>(a.dx);
    if (act.on())
      backward_a<T, true>(g, x, dx, a.s, a.o, a.qmin, a.qmax, a.layout, act, a.ws, a.ds, a.doff, a.grad_scale, nt);
    else
      backward_a<T, false>(g, x, dx, a.s, a.o, a.qmin, a.qmax, a.layout, act, a.ws, a.ds, a.doff, a.grad_scale, nt);
  });
}

}  // namespace PQ_ISA_NS
}  // namespace pq
