// Baseline x86-64 (or any CPU): scalar loops, auto-vectorized where the compiler can.
#define PQ_ISA_NS scalar
#define PQ_ISA_TYPE IsaScalar
#include "fake_quant_impl.h"
