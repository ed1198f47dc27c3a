// A bias on the signed 32-bit grid (docs/design.md, 5.2): clamp(rint(x / s), -2^31, 2^31) * s, true division
// and round half to even in float32, as the reference (quantize_dequantize_int32 in
// pyquant/ops/_reference.py; in float32 the grid's upper end 2^31 - 1 is 2^31). A bias has a few hundred
// values: one loop, no threads.
#include <cmath>
#include <cstring>
#include "pyquant/cpu_api.h"

namespace pq {
namespace cpu {

bool int32_fake_quant(const Int32FakeQuantArgs& a, int) {
  constexpr float lo = -2147483648.0f;
  constexpr float hi = 2147483648.0f;
  bool held = true;
  for (int64_t i = 0; i < a.n; ++i) {
    const float s = a.s[a.ns == 1 ? 0 : i];
    const float q = rintf(a.x[i] / s);
    held = held && (q >= lo && q <= hi);  // a NaN is held by no grid
    const float c = q < lo ? lo : (q > hi ? hi : q);
    a.y[i] = c * s;
  }
  if (!held && a.overflow_float && a.n > 0) std::memcpy(a.y, a.x, sizeof(float) * static_cast<size_t>(a.n));
  return held;
}

}  // namespace cpu
}  // namespace pq
