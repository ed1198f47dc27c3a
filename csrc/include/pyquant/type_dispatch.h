// Run-time codes to compile-time types, for the host code that picks a kernel instantiation (CPU
// loops and CUDA launches alike): a DType to its element type within a chosen set of types, and an
// FqOp to a constant. Host-only C++17, so nvcc compiles it in .cu host code too.
#pragma once
#include <type_traits>
#include "pyquant/common.h"
#include "pyquant/fake_quant.h"

namespace pq {

template <class T> struct TypeTag { using type = T; };
// The type of a tag, also when decltype names it as a reference (a tag captured by a nested lambda).
template <class Tag> using tag_type = typename std::decay_t<Tag>::type;

// The DType code of each element type.
template <class T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::F32; };
template <> struct DTypeOf<half_t> { static constexpr DType value = DType::F16; };
template <> struct DTypeOf<bf16_t> { static constexpr DType value = DType::BF16; };
template <> struct DTypeOf<int8_t> { static constexpr DType value = DType::I8; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::U8; };
template <> struct DTypeOf<int16_t> { static constexpr DType value = DType::I16; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::I32; };

template <class... T> struct TypeList {
  template <class U> static constexpr bool contains = (std::is_same_v<U, T> || ...);
};

// The sets of element types the ops accept, each with its message for a dtype outside it (a constant:
// these headers are compiled once per SIMD level, and code shared between those objects must not
// depend on the level's instructions).
struct FloatTypes : TypeList<float, half_t, bf16_t> {
  static constexpr const char* unsupported = "dtype must be float32, float16 or bfloat16";
};
struct AllTypes : TypeList<float, half_t, bf16_t, int8_t, uint8_t, int16_t, int32_t> {
  static constexpr const char* unsupported = "dtype must be float32, float16, bfloat16, int8, uint8, int16 or int32";
};

namespace detail {
// fn's error (nullptr when fn returns nothing).
template <class Fn, class Arg>
const char* call_for_error(Fn& fn, Arg arg) {
  if constexpr (std::is_void_v<decltype(fn(arg))>) {
    fn(arg);
    return nullptr;
  } else {
    return fn(arg);
  }
}

template <class T, class Fn>
bool try_dtype(DType dt, Fn& fn, const char*& err) {
  if (dt != DTypeOf<T>::value) return false;
  err = call_for_error(fn, TypeTag<T>{});
  return true;
}

// Set derives from TypeList<T...>, which deduces the types.
template <class Set, class... T, class Fn>
const char* dispatch_in(const TypeList<T...>*, DType dt, Fn& fn) {
  const char* err = nullptr;
  if (!(try_dtype<T>(dt, fn, err) || ...)) return Set::unsupported;
  return err;
}
}  // namespace detail

// Calls fn(TypeTag<T>{}) for the element type T of `dt` in the set and returns what fn returns (an
// error message, or nullptr when fn returns void). A dt outside the set calls nothing and returns the
// set's message. E.g. dispatch_dtype(FloatTypes{}, dt, [&](auto t) { using T = tag_type<decltype(t)>; ... }).
template <class Set, class Fn>
const char* dispatch_dtype(Set, DType dt, Fn&& fn) {
  return detail::dispatch_in<Set>(static_cast<const Set*>(nullptr), dt, fn);
}

// Calls fn(std::integral_constant<FqOp, OP>{}) for the op code (OP = tag_type<decltype(op)>::value);
// same return convention.
template <class Fn>
const char* dispatch_fq_op(FqOp op, Fn&& fn) {
  switch (op) {
    case FqOp::QDQ: return detail::call_for_error(fn, std::integral_constant<FqOp, FqOp::QDQ>{});
    case FqOp::Q: return detail::call_for_error(fn, std::integral_constant<FqOp, FqOp::Q>{});
    case FqOp::DQ: return detail::call_for_error(fn, std::integral_constant<FqOp, FqOp::DQ>{});
  }
  return "op must be 0 (quantize_dequantize), 1 (quantize) or 2 (dequantize)";
}

}  // namespace pq
