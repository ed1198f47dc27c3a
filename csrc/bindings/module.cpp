// pyquant._C: the CPU kernels. Arguments are raw addresses, dtype codes and a Layout; tensors are
// made and checked in Python (pyquant/ops), so this module needs no libtorch.
#include <pybind11/pybind11.h>
#include <cmath>
#include <string>
#include "layout_binding.h"
#include "op_binding.h"
#include "pyquant/cpu_api.h"
#include "pyquant/native_table.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace pq;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyquant CPU kernels (torch-free)";
  bind_layout(m);

  def_cpu_op(m, "fake_quant_forward", &cpu::fake_quant_forward);
  def_cpu_op(m, "fake_quant_backward", &cpu::fake_quant_backward);
  def_cpu_op(m, "max_pool_forward", &cpu::max_pool_forward);
  def_cpu_op(m, "qdq_max_pool_forward", &cpu::qdq_max_pool_forward);
  def_cpu_op(m, "max_pool_backward", &cpu::max_pool_backward);
  def_cpu_op(m, "minmax", &cpu::minmax);
  def_cpu_op(m, "histogram", &cpu::histogram);
  def_cpu_op(m, "search", &cpu::search);
  def_cpu_op(m, "entropy_search", &cpu::entropy_search);
  def_cpu_op(m, "adaround_forward", &cpu::adaround_forward);
  def_cpu_op(m, "adaround_backward", &cpu::adaround_backward);
  def_cpu_op(m, "adaround_regularizer", &cpu::adaround_regularizer);
  def_cpu_op(m, "minmax_encoding", &cpu::minmax_encoding);
  def_cpu_op(m, "minmax_qdq_forward", &cpu::minmax_qdq_forward);
  def_cpu_op(m, "minmax_qdq_backward", &cpu::minmax_qdq_backward);
  def_cpu_op(m, "int32_fake_quant", &cpu::int32_fake_quant);
  def_cpu_op(m, "minmax_scale_product", &cpu::minmax_scale_product);
  m.def("first_bad_scale",
        [](uintptr_t s, int64_t n) -> int64_t {
          const float* p = reinterpret_cast<const float*>(s);
          for (int64_t i = 0; i < n; ++i)
            if (!(p[i] > 0.0f) || !std::isfinite(p[i])) return i;
          return -1;
        },
        py::arg("s"), py::arg("n"), "index of the first scale that is not positive and finite, or -1");
  static const NativeTable table{kNativeTableVersion, uint32_t(sizeof(QLayout)), &cpu::minmax_qdq_forward,
                                 &cpu::minmax_qdq_backward, &cpu_threads};
  m.attr("native_table") = py::capsule(&table, kNativeTableName);
  m.def("simd_level", []() { return std::string(simd_level()); }, "SIMD level in use: avx512, avx2 or baseline");
  m.def("set_simd_level", [](const std::string& name) { return set_simd_level(name.c_str()); },
        "Use 'avx512', 'avx2', 'baseline' or 'auto'; returns False if this CPU lacks it");
  m.def("num_threads", &cpu_threads, "threads the CPU kernels may use");
  m.def("set_num_threads", &set_cpu_threads, "cap the CPU kernels' threads (0: OpenMP's default)");
  m.def("pool_helpers", &cpu::pool_helpers, "helper threads the CPU kernels' pool has started");
  m.def("cpu_pool_enabled", &cpu::pool_enabled, "whether the CPU kernels split work on pyquant's pool (else OpenMP)");
  m.def("set_cpu_pool_enabled", &cpu::set_pool_enabled,
        "split the CPU kernels' work on pyquant's pool (True) or in OpenMP regions (False)");
#if defined(PQ_HAVE_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
