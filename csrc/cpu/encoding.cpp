// CPU encodings of min/max ranges (encoding.h): a loop over the scale values, which are few.
#include "pyquant/cpu_api.h"
#include "pyquant/encoding.h"

namespace pq {
namespace cpu {

void minmax_encoding(const MinmaxEncodingArgs& a, int) {
  for (int64_t i = 0; i < a.n; ++i) {
    const MinmaxEncoding e = minmax_encoding_one(a.mn[i], a.mx[i], a.qmin, a.qmax, a.min_scale, a.symmetric);
    a.s[i] = e.s;
    a.o[i] = e.o;
    if (a.k_s) a.k_s[i] = e.k_s;
    if (!a.symmetric && a.k_o) {
      a.k_o[i] = e.k_o;
      a.k_ot[i] = e.k_ot;
    }
  }
}

void minmax_scale_product(const MinmaxScaleProductArgs& a, int) {
  // the scale does not depend on the symmetry (only the offset does)
  const float sa = minmax_encoding_one(a.a_mn[0], a.a_mx[0], a.a_qmin, a.a_qmax, a.a_min_scale, true).s;
  for (int64_t i = 0; i < a.n; ++i)
    a.out[i] = sa * minmax_encoding_one(a.b_mn[i], a.b_mx[i], a.b_qmin, a.b_qmax, a.b_min_scale, true).s;
}

}  // namespace cpu
}  // namespace pq
