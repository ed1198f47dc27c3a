// Calibration statistics: the per-element bin rule of the histograms and the re-binning rule used
// when a histogram's range grows. Shared by the CPU loops and the CUDA kernels.
#pragma once
#include "pyquant/common.h"

namespace pq {

// Bin of x in [lo, lo + range) split into nbins equal bins, computed as torch.histc does:
// trunc((x - lo) * nbins / range), values below lo into bin 0 and at/above the top into the last.
// Callers pass finite x only.
PQ_HD int64_t hist_bin(float x, float lo, float range, float nbins_f, int64_t nbins) {
  const float t = ((x - lo) * nbins_f) / range;
  if (!(t > 0.0f)) return 0;  // also catches a zero range (t = NaN or inf is handled below)
  if (t >= nbins_f) return nbins - 1;
  const int64_t b = int64_t(t);
  return b < nbins ? b : nbins - 1;
}

PQ_HD bool is_finite(float x) { return (f32_bits(x) & 0x7f800000u) != 0x7f800000u; }

}  // namespace pq

namespace pq {

// ---- encoding search over histograms -------------------------------------------------------------
// A candidate encoding (d, o) on the unsigned grid 0..ns (real value of code q: (q + o) * d) is scored
// by the expected error of the histogram's bins, each bin's population placed at its centre:
//   q = rint(mid / d - o);  err = |(clamp(q, 0, ns) + o) * d - mid|^p * count,  times gamma if clipped.
// The per-bin term is float32; terms are summed in float64 in a fixed order (eight partial sums by
// bin index modulo 8, combined pairwise) so that every device gives the same total.

PQ_HD float bin_mid(float c0, float bw, int64_t i) { return c0 + bw * float(i); }

PQ_HD float noise_term(float mid, float cnt, float d, float o, float ns, float gamma, float p) {
  const float q = rintf(mid / d - o);
  const bool clipped = q < 0.0f || q > ns;
  float qc = q < 0.0f ? 0.0f : q;
  qc = qc > ns ? ns : qc;
  const float e = fabsf((qc + o) * d - mid);
  const float ep = p == 2.0f ? e * e : powf(e, p);
  const float t = ep * cnt;
  return clipped ? t * gamma : t;
}

PQ_HD double combine8(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// Total noise of one candidate over bins [begin, end) (mid/cnt indexed from 0 = begin's bin).
PQ_HD double candidate_noise(const float* mid, const float* cnt, int64_t n, float d, float o, float ns, float gamma,
                             float p) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) acc[i & 7] += double(noise_term(mid[i], cnt[i], d, o, ns, gamma, p));
  return combine8(acc);
}

// Squared-error terms of bins known to lie inside the grid (p = 2: no clamp, no gamma; the same
// float32 value as noise_term), summed in sixteen float32 partial sums (lane = index modulo 16) that
// are then added pairwise in float64. Every device follows this order exactly.
PQ_HD float inside_term(float mid, float cnt, float d, float o) {
  const float q = rintf(mid / d - o);
  const float e = (q + o) * d - mid;
  return (e * e) * cnt;
}

PQ_HD double combine16(const float* a) {
  double l[8];
  for (int k = 0; k < 8; ++k) l[k] = double(a[2 * k]) + double(a[2 * k + 1]);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

PQ_HD double inside_noise(const float* mid, const float* cnt, int64_t n, float d, float o) {
  float acc[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) acc[i & 15] += inside_term(mid[i], cnt[i], d, o);
  return combine16(acc);
}

}  // namespace pq

namespace pq {

// For p = 2 the clipped bins need not be visited one by one: below the grid every bin's value is
// (0 + o) * d and above it (ns + o) * d, so their squared errors follow from prefix sums of count,
// count*mid and count*mid^2. Only the bins inside the grid are summed term by term.
struct HistPrefix {
  const double* n;   // n[i]  = sum of counts of bins [0, i)
  const double* s1;  // s1[i] = sum of count * mid
  const double* s2;  // s2[i] = sum of count * mid^2
};

PQ_HD void build_prefix(const float* mid, const float* cnt, int64_t n, double* pn, double* ps1, double* ps2) {
  pn[0] = ps1[0] = ps2[0] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double c = cnt[i], m = mid[i];
    pn[i + 1] = pn[i] + c;
    ps1[i + 1] = ps1[i] + c * m;
    ps2[i + 1] = ps2[i] + c * m * m;
  }
}

// Where the bin centres of a histogram's non-empty span sit: mid[i] ~ mid0 + i / inv_bw, each within
// `tol` bins of that line (float32 rounding of c0 + bw * i, with a wide margin).
struct Span {
  double mid0, inv_bw, tol;
};

PQ_HD Span make_span(const float* mid, int64_t n) {
  Span sp;
  sp.mid0 = n > 0 ? double(mid[0]) : 0.0;
  const double w = n > 1 ? (double(mid[n - 1]) - double(mid[0])) / double(n - 1) : 1.0;
  sp.inv_bw = w > 0.0 ? 1.0 / w : 0.0;
  const double big = n > 0 ? fmax(fabs(double(mid[0])), fabs(double(mid[n - 1]))) : 0.0;
  sp.tol = 1e-3 + 64.0 * 1.1920928955078125e-07 * big * sp.inv_bw;
  return sp;
}

