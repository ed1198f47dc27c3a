// Non-overlapping max pooling at the baseline SIMD level (see max_pool_impl.h).
#define PQ_ISA_NS scalar
#define PQ_ISA_TYPE IsaScalar
#include "max_pool_impl.h"

namespace pq {
const PoolTable& pool_table_scalar() {
  static const PoolTable t{&scalar::max_pool_forward, &scalar::qdq_max_pool_forward, &scalar::max_pool_backward};
  return t;
}
}  // namespace pq
