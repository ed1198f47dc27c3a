// A min/max quantizer's whole training call in one native entry each way: the encoding of its range and
// the fake quantization forward, the fake quantization's backward and the chain rule back to min and max.
// On a small tensor the kernels take a microsecond; what a call costs is the crossings from Python and the
// tensors made for each step, which this halves. Same operations, in the same order, as the separate ops
// (minmax_encoding, fake_quant_forward/backward, then pyquant.quant.range_params.minmax_grads).
#include "pyquant/cpu_api.h"
#include "pyquant/encoding.h"

namespace pq {
namespace cpu {

const char* minmax_qdq_forward(const MinmaxQdqForwardArgs& a, int max_threads) {
  const int64_t n = a.layout.nscale;
  float* s = a.enc;
  float* o = a.enc + n;
  float* k_s = a.enc + 2 * n;
  float* k_o = a.enc + 3 * n;
  float* k_ot = a.enc + 4 * n;
  for (int64_t i = 0; i < n; ++i) {
    const MinmaxEncoding e = minmax_encoding_one(a.mn[i], a.mx[i], a.qmin, a.qmax, a.min_scale, a.symmetric);
    s[i] = e.s;
    o[i] = e.o;
    k_s[i] = e.k_s;
    k_o[i] = e.k_o;
    k_ot[i] = e.k_ot;
  }
  const FakeQuantForwardArgs f{FqOp::QDQ, a.x, a.dt, a.y, a.dt, s, o, a.qmin, a.qmax, a.layout, a.act_lo, a.act_hi};
  return fake_quant_forward(f, max_threads);
}

const char* minmax_qdq_backward(const MinmaxQdqBackwardArgs& a, int max_threads) {
  const int64_t n = a.layout.nscale;
  const float* s = a.enc;
  const float* o = a.enc + n;
  const bool ranges = a.dmin != nullptr && a.dmax != nullptr;
  // ds lands in dmax and do in dmin, then both become the range's gradients in place
  const FakeQuantBackwardArgs b{a.g, a.x, a.dt, a.dx, s, o, a.qmin, a.qmax, a.layout, a.ws,
                                ranges ? a.dmax : nullptr, ranges && !a.symmetric ? a.dmin : nullptr,
                                a.grad_scale, a.act_lo, a.act_hi};
  const char* err = fake_quant_backward(b, max_threads);
  if (err || !ranges) return err;
  const float* k_s = a.enc + 2 * n;
  const float* k_o = a.enc + 3 * n;
  const float* k_ot = a.enc + 4 * n;
  for (int64_t i = 0; i < n; ++i) {
    const float ds = a.dmax[i];
    if (a.symmetric) {  // the offset is 0: dmin = -dmax
      const float dmax = ds * k_s[i];
      a.dmax[i] = dmax;
      a.dmin[i] = -dmax;
    } else {
      const float doff = a.dmin[i];
      const float dmax = (ds - doff * k_ot[i]) * k_s[i];
      a.dmax[i] = dmax;
      a.dmin[i] = doff * k_o[i] - dmax;
    }
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace pq
