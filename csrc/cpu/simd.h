// Thin vector wrappers, one per instruction set, so that the fake-quant loops are written once.
// Each translation unit is compiled with its own -m flags and sees only the wrappers it can use.
// Lanes hold float32; load/store convert from/to the element type. Min/max are ordered so that a
// NaN lane passes through the clamp, as in the scalar code.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include "pyquant/common.h"
#include "pyquant/stats.h"

namespace pq {

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct IsaAvx512 {
  static constexpr int W = 16;
  using V = __m512;
  using M = __mmask16;
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V rint(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V clamp(V v, V lo, V hi) { return _mm512_max_ps(lo, _mm512_min_ps(hi, v)); }
  static M inside(V q, V lo, V hi) {
    return _mm512_cmp_ps_mask(q, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(q, hi, _CMP_LE_OQ);
  }
  static V mask_to_one(M m) { return _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0f)); }
  static V select(M m, V if_true, V if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  // ActClamp::passes: not (x <= lo), and not (x >= hi) when hi is finite; NaN passes.
  static M act_passes(V x, V lo, V hi, bool hi_finite) {
    M m = _mm512_cmp_ps_mask(x, lo, _CMP_NLE_UQ);
    return hi_finite ? M(m & _mm512_cmp_ps_mask(x, hi, _CMP_NGE_UQ)) : m;
  }
  // max pooling: v > m or v is NaN (aten's update rule); 2W floats -> even and odd lanes; uint8 lanes
  static M gt_or_nan(V v, V m) { return _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
  static void deinterleave(V a, V b, V& even, V& odd) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    even = _mm512_permutex2var_ps(a, ie, b);
    odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(ie, _mm512_set1_epi32(1)), b);
  }
  static void store_partial(float* p, V v, int count) { _mm512_mask_storeu_ps(p, __mmask16((1u << count) - 1u), v); }
  static void store_u8(uint8_t* p, V v) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v))); }
  static void to_array(float* dst, V v) { _mm512_storeu_ps(dst, v); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  // The first `count` (0..W) lanes from p, the rest 0 (nothing beyond them is read).
  static V load_partial(const float* p, int count) {
    return _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1u), p);
  }
  static V load(const half_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static V load(const bf16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static __m256i to_f16(V v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m256i to_bf16(V v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i qnan = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
                                   _mm512_set1_epi32(0x7fc0));
    r = _mm512_mask_mov_epi32(r, nan, qnan);
    return _mm512_cvtepi32_epi16(r);
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(half_t* p, V v) { _mm256_storeu_si256((__m256i*)p, to_f16(v)); }
  static void store(bf16_t* p, V v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
  // Streaming stores need the address aligned to the store width.
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static void stream(half_t* p, V v) { _mm256_stream_si256((__m256i*)p, to_f16(v)); }
  static void stream(bf16_t* p, V v) { _mm256_stream_si256((__m256i*)p, to_bf16(v)); }
  static void fence() { _mm_sfence(); }

  // statistics
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static M finite(V v) { return __mmask16(~_mm512_fpclass_ps_mask(v, 0x99)); }  // not NaN or +-inf
  static int count_false(M m) { return W - __builtin_popcount(unsigned(m)); }
  static unsigned bits(M m) { return unsigned(m); }
  static float hmin(V v) { return _mm512_reduce_min_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static void to_int_array(int32_t* dst, V v) { _mm512_storeu_si512((void*)dst, _mm512_cvttps_epi32(v)); }
  // Eight float64 partial sums; lanes 0..15 of v are added in order (lane l and l+8 into sum l).
  using D8 = __m512d;
  static D8 dzero() { return _mm512_setzero_pd(); }
  static D8 dadd8(D8 acc, V v) {
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  static void dstore8(double* dst, D8 acc) { _mm512_storeu_pd(dst, acc); }
};
#endif

#if defined(__AVX2__) && defined(__F16C__)
struct IsaAvx2 {
  static constexpr int W = 8;
  using V = __m256;
  using M = __m256;
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V rint(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V clamp(V v, V lo, V hi) { return _mm256_max_ps(lo, _mm256_min_ps(hi, v)); }
  static M inside(V q, V lo, V hi) {
    return _mm256_and_ps(_mm256_cmp_ps(q, lo, _CMP_GE_OQ), _mm256_cmp_ps(q, hi, _CMP_LE_OQ));
  }
  static V mask_to_one(M m) { return _mm256_and_ps(m, _mm256_set1_ps(1.0f)); }
  static V select(M m, V if_true, V if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static M act_passes(V x, V lo, V hi, bool hi_finite) {
    M m = _mm256_cmp_ps(x, lo, _CMP_NLE_UQ);
    return hi_finite ? _mm256_and_ps(m, _mm256_cmp_ps(x, hi, _CMP_NGE_UQ)) : m;
  }
  static M gt_or_nan(V v, V m) { return _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
  static void deinterleave(V a, V b, V& even, V& odd) {
    // [a0 a2 b0 b2 | a4 a6 b4 b6] -> [a0 a2 a4 a6 b0 b2 b4 b6]
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
  }
  static void store_partial(float* p, V v, int count) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), idx), v);
  }
  static void store_u8(uint8_t* p, V v) {
    alignas(32) int32_t t[8];
    _mm256_store_si256((__m256i*)t, _mm256_cvttps_epi32(v));
    for (int i = 0; i < 8; ++i) p[i] = uint8_t(t[i]);
  }
  static void to_array(float* dst, V v) { _mm256_storeu_ps(dst, v); }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_partial(const float* p, int count) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), idx));
  }
  static V load(const half_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static V load(const bf16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static __m128i to_f16(V v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m128i to_bf16(V v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i qnan = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                   _mm256_set1_epi32(0x7fc0));
    r = _mm256_blendv_epi8(r, qnan, nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(half_t* p, V v) { _mm_storeu_si128((__m128i*)p, to_f16(v)); }
  static void store(bf16_t* p, V v) { _mm_storeu_si128((__m128i*)p, to_bf16(v)); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static void stream(half_t* p, V v) { _mm_stream_si128((__m128i*)p, to_f16(v)); }
  static void stream(bf16_t* p, V v) { _mm_stream_si128((__m128i*)p, to_bf16(v)); }
  static void fence() { _mm_sfence(); }

  // statistics
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static M finite(V v) {
    const V absv = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return _mm256_cmp_ps(absv, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
  }
  static int count_false(M m) { return W - __builtin_popcount(unsigned(_mm256_movemask_ps(m))); }
  static unsigned bits(M m) { return unsigned(_mm256_movemask_ps(m)); }
  static float hmin(V v) {
    alignas(32) float a[W];
    _mm256_store_ps(a, v);
    float r = a[0];
    for (int i = 1; i < W; ++i) r = a[i] < r ? a[i] : r;
    return r;
  }
  static float hmax(V v) {
    alignas(32) float a[W];
    _mm256_store_ps(a, v);
    float r = a[0];
    for (int i = 1; i < W; ++i) r = a[i] > r ? a[i] : r;
    return r;
  }
  static void to_int_array(int32_t* dst, V v) { _mm256_storeu_si256((__m256i*)dst, _mm256_cvttps_epi32(v)); }
  // Eight float64 partial sums as two halves (lanes 0..3 and 4..7 of v).
  struct D8 { __m256d lo, hi; };
  static D8 dzero() { return D8{_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static D8 dadd8(D8 acc, V v) {
    acc.lo = _mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    return acc;
  }
  static void dstore8(double* dst, D8 acc) { _mm256_storeu_pd(dst, acc.lo); _mm256_storeu_pd(dst + 4, acc.hi); }
};
#endif

// The baseline: one lane, so the loops take their scalar paths (left to the compiler). The
// members exist only so that the shared loops compile; has_vec() keeps them unused.
struct IsaScalar {
  static constexpr int W = 1;
  using V = float;
  using M = bool;
  static V set1(float f) { return f; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V rint(V v) { return rintf(v); }
  static V clamp(V v, V lo, V hi) { v = v < lo ? lo : v; return v > hi ? hi : v; }
  static M inside(V q, V lo, V hi) { return q >= lo && q <= hi; }
  static V mask_to_one(M m) { return m ? 1.0f : 0.0f; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static M act_passes(V x, V lo, V hi, bool hi_finite) { return !(x <= lo) && !(hi_finite && x >= hi); }
  static M gt_or_nan(V v, V m) { return (v > m) || (v != v); }
  static void deinterleave(V a, V b, V& even, V& odd) { even = a; odd = b; }
  static void store_partial(float* p, V v, int count) { if (count > 0) *p = v; }
  static void store_u8(uint8_t* p, V v) { *p = uint8_t(v); }
  static void to_array(float* dst, V v) { *dst = v; }
  template <class T> static V load(const T* p) { return Elem<T>::load(p); }
  static V load_partial(const float* p, int count) { return count > 0 ? *p : 0.0f; }
  template <class T> static void store(T* p, V v) { Elem<T>::store(p, v); }
  template <class T> static void stream(T* p, V v) { Elem<T>::store(p, v); }
  static void fence() {}
  static V min(V a, V b) { return b < a ? b : a; }
  static V max(V a, V b) { return b > a ? b : a; }
  static M finite(V v) { return is_finite(v); }
  static int count_false(M m) { return m ? 0 : 1; }
  static unsigned bits(M m) { return m ? 1u : 0u; }
  static float hmin(V v) { return v; }
  static float hmax(V v) { return v; }
  static void to_int_array(int32_t* dst, V v) { *dst = int32_t(v); }
  using D8 = double;
  static D8 dzero() { return 0.0; }
  static D8 dadd8(D8 acc, V v) { return acc + double(v); }
  static void dstore8(double* dst, D8 acc) { *dst = acc; }
};

// Which element types have a vector path (integers use the scalar loop).
template <class T> struct VecType { static constexpr bool value = false; };
template <> struct VecType<float> { static constexpr bool value = true; };
template <> struct VecType<half_t> { static constexpr bool value = true; };
template <> struct VecType<bf16_t> { static constexpr bool value = true; };

// quantize_one / fake_quant_one (pyquant/fake_quant.h) on one vector: the same float32 operations in
// the same order, so vector and scalar lanes agree to the bit.
template <class I>
inline typename I::V quantize_vec(typename I::V x, typename I::V s, typename I::V o, typename I::V qmin,
                                  typename I::V qmax) {
  return I::clamp(I::sub(I::rint(I::div(x, s)), o), qmin, qmax);
}
template <class I>
inline typename I::V fake_quant_vec(typename I::V x, typename I::V s, typename I::V o, typename I::V qmin,
                                    typename I::V qmax) {
  return I::mul(I::add(quantize_vec<I>(x, s, o, qmin, qmax), o), s);
}

}  // namespace pq
