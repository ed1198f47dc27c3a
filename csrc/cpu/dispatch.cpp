// Run-time choice of the SIMD level (one binary for any x86-64) and of the CPU thread count.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include "kernel_table.h"
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

constexpr CpuKernels kBaseline = PQ_CPU_KERNELS(scalar, "baseline");
constexpr CpuKernels kAvx2 = PQ_CPU_KERNELS(avx2, "avx2");
constexpr CpuKernels kAvx512 = PQ_CPU_KERNELS(avx512, "avx512");

const CpuKernels* best_table() {
  // PYQUANT_SIMD caps the level (baseline, avx2, avx512), e.g. to compare or to work around a CPU.
  const char* cap = std::getenv("PYQUANT_SIMD");
  const bool allow512 = !cap || std::strcmp(cap, "avx512") == 0;
  const bool allow2 = allow512 || (cap && std::strcmp(cap, "avx2") == 0);
  if (allow512 && cpu_has_avx512()) return &kAvx512;
  if (allow2 && cpu_has_avx2()) return &kAvx2;
  return &kBaseline;
}

std::atomic<const CpuKernels*> g_table{nullptr};
std::atomic<int> g_threads{0};

const CpuKernels& cpu_kernels() {
  const CpuKernels* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

}  // namespace

// cpu::<op> runs the selected level's entry.
#define PQ_CPU_SELECTED_OP(ns, R, name, Args) \
  R cpu::name(const Args& a, int max_threads) { return cpu_kernels().name(a, max_threads); }
PQ_CPU_SIMD_OPS(PQ_CPU_SELECTED_OP, _)
#undef PQ_CPU_SELECTED_OP

const char* simd_level() { return cpu_kernels().level; }

bool set_simd_level(const char* name) {
  if (std::strcmp(name, "avx512") == 0) {
    if (!cpu_has_avx512()) return false;
    g_table.store(&kAvx512);
  } else if (std::strcmp(name, "avx2") == 0) {
    if (!cpu_has_avx2()) return false;
    g_table.store(&kAvx2);
  } else if (std::strcmp(name, "baseline") == 0) {
    g_table.store(&kBaseline);
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
