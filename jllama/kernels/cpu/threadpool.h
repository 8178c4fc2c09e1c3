// How the kernels share a call's work between the caller and helper threads (XLA's intra-op
// pool, or the optional spinning pool below): chunks claimed from a shared counter.
//
// Speed knobs read from the environment, here and in the kernels (JLLAMA_CPU_KERNEL_THREADS,
// JLLAMA_CPU_SPIN_US, JLLAMA_CPU_PREFETCH_ROWS, JLLAMA_CPU_PREFETCH_NTA,
// JLLAMA_CPU_PREFETCH_SPREAD, JLLAMA_Q8_GEMM_MIN_ROWS), change how fast a result comes and never a bit of it: threads and
// chunks only split whole output elements, prefetches only move data earlier, and the GEMM and
// the row kernels follow the same f32 steps. Whatever changes results is a field of the Python
// side's Numerics, passed to the kernels as an FFI attribute.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Shared between this library's files only: hidden, so calls between them are direct.
#pragma GCC visibility push(hidden)

namespace jllama {

namespace ffi = xla::ffi;

struct Job {
  virtual void run() = 0;
  virtual ~Job() = default;
};

// A call's work in n_chunks chunks, claimed from ``next`` by the caller and by helpers; each
// counts the chunks it finished in ``done``. The caller waits only for chunks a helper has
// already claimed, so helpers that never run (busy pool, no threads) cannot deadlock a call;
// the state is shared_ptr-owned because a late helper may start after the call returned.
struct ChunkJob : Job {
  int64_t n_chunks = 0;
  std::atomic<int64_t> next{0}, done{0};
};

// Helper threads a call may use besides the caller: JLLAMA_CPU_KERNEL_THREADS - 1 (for
// measurements), else no limit.
int64_t helpers_cap();

// The helpers for a call of n_chunks chunks: one per other XLA pool thread, no more than
// there are chunks to share, within helpers_cap().
static inline int64_t helpers_for(ffi::ThreadPool& pool, int64_t n_chunks) {
  return std::min({pool.num_threads() - 1, n_chunks - 1, helpers_cap()});
}

// Helpers for decode matvecs: a decode step makes a few hundred short kernel calls with small
// XLA ops in between, and waking one of XLA's pool threads per call (futex wake, work
// stealing) costs CPU time. Like llama.cpp's threadpool, these threads can spin for a while
// after each call (JLLAMA_CPU_SPIN_US) and then sleep, so the next call of the same step finds
// them awake. Off by default (0 = XLA's pool): on 2 cores a spinning helper competes with
// XLA's and Python's own threads between calls and steps, and interleaved decode runs were
// fastest without it (experiments/results/cpu_kernels.md). One call at a time: a second
// concurrent caller (several host devices) falls back to XLA's pool.
class SpinPool {
 public:
  // Null when disabled; created at the first call with the caller's helper count. One per
  // shared library (threadpool.cc).
  static SpinPool* get(int64_t helpers);
  bool try_begin(std::shared_ptr<Job> job);
  void end() { busy_.store(false, std::memory_order_release); }

 private:
  SpinPool(int64_t n, int64_t spin_us);
  void loop();

  std::chrono::microseconds spin_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> gen_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t sleepers_ = 0;
  std::shared_ptr<Job> job_;
};

static inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Runs ``work`` (a ChunkJob) on the caller plus up to ``helpers`` threads; returns when every
// chunk is done. ``spin``: the spinning pool may stand in for XLA's (when it is on); false
// keeps exactly ``helpers`` threads of XLA's pool.
template <typename W>
void run_chunks(ffi::ThreadPool& pool, const std::shared_ptr<W>& work, int64_t helpers,
                bool spin = true) {
  SpinPool* sp =
      spin ? SpinPool::get(std::min<int64_t>(pool.num_threads() - 1, helpers_cap())) : nullptr;
  const bool spun = helpers > 0 && sp != nullptr && sp->try_begin(work);
  if (!spun)
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->n_chunks) cpu_relax();
  if (spun) sp->end();
}

}  // namespace jllama

#pragma GCC visibility pop
