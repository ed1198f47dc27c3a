// Run-time choice of the SIMD level (one binary for any x86-64) and of the CPU thread count.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include "kernel_table.h"
#include "stats_table.h"
#include "pool_table.h"
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pq {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const FakeQuantTable* best_table() {
  // PYQUANT_SIMD caps the level (baseline, avx2, avx512), e.g. to compare or to work around a CPU.
  const char* cap = std::getenv("PYQUANT_SIMD");
  const bool allow512 = !cap || std::strcmp(cap, "avx512") == 0;
  const bool allow2 = allow512 || (cap && std::strcmp(cap, "avx2") == 0);
  if (allow512 && cpu_has_avx512()) return &fake_quant_table_avx512();
  if (allow2 && cpu_has_avx2()) return &fake_quant_table_avx2();
  return &fake_quant_table_scalar();
}

std::atomic<const FakeQuantTable*> g_table{nullptr};
std::atomic<int> g_threads{0};

}  // namespace

const FakeQuantTable& fake_quant_table() {
  const FakeQuantTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

const StatsTable& stats_table() {
  const FakeQuantTable* t = &fake_quant_table();
  if (t == &fake_quant_table_avx512()) return stats_table_avx512();
  if (t == &fake_quant_table_avx2()) return stats_table_avx2();
  return stats_table_scalar();
}

const PoolTable& pool_table() {
  const FakeQuantTable* t = &fake_quant_table();
  if (t == &fake_quant_table_avx512()) return pool_table_avx512();
  if (t == &fake_quant_table_avx2()) return pool_table_avx2();
  return pool_table_scalar();
}

const char* simd_level() { return fake_quant_table().name; }

bool set_simd_level(const char* name) {
  if (std::strcmp(name, "avx512") == 0) {
    if (!cpu_has_avx512()) return false;
    g_table.store(&fake_quant_table_avx512());
  } else if (std::strcmp(name, "avx2") == 0) {
    if (!cpu_has_avx2()) return false;
    g_table.store(&fake_quant_table_avx2());
  } else if (std::strcmp(name, "baseline") == 0) {
    g_table.store(&fake_quant_table_scalar());
  } else if (std::strcmp(name, "auto") == 0) {
    g_table.store(best_table());
  } else {
    return false;
  }
  return true;
}

int cpu_threads() {
  int n = g_threads.load();
  if (n > 0) return n;
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_cpu_threads(int n) { g_threads.store(n > 0 ? n : 0); }

}  // namespace pq
