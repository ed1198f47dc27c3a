// Python view of QLayout, shared by the CPU and CUDA modules. Python builds one per
// (shape, scale shape) and caches it, so a call pays no list conversion.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <stdexcept>
#include <vector>
#include "pyquant/fake_quant.h"

namespace pq {

inline void bind_layout(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<QLayout>(m, "Layout", py::module_local())
      .def(py::init([](int64_t numel, int64_t row_len, int64_t inner_block, int64_t nscale,
                       const std::vector<int64_t>& size, const std::vector<int64_t>& block,
                       const std::vector<int64_t>& sstride) {
             if (size.size() != block.size() || size.size() != sstride.size())
               throw std::invalid_argument("Layout: outer size/block/stride lists differ in length");
             if (size.size() > size_t(kMaxOuterDims))
               throw std::invalid_argument("Layout: too many outer dimensions after collapsing");
             if (row_len <= 0 || inner_block <= 0 || nscale <= 0 || numel < 0 || numel % row_len)
               throw std::invalid_argument("Layout: inconsistent sizes");
             QLayout L;
             L.numel = numel;
             L.row_len = row_len;
             L.inner_block = inner_block;
             L.nscale = nscale;
             L.n_outer = int32_t(size.size());
             for (size_t d = 0; d < size.size(); ++d) {
               if (size[d] <= 0 || block[d] <= 0) throw std::invalid_argument("Layout: bad outer dimension");
               L.outer_size[d] = size[d];
               L.outer_block[d] = block[d];
               L.outer_sstride[d] = sstride[d];
             }
             return L;
           }),
           py::arg("numel"), py::arg("row_len"), py::arg("inner_block"), py::arg("nscale"),
           py::arg("outer_size"), py::arg("outer_block"), py::arg("outer_sstride"))
      .def_readonly("numel", &QLayout::numel)
      .def_readonly("row_len", &QLayout::row_len)
      .def_readonly("inner_block", &QLayout::inner_block)
      .def_readonly("nscale", &QLayout::nscale)
      .def("row_base", &QLayout::row_base)
      // where the struct lives, for the autograd module, which copies it (the Python object outlives the call)
      .def_property_readonly("address", [](const QLayout& L) { return reinterpret_cast<uintptr_t>(&L); })
      .def("__repr__", [](const QLayout& L) {
        return "Layout(numel=" + std::to_string(L.numel) + ", row_len=" + std::to_string(L.row_len) +
               ", inner_block=" + std::to_string(L.inner_block) + ", nscale=" + std::to_string(L.nscale) +
               ", outer_dims=" + std::to_string(L.n_outer) + ")";
      });
}

}  // namespace pq
