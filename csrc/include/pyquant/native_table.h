// The CPU module's entry points as a table of plain function pointers, which pyquant._C hands out as a
// capsule ("pyquant._C.native_table"). The autograd module (bindings/autograd_module.cpp), the one part
// built against libtorch, calls the kernels through it: one copy of the kernels, their thread cap and
// SIMD choice, in one module.
#pragma once
#include <cstddef>
#include <cstdint>
#include "pyquant/op_args.h"

namespace pq {

struct NativeTable {
  // A reader checks both before it uses a field: the table's layout and QLayout's must be the ones it
  // was compiled with.
  uint32_t version;
  uint32_t layout_size;
  const char* (*minmax_qdq_forward)(const MinmaxQdqForwardArgs& a, int max_threads);
  const char* (*minmax_qdq_backward)(const MinmaxQdqBackwardArgs& a, int max_threads);
  int (*threads)();  // the kernels' thread cap; also the backward's workspace slots
};

constexpr uint32_t kNativeTableVersion = 1;
constexpr const char* kNativeTableName = "pyquant._C.native_table";

}  // namespace pq
