// CPU calibration statistics (min/max, histograms), written once over an instruction-set wrapper
// and included by one translation unit per SIMD level, like fake_quant_impl.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>
#include "parallel.h"
#include "pyquant/stats.h"
#include "pyquant/type_dispatch.h"
#include "kernel_table.h"
#include "simd.h"

namespace pq {
namespace PQ_ISA_NS {

using Isa = PQ_ISA_TYPE;

template <class T>
constexpr bool vec_ok() {
  return Isa::W > 1 && VecType<T>::value;
}

// ---------------------------------------------------------------- min/max
template <class T>
void minmax_typed(const T* x, const QLayout& L, float* mn, float* mx, int64_t* nonfinite, float* ws_f,
                  int64_t* ws_i, int max_threads) {
  const int nt = cpu::pick_threads(L.numel, max_threads);
  const int64_t ns = L.nscale;
  const float inf = std::numeric_limits<float>::infinity();
  for (int t = 0; t < nt; ++t) {
    std::fill(ws_f + int64_t(t) * 2 * ns, ws_f + int64_t(t) * 2 * ns + ns, inf);
    std::fill(ws_f + int64_t(t) * 2 * ns + ns, ws_f + int64_t(t) * 2 * ns + 2 * ns, -inf);
    std::fill(ws_i + int64_t(t) * ns, ws_i + int64_t(t) * ns + ns, int64_t(0));
  }
  cpu::parallel_ranges(L.numel, nt, [&](int tid, int64_t b, int64_t e) {
    float* tmn = ws_f + int64_t(tid) * 2 * ns;
    float* tmx = tmn + ns;
    int64_t* tnf = ws_i + int64_t(tid) * ns;
    cpu::walk(L, b, e, [&](int64_t off, int64_t n, int64_t k, bool per_elem) {
      const T* xp = x + off;
      int64_t t = 0;
      if constexpr (vec_ok<T>()) {
        using V = typename Isa::V;
        constexpr int W = Isa::W;
        const V pinf = Isa::set1(inf), ninf = Isa::set1(-inf);
        if (per_elem) {
          for (; t + W <= n; t += W) {
            V v = Isa::load(xp + t);
            auto fin = Isa::finite(v);
            Isa::store(tmn + k + t, Isa::min(Isa::load(tmn + k + t), Isa::select(fin, v, pinf)));
            Isa::store(tmx + k + t, Isa::max(Isa::load(tmx + k + t), Isa::select(fin, v, ninf)));
            const unsigned bad = ~Isa::bits(fin);
            if (bad & ((1u << W) - 1u))
              for (int l = 0; l < W; ++l) tnf[k + t + l] += (bad >> l) & 1u;
          }
        } else {
          V vmn0 = pinf, vmx0 = ninf, vmn1 = pinf, vmx1 = ninf;
          int64_t bad = 0;
          for (; t + 2 * W <= n; t += 2 * W) {
            V a = Isa::load(xp + t), c = Isa::load(xp + t + W);
            auto fa = Isa::finite(a), fc = Isa::finite(c);
            vmn0 = Isa::min(vmn0, Isa::select(fa, a, pinf));
            vmx0 = Isa::max(vmx0, Isa::select(fa, a, ninf));
            vmn1 = Isa::min(vmn1, Isa::select(fc, c, pinf));
            vmx1 = Isa::max(vmx1, Isa::select(fc, c, ninf));
            bad += Isa::count_false(fa) + Isa::count_false(fc);
          }
          for (; t + W <= n; t += W) {
            V a = Isa::load(xp + t);
            auto fa = Isa::finite(a);
            vmn0 = Isa::min(vmn0, Isa::select(fa, a, pinf));
            vmx0 = Isa::max(vmx0, Isa::select(fa, a, ninf));
            bad += Isa::count_false(fa);
          }
          const float m0 = Isa::hmin(Isa::min(vmn0, vmn1)), m1 = Isa::hmax(Isa::max(vmx0, vmx1));
          tmn[k] = m0 < tmn[k] ? m0 : tmn[k];
          tmx[k] = m1 > tmx[k] ? m1 : tmx[k];
          tnf[k] += bad;
        }
      }
      for (; t < n; ++t) {
        const float v = Elem<T>::load(xp + t);
        const int64_t kk = per_elem ? k + t : k;
        if (is_finite(v)) {
          tmn[kk] = v < tmn[kk] ? v : tmn[kk];
          tmx[kk] = v > tmx[kk] ? v : tmx[kk];
        } else {
          tnf[kk] += 1;
        }
      }
    });
  });
  for (int64_t k = 0; k < ns; ++k) {
    float a = inf, c = -inf;
    int64_t bad = 0;
    for (int t = 0; t < nt; ++t) {
      a = std::min(a, ws_f[int64_t(t) * 2 * ns + k]);
      c = std::max(c, ws_f[int64_t(t) * 2 * ns + ns + k]);
      bad += ws_i[int64_t(t) * ns + k];
    }
    mn[k] = a;
    mx[k] = c;
    nonfinite[k] = bad;
  }
}

// ---------------------------------------------------------------- histograms
// Counts one run of elements of group k into hist (nbins entries, COPIES interleaved copies at
// stride `cstride`: consecutive equal bins then do not wait on each other's increment).
template <class T, int COPIES, class C = int64_t>
inline void hist_run(const T* xp, int64_t n, float lo, float range, int64_t nbins, C* hist, int64_t cstride) {
  const float nbf = float(nbins);
  int64_t t = 0;
  if constexpr (vec_ok<T>()) {
    using V = typename Isa::V;
    constexpr int W = Isa::W;
    const V vlo = Isa::set1(lo), vnb = Isa::set1(nbf), vr = Isa::set1(range), zero = Isa::set1(0.0f),
            top = Isa::set1(nbf - 1.0f);
    alignas(64) int32_t idx[W];
    for (; t + W <= n; t += W) {
      V v = Isa::load(xp + t);
      auto fin = Isa::finite(v);
      V pos = Isa::div(Isa::mul(Isa::sub(v, vlo), vnb), vr);
      pos = Isa::min(Isa::max(pos, zero), top);  // hist_bin's clamps; NaN lanes are masked below
      Isa::to_int_array(idx, pos);
      const unsigned ok = Isa::bits(fin);
      if (ok == (1u << W) - 1u) {
        for (int l = 0; l < W; ++l) hist[(l % COPIES) * cstride + idx[l]] += 1;
      } else {
        for (int l = 0; l < W; ++l)
          if ((ok >> l) & 1u) hist[(l % COPIES) * cstride + idx[l]] += 1;
      }
    }
  }
  for (; t < n; ++t) {
    const float v = Elem<T>::load(xp + t);
    if (is_finite(v)) hist[(t % COPIES) * cstride + hist_bin(v, lo, range, nbf, nbins)] += 1;
  }
}

template <class T>
void histogram_typed(const T* x, const QLayout& L, const float* lo, const float* range, int64_t nbins,
                     int64_t* counts, int64_t* ws, int64_t ws_len, int max_threads) {
  const int64_t ns = L.nscale;
  const int64_t entries = ns * nbins;
  constexpr int kCopies = 4;  // hist_run's interleaved copies (the scratch below assumes 4)
  int nt = cpu::pick_threads(L.numel, max_threads);
  if (ws != nullptr && ws_len >= int64_t(nt) * kCopies * entries) {
    // Private mode: threads split the elements and count into their own copies.
    std::fill(ws, ws + int64_t(nt) * kCopies * entries, int64_t(0));
    cpu::parallel_ranges(L.numel, nt, [&](int tid, int64_t b, int64_t e) {
      int64_t* mine = ws + int64_t(tid) * kCopies * entries;
      cpu::walk(L, b, e, [&](int64_t off, int64_t n, int64_t k, bool per_elem) {
        if (per_elem) {
          for (int64_t t = 0; t < n; ++t)
            hist_run<T, 1>(x + off + t, 1, lo[k + t], range[k + t], nbins, mine + (k + t) * nbins, entries);
        } else {
          hist_run<T, kCopies>(x + off, n, lo[k], range[k], nbins, mine + k * nbins, entries);
        }
      });
    });
    cpu::parallel_split(entries, std::min<int>(nt, int(std::max<int64_t>(1, entries / 4096))),
                        [&](int, int64_t a, int64_t b) {
                          for (int64_t i = a; i < b; ++i) {
                            int64_t s = 0;
                            for (int t = 0; t < nt * kCopies; ++t) s += ws[int64_t(t) * entries + i];
                            counts[i] = s;
                          }
                        });
    return;
  }
  // Ownership mode: each thread takes a range of groups and counts straight into `counts`.
  nt = int(std::min<int64_t>(nt, ns));
  cpu::parallel_split(ns, nt, [&](int, int64_t k0, int64_t k1) {
    std::fill(counts + k0 * nbins, counts + k1 * nbins, int64_t(0));
    constexpr int kRowCopies = 2;  // int32 scratch per long run, folded into the int64 counts
    std::vector<int32_t> scratch(size_t(kRowCopies * nbins));
    cpu::walk_groups(L, k0, k1, [&](int64_t off, int64_t n, int64_t k, bool per_elem) {
      if (per_elem) {
        for (int64_t t = 0; t < n; ++t)
          hist_run<T, 1>(x + off + t, 1, lo[k + t], range[k + t], nbins, counts + (k + t) * nbins, 0);
      } else if (lo[k] == 0.0f && n >= 4 * nbins && n < (int64_t(1) << 31)) {
        // A range starting at exactly 0 is rectified data: its zeros pile into bin 0, and increments
        // of one counter would wait on each other, so they alternate between two copies.
        std::fill(scratch.begin(), scratch.end(), int32_t(0));
        hist_run<T, kRowCopies, int32_t>(x + off, n, lo[k], range[k], nbins, scratch.data(), nbins);
        int64_t* dst = counts + k * nbins;
        for (int64_t b = 0; b < nbins; ++b) dst[b] += int64_t(scratch[b]) + int64_t(scratch[nbins + b]);
      } else {
        hist_run<T, 1>(x + off, n, lo[k], range[k], nbins, counts + k * nbins, 0);
      }
    });
  });
}

// ---------------------------------------------------------------- encoding search
// The vector path computes the same float32 terms as noise_term and adds them into the same eight
// float64 partial sums (lane = bin index modulo 8), so it returns candidate_noise's exact value.
inline double noise_vec(const float* mid, const float* cnt, int64_t n, float d, float o, float ns, float gamma,
                        float p) {
  if constexpr (Isa::W >= 8) {
    if (p == 2.0f) {
      using V = typename Isa::V;
      constexpr int W = Isa::W;
      const V vd = Isa::set1(d), vo = Isa::set1(o), vns = Isa::set1(ns), zero = Isa::set1(0.0f),
              vg = Isa::set1(gamma);
      alignas(64) double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      alignas(64) float term[W];
      int64_t i = 0;
      auto dacc = Isa::dzero();
      for (; i + W <= n; i += W) {
        V m = Isa::load(mid + i);
        V q = Isa::rint(Isa::sub(Isa::div(m, vd), vo));
        auto inside = Isa::inside(q, zero, vns);
        V qc = Isa::clamp(q, zero, vns);
        V e = Isa::sub(Isa::mul(Isa::add(qc, vo), vd), m);
        V t = Isa::mul(Isa::mul(e, e), Isa::load(cnt + i));
        t = Isa::select(inside, t, Isa::mul(t, vg));
        dacc = Isa::dadd8(dacc, t);
      }
      Isa::dstore8(acc, dacc);
      for (; i < n; ++i) acc[i & 7] += double(noise_term(mid[i], cnt[i], d, o, ns, gamma, p));
      (void)term;
      return combine8(acc);
    }
  }
  return candidate_noise(mid, cnt, n, d, o, ns, gamma, p);
}

// inside_noise (stats.h) with vectors: the same float32 terms into the same sixteen float32 lanes.
inline double inside_noise_vec(const float* mid, const float* cnt, int64_t n, float d, float o) {
  if constexpr (Isa::W >= 8) {
    using V = typename Isa::V;
    constexpr int W = Isa::W;
    constexpr int R = 16 / W;  // vectors per 16 lanes
    const V vd = Isa::set1(d), vo = Isa::set1(o);
    V acc[R];
    for (int k = 0; k < R; ++k) acc[k] = Isa::set1(0.0f);
    auto step = [&](int64_t i, int k, int count) {
      // masked lanes load mid = cnt = 0, whose term is exactly 0: the lane sums are unchanged
      V m = count == W ? Isa::load(mid + i + k * W) : Isa::load_partial(mid + i + k * W, count);
      V c = count == W ? Isa::load(cnt + i + k * W) : Isa::load_partial(cnt + i + k * W, count);
      V q = Isa::rint(Isa::sub(Isa::div(m, vd), vo));
      V e = Isa::sub(Isa::mul(Isa::add(q, vo), vd), m);
      acc[k] = Isa::add(acc[k], Isa::mul(Isa::mul(e, e), c));
    };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      for (int k = 0; k < R; ++k) step(i, k, W);
    if (i < n) {
      const int rem = int(n - i);
      for (int k = 0; k < R; ++k) {
        const int cnt_k = rem - k * W;
        if (cnt_k > 0) step(i, k, cnt_k < W ? cnt_k : W);
      }
    }
    alignas(64) float lanes[16];
    for (int k = 0; k < R; ++k) Isa::to_array(lanes + k * W, acc[k]);
    return combine16(lanes);
  }
  return inside_noise(mid, cnt, n, d, o);
}

void search(const SearchArgs& a, int max_threads) {
  const int64_t* counts = a.counts;
  const int64_t G = a.G, nb = a.nbins, C = a.C;
  const float* c0 = a.c0;
  const float* bw = a.bw;
  const float* cand_d = a.cand_d;
  const float* cand_o = a.cand_o;
  const float ns = a.ns, gamma = a.gamma, p = a.p;
  int64_t* best_idx = a.best_idx;
  double* best_noise = a.best_noise;
  const int64_t work = G * C * nb;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>({int64_t(max_threads), G, work / 100000 + 1})));
  cpu::parallel_split(G, nt, [&](int, int64_t g0, int64_t g1) {
    std::vector<float> mid(size_t(nb) + 64), cnt(size_t(nb) + 64);
    std::vector<double> pn(size_t(nb) + 1), ps1(size_t(nb) + 1), ps2(size_t(nb) + 1);
    const HistPrefix P{pn.data(), ps1.data(), ps2.data()};
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t* h = counts + g * nb;
      int64_t first = 0, last = nb;  // bins outside [first, last) are empty and add nothing
      while (first < nb && h[first] == 0) ++first;
      while (last > first && h[last - 1] == 0) --last;
      const int64_t n = last - first;
      for (int64_t i = 0; i < n; ++i) {
        mid[i] = bin_mid(c0[g], bw[g], first + i);
        cnt[i] = float(h[first + i]);
      }
      if (p == 2.0f) build_prefix(mid.data(), cnt.data(), n, pn.data(), ps1.data(), ps2.data());
      const Span sp = make_span(mid.data(), n);
      int64_t bi = 0;
      double bn = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const float d = cand_d[g * C + c], o = cand_o[g * C + c];
        double v;
        if (p == 2.0f) {
          int64_t lo, hi;
          const double clip = clipped_noise(mid.data(), P, sp, n, d, o, ns, gamma, &lo, &hi);
          if (c > 0 && !(clip < bn)) continue;  // the inside bins only add: cannot beat the best
          v = inside_noise_vec(mid.data() + lo, cnt.data() + lo, hi - lo, d, o) + clip;
        } else {
          v = noise_vec(mid.data(), cnt.data(), n, d, o, ns, gamma, p);
        }
        if (c == 0 || v < bn) { bn = v; bi = c; }
      }
      best_idx[g] = bi;
      best_noise[g] = bn;
    }
  });
}

// Statistics are taken of float data only.
const char* minmax(const MinmaxCpuArgs& a, int nt) {
  return dispatch_dtype(FloatTypes{}, a.dt, [&](auto tag) {
    using T = tag_type<decltype(tag)>;
    minmax_typed<T>(static_cast<const T*>(a.x), a.layout, a.mn, a.mx, a.nonfinite, a.ws_f, a.ws_i, nt);
  });
}

const char* histogram(const HistogramCpuArgs& a, int nt) {
  return dispatch_dtype(FloatTypes{}, a.dt, [&](auto tag) {
    using T = tag_type<decltype(tag)>;
    histogram_typed<T>(static_cast<const T*>(a.x), a.layout, a.lo, a.range, a.nbins, a.counts, a.ws, a.ws_len, nt);
  });
}

}  // namespace PQ_ISA_NS
}  // namespace pq
