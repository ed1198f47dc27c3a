// Non-overlapping max pooling at the avx2 SIMD level (see max_pool_impl.h).
#define PQ_ISA_NS avx2
#define PQ_ISA_TYPE IsaAvx2
#include "max_pool_impl.h"
