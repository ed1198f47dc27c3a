#include "adaround.h"
#include <algorithm>
#include <vector>
#include "parallel.h"
#include "pyquant/adaround.h"

namespace pq {
namespace cpu {

void adaround_forward(const float* w, const float* alpha, float* y, const float* s, const float* o, int64_t rows,
                      int64_t row_len, int64_t nscale, float qmin, float qmax, bool hard, int threads) {
  const int64_t n = rows * row_len;
  parallel_ranges(n, pick_threads(n, threads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t k = nscale == 1 ? 0 : i / row_len;
      y[i] = ada_weight(w[i], alpha[i], s[k], o[k], qmin, qmax, hard);
    }
  });
}

void adaround_backward(const float* g, const float* w, const float* alpha, float* dalpha, const float* s,
                       const float* o, int64_t rows, int64_t row_len, int64_t nscale, float qmin, float qmax,
                       int threads) {
  const int64_t n = rows * row_len;
  parallel_ranges(n, pick_threads(n, threads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t k = nscale == 1 ? 0 : i / row_len;
      dalpha[i] = ada_weight_grad(g[i], w[i], alpha[i], s[k], o[k], qmin, qmax);
    }
  });
}

double adaround_regularizer(const float* alpha, int64_t n, float beta, float* grad, int threads) {
  const int nt = pick_threads(n, threads);
  std::vector<double> part(size_t(std::max(nt, 1)), 0.0);
  parallel_ranges(n, nt, [&](int tid, int64_t b, int64_t e) {
    double acc = 0.0;
    for (int64_t i = b; i < e; ++i) {
      const AdaReg r = ada_reg(alpha[i], beta);
      acc += r.value;
      grad[i] = r.grad;
    }
    part[size_t(tid)] = acc;
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

}  // namespace cpu
}  // namespace pq
