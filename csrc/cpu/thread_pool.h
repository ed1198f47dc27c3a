// The CPU kernels' threads: a small pool whose helpers claim chunks of a call's work instead of being
// assigned them.
//
// With a fixed assignment (an OpenMP parallel region), a call ends only when every thread has done its
// share, so on a machine shared with another job a helper that the OS has not scheduled yet stalls the
// call for a whole time slice; hundreds of quantizer calls per step turn a 2x slower machine into a 10x
// slower step. Here the caller works too, and a helper that wakes late finds the chunks already taken:
// the call degrades to one thread's speed, never to a time slice. Helpers wait on a condition variable
// after a short spin, so an idle pool costs nothing.
//
// Each chunk index k in [0, n) runs exactly once, whichever thread runs it, so a kernel that keeps one
// partial result per chunk and combines them in index order stays deterministic (and equal to the OpenMP
// path's result). The pool is opt-in (PYQUANT_CPU_POOL=1): bench/contention.py measures it against OpenMP
// regions, which share torch's own threads.
#pragma once
#include <cstdint>

namespace pq {
namespace cpu {

// Runs body(ctx, k) for every k in [0, n), on at most `threads` threads (the caller included). A call
// made while another is running (a second Python thread) runs its chunks on the caller alone.
void run_chunks(int64_t n, int threads, void (*body)(void*, int64_t), void* ctx);

// Helper threads the pool has started (for tests).
int pool_helpers();

// Whether parallel_ranges/parallel_split use this pool (else OpenMP, sharing torch's threads). Off unless
// the environment variable PYQUANT_CPU_POOL=1 was set when the module loaded, or set_pool_enabled(true).
bool pool_enabled();
void set_pool_enabled(bool on);

}  // namespace cpu
}  // namespace pq
