// pyquant._C_autograd: a min/max quantizer's training call (encoding, fake quantization, and back to min
// and max) as one C++ autograd node. A Python autograd node costs more per call than torch's whole
// learnable fake-quant op, so on small tensors the Python bookkeeping, not the kernel, set the price of a
// quantizer; here the node is a torch::autograd::Function and the call's only Python step is its entry.
//
// The one part of pyquant built against libtorch. The kernels stay in pyquant._C (torch-free); this
// module reaches them through the function table that _C hands out (pyquant/native_table.h), so both
// use one copy of the kernels, their thread cap and SIMD choice. pyquant.ops plans the layout from the
// shapes (a range shape that does not fit x raises there); the entry here declines a call it does not
// take (None: the quantizer's Python node runs) and checks the tensors against the layout, so that a
// wrong call cannot read out of bounds.
#include <torch/extension.h>
#include <torch/headeronly/version.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include "pyquant/native_table.h"

namespace py = pybind11;
namespace ag = torch::autograd;

namespace {

const pq::NativeTable* g_table = nullptr;

const pq::NativeTable& table() {
  TORCH_CHECK(g_table != nullptr, "pyquant._C_autograd is not bound to pyquant._C's kernels (call bind)");
  return *g_table;
}

pq::DType dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return pq::DType::F32;
    case at::kHalf: return pq::DType::F16;
    case at::kBFloat16: return pq::DType::BF16;
    default: TORCH_CHECK(false, "x must be float32, float16 or bfloat16; got ", x.scalar_type());
  }
}

void raise_if(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "pyquant CPU kernel failed: ", op, ": ", err ? err : "");
}

constexpr int kMaxRangeDims = 8;

// What the backward needs besides x and the encoding: kept as one byte string in the node's saved data,
// so that the saved tensors are the ones the Python node saved (x and the encoding's values).
struct Saved {
  pq::QLayout layout;
  float qmin, qmax, grad_scale, act_lo, act_hi;
  bool symmetric;
  int32_t range_dims;
  int64_t range_shape[kMaxRangeDims];
};

constexpr const char* kSavedKey = "pyquant";

struct MinmaxQdq : public ag::Function<MinmaxQdq> {
  static at::Tensor forward(ag::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mn,
                            const at::Tensor& mx, const Saved& saved, double min_scale) {
    const pq::QLayout& L = saved.layout;
    const int64_t n = L.nscale;
    at::Tensor y = at::empty_like(x);
    at::Tensor enc = at::empty({5 * n}, x.options().dtype(at::kFloat));
    const pq::MinmaxQdqForwardArgs a{x.data_ptr(), dtype_code(x), y.data_ptr(), mn.data_ptr<float>(),
                                     mx.data_ptr<float>(), saved.qmin, saved.qmax, float(min_scale),
                                     saved.symmetric, L, saved.act_lo, saved.act_hi, enc.data_ptr<float>()};
    raise_if(table().minmax_qdq_forward(a, table().threads()), "minmax_qdq_forward");
    ctx->save_for_backward({x, enc});
    ctx->saved_data[kSavedKey] = std::string(reinterpret_cast<const char*>(&saved), sizeof(Saved));
    return y;
  }

  static ag::variable_list backward(ag::AutogradContext* ctx, ag::variable_list grads) {
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_range = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    ag::variable_list out(5);  // x, mn, mx and the two constants
    if (!grads[0].defined() || !(need_x || need_range)) return out;
    const auto saved_vars = ctx->get_saved_variables();
    const at::Tensor& x = saved_vars[0];
    const at::Tensor& enc = saved_vars[1];
    const int64_t n = enc.numel() / 5;
    Saved s;
    std::memcpy(&s, ctx->saved_data[kSavedKey].toStringRef().data(), sizeof(Saved));
    const at::Tensor g = grads[0].to(x.scalar_type()).contiguous();
    at::Tensor dx = need_x ? at::empty_like(x) : at::Tensor();
    at::Tensor dmin, dmax, ws;
    if (need_range) {
      const at::IntArrayRef shape(s.range_shape, size_t(s.range_dims));
      dmin = at::empty(shape, enc.options());
      dmax = at::empty(shape, enc.options());
      ws = at::empty({int64_t(table().threads()) * 2 * n}, enc.options().dtype(at::kDouble));
    }
    const pq::MinmaxQdqBackwardArgs a{g.data_ptr(), x.data_ptr(), dtype_code(x), need_x ? dx.data_ptr() : nullptr,
                                      enc.data_ptr<float>(), s.qmin, s.qmax, s.symmetric, s.layout,
                                      need_range ? ws.data_ptr<double>() : nullptr,
                                      need_range ? dmin.data_ptr<float>() : nullptr,
                                      need_range ? dmax.data_ptr<float>() : nullptr, s.grad_scale, s.act_lo,
                                      s.act_hi};
    raise_if(table().minmax_qdq_backward(a, table().threads()), "minmax_qdq_backward");
    out[0] = dx;
    if (ctx->needs_input_grad(1)) out[1] = dmin;
    if (ctx->needs_input_grad(2)) out[2] = dmax;
    return out;
  }
};

