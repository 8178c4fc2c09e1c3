// The helper threads' shared parts (threadpool.h): one spinning pool per shared library.

#include "threadpool.h"

#include <cstdlib>

namespace jllama {

int64_t helpers_cap() {
  static const int64_t v = [] {
    const char* env = std::getenv("JLLAMA_CPU_KERNEL_THREADS");  // for measurements
    return env ? std::max(0, std::atoi(env) - 1) : int64_t(1) << 20;
  }();
  return v;
}

SpinPool::SpinPool(int64_t n, int64_t spin_us) : spin_(spin_us) {
  for (int64_t i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
}

SpinPool* SpinPool::get(int64_t helpers) {
  static const int64_t spin_us = [] {
    const char* env = std::getenv("JLLAMA_CPU_SPIN_US");
    return env ? std::max(0, std::atoi(env)) : 0;
  }();
  if (spin_us == 0 || helpers <= 0) return nullptr;
  static SpinPool* pool = new SpinPool(helpers, spin_us);  // never destroyed: threads detached
  return pool;
}

bool SpinPool::try_begin(std::shared_ptr<Job> job) {
  bool expected = false;
  if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return false;
  std::lock_guard<std::mutex> lk(mu_);
  job_ = std::move(job);
  gen_.fetch_add(1, std::memory_order_release);
  if (sleepers_ > 0) cv_.notify_all();
  return true;
}

void SpinPool::loop() {
  uint64_t seen = gen_.load(std::memory_order_acquire);
  for (;;) {
    uint64_t g;
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 1; (g = gen_.load(std::memory_order_acquire)) == seen; ++it) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
      if ((it & 255) == 0 && std::chrono::steady_clock::now() - t0 > spin_) {
        std::unique_lock<std::mutex> lk(mu_);
        ++sleepers_;
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        --sleepers_;
      }
    }
    seen = g;
    std::shared_ptr<Job> job;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job = job_;
    }
    if (job) job->run();
  }
}

}  // namespace jllama
