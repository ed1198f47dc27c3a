// Calibration statistics at the baseline SIMD level (see stats_impl.h).
#define PQ_ISA_NS scalar
#define PQ_ISA_TYPE IsaScalar
#include "stats_impl.h"

namespace pq {
const StatsTable& stats_table_scalar() {
  static const StatsTable t{&scalar::minmax, &scalar::histogram, &scalar::search};
  return t;
}
}  // namespace pq
