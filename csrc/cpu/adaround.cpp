// CPU AdaRound kernels (one build, no SIMD variants: the per-element sigmoid in double dominates and
// the weights AdaRound works on are small).
#include <algorithm>
#include <vector>
#include "parallel.h"
#include "pyquant/cpu_api.h"
#include "pyquant/adaround.h"

namespace pq {
namespace cpu {

void adaround_forward(const AdaroundForwardArgs& args, int threads) {
  const float *w = args.w, *alpha = args.a, *s = args.s, *o = args.o;
  float* y = args.y;
  const int64_t row_len = args.row_len, nscale = args.nscale;
  const float qmin = args.qmin, qmax = args.qmax;
  const bool hard = args.hard;
  const int64_t n = args.rows * row_len;
  parallel_ranges(n, pick_threads(n, threads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t k = nscale == 1 ? 0 : i / row_len;
      y[i] = ada_weight(w[i], alpha[i], s[k], o[k], qmin, qmax, hard);
    }
  });
}

void adaround_backward(const AdaroundBackwardArgs& args, int threads) {
  const float *g = args.g, *w = args.w, *alpha = args.a, *s = args.s, *o = args.o;
  float* dalpha = args.da;
  const int64_t row_len = args.row_len, nscale = args.nscale;
  const float qmin = args.qmin, qmax = args.qmax;
  const int64_t n = args.rows * row_len;
  parallel_ranges(n, pick_threads(n, threads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t k = nscale == 1 ? 0 : i / row_len;
      dalpha[i] = ada_weight_grad(g[i], w[i], alpha[i], s[k], o[k], qmin, qmax);
    }
  });
}

double adaround_regularizer(const AdaroundRegularizerArgs& args, int threads) {
  const float* alpha = args.a;
  const int64_t n = args.n;
  const float beta = args.beta;
  float* grad = args.grad;
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
