// CUDA AdaRound kernels: the soft/hard quantized weight, its alpha gradient, and the regularizer
// (per-block partial sums, then one block adds them in a fixed order: deterministic totals).
#include <cuda_runtime.h>
#include <algorithm>
#include "launch_status.h"
#include "pyquant/adaround.h"
#include "pyquant/cuda_api.h"

namespace pq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

inline int blocks_for(int64_t n) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

__global__ void forward_kernel(const float* __restrict__ w, const float* __restrict__ a, float* __restrict__ y,
                               const float* __restrict__ s, const float* __restrict__ o, int64_t n, int64_t row_len,
                               int64_t nscale, float qmin, float qmax, bool hard) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = nscale == 1 ? 0 : i / row_len;
    y[i] = ada_weight(w[i], a[i], s[k], o[k], qmin, qmax, hard);
  }
}

__global__ void backward_kernel(const float* __restrict__ g, const float* __restrict__ w, const float* __restrict__ a,
                                float* __restrict__ da, const float* __restrict__ s, const float* __restrict__ o,
                                int64_t n, int64_t row_len, int64_t nscale, float qmin, float qmax) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = nscale == 1 ? 0 : i / row_len;
    da[i] = ada_weight_grad(g[i], w[i], a[i], s[k], o[k], qmin, qmax);
  }
}

__global__ void reg_kernel(const float* __restrict__ a, int64_t n, float beta, float* __restrict__ grad,
                           double* __restrict__ partial) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const AdaReg r = ada_reg(a[i], beta);
    acc += r.value;
    grad[i] = r.grad;
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int d = kThreads / 2; d > 0; d >>= 1) {
    if (threadIdx.x < d) sh[threadIdx.x] += sh[threadIdx.x + d];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

__global__ void sum_kernel(const double* __restrict__ partial, int nb, double* __restrict__ out) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) acc += partial[i];
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int d = kThreads / 2; d > 0; d >>= 1) {
    if (threadIdx.x < d) sh[threadIdx.x] += sh[threadIdx.x + d];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = sh[0];
}

}  // namespace

const char* adaround_forward(const AdaroundForwardArgs& a, uintptr_t stream) {
  const int64_t n = a.rows * a.row_len;
  if (n == 0) return nullptr;
  forward_kernel<<<blocks_for(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a.w, a.a, a.y, a.s, a.o, n, a.row_len, a.nscale, a.qmin, a.qmax, a.hard);
  return last_error();
}

const char* adaround_backward(const AdaroundBackwardArgs& a, uintptr_t stream) {
  const int64_t n = a.rows * a.row_len;
  if (n == 0) return nullptr;
  backward_kernel<<<blocks_for(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a.g, a.w, a.a, a.da, a.s, a.o, n, a.row_len, a.nscale, a.qmin, a.qmax);
  return last_error();
}

int adaround_regularizer_workspace(int64_t n) { return blocks_for(n); }

const char* adaround_regularizer(const AdaroundRegularizerCudaArgs& a, uintptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int nb = blocks_for(a.n);
  reg_kernel<<<nb, kThreads, 0, st>>>(a.a, a.n, a.beta, a.grad, a.ws);
  sum_kernel<<<1, kThreads, 0, st>>>(a.ws, nb, a.value);
  return last_error();
}

}  // namespace cuda
}  // namespace pq
