// ggml's activation quantization for the int8 kernels (actquant.cc).
#pragma once

#include <cstdint>

#include "q8.h"
#include "threadpool.h"

#if defined(JLLAMA_Q8)

// Shared between this library's files only: hidden, so calls between them are direct.
#pragma GCC visibility push(hidden)

namespace jllama {

// Activation formats (the ``fmt`` attribute): ggml's vec_dot types of the weights.
constexpr int kFmtQ8_0 = 0, kFmtQ8_1 = 1, kFmtQ8_K = 2;

// One row x[k]: codes q[k], block scales d[k / bs] (bs = 32, Q8_K: 256), Q8_1 block sums
// s[k / 32] (fmt 1 only).
void quantize_row_q8(const float* x, int64_t k, int fmt, int8_t* q, float* d, float* s);

// m rows (row-major, each as above), split over the caller and the helper threads.
void quantize_rows_q8(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k, int fmt,
                      int8_t* q, float* d, float* s);

}  // namespace jllama

#pragma GCC visibility pop

#endif  // JLLAMA_Q8
