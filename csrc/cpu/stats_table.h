// The CPU statistics entry points of one SIMD level (minmax.cpp / histogram.cpp per level).
#pragma once
#include "pyquant/fake_quant.h"

namespace pq {

struct StatsTable {
  // Per scale group: min and max over finite elements (+inf/-inf when there is none) and the
  // number of non-finite elements. ws_f: threads * 2 * nscale floats, ws_i: threads * nscale.
  void (*minmax)(const void* x, DType dt, const QLayout& L, float* mn, float* mx, int64_t* nonfinite,
                 float* ws_f, int64_t* ws_i, int max_threads);
  // counts[k * nbins + b] = number of finite x of group k with hist_bin(x, lo[k], range[k]) = b. With a
  // workspace of at least threads * nscale * nbins entries the threads count privately; without,
  // they split the groups between them.
  void (*histogram)(const void* x, DType dt, const QLayout& L, const float* lo, const float* range,
                    int64_t nbins, int64_t* counts, int64_t* ws, int64_t ws_len, int max_threads);
  // For each of G histograms (counts[G, nbins], bin centres c0[g] + bw[g] * i) and its C candidates
  // (cand_d, cand_o: [G, C]), the index and noise of the best candidate (first of equal minima).
  void (*search)(const int64_t* counts, int64_t G, int64_t nbins, const float* c0, const float* bw,
                 const float* cand_d, const float* cand_o, int64_t C, float ns, float gamma, float p,
                 int64_t* best_idx, double* best_noise, int max_threads);
};

const StatsTable& stats_table_scalar();
const StatsTable& stats_table_avx2();
const StatsTable& stats_table_avx512();
const StatsTable& stats_table();  // the selected level (dispatch.cpp)

// For each of G histograms (counts[G, nb]) the clip point i in [nq, nb] with the least KL divergence
// (kl_clip in stats.h) and that divergence (entropy.cpp).
void entropy_search_cpu(const int64_t* counts, int64_t G, int64_t nb, int64_t nq, int64_t* best_i, double* best_kl,
                        int max_threads);

}  // namespace pq
