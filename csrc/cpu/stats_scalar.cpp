// Calibration statistics at the baseline SIMD level (see stats_impl.h).
#define PQ_ISA_NS scalar
#define PQ_ISA_TYPE IsaScalar
#include "stats_impl.h"
