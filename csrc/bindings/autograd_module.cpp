// pyquant._C_autograd: a min/max quantizer's training call (encoding, fake quantization, and back to min
// and max) as one C++ autograd node. A Python autograd node costs more per call than torch's whole
// learnable fake-quant op, so on small tensors the Python bookkeeping, not the kernel, set the price of a
// quantizer; here the node is a torch::autograd::Function and the call's only Python step is its entry.
//
// The one part of pyquant built against libtorch. The kernels stay in pyquant._C (torch-free); this
// module reaches them through the function table that _C hands out (pyquant/native_table.h), so both
// use one copy of the kernels, their thread cap and SIMD choice. pyquant.ops checks the arguments
// (dtypes, devices, layout) before it calls in; the checks here only keep a wrong call from reading
// out of bounds.
#include <torch/extension.h>
#include <torch/headeronly/version.h>

#include <cstring>
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

// What the backward needs besides x, kept in the tail of the forward's state buffer (after the
// encoding's 5 x nscale floats) so that the node saves two tensors and no map entries.
struct Saved {
  pq::QLayout layout;
  float qmin, qmax, grad_scale, act_lo, act_hi;
  bool symmetric;
  int32_t range_dims;
  int64_t range_shape[kMaxRangeDims];
};

constexpr int64_t kSavedFloats = int64_t((sizeof(Saved) + sizeof(float) - 1) / sizeof(float));

Saved read_saved(const at::Tensor& state, int64_t nscale) {
  Saved s;
  std::memcpy(&s, state.data_ptr<float>() + 5 * nscale, sizeof(Saved));
  return s;
}

struct MinmaxQdq : public ag::Function<MinmaxQdq> {
  static at::Tensor forward(ag::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mn,
                            const at::Tensor& mx, const Saved& saved, double min_scale) {
    const pq::QLayout& L = saved.layout;
    const int64_t n = L.nscale;
    at::Tensor y = at::empty_like(x);
    at::Tensor state = at::empty({5 * n + kSavedFloats}, x.options().dtype(at::kFloat));
    std::memcpy(state.data_ptr<float>() + 5 * n, &saved, sizeof(Saved));
    const pq::MinmaxQdqForwardArgs a{x.data_ptr(), dtype_code(x), y.data_ptr(), mn.data_ptr<float>(),
                                     mx.data_ptr<float>(), saved.qmin, saved.qmax, float(min_scale),
                                     saved.symmetric, L, saved.act_lo, saved.act_hi, state.data_ptr<float>()};
    raise_if(table().minmax_qdq_forward(a, table().threads()), "minmax_qdq_forward");
    ctx->save_for_backward({x, state});
    return y;
  }

  static ag::variable_list backward(ag::AutogradContext* ctx, ag::variable_list grads) {
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_range = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    ag::variable_list out(5);  // x, mn, mx and the two constants
    if (!grads[0].defined() || !(need_x || need_range)) return out;
    const auto saved_vars = ctx->get_saved_variables();
    const at::Tensor& x = saved_vars[0];
    const at::Tensor& state = saved_vars[1];
    const int64_t n = (state.numel() - kSavedFloats) / 5;
    const Saved s = read_saved(state, n);
    const at::Tensor g = grads[0].to(x.scalar_type()).contiguous();
    at::Tensor dx = need_x ? at::empty_like(x) : at::Tensor();
    at::Tensor dmin, dmax, ws;
    if (need_range) {
      const at::IntArrayRef shape(s.range_shape, size_t(s.range_dims));
      dmin = at::empty(shape, state.options());
      dmax = at::empty(shape, state.options());
      ws = at::empty({int64_t(table().threads()) * 2 * n}, state.options().dtype(at::kDouble));
    }
    const pq::MinmaxQdqBackwardArgs a{g.data_ptr(), x.data_ptr(), dtype_code(x), need_x ? dx.data_ptr() : nullptr,
                                      state.data_ptr<float>(), s.qmin, s.qmax, s.symmetric, s.layout,
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

// The entry: x contiguous on the CPU; mn and mx the range parameters (float32, contiguous, the layout's
// nscale values each, in the parameters' own shape, which their gradients take); `layout` the address of
// a pyquant._C Layout for x's shape and the range's block-broadcast shape (copied here).
at::Tensor minmax_qdq(const at::Tensor& x, const at::Tensor& mn, const at::Tensor& mx, uintptr_t layout,
                      double qmin, double qmax, double min_scale, bool symmetric, double grad_scale,
                      double act_lo, double act_hi) {
  TORCH_CHECK(layout != 0, "minmax_qdq: no layout");
  Saved s{};
  s.layout = *reinterpret_cast<const pq::QLayout*>(layout);
  TORCH_CHECK(x.device().is_cpu() && mn.device().is_cpu() && mx.device().is_cpu(),
              "minmax_qdq: x, mn and mx must be CPU tensors");
  TORCH_CHECK(x.is_contiguous() && x.numel() == s.layout.numel, "minmax_qdq: x must be contiguous with ",
              s.layout.numel, " elements (the layout's)");
  for (const at::Tensor* p : {&mn, &mx})
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == s.layout.nscale,
                "minmax_qdq: mn and mx must be contiguous float32 with the layout's ", s.layout.nscale,
                " values");
  TORCH_CHECK(mn.sizes() == mx.sizes(), "minmax_qdq: mn and mx differ in shape");
  TORCH_CHECK(mn.dim() <= kMaxRangeDims, "minmax_qdq: a range of at most ", kMaxRangeDims, " dimensions");
  s.qmin = float(qmin);
  s.qmax = float(qmax);
  s.grad_scale = float(grad_scale);
  s.act_lo = float(act_lo);
  s.act_hi = float(act_hi);
  s.symmetric = symmetric;
  s.range_dims = int32_t(mn.dim());
  for (int64_t d = 0; d < mn.dim(); ++d) s.range_shape[d] = mn.size(d);
  return MinmaxQdq::apply(x, mn, mx, s, min_scale);
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
        py::arg("act_lo"), py::arg("act_hi"), py::call_guard<py::gil_scoped_release>(),
        "a min/max quantizer's training call as one autograd node: minmax_qdq_forward, and in the backward "
        "minmax_qdq_backward (dx, and the gradients of mn and mx in their own shape)");
}
