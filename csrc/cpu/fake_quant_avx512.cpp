// AVX-512 (F, BW, VL, DQ): 16 float lanes, vroundscale for rint, streaming stores for large outputs.
// Compiled with -mavx512*; called only when the CPU has them.
#define PQ_ISA_NS avx512
#define PQ_ISA_TYPE IsaAvx512
#include "fake_quant_impl.h"
