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