// First bin i in [a, n] whose code rint(mid[i] / d - o) is >= thr (codes grow with i). The bin is read
// off the span's line; only when the code boundary falls within `tol` of a bin centre are the codes
// themselves evaluated (rint is half-to-even, so ties are settled by the exact computation).
PQ_HD int64_t first_code_at_least(const float* mid, int64_t a, int64_t n, float d, float o, float thr, const Span& sp) {
  if (a >= n) return n;
  double est = sp.inv_bw > 0.0 ? ((double(thr) - 0.5 + double(o)) * double(d) - sp.mid0) * sp.inv_bw : 0.0;
  const double lo_b = double(a), hi_b = double(n);
  if (est <= lo_b - 1.0) return a;
  if (est >= hi_b) {
    if (est - (hi_b - 1.0) > sp.tol) return n;
    est = hi_b - 1.0;
  }
  const double c = ceil(est);
  int64_t i = int64_t(c);
  if (c - est > sp.tol && est - (c - 1.0) > sp.tol) return i < a ? a : (i > n ? n : i);
  i = i < a ? a : (i > n ? n : i);
  while (i > a && rintf(mid[i - 1] / d - o) >= thr) --i;
  while (i < n && !(rintf(mid[i] / d - o) >= thr)) ++i;
  return i;
}

PQ_HD double clipped_sq_error(const HistPrefix& P, int64_t a, int64_t b, float value) {
  if (b <= a) return 0.0;
  const double v = value;
  const double sn = P.n[b] - P.n[a], s1 = P.s1[b] - P.s1[a], s2 = P.s2[b] - P.s2[a];
  const double e = v * v * sn - 2.0 * v * s1 + s2;
  return e > 0.0 ? e : 0.0;
}

// Splits a p = 2 candidate into [0, lo) clipped low, [lo, hi) inside, [hi, n) clipped high, and
// returns gamma times the clipped error; the caller adds the inside bins' terms.
PQ_HD double clipped_noise(const float* mid, const HistPrefix& P, const Span& sp, int64_t n, float d, float o, float ns,
                           float gamma, int64_t* lo, int64_t* hi) {
  *lo = first_code_at_least(mid, 0, n, d, o, 0.0f, sp);
  *hi = first_code_at_least(mid, *lo, n, d, o, ns + 1.0f, sp);
  const double low = clipped_sq_error(P, 0, *lo, (0.0f + o) * d);
  const double high = clipped_sq_error(P, *hi, n, (ns + o) * d);
  return double(gamma) * low + double(gamma) * high;
}

}  // namespace pq

namespace pq {

// ---- KL-divergence (entropy) threshold search, TensorRT-style ---------------------------------------
// Natural log with the same float64 operations on every device (no libm), so KL totals agree bit
// for bit between the CPU and CUDA searches. Accurate to a few ulp for x > 0.
PQ_HD double det_log(double x) {
  uint64_t u;
#if defined(__CUDA_ARCH__)
  u = uint64_t(__double_as_longlong(x));
#else
  std::memcpy(&u, &x, 8);
#endif
  int64_t e = int64_t((u >> 52) & 0x7ff) - 1023;
  u = (u & 0x000fffffffffffffull) | 0x3ff0000000000000ull;  // mantissa in [1, 2)
  double m;
#if defined(__CUDA_ARCH__)
  m = __longlong_as_double((long long)u);
#else
  std::memcpy(&m, &u, 8);
#endif
  if (m > 1.4142135623730951) { m = m * 0.5; e += 1; }
  const double t = (m - 1.0) / (m + 1.0), t2 = t * t;
  double s = 1.0 / 23.0;
  s = s * t2 + 1.0 / 21.0;
  s = s * t2 + 1.0 / 19.0;
  s = s * t2 + 1.0 / 17.0;
  s = s * t2 + 1.0 / 15.0;
  s = s * t2 + 1.0 / 13.0;
  s = s * t2 + 1.0 / 11.0;
  s = s * t2 + 1.0 / 9.0;
  s = s * t2 + 1.0 / 7.0;
  s = s * t2 + 1.0 / 5.0;
  s = s * t2 + 1.0 / 3.0;
  s = s * t2 + 1.0;
  return 2.0 * t * s + double(e) * 0.6931471805599453;
}

// KL(P || Q) for clipping a histogram h[0..nb) after its first i bins, quantized to nq levels:
// P = h[0..i) with the counts beyond folded into bin i-1; Q spreads each of nq chunks of h[0..i)
// (i / nq bins each, the last takes the rest) evenly over the chunk's non-empty bins. Bins where P > 0
// and Q = 0 get Q = 1e-12 of the mass instead of an infinite divergence.
PQ_HD double kl_clip(const int64_t* h, int64_t nb, int64_t i, int64_t nq) {
  double total = 0.0, kept = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    total += double(h[b]);
    if (b < i) kept += double(h[b]);
  }
  if (total <= 0.0 || kept <= 0.0) return 0.0;
  const double outliers = total - kept;
  const int64_t m = i / nq;
  double kl = 0.0;
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t a = j * m, b = (j == nq - 1) ? i : (j + 1) * m;
    double chunk = 0.0;
    int64_t nz = 0;
    for (int64_t k = a; k < b; ++k) {
      chunk += double(h[k]);
      nz += h[k] > 0;
    }
    const double q_each = nz > 0 ? chunk / double(nz) / kept : 0.0;
    for (int64_t k = a; k < b; ++k) {
      double pk = double(h[k]);
      if (k == i - 1) pk += outliers;
      if (pk <= 0.0) continue;
      pk /= total;
      double qk = h[k] > 0 ? q_each : 0.0;
      if (qk <= 0.0) qk = 1e-12;
      kl += pk * (det_log(pk) - det_log(qk));
    }
  }
  return kl;
}

}  // namespace pq
