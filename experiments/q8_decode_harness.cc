// One-row Q8_0 / Q4_0 products outside XLA: jllama's row kernel (vec_dot.cc, included here for
// its internal functions) against ggml's own vec_dot (libggml-cpu of the llama.cpp build),
// on weights far larger than L3, 1 or 2 threads (pinned, spinning start: no wake-up cost), to
// tell the kernels' speed from the threading's. Build and run (see cpu_kernels.md):
//
//   g++ -O3 -march=native -std=c++17 -ffp-contract=fast -fno-math-errno -fassociative-math \
//     -fno-signed-zeros -fno-trapping-math -Ijllama/kernels/cpu -o /tmp/q8h \
//     experiments/q8_decode_harness.cc jllama/kernels/cpu/gemm.cc -ldl -lpthread
//   /tmp/q8h LIBDIR/libggml-cpu.so [qtype 8|2] [MiB] [reps]
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <random>
#include <thread>

#include "vec_dot.cc"

using namespace jllama;

typedef void (*vec_dot_t)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
typedef void (*from_float_t)(const float*, void*, int64_t);
struct traits_t {
  from_float_t from_float;
  vec_dot_t vec_dot;
  int vec_dot_type;
  int64_t nrows;
};

static double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pin(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

// Runs fn(tid, nthreads) on nthreads threads that spin on a start flag (as ggml's do).
static double run_threads(int nthreads, const std::function<void(int, int)>& fn) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> ts;
  for (int t = 1; t < nthreads; ++t)
    ts.emplace_back([&, t] {
      pin(t);
      ready++;
      while (!go.load()) __builtin_ia32_pause();
      fn(t, nthreads);
    });
  pin(0);
  while (ready.load() < nthreads - 1) __builtin_ia32_pause();
  const double t0 = now();
  go = true;
  fn(0, nthreads);
  for (auto& t : ts) t.join();
  return now() - t0;
}

int main(int argc, char** argv) {
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!lib) return std::printf("%s\n", dlerror()), 1;
  auto init = (void (*)())dlsym(lib, "ggml_cpu_init");
  auto get = (const traits_t* (*)(int))dlsym(lib, "ggml_get_type_traits_cpu");
  init();
  const int qtype = argc > 2 ? std::atoi(argv[2]) : 8;
  const int64_t mib = argc > 3 ? std::atoll(argv[3]) : 256;
  const int reps = argc > 4 ? std::atoi(argv[4]) : 5;
  const int64_t k = argc > 5 ? std::atoll(argv[5]) : 2048, ts = qtype == 8 ? 34 : 18, rb = k / 32 * ts;
  const int64_t n = (mib << 20) / rb;
  std::vector<uint8_t> w(size_t(n * rb));
  std::mt19937 rng(1);
  for (auto& b : w) b = uint8_t(rng());
  for (int64_t i = 0; i < n * (k / 32); ++i) {  // finite f16 scales ~0.01
    const uint16_t h = _cvtss_sh(0.01f + 0.001f * float(i % 7), 0);
    std::memcpy(&w[size_t(i * ts)], &h, 2);
  }
  std::vector<float> xf(k);
  for (auto& v : xf) v = float(int(rng() % 2001) - 1000) / 1000.f;
  // ggml's x: block_q8_0 (vec_dot_type of both types)
  std::vector<uint8_t> xg(size_t(k / 32 * 34));
  get(8)->from_float(xf.data(), xg.data(), k);
  std::vector<int8_t> xq(k);
  std::vector<float> xd(k / 32);
  for (int64_t b = 0; b < k / 32; ++b) {
    uint16_t h;
    std::memcpy(&h, &xg[size_t(b * 34)], 2);
    xd[size_t(b)] = _cvtsh_ss(h);
    std::memcpy(&xq[size_t(b * 32)], &xg[size_t(b * 34 + 2)], 32);
  }
  const Q8Kernel kern = pick_q8(qtype);
  std::vector<int32_t> aux(k / 4);
  for (int64_t i = 0; i < k / 4; ++i) {
    int s = 0;
    for (int j = 0; j < 4; ++j) s += xq[size_t(4 * i + j)];
    aux[size_t(i)] = -kern.off * s;
  }
  std::vector<float> yg(n), yj(n);
  Q8Call c;
  c.k = k;
  c.n_out = n;
  c.m_total = 1;
  c.row_bytes = rb;
  c.w = w.data();
  c.y = yj.data();
  c.tiled = true;
  c.rows = {{xq.data(), xd.data(), nullptr, aux.data(), nullptr}};
  const vec_dot_t vd = get(qtype)->vec_dot;
  const int64_t chunk = 16;  // ggml's rows per chunk (one row's vec_dot per call)
  for (int nth = 1; nth <= 2; ++nth) {
    double bg = 1e9, bj = 1e9;
    for (int r = 0; r < reps; ++r) {
      std::atomic<int64_t> next{0};
      bg = std::min(bg, run_threads(nth, [&](int, int) {
        for (int64_t c0; (c0 = next.fetch_add(chunk)) < n;)
          for (int64_t i = c0; i < std::min(n, c0 + chunk); ++i)
            vd(int(k), &yg[size_t(i)], 0, &w[size_t(i * rb)], 0, xg.data(), 0, 1);
      }));
      std::atomic<int64_t> next2{0};
      const int64_t jc = std::max<int64_t>(1, (64 << 10) / rb);
      bj = std::min(bj, run_threads(nth, [&](int, int) {
        for (int64_t c0; (c0 = next2.fetch_add(jc)) < n;) kern.fn(c, c0, std::min(n, c0 + jc));
      }));
    }
    const double gb = double(n * rb) / 1e9;
    std::printf("type %d, %lld rows x %lld, %.0f MB, %d thread(s): ggml %.2f GB/s, jllama %.2f "
                "GB/s%s\n",
                qtype, (long long)n, (long long)k, gb * 1e3, nth, gb / bg, gb / bj,
                std::memcmp(yg.data(), yj.data(), n * 4) ? "  RESULTS DIFFER" : "");
  }
  return 0;
}
