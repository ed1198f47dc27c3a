// pyquant._C_cuda: the CUDA kernels. Like _C it sees raw addresses only; Python passes the current
// torch stream of the tensor's device (never the legacy default stream).
#include <pybind11/pybind11.h>
#include "layout_binding.h"
#include "op_binding.h"
#include "pyquant/cuda_api.h"

namespace py = pybind11;
using namespace pq;

#ifndef PQ_CUDA_ARCHS
#define PQ_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyquant CUDA kernels (torch-free)";
  bind_layout(m);
  def_cuda_op(m, "fake_quant_forward", &cuda::fake_quant_forward);
  def_cuda_op(m, "fake_quant_backward", &cuda::fake_quant_backward);
  def_cuda_op(m, "minmax", &cuda::minmax);
  def_cuda_op(m, "histogram", &cuda::histogram);
  def_cuda_op(m, "search", &cuda::search);
  def_cuda_op(m, "entropy_search", &cuda::entropy_search);
  def_cuda_op(m, "adaround_forward", &cuda::adaround_forward);
  def_cuda_op(m, "adaround_backward", &cuda::adaround_backward);
  def_cuda_op(m, "adaround_regularizer", &cuda::adaround_regularizer);
  m.def("adaround_regularizer_workspace", &cuda::adaround_regularizer_workspace, py::arg("n"),
        "float64 entries of adaround_regularizer's ws for n values");
  m.def("device_count", &cuda::device_count);
  m.def("runtime_version", &cuda::runtime_version);
  m.attr("archs") = PQ_CUDA_ARCHS;
}
