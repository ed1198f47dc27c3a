// Threading and layout walking shared by the CPU kernels (independent of the SIMD level).
#pragma once
#include <algorithm>
#include <cstdint>
#include "pyquant/fake_quant.h"
#include "thread_pool.h"
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pq {
namespace cpu {

// Work below this many elements per thread is not worth waking another thread for.
constexpr int64_t kGrain = 32768;
inline int pick_threads(int64_t numel, int max_threads) {
  int64_t t = (numel + kGrain - 1) / kGrain;
  return int(std::max<int64_t>(1, std::min<int64_t>(t, max_threads)));
}

template <class F>
void call_chunk(void* f, int64_t k) {
  (*static_cast<F*>(f))(k);
}

// Runs chunk(k) for every k in [0, n): on the pool when it is enabled (thread_pool.h), else in an OpenMP
// region (torch's threads), each thread taking every num_threads-th chunk so that none is skipped when
// the runtime grants fewer threads than asked.
template <class F>
inline void run_all(int64_t n, F& chunk) {
  if (pool_enabled()) {
    run_chunks(n, int(n), &call_chunk<F>, &chunk);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(int(n))
  {
    for (int64_t k = omp_get_thread_num(); k < n; k += omp_get_num_threads()) chunk(k);
  }
#else
  for (int64_t k = 0; k < n; ++k) chunk(k);
#endif
}

// Runs fn(tid, begin, end) over `nthreads` contiguous ranges whose starts are multiples of 64, each range
// once (tid is the range's index, whichever thread runs it).
template <class Fn>
inline void parallel_ranges(int64_t numel, int nthreads, Fn&& fn) {
  if (nthreads <= 1) { fn(0, int64_t(0), numel); return; }
  const int64_t per = ((numel + nthreads - 1) / nthreads + 63) / 64 * 64;
  auto chunk = [&](int64_t tid) {
    const int64_t b = std::min<int64_t>(numel, per * tid);
    fn(int(tid), b, std::min<int64_t>(numel, b + per));
  };
  run_all(nthreads, chunk);
}

// Walks [begin, end) and calls seg(offset, n, scale_index, per_element) for each run of elements
// that share one scale (per_element=false), or whose scales are consecutive (per_element=true).
template <class Seg>
inline void walk(const QLayout& L, int64_t begin, int64_t end, Seg&& seg) {
  if (begin >= end) return;
  const int64_t len = L.row_len;
  int64_t r = begin / len, j = begin % len, i = begin;
  while (i < end) {
    const int64_t base = L.row_base(r);
    const int64_t jend = std::min<int64_t>(len, j + (end - i));
    if (L.inner_block >= len) {
      seg(i, jend - j, base, false);
    } else if (L.inner_block == 1) {
      seg(i, jend - j, base + j, true);
    } else {
      for (int64_t jb = j; jb < jend;) {
        const int64_t k = jb / L.inner_block;
        const int64_t je = std::min<int64_t>(jend, (k + 1) * L.inner_block);
        seg(i + (jb - j), je - jb, base + k, false);
        jb = je;
      }
    }
    i += jend - j;
    ++r;
    j = 0;
  }
}

// Calls seg(offset, n, group, per_element) for the elements whose scale group lies in [k0, k1),
// row by row. Threads that own disjoint group ranges can then update per-group state without
// sharing it.
template <class Seg>
inline void walk_groups(const QLayout& L, int64_t k0, int64_t k1, Seg&& seg) {
  const int64_t len = L.row_len;
  const int64_t rows = L.rows();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = L.row_base(r);
    const int64_t off = r * len;
    if (L.inner_block >= len) {
      if (base >= k0 && base < k1) seg(off, len, base, false);
      continue;
    }
    const int64_t nk = (len + L.inner_block - 1) / L.inner_block;
    const int64_t a = std::max(k0, base), b = std::min(k1, base + nk);
    if (a >= b) continue;
    if (L.inner_block == 1) {
      seg(off + (a - base), b - a, a, true);
      continue;
    }
    for (int64_t k = a; k < b; ++k) {
      const int64_t j0 = (k - base) * L.inner_block;
      const int64_t j1 = std::min(len, j0 + L.inner_block);
      seg(off + j0, j1 - j0, k, false);
    }
  }
}

// Runs fn(tid, k0, k1) over `nthreads` contiguous ranges of [0, n).
template <class Fn>
inline void parallel_split(int64_t n, int nthreads, Fn&& fn) {
  if (nthreads <= 1) { fn(0, int64_t(0), n); return; }
  auto chunk = [&](int64_t tid) { fn(int(tid), n * tid / nthreads, n * (tid + 1) / nthreads); };
  run_all(nthreads, chunk);
}

}  // namespace cpu
}  // namespace pq
