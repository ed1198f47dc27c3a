// Calibration statistics at the avx512 SIMD level (see stats_impl.h).
#define PQ_ISA_NS avx512
#define PQ_ISA_TYPE IsaAvx512
#include "stats_impl.h"

namespace pq {
const StatsTable& stats_table_avx512() {
  static const StatsTable t{&avx512::minmax, &avx512::histogram, &avx512::search};
  return t;
}
}  // namespace pq
