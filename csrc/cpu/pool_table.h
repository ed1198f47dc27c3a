// The CPU max-pool entry points of one SIMD level (max_pool_impl.h); dispatch.cpp picks the level.
#pragma once
#include <cstdint>
#include "pyquant/fake_quant.h"

namespace pq {

struct PoolTable {
  // x: P planes of H x W float32 (contiguous); kernel kh x kw == stride, no padding, floor mode.
  // out/argmax: P x (H/kh) x (W/kw); argmax is the window position (row-major) of the maximum.
  void (*forward)(const float* x, int64_t P, int64_t H, int64_t W, int kh, int kw, float* out, uint8_t* argmax,
                  int max_threads);
  // The same pool over fake_quant(act(x)) (scale/offset: one, or one per channel with planes cycling
  // through `channels`), so its maximum and argmax are those of quantize -> max pool; sel is the input
  // value at the argmax.
  void (*qdq_forward)(const float* x, int64_t P, int64_t H, int64_t W, int kh, int kw, const float* s,
                      const float* o, int64_t channels, float qmin, float qmax, const ActClamp& act, float* out,
                      uint8_t* argmax, float* sel, int max_threads);
  // dx (P x H x W, fully written): g at each window's argmax position, 0 elsewhere.
  void (*backward)(const float* g, const uint8_t* argmax, int64_t P, int64_t H, int64_t W, int kh, int kw,
                   float* dx, int max_threads);
};

const PoolTable& pool_table_scalar();
const PoolTable& pool_table_avx2();
const PoolTable& pool_table_avx512();
const PoolTable& pool_table();  // the selected level (dispatch.cpp)

}  // namespace pq
