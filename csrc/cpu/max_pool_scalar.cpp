// Non-overlapping max pooling at the baseline SIMD level (see max_pool_impl.h).
#define PQ_ISA_NS scalar
#define PQ_ISA_TYPE IsaScalar
#include "max_pool_impl.h"
