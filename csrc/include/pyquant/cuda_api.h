// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu), one per op, each taking its argument
// struct (op_args.h) and the stream (a cudaStream_t) to launch on. Plain C++ types only, so the
// pybind11 module that calls them compiles without the CUDA headers. Each returns nullptr on success
// or the error message.
#pragma once
#include <cstdint>
#include "pyquant/op_args.h"

namespace pq {
namespace cuda {

// fake_quant.cu; fake_quant_backward's ws holds 2 * nscale float64 (zeroed here).
const char* fake_quant_forward(const FakeQuantForwardArgs& a, uintptr_t stream);
const char* fake_quant_backward(const FakeQuantBackwardArgs& a, uintptr_t stream);

// stats.cu: the same results as the CPU's.
const char* minmax(const MinmaxArgs& a, uintptr_t stream);
const char* histogram(const HistogramArgs& a, uintptr_t stream);
const char* search(const SearchArgs& a, uintptr_t stream);
const char* entropy_search(const EntropySearchArgs& a, uintptr_t stream);

// adaround.cu
const char* adaround_forward(const AdaroundForwardArgs& a, uintptr_t stream);
const char* adaround_backward(const AdaroundBackwardArgs& a, uintptr_t stream);
const char* adaround_regularizer(const AdaroundRegularizerCudaArgs& a, uintptr_t stream);
int adaround_regularizer_workspace(int64_t n);  // float64 entries of adaround_regularizer's ws

int device_count();
int runtime_version();

}  // namespace cuda
}  // namespace pq
