// CUDA calibration statistics. As in fake_quant.cu, rows of the layout map to grid.y; a block that
// owns a row with one group reduces in registers/shared memory and publishes once.
#include <cuda_runtime.h>
#include <algorithm>
#include "launch_status.h"
#include "pyquant/cuda_api.h"
#include "pyquant/stats.h"
#include "pyquant/type_dispatch.h"

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
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row_group) {
      // Four independent loads in flight per thread before any of them is used.
      for (; j + 3 * stride < len; j += 4 * stride) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = Elem<T>::load(xr + j + u * stride);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (is_finite(v[u])) { a = fminf(a, v[u]); c = fmaxf(c, v[u]); } else { ++bad; }
        }
      }
    }
    for (; j < len; j += stride) {
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

// Block-wide "first of the smallest": every thread offers (value, index; index < 0 for none);
// thread 0 gets the smallest value, ties to the smallest index.
__device__ __forceinline__ void block_argmin(double v, int64_t ix, double* out_v, int64_t* out_ix) {
  __shared__ double s_val[kThreads];
  __shared__ int64_t s_idx[kThreads];
  s_val[threadIdx.x] = v;
  s_idx[threadIdx.x] = ix;
  __syncthreads();
  if (threadIdx.x == 0) {
    double bv = 0.0;
    int64_t bx = -1;
    for (int t = 0; t < kThreads; ++t) {
      const int64_t i = s_idx[t];
      if (i < 0) continue;
      if (bx < 0 || s_val[t] < bv || (s_val[t] == bv && i < bx)) { bv = s_val[t]; bx = i; }
    }
    *out_v = bv;
    *out_ix = bx;
  }
}

// One block per histogram: its non-empty span of bins (centres, counts, prefix sums) goes to shared
// memory, threads take candidates, and the block keeps the first of the smallest totals. The
// arithmetic is the CPU search's, in the same order, so both give the same index and noise.
__global__ void __launch_bounds__(kThreads) search_kernel(const int64_t* __restrict__ counts, int64_t nb,
                                                          const float* __restrict__ c0, const float* __restrict__ bw,
                                                          const float* __restrict__ cand_d,
                                                          const float* __restrict__ cand_o, int64_t C, float ns,
                                                          float gamma, float p, int64_t* best_idx,
                                                          double* best_noise) {
  extern __shared__ double s_dbuf[];
  __shared__ int64_t s_first, s_last;
  const int64_t g = blockIdx.x;
  const int64_t* h = counts + g * nb;
  if (threadIdx.x == 0) {
    int64_t f = 0, l = nb;
    while (f < nb && h[f] == 0) ++f;
    while (l > f && h[l - 1] == 0) --l;
    s_first = f;
    s_last = l;
  }
  __syncthreads();
  const int64_t first = s_first, n = s_last - s_first;
  double* pn = s_dbuf;
  double* ps1 = pn + (nb + 1);
  double* ps2 = ps1 + (nb + 1);
  float* mid = reinterpret_cast<float*>(ps2 + (nb + 1));
  float* cnt = mid + nb;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    mid[i] = bin_mid(c0[g], bw[g], first + i);
    cnt[i] = float(h[first + i]);
  }
  __syncthreads();
  if (threadIdx.x == 0 && p == 2.0f) build_prefix(mid, cnt, n, pn, ps1, ps2);
  __syncthreads();
  const HistPrefix P{pn, ps1, ps2};
  const Span sp = make_span(mid, n);
  double best = 0.0;
  int64_t bi = -1;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = cand_d[g * C + c], o = cand_o[g * C + c];
    double v;
    if (p == 2.0f) {
      int64_t lo, hi;
      const double clip = clipped_noise(mid, P, sp, n, d, o, ns, gamma, &lo, &hi);
      if (bi >= 0 && !(clip < best)) continue;  // the inside bins only add: cannot beat the best
      v = inside_noise(mid + lo, cnt + lo, hi - lo, d, o) + clip;
    } else {
      v = candidate_noise(mid, cnt, n, d, o, ns, gamma, p);
    }
    if (bi < 0 || v < best) { best = v; bi = c; }
  }
  double bv;
  int64_t bx;
  block_argmin(best, bi, &bv, &bx);
  if (threadIdx.x == 0) {
    best_idx[g] = bx;
    best_noise[g] = bv;
  }
}

