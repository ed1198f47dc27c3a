// The CPU ops of one SIMD level as a table of entry points; dispatch.cpp holds one per level and
// picks one at run time. Each level's functions live in a namespace of its own (scalar, avx2,
// avx512), defined by the *_impl.h loops in that level's objects.
#pragma once
#include "pyquant/cpu_api.h"

namespace pq {

#define PQ_CPU_TABLE_FIELD(ns, R, name, Args) R (*name)(const Args& a, int max_threads);
struct CpuKernels {
  const char* level;
  PQ_CPU_SIMD_OPS(PQ_CPU_TABLE_FIELD, _)
};
#undef PQ_CPU_TABLE_FIELD

namespace scalar { PQ_CPU_SIMD_OPS(PQ_CPU_DECLARE_OP, scalar) }
namespace avx2 { PQ_CPU_SIMD_OPS(PQ_CPU_DECLARE_OP, avx2) }
namespace avx512 { PQ_CPU_SIMD_OPS(PQ_CPU_DECLARE_OP, avx512) }

// The table of namespace `ns`, e.g. PQ_CPU_KERNELS(avx2, "avx2").
#define PQ_CPU_TABLE_ENTRY(ns, R, name, Args) &ns::name,
#define PQ_CPU_KERNELS(ns, level) CpuKernels{level, PQ_CPU_SIMD_OPS(PQ_CPU_TABLE_ENTRY, ns)}

}  // namespace pq
