// pyquant._C: the CPU kernels. Arguments are raw addresses, dtype codes and a Layout; tensors are
// made and checked in Python (pyquant/ops), so this module needs no libtorch.
#include <pybind11/pybind11.h>
#include <cmath>
#include "kernel_table.h"
#include "stats_table.h"
#include "pool_table.h"
#include "layout_binding.h"
#include "adaround.h"

namespace py = pybind11;
using namespace pq;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyquant CPU kernels (torch-free)";
  bind_layout(m);

  m.def("fake_quant_forward",
        [](int op, uintptr_t x, int xdt, uintptr_t y, int ydt, uintptr_t s, uintptr_t o, float qmin, float qmax,
           const QLayout& L, float act_lo, float act_hi) {
          py::gil_scoped_release nogil;
          fake_quant_table().forward(FqOp(op), ptr<const void>(x), DType(xdt), ptr<void>(y), DType(ydt),
                                     ptr<const float>(s), ptr<const float>(o), qmin, qmax, L,
                                     ActClamp{act_lo, act_hi}, cpu_threads());
        },
        py::arg("op"), py::arg("x"), py::arg("xdt"), py::arg("y"), py::arg("ydt"), py::arg("s"), py::arg("o"),
        py::arg("qmin"), py::arg("qmax"), py::arg("layout"), py::arg("act_lo") = -INFINITY,
        py::arg("act_hi") = INFINITY,
        "y = op(x) for op 0=quantize_dequantize, 1=quantize, 2=dequantize; quantize_dequantize of a float x "
        "into its own dtype first clamps x to [act_lo, act_hi] (a fused ReLU/ReLU6/Hardtanh)");

  m.def("fake_quant_backward",
        [](uintptr_t g, uintptr_t x, int dt, uintptr_t dx, uintptr_t s, uintptr_t o, float qmin, float qmax,
           const QLayout& L, uintptr_t ws, uintptr_t ds, uintptr_t doff, float grad_scale, float act_lo,
           float act_hi) {
          py::gil_scoped_release nogil;
          fake_quant_table().backward(ptr<const void>(g), ptr<const void>(x), DType(dt), ptr<void>(dx),
                                      ptr<const float>(s), ptr<const float>(o), qmin, qmax, L,
                                      ActClamp{act_lo, act_hi}, ptr<double>(ws), ptr<float>(ds), ptr<float>(doff),
                                      grad_scale, cpu_threads());
        },
        py::arg("g"), py::arg("x"), py::arg("dt"), py::arg("dx"), py::arg("s"), py::arg("o"), py::arg("qmin"),
        py::arg("qmax"), py::arg("layout"), py::arg("ws"), py::arg("ds"), py::arg("doff"), py::arg("grad_scale"),
        py::arg("act_lo") = -INFINITY, py::arg("act_hi") = INFINITY,
        "fused backward of quantize_dequantize: dx and per-scale ds/do (null address = not wanted); "
        "ws holds num_threads() * 2 * nscale float64; with [act_lo, act_hi], x is the activation's input");

  m.def("max_pool_forward",
        [](uintptr_t x, int64_t planes, int64_t H, int64_t W, int kh, int kw, uintptr_t out, uintptr_t argmax) {
          py::gil_scoped_release nogil;
          pool_table().forward(ptr<const float>(x), planes, H, W, kh, kw, ptr<float>(out), ptr<uint8_t>(argmax),
                               cpu_threads());
        },
        "non-overlapping max pool (kernel kh x kw == stride) of float32 planes: out and the argmax's window "
        "position (uint8)");
  m.def("qdq_max_pool_forward",
        [](uintptr_t x, int64_t planes, int64_t H, int64_t W, int kh, int kw, uintptr_t s, uintptr_t o,
           int64_t channels, float qmin, float qmax, float act_lo, float act_hi, uintptr_t out, uintptr_t argmax,
           uintptr_t sel) {
          py::gil_scoped_release nogil;
          pool_table().qdq_forward(ptr<const float>(x), planes, H, W, kh, kw, ptr<const float>(s),
                                   ptr<const float>(o), channels, qmin, qmax, ActClamp{act_lo, act_hi},
                                   ptr<float>(out), ptr<uint8_t>(argmax), ptr<float>(sel), cpu_threads());
        },
        "max_pool_forward over the fake quantization of the clamped x; sel: x at each argmax");
  m.def("max_pool_backward",
        [](uintptr_t g, uintptr_t argmax, int64_t planes, int64_t H, int64_t W, int kh, int kw, uintptr_t dx) {
          py::gil_scoped_release nogil;
          pool_table().backward(ptr<const float>(g), ptr<const uint8_t>(argmax), planes, H, W, kh, kw,
                                ptr<float>(dx), cpu_threads());
        },
        "dx of max_pool_forward: g at each window's argmax, 0 elsewhere (fully written)");
  m.def("minmax",
        [](uintptr_t x, int dt, const QLayout& L, uintptr_t mn, uintptr_t mx, uintptr_t nonfinite, uintptr_t ws_f,
           uintptr_t ws_i) {
          py::gil_scoped_release nogil;
          stats_table().minmax(ptr<const void>(x), DType(dt), L, ptr<float>(mn), ptr<float>(mx),
                               ptr<int64_t>(nonfinite), ptr<float>(ws_f), ptr<int64_t>(ws_i), cpu_threads());
        },
        "per-group min/max of finite values and count of non-finite ones; ws_f: num_threads()*2*nscale "
        "float32, ws_i: num_threads()*nscale int64");
  m.def("histogram",
        [](uintptr_t x, int dt, const QLayout& L, uintptr_t lo, uintptr_t range, int64_t nbins, uintptr_t counts,
           uintptr_t ws, int64_t ws_len) {
          py::gil_scoped_release nogil;
          stats_table().histogram(ptr<const void>(x), DType(dt), L, ptr<const float>(lo), ptr<const float>(range),
                                  nbins, ptr<int64_t>(counts), ptr<int64_t>(ws), ws_len, cpu_threads());
        },
        "counts[nscale, nbins] (overwritten) of the finite elements of each group over [lo, lo + range); a "
        "workspace of num_threads()*4*nscale*nbins int64 lets threads count privately");
  m.def("search",
        [](uintptr_t counts, int64_t G, int64_t nbins, uintptr_t c0, uintptr_t bw, uintptr_t cand_d, uintptr_t cand_o,
           int64_t C, float ns, float gamma, float p, uintptr_t best_idx, uintptr_t best_noise) {
          py::gil_scoped_release nogil;
          stats_table().search(ptr<const int64_t>(counts), G, nbins, ptr<const float>(c0), ptr<const float>(bw),
                               ptr<const float>(cand_d), ptr<const float>(cand_o), C, ns, gamma, p,
                               ptr<int64_t>(best_idx), ptr<double>(best_noise), cpu_threads());
        },
        "index and noise of the best of C candidates (d, o) for each of G histograms");
  m.def("entropy_search",
        [](uintptr_t counts, int64_t G, int64_t nb, int64_t nq, uintptr_t best_i, uintptr_t best_kl) {
          py::gil_scoped_release nogil;
          entropy_search_cpu(ptr<const int64_t>(counts), G, nb, nq, ptr<int64_t>(best_i), ptr<double>(best_kl),
                             cpu_threads());
        },
        "clip point (number of kept bins) with the least KL divergence for each of G histograms");
  m.def("adaround_forward",
        [](uintptr_t w, uintptr_t a, uintptr_t y, uintptr_t s, uintptr_t o, int64_t rows, int64_t row_len,
           int64_t nscale, float qmin, float qmax, bool hard) {
          py::gil_scoped_release nogil;
          cpu::adaround_forward(ptr<const float>(w), ptr<const float>(a), ptr<float>(y), ptr<const float>(s),
                                ptr<const float>(o), rows, row_len, nscale, qmin, qmax, hard, cpu_threads());
        },
        "AdaRound soft (or hard) quantized weight, float32 [rows, row_len], nscale 1 or rows");
  m.def("adaround_backward",
        [](uintptr_t g, uintptr_t w, uintptr_t a, uintptr_t da, uintptr_t s, uintptr_t o, int64_t rows,
           int64_t row_len, int64_t nscale, float qmin, float qmax) {
          py::gil_scoped_release nogil;
          cpu::adaround_backward(ptr<const float>(g), ptr<const float>(w), ptr<const float>(a), ptr<float>(da),
                                 ptr<const float>(s), ptr<const float>(o), rows, row_len, nscale, qmin, qmax,
                                 cpu_threads());
        },
        "d(loss)/d(alpha) of the soft quantized weight");
  m.def("adaround_regularizer",
        [](uintptr_t a, int64_t n, float beta, uintptr_t grad) {
          py::gil_scoped_release nogil;
          return cpu::adaround_regularizer(ptr<const float>(a), n, beta, ptr<float>(grad), cpu_threads());
        },
        "sum(1 - |2h - 1|^beta) and its gradient in alpha");
  m.def("first_bad_scale",
        [](uintptr_t s, int64_t n) -> int64_t {
          const float* p = ptr<const float>(s);
          for (int64_t i = 0; i < n; ++i)
            if (!(p[i] > 0.0f) || !std::isfinite(p[i])) return i;
          return -1;
        },
        "index of the first scale that is not positive and finite, or -1");
  m.def("simd_level", []() { return std::string(simd_level()); }, "SIMD level in use: avx512, avx2 or baseline");
  m.def("set_simd_level", [](const std::string& name) { return set_simd_level(name.c_str()); },
        "Use 'avx512', 'avx2', 'baseline' or 'auto'; returns False if this CPU lacks it");
  m.def("num_threads", &cpu_threads, "threads the CPU kernels may use");
  m.def("set_num_threads", &set_cpu_threads, "cap the CPU kernels' threads (0: OpenMP's default)");
#if defined(PQ_HAVE_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
