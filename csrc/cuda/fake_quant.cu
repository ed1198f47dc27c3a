// CUDA fake-quant kernels. Rows of the layout map to grid.y, so a block finds its scale from the
// launch geometry (one row_base per row, no per-element division when a row has one scale).
// Elements move in 16-byte packs when the row length and the pointers allow it.
#include <cuda_runtime.h>
#include <algorithm>
#include <type_traits>
#include "launch_status.h"
#include "pyquant/cuda_api.h"
#include "pyquant/fake_quant.h"
#include "pyquant/type_dispatch.h"

namespace pq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <FqOp OP, bool ACT>
__device__ __forceinline__ float apply(float x, float s, float o, float qmin, float qmax, const ActClamp& act) {
  if constexpr (ACT) x = act.apply(x);
  if constexpr (OP == FqOp::QDQ) return fake_quant_one(x, s, o, qmin, qmax);
  else if constexpr (OP == FqOp::Q) return quantize_one(x, s, o, qmin, qmax);
  else return dequantize_one(x, s, o);
}

__device__ __forceinline__ int64_t scale_index(const QLayout& L, int64_t base, int64_t j) {
  return L.inner_block >= L.row_len ? base : base + j / L.inner_block;
}

// Each thread keeps kUnroll packs in flight (loads first, then math, then stores): one 16-byte load
// per thread is too little outstanding memory traffic to reach HBM bandwidth.
constexpr int kUnroll = 4;
constexpr int kBwdUnroll = 2;  // two inputs per element already

template <FqOp OP, class Tin, class Tout, int VEC, bool ACT>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Tin* __restrict__ x, Tout* __restrict__ y,
                                                           const float* __restrict__ s, const float* __restrict__ o,
                                                           float qmin, float qmax, const QLayout L,
                                                           const ActClamp act) {
  const int64_t rows = L.rows();
  const int64_t len = L.row_len;
  const bool row_scale = L.inner_block >= len;
  constexpr int64_t kTile = int64_t(kThreads) * VEC * kUnroll;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t base = L.row_base(r);
    const float s_row = row_scale ? s[base] : 0.f;
    const float o_row = row_scale ? o[base] : 0.f;
    const Tin* xr = x + r * len;
    Tout* yr = y + r * len;
    for (int64_t t0 = int64_t(blockIdx.x) * kTile; t0 < len; t0 += int64_t(gridDim.x) * kTile) {
      Pack<Tin, VEC> in[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = t0 + (int64_t(u) * kThreads + threadIdx.x) * VEC;
        if (j < len) in[u] = *reinterpret_cast<const Pack<Tin, VEC>*>(xr + j);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = t0 + (int64_t(u) * kThreads + threadIdx.x) * VEC;
        if (j >= len) continue;
        Pack<Tout, VEC> out;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          float sv = s_row, ov = o_row;
          if (!row_scale) {
            const int64_t k = scale_index(L, base, j + v);
            sv = s[k];
            ov = o[k];
          }
          Elem<Tout>::store(&out.v[v], apply<OP, ACT>(Elem<Tin>::load(&in[u].v[v]), sv, ov, qmin, qmax, act));
        }
        *reinterpret_cast<Pack<Tout, VEC>*>(yr + j) = out;
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  return v;
}

// Block-wide sum of two values; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[kThreads / 32], sb[kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the shared slots may still be read from the previous row
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : 0.f;
    b = lane < kThreads / 32 ? sb[lane] : 0.f;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

template <class T, int VEC, bool NEED_DX, bool NEED_SO, bool ACT>
__global__ void __launch_bounds__(kThreads) backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                            T* __restrict__ dx, const float* __restrict__ s,
                                                            const float* __restrict__ o, float qmin, float qmax,
                                                            const QLayout L, const ActClamp act,
                                                            double* __restrict__ ws) {
  const int64_t rows = L.rows();
  const int64_t len = L.row_len;
  const bool row_scale = L.inner_block >= len;
  double* ws_s = ws;
  double* ws_o = ws + L.nscale;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t base = L.row_base(r);
    const float s_row = row_scale ? s[base] : 0.f;
    const float o_row = row_scale ? o[base] : 0.f;
    const T* gr = g + r * len;
    const T* xr = x + r * len;
    float acc_s = 0.f, acc_o = 0.f;
    constexpr int64_t kTile = int64_t(kThreads) * VEC * kBwdUnroll;
    for (int64_t t0 = int64_t(blockIdx.x) * kTile; t0 < len; t0 += int64_t(gridDim.x) * kTile) {
    Pack<T, VEC> gins[kBwdUnroll], xins[kBwdUnroll];
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      const int64_t j = t0 + (int64_t(u) * kThreads + threadIdx.x) * VEC;
      if (j < len) {
        gins[u] = *reinterpret_cast<const Pack<T, VEC>*>(gr + j);
        xins[u] = *reinterpret_cast<const Pack<T, VEC>*>(xr + j);
      }
    }
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      const int64_t j = t0 + (int64_t(u) * kThreads + threadIdx.x) * VEC;
      if (j >= len) continue;
      const Pack<T, VEC>& gin = gins[u];
      const Pack<T, VEC>& xin = xins[u];
      Pack<T, VEC> out;
      int64_t k_run = -1;
      float run_s = 0.f, run_o = 0.f;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float sv = s_row, ov = o_row;
        int64_t k = base;
        if (!row_scale) {
          k = scale_index(L, base, j + v);
          sv = s[k];
          ov = o[k];
        }
        const float gv = Elem<T>::load(&gin.v[v]), xv = Elem<T>::load(&xin.v[v]);
        const FqGrad t = fake_quant_grad<ACT>(gv, xv, sv, ov, qmin, qmax, act);
        if constexpr (NEED_DX) Elem<T>::store(&out.v[v], t.dx);
        if constexpr (NEED_SO) {
          if (row_scale) {
            acc_s += t.ds;
            acc_o += t.doff;
          } else {
            // Several scales per row: add runs of equal scale index straight to the workspace.
            if (k != k_run) {
              if (k_run >= 0) { atomicAdd(ws_s + k_run, double(run_s)); atomicAdd(ws_o + k_run, double(run_o)); }
              k_run = k;
              run_s = 0.f;
              run_o = 0.f;
            }
            run_s += t.ds;
            run_o += t.doff;
          }
        }
      }
      if constexpr (NEED_SO) {
        if (!row_scale && k_run >= 0) { atomicAdd(ws_s + k_run, double(run_s)); atomicAdd(ws_o + k_run, double(run_o)); }
      }
      if constexpr (NEED_DX) *reinterpret_cast<Pack<T, VEC>*>(dx + r * len + j) = out;
    }
    }
    if constexpr (NEED_SO) {
      if (row_scale) {  // uniform across the block: every thread takes this branch together
        block_sum2(acc_s, acc_o);
        if (threadIdx.x == 0) {
          atomicAdd(ws_s + base, double(acc_s));
          atomicAdd(ws_o + base, double(acc_o));
        }
      }
    }
  }
}

