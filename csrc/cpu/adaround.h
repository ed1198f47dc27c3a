// CPU AdaRound kernels (one build, no SIMD variants: the per-element sigmoid in double dominates and
// the weights AdaRound works on are small). Weights are [rows, row_len] row-major; `nscale` is 1
// (one encoding) or rows (one per output channel).
#pragma once
#include <cstdint>

namespace pq {
namespace cpu {

void adaround_forward(const float* w, const float* alpha, float* y, const float* s, const float* o, int64_t rows,
                      int64_t row_len, int64_t nscale, float qmin, float qmax, bool hard, int threads);
void adaround_backward(const float* g, const float* w, const float* alpha, float* dalpha, const float* s,
                       const float* o, int64_t rows, int64_t row_len, int64_t nscale, float qmin, float qmax,
                       int threads);
// Returns sum(1 - |2h - 1|^beta) (summed in double, in a fixed order per thread count) and writes its
// gradient in alpha.
double adaround_regularizer(const float* alpha, int64_t n, float beta, float* grad, int threads);

}  // namespace cpu
}  // namespace pq
