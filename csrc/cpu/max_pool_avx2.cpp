// Non-overlapping max pooling at the avx2 SIMD level (see max_pool_impl.h).
#define PQ_ISA_NS avx2
#define PQ_ISA_TYPE IsaAvx2
#include "max_pool_impl.h"

namespace pq {
const PoolTable& pool_table_avx2() {
  static const PoolTable t{&avx2::max_pool_forward, &avx2::qdq_max_pool_forward, &avx2::max_pool_backward};
  return t;
}
}  // namespace pq
