// CUDA calibration statistics. As in fake_quant.cu, rows of the layout map to grid.y; a block that
// owns a row with one group reduces in registers/shared memory and publishes once.
#include <cuda_runtime.h>
#include <algorithm>
#include "pyquant/cuda_api.h"
#include "pyquant/stats.h"

namespace pq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;
constexpr int64_t kSharedBins = 8192;  // 32 KB of uint32 counters

__device__ __forceinline__ void atomic_min_f(float* a, float v) {
  if (v >= 0.f) atomicMin(reinterpret_cast<int*>(a), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(a), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f(float* a, float v) {
  if (v >= 0.f) atomicMax(reinterpret_cast<int*>(a), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(a), __float_as_uint(v));
}

__global__ void init_minmax(float* mn, float* mx, unsigned long long* nf, int64_t n) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    mn[k] = __int_as_float(0x7f800000);
    mx[k] = __int_as_float(0xff800000);
    nf[k] = 0;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) minmax_kernel(const T* __restrict__ x, const QLayout L, float* mn,
                                                          float* mx, unsigned long long* nf) {
  __shared__ float s_mn[kThreads / 32], s_mx[kThreads / 32];
  __shared__ unsigned long long s_nf[kThreads / 32];
  const int64_t rows = L.rows(), len = L.row_len;
  const bool row_group = L.inner_block >= len;
  const float inf = __int_as_float(0x7f800000);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t base = L.row_base(r);
    const T* xr = x + r * len;
    float a = inf, c = -inf;
    unsigned long long bad = 0;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < len; j += int64_t(gridDim.x) * blockDim.x) {
      const float v = Elem<T>::load(xr + j);
      if (row_group) {
        if (is_finite(v)) { a = fminf(a, v); c = fmaxf(c, v); } else { ++bad; }
      } else {
        const int64_t k = base + j / L.inner_block;
        if (is_finite(v)) { atomic_min_f(mn + k, v); atomic_max_f(mx + k, v); } else { atomicAdd(nf + k, 1ull); }
      }
    }
    if (row_group) {  // uniform across the block
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        a = fminf(a, __shfl_down_sync(0xffffffffu, a, d));
        c = fmaxf(c, __shfl_down_sync(0xffffffffu, c, d));
        bad += __shfl_down_sync(0xffffffffu, bad, d);
      }
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      __syncthreads();
      if (lane == 0) { s_mn[warp] = a; s_mx[warp] = c; s_nf[warp] = bad; }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int w = 1; w < kThreads / 32; ++w) { a = fminf(a, s_mn[w]); c = fmaxf(c, s_mx[w]); bad += s_nf[w]; }
        if (a != inf) atomic_min_f(mn + base, a);
        if (c != -inf) atomic_max_f(mx + base, c);
        if (bad) atomicAdd(nf + base, bad);
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const T* __restrict__ x, const QLayout L,
                                                             const float* __restrict__ lo,
                                                             const float* __restrict__ range, int64_t nbins,
                                                             unsigned long long* counts, bool use_shared) {
  extern __shared__ unsigned s_hist[];
  const int64_t rows = L.rows(), len = L.row_len;
  const bool row_group = L.inner_block >= len;
  const float nbf = float(nbins);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t base = L.row_base(r);
    const T* xr = x + r * len;
    const bool shared = use_shared && row_group;
    if (shared) {
      for (int64_t b = threadIdx.x; b < nbins; b += blockDim.x) s_hist[b] = 0;
      __syncthreads();
    }
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < len; j += int64_t(gridDim.x) * blockDim.x) {
      const float v = Elem<T>::load(xr + j);
      if (!is_finite(v)) continue;
      const int64_t k = row_group ? base : base + j / L.inner_block;
      const int64_t b = hist_bin(v, lo[k], range[k], nbf, nbins);
      if (shared) atomicAdd(s_hist + b, 1u);
      else atomicAdd(counts + k * nbins + b, 1ull);
    }
    if (shared) {
      __syncthreads();
      for (int64_t b = threadIdx.x; b < nbins; b += blockDim.x)
        if (s_hist[b]) atomicAdd(counts + base * nbins + b, (unsigned long long)s_hist[b]);
      __syncthreads();
    }
  }
}

inline dim3 grid_for(const QLayout& L) {
  const int64_t rows = L.rows();
  const int64_t gy = std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY);
  int64_t gx = (L.row_len + kThreads * 4 - 1) / (kThreads * 4);
  gx = std::max<int64_t>(1, std::min<int64_t>(gx, (int64_t(1) << 16) / gy + 1));
  return dim3(unsigned(gx), unsigned(gy), 1);
}

inline const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* minmax(const void* x, DType dt, const QLayout& L, float* mn, float* mx, int64_t* nonfinite,
                   uintptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  auto* nf = reinterpret_cast<unsigned long long*>(nonfinite);
  const int ib = int(std::min<int64_t>((L.nscale + kThreads - 1) / kThreads, 1024));
  init_minmax<<<std::max(ib, 1), kThreads, 0, st>>>(mn, mx, nf, L.nscale);
  if (L.numel > 0) {
    const dim3 g = grid_for(L);
    switch (dt) {
      case DType::F32: minmax_kernel<float><<<g, kThreads, 0, st>>>((const float*)x, L, mn, mx, nf); break;
      case DType::F16: minmax_kernel<half_t><<<g, kThreads, 0, st>>>((const half_t*)x, L, mn, mx, nf); break;
      case DType::BF16: minmax_kernel<bf16_t><<<g, kThreads, 0, st>>>((const bf16_t*)x, L, mn, mx, nf); break;
      default: return "minmax: x must be float32, float16 or bfloat16";
    }
  }
  return last_error();
}

const char* histogram(const void* x, DType dt, const QLayout& L, const float* lo, const float* range,
                      int64_t nbins, int64_t* counts, uintptr_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t e = cudaMemsetAsync(counts, 0, sizeof(int64_t) * size_t(L.nscale * nbins), st);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (L.numel == 0) return nullptr;
  auto* c = reinterpret_cast<unsigned long long*>(counts);
  const bool use_shared = nbins <= kSharedBins;
  const size_t smem = use_shared ? sizeof(unsigned) * size_t(nbins) : 0;
  const dim3 g = grid_for(L);
  switch (dt) {
    case DType::F32:
      histogram_kernel<float><<<g, kThreads, smem, st>>>((const float*)x, L, lo, range, nbins, c, use_shared);
      break;
    case DType::F16:
      histogram_kernel<half_t><<<g, kThreads, smem, st>>>((const half_t*)x, L, lo, range, nbins, c, use_shared);
      break;
    case DType::BF16:
      histogram_kernel<bf16_t><<<g, kThreads, smem, st>>>((const bf16_t*)x, L, lo, range, nbins, c, use_shared);
      break;
    default:
      return "histogram: x must be float32, float16 or bfloat16";
  }
  return last_error();
}

}  // namespace cuda
}  // namespace pq
