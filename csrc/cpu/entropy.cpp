// KL-divergence threshold search on the CPU (one SIMD-independent translation unit: the work is
// a few million float64 operations per histogram). Groups are split between threads.
#include <cstdint>
#include "parallel.h"
#include "pyquant/cpu_api.h"
#include "pyquant/stats.h"

namespace pq {

void cpu::entropy_search(const EntropySearchArgs& a, int max_threads) {
  const int64_t* counts = a.counts;
  const int64_t G = a.G, nb = a.nb, nq = a.nq;
  int64_t* best_i = a.best_i;
  double* best_kl = a.best_kl;
  const int nt = int(G < max_threads ? (G > 0 ? G : 1) : max_threads);
  cpu::parallel_split(G, nt, [&](int, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t* h = counts + g * nb;
      int64_t bi = nb;
      double bk = 0.0;
      bool have = false;
      for (int64_t i = nq; i <= nb; ++i) {
        const double kl = kl_clip(h, nb, i, nq);
        if (!have || kl < bk) { bk = kl; bi = i; have = true; }
      }
      best_i[g] = bi;
      best_kl[g] = bk;
    }
  });
}

}  // namespace pq
