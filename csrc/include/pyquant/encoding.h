// An encoding from a learned range, per scale value (docs/design.md, 5.4 and 5.5): the scale and offset a
// min/max quantizer simulates, and the factors that carry its chain rule back to min and max. The same
// float32 operations in the same order as the reference (minmax_encoding in pyquant/ops/_reference.py),
// so the results agree bit for bit.
#pragma once
#include "pyquant/common.h"

namespace pq {

struct MinmaxEncoding {
  float s, o;         // scale and offset
  float k_s, k_o, k_ot;  // [s unclamped] / N, [o unclamped] / s, k_o * (min / s); 0 for a symmetric offset
};

// s = max((max - min) / N, min_scale); asymmetric: o = clamp(rint(min / s) - qmin, -qmax, -qmin), else 0.
PQ_HD MinmaxEncoding minmax_encoding_one(float mn, float mx, float qmin, float qmax, float min_scale,
                                         bool symmetric) {
  const float ns = qmax - qmin;
  const float raw_s = (mx - mn) / ns;
  MinmaxEncoding e;
  e.s = raw_s < min_scale ? min_scale : raw_s;  // a NaN range stays NaN
  e.k_s = (raw_s == e.s ? 1.0f : 0.0f) / ns;
  if (symmetric) {
    e.o = 0.0f;
    e.k_o = e.k_ot = 0.0f;
    return e;
  }
  const float t = mn / e.s;
  const float raw_o = rintf(t) - qmin;
  e.o = clamp_keep_nan(raw_o, -qmax, -qmin) + 0.0f;  // no negative zero, as the reference
  e.k_o = (raw_o == e.o ? 1.0f : 0.0f) / e.s;
  e.k_ot = e.k_o * t;
  return e;
}

}  // namespace pq