__global__ void finalize_kernel(const double* __restrict__ ws, int64_t n, float gs, float* __restrict__ ds,
                                float* __restrict__ doff) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    if (ds) ds[k] = float(ws[k] * double(gs));
    if (doff) doff[k] = float(ws[n + k] * double(gs));
  }
}

inline bool aligned(const void* p, size_t a) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % a == 0; }

inline dim3 grid_for(const QLayout& L, int64_t per_block) {
  const int64_t rows = L.rows();
  const int64_t gy = std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY);
  int64_t gx = (L.row_len + per_block - 1) / per_block;
  // Keep the grid modest; the loops stride over what it does not cover.
  const int64_t cap = std::max<int64_t>(1, int64_t(1) << 16) / gy + 1;
  gx = std::max<int64_t>(1, std::min<int64_t>(gx, std::max<int64_t>(cap, 1)));
  gx = std::min<int64_t>(gx, int64_t(1) << 20);
  return dim3(unsigned(gx), unsigned(gy), 1);
}

template <FqOp OP, class Tin, class Tout, bool ACT>
void launch_forward_a(const void* x, void* y, const float* s, const float* o, float qmin, float qmax,
                      const QLayout& L, const ActClamp& act, cudaStream_t st) {
  constexpr int V = 16 / (sizeof(Tin) > sizeof(Tout) ? sizeof(Tin) : sizeof(Tout));
  const bool vec_ok = V > 1 && L.row_len % V == 0 && aligned(x, sizeof(Tin) * V) && aligned(y, sizeof(Tout) * V);
  if (vec_ok) {
    forward_kernel<OP, Tin, Tout, V, ACT><<<grid_for(L, int64_t(kThreads) * V * kUnroll), kThreads, 0, st>>>(
        (const Tin*)x, (Tout*)y, s, o, qmin, qmax, L, act);
  } else {
    forward_kernel<OP, Tin, Tout, 1, ACT><<<grid_for(L, int64_t(kThreads) * kUnroll), kThreads, 0, st>>>(
        (const Tin*)x, (Tout*)y, s, o, qmin, qmax, L, act);
  }
}

