// Calibration statistics at the avx512 SIMD level (see stats_impl.h).
#define PQ_ISA_NS avx512
#define PQ_ISA_TYPE IsaAvx512
#include "stats_impl.h"