bool node_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The entry: y for x, or None where the node does not take the call (x strided, empty or not a float
// type; ranges that are not contiguous float32 CPU tensors; an activation range that is not lo < hi) and
// the caller runs its own path, which accepts or refuses the call with its own errors. mn and mx are the
// range parameters in their own shape, which their gradients take; `layout` the address of a pyquant._C
// Layout for x's shape and the range's block-broadcast shape (copied here).
py::object minmax_qdq(const at::Tensor& x, const at::Tensor& mn, const at::Tensor& mx, uintptr_t layout,
                      double qmin, double qmax, double min_scale, bool symmetric, double grad_scale,
                      std::optional<double> act_lo, std::optional<double> act_hi) {
  const double lo = act_lo.value_or(-INFINITY), hi = act_hi.value_or(INFINITY);
  const bool ranges_fit = mn.scalar_type() == at::kFloat && mx.scalar_type() == at::kFloat &&
                          mn.device().is_cpu() && mx.device().is_cpu() && mn.is_contiguous() &&
                          mx.is_contiguous() && mn.sizes() == mx.sizes() && mn.dim() <= kMaxRangeDims;
  if (!(x.device().is_cpu() && x.is_contiguous() && x.numel() > 0 && node_dtype(x) && ranges_fit && lo < hi &&
        lo != INFINITY && hi != -INFINITY))
    return py::none();
  TORCH_CHECK(layout != 0, "minmax_qdq: no layout");
  Saved s{};
  s.layout = *reinterpret_cast<const pq::QLayout*>(layout);
  TORCH_CHECK(x.numel() == s.layout.numel, "minmax_qdq: x has ", x.numel(), " elements, the layout's ",
              s.layout.numel);
  TORCH_CHECK(mn.numel() == s.layout.nscale, "minmax_qdq: mn and mx must have the layout's ", s.layout.nscale,
              " values, got ", mn.numel());
  s.qmin = float(qmin);
  s.qmax = float(qmax);
  s.grad_scale = float(grad_scale);
  s.act_lo = float(lo);
  s.act_hi = float(hi);
  s.symmetric = symmetric;
  s.range_dims = int32_t(mn.dim());
  for (int64_t d = 0; d < mn.dim(); ++d) s.range_shape[d] = mn.size(d);
  at::Tensor y;
  {
    py::gil_scoped_release nogil;
    y = MinmaxQdq::apply(x, mn, mx, s, min_scale);
  }
  return py::cast(std::move(y));
}

}  // namespace

PYBIND11_MODULE(_C_autograd, m) {
  m.doc() = "pyquant's C++ autograd nodes (built against libtorch; kernels from pyquant._C)";
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                            "." + std::to_string(TORCH_VERSION_PATCH);
  m.def(
      "bind",
      [](py::capsule cap) {
        if (std::strcmp(cap.name() ? cap.name() : "", pq::kNativeTableName) != 0)
          throw std::invalid_argument(std::string("bind: expected the capsule ") + pq::kNativeTableName);
        const auto* t = cap.get_pointer<pq::NativeTable>();
        if (t->version != pq::kNativeTableVersion || t->layout_size != sizeof(pq::QLayout))
          throw std::runtime_error("bind: pyquant._C and pyquant._C_autograd come from different builds");
        g_table = t;
      },
      py::arg("native_table"), "use the kernels of pyquant._C (its `native_table` capsule)");
  m.def("minmax_qdq", &minmax_qdq, py::arg("x"), py::arg("mn"), py::arg("mx"), py::arg("layout"),
        py::arg("qmin"), py::arg("qmax"), py::arg("min_scale"), py::arg("symmetric"), py::arg("grad_scale"),
        py::arg("act_lo"), py::arg("act_hi"),
        "a min/max quantizer's training call as one autograd node: minmax_qdq_forward, and in the backward "
        "minmax_qdq_backward (dx, and the gradients of mn and mx in their own shape); None where the node "
        "does not take the call");
}
