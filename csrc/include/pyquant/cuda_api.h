// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu). Plain C++ types only, so the
// pybind11 module that calls them compiles without the CUDA headers. Each returns nullptr on
// success or the CUDA error string.
#pragma once
#include <cstdint>
#include "pyquant/fake_quant.h"

namespace pq {
namespace cuda {

const char* fake_quant_forward(FqOp op, const void* x, DType xdt, void* y, DType ydt, const float* s,
                               const float* o, float qmin, float qmax, const QLayout& L, uintptr_t stream);
// ws: 2 * nscale float64 (zeroed here); ds/doff/dx may be null.
const char* fake_quant_backward(const void* g, const void* x, DType dt, void* dx, const float* s,
                                const float* o, float qmin, float qmax, const QLayout& L, double* ws,
                                float* ds, float* doff, float grad_scale, uintptr_t stream);
int device_count();
int runtime_version();

}  // namespace cuda
}  // namespace pq
