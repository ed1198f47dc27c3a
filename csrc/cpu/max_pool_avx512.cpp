// Non-overlapping max pooling at the avx512 SIMD level (see max_pool_impl.h).
#define PQ_ISA_NS avx512
#define PQ_ISA_TYPE IsaAvx512
#include "max_pool_impl.h"
