// AVX2 + F16C: 8 float lanes. Compiled with -mavx2 -mfma -mf16c; called only when the CPU has them.
#define PQ_ISA_NS avx2
#define PQ_ISA_TYPE IsaAvx2
#include "fake_quant_impl.h"
