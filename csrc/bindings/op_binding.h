// Binds a kernel entry point `R kernel(const Args&, ...)` as a Python function of Args' fields (op_args.h):
// positional parameters named after the fields, each converted from its wire type (below) into the
// struct, Args' description as the docstring, the kernel run without the GIL, and a returned error
// string raised as RuntimeError. Shared by the CPU module (_C) and the CUDA module (_C_cuda).
#pragma once
#include <pybind11/pybind11.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include "pyquant/cpu_api.h"
#include "pyquant/op_args.h"

namespace pq {

// How a field crosses from Python: pointers as integer addresses, DType/FqOp as their codes, the rest
// (numbers, bool, the Layout object) as themselves.
template <class T> struct Wire {
  using type = T;
  static T from(T v) { return v; }
};
template <class T> struct Wire<T*> {
  using type = uintptr_t;
  static T* from(uintptr_t p) { return reinterpret_cast<T*>(p); }
};
template <> struct Wire<DType> {
  using type = int32_t;
  static DType from(int32_t v) { return DType(v); }
};
template <> struct Wire<FqOp> {
  using type = int32_t;
  static FqOp from(int32_t v) { return FqOp(v); }
};

// Runs fn() without the GIL. A const char* result is an error (nullptr: none) raised as RuntimeError
// "<what><op>: <error>"; another result is returned.
template <class Fn>
auto call_without_gil(const char* what, const char* op, Fn&& fn) {
  using R = decltype(fn());
  if constexpr (std::is_same_v<R, const char*>) {
    const char* err;
    {
      pybind11::gil_scoped_release nogil;
      err = fn();
    }
    if (err) throw std::runtime_error(std::string(what) + op + ": " + err);
  } else {
    pybind11::gil_scoped_release nogil;
    return fn();
  }
}

namespace detail {
// Defines `name`(fields..., extra...) calling call(args, extra...).
template <class Args, class... Extra, class Call, class... F, size_t... I, class... Names>
void def_op(pybind11::module_& m, const char* name, const char* what, Call call, FieldTypes<void, F...>,
            std::index_sequence<I...>, Names... extra_names) {
  static_assert(sizeof...(F) == Args::kCount && sizeof...(Extra) == sizeof...(Names), "one name per parameter");
  m.def(
      name,
      [call, name, what](typename Wire<F>::type... fields, Extra... extra) {
        const Args args{Wire<F>::from(fields)...};
        return call_without_gil(what, name, [&] { return call(args, extra...); });
      },
      pybind11::arg(Args::kNames[I])..., pybind11::arg(extra_names)..., Args::kDoc);
}
}  // namespace detail

// A CPU op: kernel(args, max_threads), given the module's thread cap at each call.
template <class R, class Args>
void def_cpu_op(pybind11::module_& m, const char* name, R (*kernel)(const Args&, int max_threads)) {
  detail::def_op<Args>(
      m, name, "pyquant CPU kernel failed: ", [kernel](const Args& args) { return kernel(args, cpu_threads()); },
      typename Args::Fields{}, std::make_index_sequence<Args::kCount>{});
}

// A CUDA op: kernel(args, stream), Python passing the stream (a cudaStream_t as an integer) last.
template <class Args>
void def_cuda_op(pybind11::module_& m, const char* name, const char* (*kernel)(const Args&, uintptr_t stream)) {
  detail::def_op<Args, uintptr_t>(m, name, "pyquant CUDA kernel failed: ", kernel, typename Args::Fields{},
                                  std::make_index_sequence<Args::kCount>{}, "stream");
}

}  // namespace pq
