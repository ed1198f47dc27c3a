// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu). Plain C++ types only, so the
// pybind11 module that calls them compiles without the CUDA headers. Each returns nullptr on
// success or the CUDA error string.
#pragma once
#include <cstdint>
#include "pyquant/fake_quant.h"

namespace pq {
namespace cuda {

// `act` (QDQ of a float input into its own dtype only) clamps x first.
const char* fake_quant_forward(FqOp op, const void* x, DType xdt, void* y, DType ydt, const float* s,
                               const float* o, float qmin, float qmax, const QLayout& L, const ActClamp& act,
                               uintptr_t stream);
// ws: 2 * nscale float64 (zeroed here); ds/doff/dx may be null. With `act`, x is the activation's input.
const char* fake_quant_backward(const void* g, const void* x, DType dt, void* dx, const float* s,
                                const float* o, float qmin, float qmax, const QLayout& L, const ActClamp& act,
                                double* ws, float* ds, float* doff, float grad_scale, uintptr_t stream);
int device_count();
int runtime_version();

}  // namespace cuda
}  // namespace pq

namespace pq {
namespace cuda {

// Per-group min/max of finite values (+inf/-inf when none) and the count of non-finite values.
const char* minmax(const void* x, DType dt, const QLayout& L, float* mn, float* mx, int64_t* nonfinite,
                   uintptr_t stream);
// counts[nscale * nbins] (zeroed here) receives the finite elements of each group.
const char* histogram(const void* x, DType dt, const QLayout& L, const float* lo, const float* range,
                      int64_t nbins, int64_t* counts, uintptr_t stream);
// Best of C candidates per histogram (see stats.h); same results as the CPU search.
const char* search(const int64_t* counts, int64_t G, int64_t nbins, const float* c0, const float* bw,
                   const float* cand_d, const float* cand_o, int64_t C, float ns, float gamma, float p,
                   int64_t* best_idx, double* best_noise, uintptr_t stream);
// KL clip-point search per histogram (kl_clip in stats.h); same results as the CPU search.
const char* entropy_search(const int64_t* counts, int64_t G, int64_t nb, int64_t nq, int64_t* best_i, double* best_kl,
                           uintptr_t stream);

}  // namespace cuda
}  // namespace pq

namespace pq {
namespace cuda {

// AdaRound (adaround.h): weights [rows, row_len] float32, nscale 1 or rows.
const char* adaround_forward(const float* w, const float* a, float* y, const float* s, const float* o, int64_t rows,
                             int64_t row_len, int64_t nscale, float qmin, float qmax, bool hard, uintptr_t stream);
const char* adaround_backward(const float* g, const float* w, const float* a, float* da, const float* s,
                              const float* o, int64_t rows, int64_t row_len, int64_t nscale, float qmin, float qmax,
                              uintptr_t stream);
// ws: adaround_regularizer_workspace(n) float64; value: one float64 on the device.
int adaround_regularizer_workspace(int64_t n);
const char* adaround_regularizer(const float* a, int64_t n, float beta, float* grad, double* ws, double* value,
                                 uintptr_t stream);

}  // namespace cuda
}  // namespace pq