// One block per histogram, threads over clip points; the first of the smallest divergences wins.
__global__ void __launch_bounds__(kThreads) entropy_kernel(const int64_t* __restrict__ counts, int64_t nb, int64_t nq,
                                                           int64_t* best_i, double* best_kl) {
  const int64_t* h = counts + int64_t(blockIdx.x) * nb;
  double best = 0.0;
  int64_t bi = -1;
  for (int64_t i = nq + threadIdx.x; i <= nb; i += blockDim.x) {
    const double kl = kl_clip(h, nb, i, nq);
    if (bi < 0 || kl < best) { best = kl; bi = i; }
  }
  double bv;
  int64_t bx;
  block_argmin(best, bi, &bv, &bx);
  if (threadIdx.x == 0) {
    best_i[blockIdx.x] = bx < 0 ? nb : bx;
    best_kl[blockIdx.x] = bv;
  }
}

inline dim3 grid_for(const QLayout& L) {
  const int64_t rows = L.rows();
  const int64_t gy = std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY);
  int64_t gx = (L.row_len + kThreads * 4 - 1) / (kThreads * 4);
  gx = std::max<int64_t>(1, std::min<int64_t>(gx, (int64_t(1) << 12) / gy + 1));
  return dim3(unsigned(gx), unsigned(gy), 1);
}

}  // namespace

// Statistics are taken of float data only.
const char* minmax(const MinmaxArgs& a, uintptr_t stream) {
  const QLayout& L = a.layout;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  auto* nf = reinterpret_cast<unsigned long long*>(a.nonfinite);
  const int ib = int(std::min<int64_t>((L.nscale + kThreads - 1) / kThreads, 1024));
  init_minmax<<<std::max(ib, 1), kThreads, 0, st>>>(a.mn, a.mx, nf, L.nscale);
  if (L.numel > 0) {
    const dim3 g = grid_for(L);
    const char* err = dispatch_dtype(FloatTypes{}, a.dt, [&](auto tag) {
      using T = tag_type<decltype(tag)>;
      minmax_kernel<T><<<g, kThreads, 0, st>>>(static_cast<const T*>(a.x), L, a.mn, a.mx, nf);
    });
    if (err) return err;
  }
  return last_error();
}

const char* histogram(const HistogramArgs& a, uintptr_t stream) {
  const QLayout& L = a.layout;
  const int64_t nbins = a.nbins;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t e = cudaMemsetAsync(a.counts, 0, sizeof(int64_t) * size_t(L.nscale * nbins), st);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (L.numel == 0) return nullptr;
  auto* c = reinterpret_cast<unsigned long long*>(a.counts);
  const bool use_shared = nbins <= kSharedBins;
  const size_t smem = use_shared ? sizeof(unsigned) * size_t(nbins) : 0;
  const dim3 g = grid_for(L);
  const char* err = dispatch_dtype(FloatTypes{}, a.dt, [&](auto tag) {
    using T = tag_type<decltype(tag)>;
    histogram_kernel<T><<<g, kThreads, smem, st>>>(static_cast<const T*>(a.x), L, a.lo, a.range, nbins, c, use_shared);
  });
  return err ? err : last_error();
}

const char* search(const SearchArgs& a, uintptr_t stream) {
  if (a.G == 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t nbins = a.nbins;
  // prefix sums (3 x (nbins+1) doubles), centres and counts (2 x nbins floats)
  const size_t smem = 3 * sizeof(double) * size_t(nbins + 1) + 2 * sizeof(float) * size_t(nbins);
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const size_t static_smem = kThreads * (sizeof(double) + sizeof(int64_t)) + 2 * sizeof(int64_t);
  if (smem + static_smem > size_t(optin)) return "too many bins for one block's shared memory on this GPU";
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(search_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  search_kernel<<<unsigned(a.G), kThreads, smem, st>>>(a.counts, nbins, a.c0, a.bw, a.cand_d, a.cand_o, a.C, a.ns,
                                                       a.gamma, a.p, a.best_idx, a.best_noise);
  return last_error();
}

const char* entropy_search(const EntropySearchArgs& a, uintptr_t stream) {
  if (a.G == 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  entropy_kernel<<<unsigned(a.G), kThreads, 0, st>>>(a.counts, a.nb, a.nq, a.best_i, a.best_kl);
  return last_error();
}

}  // namespace cuda
}  // namespace pq