template <FqOp OP, class Tin, class Tout>
void launch_forward(const void* x, void* y, const float* s, const float* o, float qmin, float qmax,
                    const QLayout& L, const ActClamp& act, cudaStream_t st) {
  // the activation is fused for QDQ of a float input into its own dtype only
  if constexpr (OP == FqOp::QDQ && std::is_same<Tin, Tout>::value && FloatTypes::contains<Tin>) {
    if (act.on()) return launch_forward_a<OP, Tin, Tout, true>(x, y, s, o, qmin, qmax, L, act, st);
  }
  launch_forward_a<OP, Tin, Tout, false>(x, y, s, o, qmin, qmax, L, act, st);
}

template <class T, int V, bool DX, bool SO>
void launch_backward_v(const void* g, const void* x, void* dx, const float* s, const float* o, float qmin, float qmax,
                       const QLayout& L, const ActClamp& act, double* ws, cudaStream_t st) {
  const dim3 grid = grid_for(L, int64_t(kThreads) * V * kBwdUnroll);
  if (act.on())
    backward_kernel<T, V, DX, SO, true><<<grid, kThreads, 0, st>>>((const T*)g, (const T*)x, (T*)dx, s, o, qmin, qmax,
                                                                   L, act, ws);
  else
    backward_kernel<T, V, DX, SO, false><<<grid, kThreads, 0, st>>>((const T*)g, (const T*)x, (T*)dx, s, o, qmin,
                                                                    qmax, L, act, ws);
}

template <class T, bool DX, bool SO>
void launch_backward(const void* g, const void* x, void* dx, const float* s, const float* o, float qmin, float qmax,
                     const QLayout& L, const ActClamp& act, double* ws, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const size_t a = sizeof(T) * V;
  if (L.row_len % V == 0 && aligned(g, a) && aligned(x, a) && aligned(dx, a))
    launch_backward_v<T, V, DX, SO>(g, x, dx, s, o, qmin, qmax, L, act, ws, st);
  else
    launch_backward_v<T, 1, DX, SO>(g, x, dx, s, o, qmin, qmax, L, act, ws, st);
}

template <class T>
void backward_t(const void* g, const void* x, void* dx, const float* s, const float* o, float qmin, float qmax,
                const QLayout& L, const ActClamp& act, double* ws, bool so, cudaStream_t st) {
  if (dx && so) launch_backward<T, true, true>(g, x, dx, s, o, qmin, qmax, L, act, ws, st);
  else if (dx) launch_backward<T, true, false>(g, x, dx, s, o, qmin, qmax, L, act, ws, st);
  else if (so) launch_backward<T, false, true>(g, x, dx, s, o, qmin, qmax, L, act, ws, st);
}

}  // namespace

const char* fake_quant_forward(const FakeQuantForwardArgs& a, uintptr_t stream) {
  const QLayout& L = a.layout;
  if (L.numel == 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const ActClamp act = act_clamp(a);
  const char* err = dispatch_fq_op(a.op, [&](auto op) {
    return dispatch_dtype(AllTypes{}, a.xdt, [&](auto in) {
      return dispatch_dtype(AllTypes{}, a.ydt, [&](auto out) {
        launch_forward<tag_type<decltype(op)>::value, tag_type<decltype(in)>, tag_type<decltype(out)>>(
            a.x, a.y, a.s, a.o, a.qmin, a.qmax, L, act, st);
      });
    });
  });
  return err ? err : last_error();
}

// Gradients exist for float types only.
const char* fake_quant_backward(const FakeQuantBackwardArgs& a, uintptr_t stream) {
  const QLayout& L = a.layout;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool so = a.ds != nullptr || a.doff != nullptr;
  if (so) {
    cudaError_t e = cudaMemsetAsync(a.ws, 0, sizeof(double) * 2 * size_t(L.nscale), st);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  if (L.numel > 0) {
    const ActClamp act = act_clamp(a);
    const char* err = dispatch_dtype(FloatTypes{}, a.dt, [&](auto tag) {
      backward_t<tag_type<decltype(tag)>>(a.g, a.x, a.dx, a.s, a.o, a.qmin, a.qmax, L, act, a.ws, so, st);
    });
    if (err) return err;
    if ((err = last_error())) return err;
  }
  if (so) {
    const int blocks = int(std::min<int64_t>((L.nscale + kThreads - 1) / kThreads, 1024));
    finalize_kernel<<<blocks, kThreads, 0, st>>>(a.ws, L.nscale, a.grad_scale, a.ds, a.doff);
  }
  return last_error();
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace cuda
}  // namespace pq
