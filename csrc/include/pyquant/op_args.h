// The parameters of each native op, declared once as a field list with the op's description. Each gives
//  - a plain struct of typed fields, which the CPU entry points (cpu_api.h) and the CUDA entry points
//    (cuda_api.h) take, and
//  - the op's Python signature and docstring (bindings/op_binding.h): one positional parameter per
//    field, in this order and under these names, pointers as integer addresses, DType/FqOp as codes.
// pyquant/ops/_backend.py passes the arguments in this order; tests/test_native_bindings.py checks it.
// Where the CPU and CUDA kernels need different workspaces, each has its own list.
#pragma once
#include <cstddef>
#include <cstdint>
#include "pyquant/fake_quant.h"

namespace pq {

// The field types of an argument struct, after a leading void (the lists expand to ", T" per field).
template <class... T> struct FieldTypes {};

#define PQ_ARG_FIELD(type, name) type name;
#define PQ_ARG_TYPE(type, name) , type
#define PQ_ARG_NAME(type, name) #name,
// struct NAME { fields... }, with Fields (their types), kNames (their names) and kDoc for the binding.
#define PQ_DEFINE_ARGS(NAME, LIST, DOC)                                     \
  struct NAME {                                                             \
    LIST(PQ_ARG_FIELD)                                                      \
    using Fields = FieldTypes<void LIST(PQ_ARG_TYPE)>;                      \
    static constexpr const char* kNames[] = {LIST(PQ_ARG_NAME)};            \
    static constexpr size_t kCount = sizeof(kNames) / sizeof(kNames[0]);    \
    static constexpr const char* kDoc = DOC;                                \
  };

// The activation clamp of the ops that take act_lo/act_hi: (-inf, inf) is none.
template <class Args>
inline ActClamp act_clamp(const Args& a) { return ActClamp{a.act_lo, a.act_hi}; }

// ---- fake quantization ---------------------------------------------------------------------------
#define PQ_FAKE_QUANT_FORWARD_FIELDS(X)                                                        \
  X(FqOp, op) X(const void*, x) X(DType, xdt) X(void*, y) X(DType, ydt) X(const float*, s)     \
  X(const float*, o) X(float, qmin) X(float, qmax) X(const QLayout&, layout) X(float, act_lo) \
  X(float, act_hi)
PQ_DEFINE_ARGS(FakeQuantForwardArgs, PQ_FAKE_QUANT_FORWARD_FIELDS,
               "y = op(x) elementwise for op 0=quantize_dequantize, 1=quantize, 2=dequantize (x and y may differ "
               "in dtype: quantize writes integers, dequantize reads them); quantize_dequantize of a float x into "
               "its own dtype first clamps x to [act_lo, act_hi] (a fused ReLU/ReLU6/Hardtanh; -inf, inf: none)")

#define PQ_FAKE_QUANT_BACKWARD_FIELDS(X)                                                                \
  X(const void*, g) X(const void*, x) X(DType, dt) X(void*, dx) X(const float*, s) X(const float*, o)  \
  X(float, qmin) X(float, qmax) X(const QLayout&, layout) X(double*, ws) X(float*, ds) X(float*, doff) \
  X(float, grad_scale) X(float, act_lo) X(float, act_hi)
PQ_DEFINE_ARGS(FakeQuantBackwardArgs, PQ_FAKE_QUANT_BACKWARD_FIELDS,
               "fused backward of quantize_dequantize: dx and per-scale ds/do, times grad_scale (null address = "
               "not wanted); ws holds num_threads() * 2 * nscale float64 on the CPU, 2 * nscale on CUDA; with "
               "[act_lo, act_hi], x is the activation's input")

// ---- encodings of learned ranges (encoding.h) ------------------------------------------------------
#define PQ_MINMAX_ENCODING_FIELDS(X)                                                                   \
  X(const float*, mn) X(const float*, mx) X(int64_t, n) X(float, qmin) X(float, qmax) X(float, min_scale) \
  X(bool, symmetric) X(float*, s) X(float*, o) X(float*, k_s) X(float*, k_o) X(float*, k_ot)
PQ_DEFINE_ARGS(MinmaxEncodingArgs, PQ_MINMAX_ENCODING_FIELDS,
               "scale s and offset o of n min/max ranges on the grid [qmin, qmax], and the chain-rule factors "
               "k_s, k_o, k_ot (null address: not wanted; k_o, k_ot unwritten when symmetric)")

#define PQ_MINMAX_SCALE_PRODUCT_FIELDS(X)                                                                 \
  X(const float*, a_mn) X(const float*, a_mx) X(float, a_qmin) X(float, a_qmax) X(float, a_min_scale)        \
  X(const float*, b_mn) X(const float*, b_mx) X(int64_t, n) X(float, b_qmin) X(float, b_qmax)                \
  X(float, b_min_scale) X(float*, out)
PQ_DEFINE_ARGS(MinmaxScaleProductArgs, PQ_MINMAX_SCALE_PRODUCT_FIELDS,
               "out[i] = s_a * s_b[i]: the scale of one min/max range (a: e.g. a layer's input) times each of n "
               "others' (b: e.g. its weight's channels), each minmax_encoding's scale -- an int32 bias's scale")

// ---- a min/max quantizer's training call (quantizer_step.cpp): encoding + fake quantization ------------
// enc holds 5 * nscale float32: s, o, k_s, k_o, k_ot (minmax_encoding's outputs, in that order).
#define PQ_MINMAX_QDQ_FORWARD_FIELDS(X)                                                                   \
  X(const void*, x) X(DType, dt) X(void*, y) X(const float*, mn) X(const float*, mx) X(float, qmin)     \
  X(float, qmax) X(float, min_scale) X(bool, symmetric) X(const QLayout&, layout) X(float, act_lo)     \
  X(float, act_hi) X(float*, enc)
PQ_DEFINE_ARGS(MinmaxQdqForwardArgs, PQ_MINMAX_QDQ_FORWARD_FIELDS,
               "minmax_encoding of the layout's nscale ranges into enc (s, o, k_s, k_o, k_ot, nscale values each), "
               "then y = quantize_dequantize(clamp(x, act_lo, act_hi)) with that s and o: a min/max quantizer's "
               "forward in one call")

#define PQ_MINMAX_QDQ_BACKWARD_FIELDS(X)                                                                  \
  X(const void*, g) X(const void*, x) X(DType, dt) X(void*, dx) X(const float*, enc) X(float, qmin)     \
  X(float, qmax) X(bool, symmetric) X(const QLayout&, layout) X(double*, ws) X(float*, dmin)            \
  X(float*, dmax) X(float, grad_scale) X(float, act_lo) X(float, act_hi)
PQ_DEFINE_ARGS(MinmaxQdqBackwardArgs, PQ_MINMAX_QDQ_BACKWARD_FIELDS,
               "the backward of minmax_qdq_forward: dx, and the gradients of min and max through the encoding "
               "(enc: the forward's; dmin/dmax: nscale values each, null = not wanted, both or neither); ws as "
               "fake_quant_backward's")

// ---- a bias on the int32 grid (int32_fake_quant.cpp) -----------------------------------------------
#define PQ_INT32_FAKE_QUANT_FIELDS(X) \
  X(const float*, x) X(int64_t, n) X(const float*, s) X(int64_t, ns) X(float*, y) X(bool, overflow_float)
PQ_DEFINE_ARGS(Int32FakeQuantArgs, PQ_INT32_FAKE_QUANT_FIELDS,
               "y = clamp(rint(x / s), -2^31, 2^31) * s for n float32 values (s: one value, or ns == n, one per "
               "element); overflow_float: where some element lies beyond the grid (or is NaN), y = x. Returns "
               "whether every element lay on the grid")

// ---- calibration statistics ----------------------------------------------------------------------
#define PQ_MINMAX_FIELDS(X) \
  X(const void*, x) X(DType, dt) X(const QLayout&, layout) X(float*, mn) X(float*, mx) X(int64_t*, nonfinite)
#define PQ_MINMAX_CPU_FIELDS(X) PQ_MINMAX_FIELDS(X) X(float*, ws_f) X(int64_t*, ws_i)
#define PQ_MINMAX_DOC \
  "per-group min/max of finite values (+inf/-inf when there is none) and count of non-finite ones"
PQ_DEFINE_ARGS(MinmaxArgs, PQ_MINMAX_FIELDS, PQ_MINMAX_DOC)
PQ_DEFINE_ARGS(MinmaxCpuArgs, PQ_MINMAX_CPU_FIELDS,
               PQ_MINMAX_DOC "; ws_f: num_threads()*2*nscale float32, ws_i: num_threads()*nscale int64")

#define PQ_HISTOGRAM_FIELDS(X)                                                                  \
  X(const void*, x) X(DType, dt) X(const QLayout&, layout) X(const float*, lo) X(const float*, range) \
  X(int64_t, nbins) X(int64_t*, counts)
#define PQ_HISTOGRAM_CPU_FIELDS(X) PQ_HISTOGRAM_FIELDS(X) X(int64_t*, ws) X(int64_t, ws_len)
#define PQ_HISTOGRAM_DOC \
  "counts[nscale, nbins] (overwritten) of the finite elements of each group over [lo, lo + range)"
PQ_DEFINE_ARGS(HistogramArgs, PQ_HISTOGRAM_FIELDS, PQ_HISTOGRAM_DOC)
PQ_DEFINE_ARGS(HistogramCpuArgs, PQ_HISTOGRAM_CPU_FIELDS,
               PQ_HISTOGRAM_DOC "; a workspace of ws_len >= num_threads()*4*nscale*nbins int64 lets threads count "
               "privately (null: they split the groups)")

#define PQ_SEARCH_FIELDS(X)                                                                            \
  X(const int64_t*, counts) X(int64_t, G) X(int64_t, nbins) X(const float*, c0) X(const float*, bw)   \
  X(const float*, cand_d) X(const float*, cand_o) X(int64_t, C) X(float, ns) X(float, gamma) X(float, p) \
  X(int64_t*, best_idx) X(double*, best_noise)
PQ_DEFINE_ARGS(SearchArgs, PQ_SEARCH_FIELDS,
               "index and noise of the best of C candidate encodings (cand_d, cand_o: [G, C]) for each of G "
               "histograms (counts[G, nbins], bin centres c0[g] + bw[g] * i); the first of equal minima")

#define PQ_ENTROPY_SEARCH_FIELDS(X) \
  X(const int64_t*, counts) X(int64_t, G) X(int64_t, nb) X(int64_t, nq) X(int64_t*, best_i) X(double*, best_kl)
PQ_DEFINE_ARGS(EntropySearchArgs, PQ_ENTROPY_SEARCH_FIELDS,
               "clip point (number of kept bins, nq..nb) with the least KL divergence for each of G histograms "
               "(counts[G, nb]), and that divergence")

// ---- max pooling by window (CPU) -----------------------------------------------------------------
#define PQ_MAX_POOL_FORWARD_FIELDS(X)                                                                  \
  X(const float*, x) X(int64_t, planes) X(int64_t, height) X(int64_t, width) X(int, kh) X(int, kw)    \
  X(float*, out) X(uint8_t*, argmax)
PQ_DEFINE_ARGS(MaxPoolForwardArgs, PQ_MAX_POOL_FORWARD_FIELDS,
               "non-overlapping max pool (kernel kh x kw == stride, no padding, floor) of contiguous float32 "
               "planes: out and the argmax's window position (row-major, uint8)")

#define PQ_QDQ_MAX_POOL_FORWARD_FIELDS(X)                                                               \
  X(const float*, x) X(int64_t, planes) X(int64_t, height) X(int64_t, width) X(int, kh) X(int, kw)     \
  X(const float*, s) X(const float*, o) X(int64_t, channels) X(float, qmin) X(float, qmax)             \
  X(float, act_lo) X(float, act_hi) X(float*, out) X(uint8_t*, argmax) X(float*, sel)
PQ_DEFINE_ARGS(QdqMaxPoolForwardArgs, PQ_QDQ_MAX_POOL_FORWARD_FIELDS,
               "max_pool_forward over the fake quantization of the clamped x (one scale/offset, or one per "
               "channel with planes cycling through `channels`); sel: x at each argmax")

#define PQ_MAX_POOL_BACKWARD_FIELDS(X)                                                                 \
  X(const float*, g) X(const uint8_t*, argmax) X(int64_t, planes) X(int64_t, height) X(int64_t, width) \
  X(int, kh) X(int, kw) X(float*, dx)
PQ_DEFINE_ARGS(MaxPoolBackwardArgs, PQ_MAX_POOL_BACKWARD_FIELDS,
               "dx of max_pool_forward: g at each window's argmax, 0 elsewhere (fully written)")

// ---- AdaRound (adaround.h): w and a are [rows, row_len] float32, s/o nscale = 1 or rows values -------
#define PQ_ADAROUND_FORWARD_FIELDS(X)                                                                  \
  X(const float*, w) X(const float*, a) X(float*, y) X(const float*, s) X(const float*, o)            \
  X(int64_t, rows) X(int64_t, row_len) X(int64_t, nscale) X(float, qmin) X(float, qmax) X(bool, hard)
PQ_DEFINE_ARGS(AdaroundForwardArgs, PQ_ADAROUND_FORWARD_FIELDS,
               "AdaRound soft (or hard) quantized weight y of w with rounding parameters a")

#define PQ_ADAROUND_BACKWARD_FIELDS(X)                                                                 \
  X(const float*, g) X(const float*, w) X(const float*, a) X(float*, da) X(const float*, s)           \
  X(const float*, o) X(int64_t, rows) X(int64_t, row_len) X(int64_t, nscale) X(float, qmin) X(float, qmax)
PQ_DEFINE_ARGS(AdaroundBackwardArgs, PQ_ADAROUND_BACKWARD_FIELDS,
               "da = d(loss)/d(a) of the soft quantized weight, given g = d(loss)/d(y)")

#define PQ_ADAROUND_REGULARIZER_FIELDS(X) X(const float*, a) X(int64_t, n) X(float, beta) X(float*, grad)
#define PQ_ADAROUND_REGULARIZER_CUDA_FIELDS(X) PQ_ADAROUND_REGULARIZER_FIELDS(X) X(double*, ws) X(double*, value)
#define PQ_ADAROUND_REGULARIZER_DOC \
  "sum(1 - |2h - 1|^beta) over the n values of a (in float64, in a fixed order) and its gradient in a"
PQ_DEFINE_ARGS(AdaroundRegularizerArgs, PQ_ADAROUND_REGULARIZER_FIELDS, PQ_ADAROUND_REGULARIZER_DOC "; returns the sum")
PQ_DEFINE_ARGS(AdaroundRegularizerCudaArgs, PQ_ADAROUND_REGULARIZER_CUDA_FIELDS,
               PQ_ADAROUND_REGULARIZER_DOC " (into value, one float64 on the device); ws holds "
               "adaround_regularizer_workspace(n) float64")

}  // namespace pq
