// AdaRound (Nagel et al., 2020) per-element math, shared by the CPU loops and the CUDA kernels; the
// contract is in docs/design.md, 5.10. Rows of a weight (output channels) share one scale and offset.
//   sig = sigmoid(alpha) (computed in double, rounded to float), hr = sig * (zeta - gamma) + gamma,
//   h = clamp(hr, 0, 1), t = (floor(w / s) + h) - o, w~ = (clamp(t, qmin, qmax) + o) * s
// Hard rounding replaces h by (alpha >= 0).
#pragma once
#include <cmath>
#include "pyquant/common.h"

namespace pq {

constexpr float kAdaZeta = 1.1f;
constexpr float kAdaGamma = -0.1f;
constexpr float kAdaStretch = 1.2f;  // zeta - gamma

PQ_HD float ada_sigmoid(float a) { return float(1.0 / (1.0 + exp(-double(a)))); }

struct AdaTerms {
  float sig, hr, h, t;
};

PQ_HD AdaTerms ada_terms(float w, float a, float s, float o, bool hard) {
  AdaTerms r;
  r.sig = ada_sigmoid(a);
  r.hr = r.sig * kAdaStretch + kAdaGamma;
  r.h = hard ? (a >= 0.f ? 1.f : 0.f) : clamp_keep_nan(r.hr, 0.f, 1.f);
  r.t = (floorf(w / s) + r.h) - o;
  return r;
}

PQ_HD float ada_weight(float w, float a, float s, float o, float qmin, float qmax, bool hard) {
  const AdaTerms r = ada_terms(w, a, s, o, hard);
  return (clamp_keep_nan(r.t, qmin, qmax) + o) * s;
}

// d w~ / d alpha times g: zero where t or hr was clamped (torch.clamp passes the gradient on the
// closed interval).
PQ_HD float ada_weight_grad(float g, float w, float a, float s, float o, float qmin, float qmax) {
  const AdaTerms r = ada_terms(w, a, s, o, false);
  const bool pass = (r.t >= qmin) && (r.t <= qmax) && (r.hr >= 0.f) && (r.hr <= 1.f);
  if (!pass) return 0.f;
  return ((g * s) * kAdaStretch) * (r.sig * (1.f - r.sig));
}

// One element of the rounding regularizer 1 - |2h - 1|^beta and its derivative in alpha.
struct AdaReg {
  double value;
  float grad;
};

PQ_HD AdaReg ada_reg(float a, float beta) {
  const float sig = ada_sigmoid(a);
  const float hr = sig * kAdaStretch + kAdaGamma;
  const float h = clamp_keep_nan(hr, 0.f, 1.f);
  const float d = 2.f * h - 1.f;
  const double ad = fabs(double(d));
  const bool pass = (hr >= 0.f) && (hr <= 1.f);
  AdaReg r;
  r.grad = 0.f;
  if (!pass) {  // clamped: |d| is 1 (the term is 0), or NaN; no gradient
    r.value = ad == 1.0 ? 0.0 : 1.0 - pow(ad, double(beta));
  } else if (ad == 0.0) {  // |d|^beta = 0 for any beta > 0; its derivative term is taken as 0
    r.value = 1.0;
  } else {  // one power serves the value and the gradient: |d|^beta = |d|^(beta-1) * |d|
    const double p = pow(ad, double(beta) - 1.0);
    r.value = 1.0 - p * ad;
    const double dd = -double(beta) * p * (d > 0.f ? 1.0 : -1.0);
    r.grad = float(dd * 2.0 * double(kAdaStretch) * double(sig) * (1.0 - double(sig)));
  }
  return r;
}

}  // namespace pq
