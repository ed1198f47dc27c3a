// Calibration statistics at the avx2 SIMD level (see stats_impl.h).
#define PQ_ISA_NS avx2
#define PQ_ISA_TYPE IsaAvx2
#include "stats_impl.h"

namespace pq {
const StatsTable& stats_table_avx2() {
  static const StatsTable t{&avx2::minmax, &avx2::histogram, &avx2::search};
  return t;
}
}  // namespace pq
