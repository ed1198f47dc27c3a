// The CPU kernels' thread pool (see thread_pool.h for why chunks are claimed rather than assigned).
#include "thread_pool.h"

#include <pthread.h>

#include <cstdlib>
#include <cstring>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PQ_PAUSE() _mm_pause()
#else
#define PQ_PAUSE() ((void)0)
#endif

namespace pq {
namespace cpu {
namespace {

struct Task {
  void (*body)(void*, int64_t) = nullptr;
  void* ctx = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  int seats = 0;   // helpers that may still join; guarded by Pool::m_
  int active = 0;  // helpers inside the task; guarded by Pool::m_
};

void drain(Task* t) {
  for (int64_t k = t->next.fetch_add(1, std::memory_order_relaxed); k < t->n;
       k = t->next.fetch_add(1, std::memory_order_relaxed))
    t->body(t->ctx, k);
}

class Pool {
 public:
  std::atomic<bool> busy{false};

  void run(int64_t n, int threads, void (*body)(void*, int64_t), void* ctx) {
    Task t;
    t.body = body;
    t.ctx = ctx;
    t.n = n;
    t.seats = threads - 1;
    grow(threads - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      task_ = &t;
      generation_.fetch_add(1, std::memory_order_release);
    }
    work_.notify_all();
    drain(&t);
    std::unique_lock<std::mutex> lk(m_);
    task_ = nullptr;  // a helper that wakes from now on finds nothing to join
    done_.wait(lk, [&] { return t.active == 0; });
  }

  int helpers() {
    std::lock_guard<std::mutex> lk(m_);
    return int(threads_.size());
  }

 private:
  // Back-to-back calls (a model's quantizers, one after another) find a helper still awake; a few
  // microseconds of pause instructions, then it sleeps.
  static constexpr int kSpin = 2000;

  void grow(int want) {
    std::lock_guard<std::mutex> lk(m_);
    while (int(threads_.size()) < want) threads_.emplace_back([this] { loop(); });
  }

  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      for (int i = 0; i < kSpin && generation_.load(std::memory_order_acquire) == seen; ++i) PQ_PAUSE();
      std::unique_lock<std::mutex> lk(m_);
      work_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
      seen = generation_.load(std::memory_order_relaxed);
      Task* t = task_;
      if (t == nullptr || t->seats <= 0) continue;
      --t->seats;
      ++t->active;
      lk.unlock();
      drain(t);
      lk.lock();
      if (--t->active == 0) done_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable work_, done_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  Task* task_ = nullptr;
};

// The pool lives for the whole process and is never destroyed: its helpers sleep in it at exit. A forked
// child has none of the parent's threads, so it starts a pool of its own (the old one is left alone: its
// mutex may have been held by a thread that does not exist in the child).
std::atomic<Pool*> g_pool{nullptr};

void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  (void)registered;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread installed one first (no helper was started in `fresh`)
  return p;
}

}  // namespace

void run_chunks(int64_t n, int threads, void (*body)(void*, int64_t), void* ctx) {
  if (n <= 0) return;
  if (int64_t(threads) > n) threads = int(n);
  Pool* p = threads > 1 ? pool() : nullptr;
  if (p == nullptr || p->busy.exchange(true, std::memory_order_acquire)) {
    for (int64_t k = 0; k < n; ++k) body(ctx, k);
    return;
  }
  p->run(n, threads, body, ctx);
  p->busy.store(false, std::memory_order_release);
}

namespace {
std::atomic<bool> g_enabled{[] {
  const char* v = std::getenv("PYQUANT_CPU_POOL");
  return v != nullptr && std::strcmp(v, "1") == 0;
}()};
}  // namespace

bool pool_enabled() { return g_enabled.load(std::memory_order_relaxed); }
void set_pool_enabled(bool on) { g_enabled.store(on, std::memory_order_relaxed); }

int pool_helpers() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p == nullptr ? 0 : p->helpers();
}

}  // namespace cpu
}  // namespace pq
