// Fake quantization: the per-element math (the contract in docs/design.md, section 5) and the layout that
// maps an element to its scale/offset. Used by the CPU loops and the CUDA kernels alike.
#pragma once
#include "pyquant/common.h"

namespace pq {

// q = clamp(rint(x / s) - o, qmin, qmax). The comparisons are written so that NaN passes through.
PQ_HD float quantize_one(float x, float s, float o, float qmin, float qmax) {
  float q = rintf(x / s) - o;
  q = q < qmin ? qmin : q;
  q = q > qmax ? qmax : q;
  return q;
}
PQ_HD float dequantize_one(float q, float s, float o) { return (q + o) * s; }
PQ_HD float fake_quant_one(float x, float s, float o, float qmin, float qmax) {
  return dequantize_one(quantize_one(x, s, o, qmin, qmax), s, o);
}

// Gradient terms of x_hat for one element (STE on the rounding):
//   dx = g * m;  ds = g * (m ? rint(x/s) - x/s : q + o);  do = g * s * (1 - m)
struct FqGrad { float dx, ds, doff; };
PQ_HD FqGrad fake_quant_grad_one(float g, float x, float s, float o, float qmin, float qmax) {
  const float t = x / s;
  const float r = rintf(t);
  const float q = r - o;
  const bool inside = (q >= qmin) && (q <= qmax);
  float qc = q < qmin ? qmin : q;
  qc = qc > qmax ? qmax : qc;
  const float m = inside ? 1.0f : 0.0f;
  FqGrad out;
  out.dx = g * m;
  out.ds = g * (inside ? (r - t) : (qc + o));
  out.doff = (g * s) * (1.0f - m);
  return out;
}

// A ReLU / ReLU6 / Hardtanh applied to x before quantization, so that activation and quantizer
// run as one pass (and the backward needs only the activation's input). Off: (-inf, +inf).
// The gradient mask follows the activations' own backward kernels: zero where x <= lo, and where
// x >= hi when hi is finite (ReLU's (0, +inf) passes +inf; a NaN x passes in both).
struct ActClamp {
  float lo = -INFINITY;
  float hi = INFINITY;
  PQ_HD bool on() const { return lo > -INFINITY || hi < INFINITY; }
  PQ_HD float apply(float x) const { return clamp_keep_nan(x, lo, hi); }
  PQ_HD bool passes(float x) const { return !(x <= lo) && !(hi < INFINITY && x >= hi); }
};

// fake_quant_grad_one of the clamped input, with dx masked where the activation is flat.
PQ_HD FqGrad fake_quant_act_grad_one(float g, float x, float s, float o, float qmin, float qmax,
                                     const ActClamp& act) {
  FqGrad out = fake_quant_grad_one(g, act.apply(x), s, o, qmin, qmax);
  if (!act.passes(x)) out.dx = 0.0f;
  return out;
}

// Either of the two, chosen at compile time (ACT: a fused activation is on).
template <bool ACT>
PQ_HD FqGrad fake_quant_grad(float g, float x, float s, float o, float qmin, float qmax, const ActClamp& act) {
  if constexpr (ACT) return fake_quant_act_grad_one(g, x, s, o, qmin, qmax, act);
  else return fake_quant_grad_one(g, x, s, o, qmin, qmax);
}

// Which scale an element uses. The tensor is walked in memory order as R rows of L elements.
// Along a row the scale changes every `inner_block` elements (inner_block >= L: one scale per row;
// scale values along a row are contiguous). The row's first scale index is
//   row_base(r) = sum_d (r_d / outer_block[d]) * outer_sstride[d],
// with r decomposed in mixed radix over outer_size (dimension 0 outermost).
constexpr int kMaxOuterDims = 6;
struct QLayout {
  int64_t numel = 0;
  int64_t row_len = 1;       // L
  int64_t inner_block = 1;   // elements per scale along a row
  int64_t nscale = 1;        // number of scale (and offset) values
  int32_t n_outer = 0;
  int64_t outer_size[kMaxOuterDims] = {};
  int64_t outer_block[kMaxOuterDims] = {};
  int64_t outer_sstride[kMaxOuterDims] = {};

  PQ_HD int64_t rows() const { return row_len > 0 ? numel / row_len : 0; }
  PQ_HD int64_t row_base(int64_t r) const {
    int64_t base = 0;
    for (int d = n_outer - 1; d >= 0; --d) {
      const int64_t sz = outer_size[d];
      const int64_t rd = r % sz;
      r /= sz;
      base += (rd / outer_block[d]) * outer_sstride[d];
    }
    return base;
  }
  PQ_HD bool one_scale_per_row() const { return inner_block >= row_len; }
};

enum class FqOp : int32_t { QDQ = 0, Q = 1, DQ = 2 };

}  // namespace pq
