// The CPU fake-quant entry points of one SIMD level; dispatch.cpp picks a table at run time.
#pragma once
#include "pyquant/fake_quant.h"

namespace pq {

struct FakeQuantTable {
  const char* name;
  // y = op(x) elementwise; x and y may be of different types (Q writes integers, DQ reads them).
  // `act` (QDQ of a float input into its own dtype only) clamps x first.
  void (*forward)(FqOp op, const void* x, DType xdt, void* y, DType ydt, const float* s, const float* o,
                  float qmin, float qmax, const QLayout& L, const ActClamp& act, int max_threads);
  // Fused backward of QDQ: dx (nullable) and ds/do (nullable) reduced per scale. `ws` holds
  // max_threads * 2 * nscale doubles. With `act`, x is the activation's input.
  void (*backward)(const void* g, const void* x, DType dt, void* dx, const float* s, const float* o,
                   float qmin, float qmax, const QLayout& L, const ActClamp& act, double* ws, float* ds,
                   float* doff, float grad_scale, int max_threads);
};

const FakeQuantTable& fake_quant_table_scalar();
const FakeQuantTable& fake_quant_table_avx2();
const FakeQuantTable& fake_quant_table_avx512();

// Selected SIMD level and thread count (dispatch.cpp).
const FakeQuantTable& fake_quant_table();
const char* simd_level();
bool set_simd_level(const char* name);
int cpu_threads();
void set_cpu_threads(int n);

}  // namespace pq
