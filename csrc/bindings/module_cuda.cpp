// pyquant._C_cuda: the CUDA kernels. Like _C it sees raw addresses only; Python passes the current
// torch stream of the tensor's device (never the legacy default stream).
#include <pybind11/pybind11.h>
#include <stdexcept>
#include "layout_binding.h"
#include "pyquant/cuda_api.h"

namespace py = pybind11;
using namespace pq;

#ifndef PQ_CUDA_ARCHS
#define PQ_CUDA_ARCHS ""
#endif

static void check(const char* err) {
  if (err) throw std::runtime_error(std::string("pyquant CUDA kernel failed: ") + err);
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyquant CUDA kernels (torch-free)";
  bind_layout(m);
  m.def("adaround_forward",
        [](uintptr_t w, uintptr_t a, uintptr_t y, uintptr_t s, uintptr_t o, int64_t rows, int64_t row_len,
           int64_t nscale, float qmin, float qmax, bool hard, uintptr_t stream) {
          check(cuda::adaround_forward(ptr<const float>(w), ptr<const float>(a), ptr<float>(y), ptr<const float>(s),
                                       ptr<const float>(o), rows, row_len, nscale, qmin, qmax, hard, stream));
        });
  m.def("adaround_backward",
        [](uintptr_t g, uintptr_t w, uintptr_t a, uintptr_t da, uintptr_t s, uintptr_t o, int64_t rows,
           int64_t row_len, int64_t nscale, float qmin, float qmax, uintptr_t stream) {
          check(cuda::adaround_backward(ptr<const float>(g), ptr<const float>(w), ptr<const float>(a), ptr<float>(da),
                                        ptr<const float>(s), ptr<const float>(o), rows, row_len, nscale, qmin, qmax,
                                        stream));
        });
  m.def("adaround_regularizer_workspace", &cuda::adaround_regularizer_workspace);
  m.def("adaround_regularizer",
        [](uintptr_t a, int64_t n, float beta, uintptr_t grad, uintptr_t ws, uintptr_t value, uintptr_t stream) {
          check(cuda::adaround_regularizer(ptr<const float>(a), n, beta, ptr<float>(grad), ptr<double>(ws),
                                           ptr<double>(value), stream));
        });
  m.def("fake_quant_forward",
        [](int op, uintptr_t x, int xdt, uintptr_t y, int ydt, uintptr_t s, uintptr_t o, float qmin, float qmax,
           const QLayout& L, float act_lo, float act_hi, uintptr_t stream) {
          const char* err;
          {
            py::gil_scoped_release nogil;
            err = cuda::fake_quant_forward(FqOp(op), ptr<const void>(x), DType(xdt), ptr<void>(y), DType(ydt),
                                           ptr<const float>(s), ptr<const float>(o), qmin, qmax, L,
                                           ActClamp{act_lo, act_hi}, stream);
          }
          check(err);
        });
  m.def("fake_quant_backward",
        [](uintptr_t g, uintptr_t x, int dt, uintptr_t dx, uintptr_t s, uintptr_t o, float qmin, float qmax,
           const QLayout& L, uintptr_t ws, uintptr_t ds, uintptr_t doff, float grad_scale, float act_lo,
           float act_hi, uintptr_t stream) {
          const char* err;
          {
            py::gil_scoped_release nogil;
            err = cuda::fake_quant_backward(ptr<const void>(g), ptr<const void>(x), DType(dt), ptr<void>(dx),
                                            ptr<const float>(s), ptr<const float>(o), qmin, qmax, L,
                                            ActClamp{act_lo, act_hi}, ptr<double>(ws), ptr<float>(ds),
                                            ptr<float>(doff), grad_scale, stream);
          }
          check(err);
        },
        "ws holds 2 * nscale float64; with [act_lo, act_hi], x is the activation's input");
  m.def("minmax",
        [](uintptr_t x, int dt, const QLayout& L, uintptr_t mn, uintptr_t mx, uintptr_t nonfinite, uintptr_t stream) {
          const char* err;
          {
            py::gil_scoped_release nogil;
            err = cuda::minmax(ptr<const void>(x), DType(dt), L, ptr<float>(mn), ptr<float>(mx),
                               ptr<int64_t>(nonfinite), stream);
          }
          check(err);
        });
  m.def("histogram",
        [](uintptr_t x, int dt, const QLayout& L, uintptr_t lo, uintptr_t range, int64_t nbins, uintptr_t counts,
           uintptr_t stream) {
          const char* err;
          {
            py::gil_scoped_release nogil;
            err = cuda::histogram(ptr<const void>(x), DType(dt), L, ptr<const float>(lo), ptr<const float>(range),
                                  nbins, ptr<int64_t>(counts), stream);
          }
          check(err);
        });
  m.def("search",
        [](uintptr_t counts, int64_t G, int64_t nbins, uintptr_t c0, uintptr_t bw, uintptr_t cand_d, uintptr_t cand_o,
           int64_t C, float ns, float gamma, float p, uintptr_t best_idx, uintptr_t best_noise, uintptr_t stream) {
          const char* err;
          {
            py::gil_scoped_release nogil;
            err = cuda::search(ptr<const int64_t>(counts), G, nbins, ptr<const float>(c0), ptr<const float>(bw),
                               ptr<const float>(cand_d), ptr<const float>(cand_o), C, ns, gamma, p,
                               ptr<int64_t>(best_idx), ptr<double>(best_noise), stream);
          }
          check(err);
        });
  m.def("entropy_search",
        [](uintptr_t counts, int64_t G, int64_t nb, int64_t nq, uintptr_t best_i, uintptr_t best_kl, uintptr_t stream) {
          const char* err;
          {
            py::gil_scoped_release nogil;
            err = cuda::entropy_search(ptr<const int64_t>(counts), G, nb, nq, ptr<int64_t>(best_i),
                                       ptr<double>(best_kl), stream);
          }
          check(err);
        });
  m.def("device_count", &cuda::device_count);
  m.def("runtime_version", &cuda::runtime_version);
  m.attr("archs") = PQ_CUDA_ARCHS;
}
