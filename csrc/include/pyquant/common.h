// Shared definitions for the torch-free kernels: the host/device qualifier, the dtype enum and the
// scalar conversions between float32 and the 16-bit float formats (round to nearest even).
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

// Always inlined on the host too: the CPU loops are compiled once per SIMD level, and an out-of-line
// copy of a shared inline function would be one symbol for all levels -- the linker keeping, say, the
// AVX-512 copy for the baseline loops of a CPU without AVX-512.
#if defined(__CUDACC__)
#define PQ_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define PQ_HD inline __attribute__((always_inline))
#else
#define PQ_HD inline
#endif

namespace pq {

// Element types understood by the kernels. The numbering is part of the binding ABI.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, U8 = 4, I16 = 5, I32 = 6 };

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

PQ_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
PQ_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// clamp(v, lo, hi) that lets NaN through, as torch.clamp does, so kernels match their torch references.
PQ_HD float clamp_keep_nan(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

PQ_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// Round to nearest even, NaN -> quiet NaN (0x7FC0 with the input's sign), as torch does.
PQ_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t(((u >> 16) & 0x8000u) | 0x7fc0u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

PQ_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return f32_from_bits(sign);
    // Subnormal half: mant * 2^-24 is exact in float32.
    float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

// float32 -> IEEE half, round to nearest even; overflow -> inf, NaN -> quiet NaN.
PQ_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (u >= 0x38800000u) {                                  // normal half
    uint32_t v = u - 0x38000000u;
    v += 0xfffu + ((v >> 13) & 1u);
    return uint16_t(sign | (v >> 13));
  }
  if (u <= 0x33000000u) return sign;                       // <= 2^-25 rounds to zero
  const uint32_t e = u >> 23;
  const uint32_t mant = (u & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;                         // 14..24
  uint32_t h = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

// Scalar load/store between any element type and float32.
template <class T> struct Elem;
template <> struct Elem<float> {
  static PQ_HD float load(const float* p) { return *p; }
  static PQ_HD void store(float* p, float v) { *p = v; }
};
template <> struct Elem<half_t> {
  static PQ_HD float load(const half_t* p) { return f16_to_f32(p->bits); }
  static PQ_HD void store(half_t* p, float v) { p->bits = f32_to_f16(v); }
};
template <> struct Elem<bf16_t> {
  static PQ_HD float load(const bf16_t* p) { return bf16_to_f32(p->bits); }
  static PQ_HD void store(bf16_t* p, float v) { p->bits = f32_to_bf16(v); }
};
// Integer stores receive values already clamped to the grid (a subset of the type's range).
#define PQ_INT_ELEM(T)                                                     \
  template <> struct Elem<T> {                                             \
    static PQ_HD float load(const T* p) { return float(*p); }              \
    static PQ_HD void store(T* p, float v) { *p = T(int32_t(v)); }         \
  };
PQ_INT_ELEM(int8_t)
PQ_INT_ELEM(uint8_t)
PQ_INT_ELEM(int16_t)
PQ_INT_ELEM(int32_t)
#undef PQ_INT_ELEM

}  // namespace pq
