// Non-overlapping 2-d max pooling (kernel == stride, no padding, floor), forward and backward, for a
// quantizer followed by a max pool: the forward can pool the fake quantization of its input in the same
// pass. Compiled once per SIMD level (2x2 windows use that level's vectors); threads split the planes.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include "kernel_table.h"
#include "parallel.h"
#include "simd.h"
#include "pyquant/fake_quant.h"

namespace pq {
namespace PQ_ISA_NS {

using Isa = PQ_ISA_TYPE;

// aten's rule, in window scan order: a value replaces the running maximum when it is larger or NaN
// (so the first of equal maxima wins, and the last NaN).
inline void take(float v, uint8_t pos, float& m, uint8_t& k) {
  const bool u = (v > m) | (v != v);
  m = u ? v : m;
  k = u ? pos : k;
}

// What the pool compares: the input itself, or (QDQ) its fake quantization after the activation clamp,
// the same float32 arithmetic as the fake-quant kernels. With QDQ the pool also returns the input
// value the maximum came from (`sel`), which is all the quantizer's backward needs.
template <bool QDQ>
struct Elementwise {
  float s = 1.0f, o = 0.0f, qmin = 0.0f, qmax = 0.0f;
  ActClamp act;
  float one(float v) const {
    if constexpr (QDQ) return fake_quant_one(act.apply(v), s, o, qmin, qmax);
    else return v;
  }
  typename Isa::V vec(typename Isa::V v) const {
    if constexpr (QDQ) {
      v = Isa::clamp(v, Isa::set1(act.lo), Isa::set1(act.hi));
      return fake_quant_vec<Isa>(v, Isa::set1(s), Isa::set1(o), Isa::set1(qmin), Isa::set1(qmax));
    } else {
      return v;
    }
  }
};

// Vectors of L pooled outputs; a row's last, shorter run uses masked loads and stores (pooled rows
// are often shorter than a vector: 14, 7, 3 outputs in a small CNN).
template <bool QDQ>
void pool_plane_2x2(const float* x, int64_t W, int64_t Ho, int64_t Wo, const Elementwise<QDQ>& f, float* out,
                    uint8_t* arg, float* sel) {
  for (int64_t i = 0; i < Ho; ++i) {
    const float* r0 = x + (2 * i) * W;
    const float* r1 = r0 + W;
    float* o = out + i * Wo;
    uint8_t* a = arg + i * Wo;
    float* sl = QDQ ? sel + i * Wo : nullptr;
    if constexpr (Isa::W > 1) {
      using V = typename Isa::V;
      constexpr int L = Isa::W;
      const V p1 = Isa::set1(1.0f), p2 = Isa::set1(2.0f), p3 = Isa::set1(3.0f);
      alignas(64) uint8_t tmp[L];
      for (int64_t j = 0; j < Wo; j += L) {
        const int n = int(Wo - j < L ? Wo - j : L);  // outputs in this run
        const int c0 = 2 * n < L ? 2 * n : L, c1 = 2 * n - c0;
        V e0, o0, e1, o1;
        Isa::deinterleave(Isa::load_partial(r0 + 2 * j, c0), Isa::load_partial(r0 + 2 * j + L, c1), e0, o0);
        Isa::deinterleave(Isa::load_partial(r1 + 2 * j, c0), Isa::load_partial(r1 + 2 * j + L, c1), e1, o1);
        V m = Isa::set1(-INFINITY), k = Isa::set1(0.0f), xs = Isa::set1(0.0f);
        auto upd = [&](V v, V pos) {
          const V fv = f.vec(v);
          const auto u = Isa::gt_or_nan(fv, m);
          m = Isa::select(u, fv, m);
          k = Isa::select(u, pos, k);
          if constexpr (QDQ) xs = Isa::select(u, v, xs);
        };
        upd(e0, k);
        xs = e0;  // the first element is taken unless it is -inf, and then nothing larger may follow
        upd(o0, p1);
        upd(e1, p2);
        upd(o1, p3);
        if (n == L) {
          Isa::store(o + j, m);
          Isa::store_u8(a + j, k);
          if constexpr (QDQ) Isa::store(sl + j, xs);
        } else {
          Isa::store_partial(o + j, m, n);
          Isa::store_u8(tmp, k);
          for (int t = 0; t < n; ++t) a[j + t] = tmp[t];
          if constexpr (QDQ) Isa::store_partial(sl + j, xs, n);
        }
      }
    } else {
      for (int64_t j = 0; j < Wo; ++j) {
        const float v[4] = {r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]};
        float m = -INFINITY;
        uint8_t k = 0;
        for (int t = 0; t < 4; ++t) take(f.one(v[t]), uint8_t(t), m, k);
        o[j] = m;
        a[j] = k;
        if constexpr (QDQ) sl[j] = v[k];
      }
    }
  }
}

template <bool QDQ>
void pool_plane(const float* x, int64_t W, int64_t Ho, int64_t Wo, int kh, int kw, const Elementwise<QDQ>& f,
                float* out, uint8_t* arg, float* sel) {
  for (int64_t i = 0; i < Ho; ++i) {
    for (int64_t j = 0; j < Wo; ++j) {
      float m = -INFINITY;
      uint8_t k = 0;
      const float* w0 = x + (i * kh) * W + j * kw;
      for (int r = 0; r < kh; ++r)
        for (int c = 0; c < kw; ++c) take(f.one(w0[r * W + c]), uint8_t(r * kw + c), m, k);
      out[i * Wo + j] = m;
      arg[i * Wo + j] = k;
      if constexpr (QDQ) sel[i * Wo + j] = w0[(k / kw) * W + k % kw];
    }
  }
}

template <bool QDQ>
void pool_planes(const float* x, int64_t P, int64_t H, int64_t W, int kh, int kw, Elementwise<QDQ> f,
                 const float* s, const float* o, int64_t channels, float* out, uint8_t* arg, float* sel,
                 int max_threads) {
  const int64_t Ho = H / kh, Wo = W / kw;
  const int nt = cpu::pick_threads(P * H * W, max_threads);
  cpu::parallel_ranges(P, nt, [&](int, int64_t b, int64_t e) {
    Elementwise<QDQ> fp = f;
    for (int64_t p = b; p < e; ++p) {
      if constexpr (QDQ) {  // one scale per tensor, or per channel (planes cycle through the channels)
        const int64_t c = channels > 1 ? p % channels : 0;
        fp.s = s[c];
        fp.o = o[c];
      }
      const float* xp = x + p * H * W;
      float* slp = QDQ ? sel + p * Ho * Wo : nullptr;
      if (kh == 2 && kw == 2) pool_plane_2x2<QDQ>(xp, W, Ho, Wo, fp, out + p * Ho * Wo, arg + p * Ho * Wo, slp);
      else pool_plane<QDQ>(xp, W, Ho, Wo, kh, kw, fp, out + p * Ho * Wo, arg + p * Ho * Wo, slp);
    }
  });
}

void max_pool_forward(const MaxPoolForwardArgs& a, int max_threads) {
  pool_planes<false>(a.x, a.planes, a.height, a.width, a.kh, a.kw, Elementwise<false>(), nullptr, nullptr, 1, a.out,
                     a.argmax, nullptr, max_threads);
}

void qdq_max_pool_forward(const QdqMaxPoolForwardArgs& a, int max_threads) {
  Elementwise<true> f;
  f.qmin = a.qmin;
  f.qmax = a.qmax;
  f.act = act_clamp(a);
  pool_planes<true>(a.x, a.planes, a.height, a.width, a.kh, a.kw, f, a.s, a.o, a.channels, a.out, a.argmax, a.sel,
                    max_threads);
}

// The plane is zeroed (a fast fill) and each gradient stored at its maximum's position. Writing the window
// rows as interleaved vectors measured slower, for short and long rows alike. KW > 0: the window width
// known at compile time (2x2 windows), so the position splits without a division.
template <int KW>
void unpool_plane(const float* g, const uint8_t* arg, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int kh, int kw,
                  float* dx) {
  if constexpr (KW > 0) kw = KW;
  std::fill(dx, dx + H * W, 0.0f);
  for (int64_t i = 0; i < Ho; ++i)
    for (int64_t j = 0; j < Wo; ++j) {
      const int k = arg[i * Wo + j];
      if (k < kh * kw) dx[(i * kh + k / kw) * W + j * kw + k % kw] = g[i * Wo + j];  // never outside the window
    }
}

void max_pool_backward(const MaxPoolBackwardArgs& a, int max_threads) {
  const float* g = a.g;
  const uint8_t* arg = a.argmax;
  float* dx = a.dx;
  const int64_t P = a.planes, H = a.height, W = a.width;
  const int kh = a.kh, kw = a.kw;
  const int64_t Ho = H / kh, Wo = W / kw;
  const int nt = cpu::pick_threads(P * H * W, max_threads);
  cpu::parallel_ranges(P, nt, [&](int, int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      if (kh == 2 && kw == 2) unpool_plane<2>(g + p * Ho * Wo, arg + p * Ho * Wo, H, W, Ho, Wo, 2, 2, dx + p * H * W);
      else unpool_plane<0>(g + p * Ho * Wo, arg + p * Ho * Wo, H, W, Ho, Wo, kh, kw, dx + p * H * W);
    }
  });
}

}  // namespace PQ_ISA_NS
}  // namespace pq
