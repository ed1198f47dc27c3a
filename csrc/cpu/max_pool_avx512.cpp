// Non-overlapping max pooling at the avx512 SIMD level (see max_pool_impl.h).
#define PQ_ISA_NS avx512
#define PQ_ISA_TYPE IsaAvx512
#include "max_pool_impl.h"

namespace pq {
const PoolTable& pool_table_avx512() {
  static const PoolTable t{&avx512::max_pool_forward, &avx512::qdq_max_pool_forward, &avx512::max_pool_backward};
  return t;
}
}  // namespace pq
