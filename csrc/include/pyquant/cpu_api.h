// Entry points of the CPU kernels (csrc/cpu), one per op, each taking its argument struct
// (op_args.h) and the number of threads it may use. Those that can refuse their input (a dtype outside
// the op's set) return nullptr on success or the reason.
#pragma once
#include <cstdint>
#include "pyquant/op_args.h"

// The ops compiled once per SIMD level (csrc/cpu/*_impl.h, one object per level): X(ns, return type,
// name, argument struct). The level is chosen at run time (dispatch.cpp).
#define PQ_CPU_SIMD_OPS(X, ns)                                          \
  X(ns, const char*, fake_quant_forward, FakeQuantForwardArgs)          \
  X(ns, const char*, fake_quant_backward, FakeQuantBackwardArgs)        \
  X(ns, const char*, minmax, MinmaxCpuArgs)                             \
  X(ns, const char*, histogram, HistogramCpuArgs)                       \
  X(ns, void, search, SearchArgs)                                       \
  X(ns, void, max_pool_forward, MaxPoolForwardArgs)                     \
  X(ns, void, qdq_max_pool_forward, QdqMaxPoolForwardArgs)              \
  X(ns, void, max_pool_backward, MaxPoolBackwardArgs)

#define PQ_CPU_DECLARE_OP(ns, R, name, Args) R name(const Args& a, int max_threads);

namespace pq {
namespace cpu {

// At the selected SIMD level.
PQ_CPU_SIMD_OPS(PQ_CPU_DECLARE_OP, cpu)

// One build for every level (entropy.cpp, adaround.cpp).
void entropy_search(const EntropySearchArgs& a, int max_threads);
void adaround_forward(const AdaroundForwardArgs& a, int max_threads);
void adaround_backward(const AdaroundBackwardArgs& a, int max_threads);
double adaround_regularizer(const AdaroundRegularizerArgs& a, int max_threads);
void minmax_encoding(const MinmaxEncodingArgs& a, int max_threads);  // encoding.cpp
void minmax_scale_product(const MinmaxScaleProductArgs& a, int max_threads);  // encoding.cpp
// A min/max quantizer's training call, encoding and chain rule inside (quantizer_step.cpp).
const char* minmax_qdq_forward(const MinmaxQdqForwardArgs& a, int max_threads);
const char* minmax_qdq_backward(const MinmaxQdqBackwardArgs& a, int max_threads);
// A bias on the int32 grid, straight from its float values (int32_fake_quant.cpp).
bool int32_fake_quant(const Int32FakeQuantArgs& a, int max_threads);

}  // namespace cpu

// The SIMD level in use ("avx512", "avx2" or "baseline") and the choice of it: "auto" or a level,
// false when this CPU lacks it. PYQUANT_SIMD caps the automatic choice.
const char* simd_level();
bool set_simd_level(const char* name);
// Threads the kernels may use (0 sets OpenMP's default).
int cpu_threads();
void set_cpu_threads(int n);

}  // namespace pq
