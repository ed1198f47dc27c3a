// Calibration statistics at the avx2 SIMD level (see stats_impl.h).
#define PQ_ISA_NS avx2
#define PQ_ISA_TYPE IsaAvx2
#include "stats_impl.h"
