// The f32-activation row kernels (vec_dot.cc): x rows against a range of weight rows in GGUF
// blocks, each block decoded straight into vector registers; and whole-row f32 decoding.
// The int8-activation row kernels are declared in q8.h.
#pragma once

#include <cstdint>

// Shared between this library's files only: hidden, so calls between them are direct.
#pragma GCC visibility push(hidden)

namespace jllama {

// y[m, n] for all m < m_total and n in [n0, n1): (x, xsum, k, w, row_bytes, y, n_out, m_total,
// n0, n1). xsum: per-32-element sums of x for the types with a min (needs_xsum).
using RowsFn = void (*)(const float*, const float*, int64_t, const uint8_t*, int64_t, float*,
                        int64_t, int64_t, int64_t, int64_t);

struct Kernel {
  RowsFn fn;
  bool needs_xsum;
};

// The row kernel of a ggml type ({nullptr, false}: none).
Kernel pick(int64_t qtype);

// f32 rows [n0, n1) of a weight: (w, row_bytes, k, out[n, k], n0, n1).
using DequantFn = void (*)(const uint8_t*, int64_t, int64_t, float*, int64_t, int64_t);

DequantFn pick_dequant(int64_t qtype);

}  // namespace jllama

#pragma GCC visibility pop
