// Row kernels: y[m, n] = sum_k x[m, k] W[n, k] for a range of weight rows n, every x row, W in
// its GGUF bytes.
//
// f32 activations (``JllamaQMatVec``): XLA:CPU compiles nibble unpacking and any convert fused
// into a dot to scalar loops, so the best pure-XLA decode path is far slower than reading the
// weight once here. Each GGUF block is decoded straight into f32 vector registers and FMA'd
// against the activations (the group scale applied once per 16-32 elements, mins through
// precomputed sums of x); the weight is read once, in its GGUF bytes (0.56-1.06 B per element).
// Single-core rates per type are in experiments/results/cpu_kernels.md. These kernels serve
// the exact-f32 mode, the types without an int8 kernel and the f32 GEMM path's tiles.
//
// int8 activations (``JllamaQMatVecQ8``, q8.h): what llama.cpp itself runs, bit-identical to
// its CPU mul_mat; the per-block arithmetic is in q8_dot.h. Decode uses them in the default
// llama.cpp-matching numerics for every type pick_q8 lists, where they also read the weights
// faster than the f32 decoders.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "blocks.h"
#include "q8.h"
#include "q8_dot.h"
#include "vec_dot.h"

namespace jllama {
namespace {

typedef float v16 __attribute__((vector_size(64)));  // GCC/Clang: lowered to the target's SIMD
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
// Unaligned views: plain vector loads (GCC turns memcpy into int8 vectors into scalar code).
typedef float v16_u __attribute__((vector_size(64), aligned(1), may_alias));
typedef uint8_t v16b_u __attribute__((vector_size(16), aligned(1), may_alias));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16_u*>(p); }
inline v16b load16b(const uint8_t* p) { return *reinterpret_cast<const v16b_u*>(p); }
// Widening converts, the one place GCC's generic vectors scalarise: use AVX-512 when the build
// machine has it (-march=native), otherwise a loop the auto-vectoriser handles.
inline v16i u8_to_i(v16b b) {
#if defined(__AVX512F__)
  return (v16i)_mm512_cvtepu8_epi32((__m128i)b);
#else
  v16i r;
  for (int i = 0; i < 16; ++i) r[i] = b[i];
  return r;
#endif
}
inline v16 i32_to_f(v16i i) {
#if defined(__AVX512F__)
  return (v16)_mm512_cvtepi32_ps((__m512i)i);
#else
  return __builtin_convertvector(i, v16);
#endif
}
inline v16 u8_to_f(v16b b) { return i32_to_f(u8_to_i(b)); }
inline v16i i8_to_i(v16b b) {
#if defined(__AVX512F__)
  return (v16i)_mm512_cvtepi8_epi32((__m128i)b);
#else
  v16i r;
  for (int i = 0; i < 16; ++i) r[i] = int8_t(b[i]);
  return r;
#endif
}

// Fused per-block dots: no f32 copy of the block, the scale is applied once per group.
// acc[m] (16 lanes) collects scale * sum(code * x); sacc[m] collects min * sum(x over the group)
// (xs: per-32-element sums of x, precomputed once per call for types with a min).
struct FQ4_0 : Q4_0 {
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const*, v16* acc,
                  float*) {
    const float d = f16_to_f32(b);
    const v16i q = u8_to_i(load16b(b + 2));
    const v16 lo = i32_to_f((q & 15) - 8), hi = i32_to_f((q >> 4) - 8);
    for (int m = 0; m < MC; ++m) acc[m] += d * (lo * load16(xm[m]) + hi * load16(xm[m] + 16));
  }
};

struct FQ4_1 : Q4_1 {
  static constexpr bool kNeedsXsum = true;
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const* xs, v16* acc,
                  float* sacc) {
    const float d = f16_to_f32(b), mn = f16_to_f32(b + 2);
    const v16i q = u8_to_i(load16b(b + 4));
    const v16 lo = i32_to_f(q & 15), hi = i32_to_f(q >> 4);
    for (int m = 0; m < MC; ++m) {
      acc[m] += d * (lo * load16(xm[m]) + hi * load16(xm[m] + 16));
      sacc[m] += mn * xs[m][0];
    }
  }
};

// The 5-bit codes of a Q5_0/Q5_1 block (0..31) as two f32 vectors (elements 0-15, 16-31), minus
// ``offset``.
inline void q5_codes(uint32_t qh, const uint8_t* qs, int offset, v16* lo, v16* hi) {
  const v16i q = u8_to_i(load16b(qs));
#if defined(__AVX512F__)  // the high bits are exactly a lane mask: add 16 where set
  const __m512i k16 = _mm512_set1_epi32(16);
  const __m512i l = (__m512i)(q & 15), h = (__m512i)(q >> 4);
  *lo = i32_to_f((v16i)_mm512_mask_add_epi32(l, __mmask16(qh), l, k16) - offset);
  *hi = i32_to_f((v16i)_mm512_mask_add_epi32(h, __mmask16(qh >> 16), h, k16) - offset);
#else
  const v16u lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const v16i hlo = (v16i)(((qh >> lane) & 1) << 4), hhi = (v16i)(((qh >> (lane + 16)) & 1) << 4);
  *lo = i32_to_f(((q & 15) | hlo) - offset);
  *hi = i32_to_f(((q >> 4) | hhi) - offset);
#endif
}

struct FQ5_0 : Q5_0 {
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const*, v16* acc,
                  float*) {
    const float d = f16_to_f32(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    v16 lo, hi;
    q5_codes(qh, b + 6, 16, &lo, &hi);
    for (int m = 0; m < MC; ++m) acc[m] += d * (lo * load16(xm[m]) + hi * load16(xm[m] + 16));
  }
};

struct FQ5_1 : Q5_1 {
  static constexpr bool kNeedsXsum = true;
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const* xs, v16* acc,
                  float* sacc) {
    const float d = f16_to_f32(b), mn = f16_to_f32(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    v16 lo, hi;
    q5_codes(qh, b + 8, 0, &lo, &hi);
    for (int m = 0; m < MC; ++m) {
      acc[m] += d * (lo * load16(xm[m]) + hi * load16(xm[m] + 16));
      sacc[m] += mn * xs[m][0];
    }
  }
};

struct FQ8_0 : Q8_0 {
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const*, v16* acc,
                  float*) {
    const float d = f16_to_f32(b);
    const v16 lo = i32_to_f(i8_to_i(load16b(b + 2))), hi = i32_to_f(i8_to_i(load16b(b + 18)));
    for (int m = 0; m < MC; ++m) acc[m] += d * (lo * load16(xm[m]) + hi * load16(xm[m] + 16));
  }
};

// K-quants: each 32-element group (Q6_K: 16) is decoded straight into f32 vectors and used
// with its scale while in registers; the mins use the x group sums.
template <typename T>
struct FK : T {
  static constexpr bool kNeedsXsum = T::kMin;
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const* xs, v16* acc,
                  float* sacc) {
    float sc[16], mn[8];
    T::scales(b, sc, mn);
#pragma GCC unroll 16
    for (int g = 0; g < 256 / T::G; ++g) {
      v16 f[T::G / 16];
      T::group(b, g, f);
      for (int m = 0; m < MC; ++m) {
        v16 s = f[0] * load16(xm[m] + g * T::G);
        for (int h = 1; h < T::G / 16; ++h) s += f[h] * load16(xm[m] + g * T::G + 16 * h);
        acc[m] += sc[g] * s;
        if constexpr (T::kMin) sacc[m] -= mn[g] * xs[m][g];
      }
    }
  }
};

struct CQ4_K : Q4_K {
  static constexpr int G = 32;
  static constexpr bool kMin = true;
  static void scales(const uint8_t* b, float* sc, float* mn) {
    k_scale_min(b + 4, f16_to_f32(b), f16_to_f32(b + 2), sc, mn);
  }
  static void group(const uint8_t* b, int g, v16* f) {  // group g: chunk g/2, nibble g%2
    const uint8_t* qs = b + 16 + 32 * (g >> 1);
    const int sh = 4 * (g & 1);
    f[0] = i32_to_f((u8_to_i(load16b(qs)) >> sh) & 15);
    f[1] = i32_to_f((u8_to_i(load16b(qs + 16)) >> sh) & 15);
  }
};

struct CQ5_K : Q5_K {
  static constexpr int G = 32;
  static constexpr bool kMin = true;
  static void scales(const uint8_t* b, float* sc, float* mn) {
    k_scale_min(b + 4, f16_to_f32(b), f16_to_f32(b + 2), sc, mn);
  }
  static void group(const uint8_t* b, int g, v16* f) {  // high bit g of qh[l]
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48 + 32 * (g >> 1);
    const int sh = 4 * (g & 1);
    for (int h = 0; h < 2; ++h) {
      const v16i lo = (u8_to_i(load16b(qs + 16 * h)) >> sh) & 15;
      const v16i hi = (u8_to_i(load16b(qh + 16 * h)) >> g) & 1;
      f[h] = i32_to_f(lo | (hi << 4));
    }
  }
};

struct CQ6_K : Q6_K {
  static constexpr int G = 16;
  static constexpr bool kMin = false;
  static void scales(const uint8_t* b, float* sc, float*) {
    const v16 v = f16_to_f32(b + 208) * i32_to_f(i8_to_i(load16b(b + 192)));
    std::memcpy(sc, &v, sizeof v);
  }
  // Group g covers elements 16g..16g+15 = h*128 + s*32 + l with l in [16*(g%2), +16).
  static void group(const uint8_t* b, int g, v16* f) {
    const int h = g >> 3, s = (g >> 1) & 3, l0 = 16 * (g & 1);
    const v16i lo = (u8_to_i(load16b(b + h * 64 + (s & 1) * 32 + l0)) >> (4 * (s >> 1))) & 15;
    const v16i hi = (u8_to_i(load16b(b + 128 + h * 32 + l0)) >> (2 * s)) & 3;
    f[0] = i32_to_f((lo | (hi << 4)) - 32);
  }
};

// IQ4 code book lookup of 16 indices (0..15).
inline v16 iq4_lookup(v16i idx) {
#if defined(__AVX512F__)
  return (v16)_mm512_permutexvar_ps((__m512i)idx, _mm512_load_ps(kIQ4Values));
#else
  v16 r;
  for (int i = 0; i < 16; ++i) r[i] = kIQ4Values[idx[i]];
  return r;
#endif
}

struct FIQ4_NL : IQ4_NL {
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const*, v16* acc,
                  float*) {
    const float d = f16_to_f32(b);
    const v16i q = u8_to_i(load16b(b + 2));
    const v16 lo = iq4_lookup(q & 15), hi = iq4_lookup(q >> 4);
    for (int m = 0; m < MC; ++m) acc[m] += d * (lo * load16(xm[m]) + hi * load16(xm[m] + 16));
  }
};

struct FIQ4_XS : IQ4_XS {
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const*, v16* acc,
                  float*) {
    const float d = f16_to_f32(b);
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const float dl = group_scale(b, d, g);
      const v16i q = u8_to_i(load16b(b + 8 + 16 * g));
      const v16 lo = iq4_lookup(q & 15), hi = iq4_lookup(q >> 4);
      for (int m = 0; m < MC; ++m)
        acc[m] += dl * (lo * load16(xm[m] + 32 * g) + hi * load16(xm[m] + 32 * g + 16));
    }
  }
};

// Types without a hand-vectorised dot: decode the block to an L1 buffer, then vector FMAs.
template <typename T>
struct FBuf : T {
  template <int MC>
  static void dot(const uint8_t* b, const float* const* xm, const float* const*, v16* acc,
                  float*) {
    alignas(64) float buf[T::BS];
    T::decode(b, buf);
    for (int j = 0; j < T::BS; j += 16) {
      const v16 wv = load16(buf + j);
      for (int m = 0; m < MC; ++m) acc[m] += wv * load16(xm[m] + j);
    }
  }
};

template <typename T, typename = void>
struct NeedsXsum {
  static constexpr bool value = false;
};
template <typename T>
struct NeedsXsum<T, std::void_t<decltype(T::kNeedsXsum)>> {
  static constexpr bool value = T::kNeedsXsum;
};

// Rows of W prefetched ahead of the one being read (0: off). Decode streams the whole model's
// weights per token, and the hardware prefetcher alone left the kernel latency-bound on the
// 2-vCPU Xeon VM (env JLLAMA_CPU_PREFETCH_ROWS, for measurements). The hint is T0, not NTA: a
// non-temporal prefetch evicts the lines from the (large, shared) L3, so weights that would
// have stayed there between tokens came from DRAM every time, which made matvecs on an
// L3-resident matrix several times slower (experiments/results/cpu_kernels.md; env
// JLLAMA_CPU_PREFETCH_NTA=1 restores it).
inline int64_t prefetch_rows() {
  static const int64_t v = [] {
    const char* env = std::getenv("JLLAMA_CPU_PREFETCH_ROWS");
    return env ? std::max(0, std::atoi(env)) : 8;
  }();
  return v;
}

__attribute__((always_inline)) inline void prefetch_row(const uint8_t* p, int64_t bytes) {
  static const bool nta = [] {
    const char* env = std::getenv("JLLAMA_CPU_PREFETCH_NTA");
    return env != nullptr && std::atoi(env) != 0;
  }();
  if (nta) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 0);
  } else {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
  }
}

// The int8 row kernels' prefetch (q8_rows_mc): each cache line of the weight row ``v`` rows
// ahead, one prefetch per line spread along the current row's blocks (0: the whole-row burst
// of prefetch_rows() instead). On the Zen 1 VM the burst (34 prefetches per Q8_0 row of 2048
// values, 8 rows ahead) cost ~15 % of a one-row Q8_0 product's time, below the hardware
// prefetcher alone; spread, 1 row ahead, was fastest at 2048 and 8192 values (Q8_0 and Q4_0)
// (experiments/results/cpu_kernels.md; env JLLAMA_CPU_PREFETCH_SPREAD, for measurements).
inline int64_t prefetch_spread_rows() {
  static const int64_t v = [] {
    const char* env = std::getenv("JLLAMA_CPU_PREFETCH_SPREAD");
    return env ? std::max(0, std::atoi(env)) : 1;
  }();
  return v;
}

// y[m0 + m, n] for n in [n0, n1), m < MC: each block is decoded once and used for MC rows of x.
template <typename T, int MC>
void rows_mc(const float* x, const float* xsum, int64_t k, const uint8_t* w, int64_t row_bytes,
             float* y, int64_t n_out, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = k / T::BS, gpb = T::BS / 32;  // 32-element x sums per block
  const int64_t pf = prefetch_rows();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    if (pf > 0 && n + pf < n1) {
      prefetch_row(row + pf * row_bytes, row_bytes);
    }
    v16 acc[MC] = {};
    float sacc[MC] = {};
    for (int64_t bi = 0; bi < nb; ++bi) {
      const float* xm[MC];
      const float* xs[MC];
      for (int m = 0; m < MC; ++m) {
        xm[m] = x + (m0 + m) * k + bi * T::BS;
        xs[m] = xsum + (m0 + m) * (k / 32) + bi * gpb;
      }
      T::template dot<MC>(row + bi * T::TS, xm, xs, acc, sacc);
    }
    for (int m = 0; m < MC; ++m) {
      float s = sacc[m];
      for (int l = 0; l < 16; ++l) s += acc[m][l];
      y[(m0 + m) * n_out + n] = s;
    }
  }
}

// All x rows against W rows [n0, n1): passes of 8, then 4, 2, 1 rows.
template <typename T>
void rows_kernel(const float* x, const float* xs, int64_t k, const uint8_t* w, int64_t rb,
                 float* y, int64_t n_out, int64_t m_total, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + 8 <= m_total; m0 += 8) rows_mc<T, 8>(x, xs, k, w, rb, y, n_out, m0, n0, n1);
  if (m0 + 4 <= m_total) rows_mc<T, 4>(x, xs, k, w, rb, y, n_out, m0, n0, n1), m0 += 4;
  if (m0 + 2 <= m_total) rows_mc<T, 2>(x, xs, k, w, rb, y, n_out, m0, n0, n1), m0 += 2;
  if (m0 < m_total) rows_mc<T, 1>(x, xs, k, w, rb, y, n_out, m0, n0, n1);
}

template <typename T>
constexpr Kernel make() {
  return {rows_kernel<T>, NeedsXsum<T>::value};
}

// f32 rows [n0, n1) of a weight, block by block.
template <typename T>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t k, float* out, int64_t n0,
                  int64_t n1) {
  const int64_t nb = k / T::BS;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t bi = 0; bi < nb; ++bi)
      T::decode(w + n * row_bytes + bi * T::TS, out + n * k + bi * T::BS);
}

#if defined(JLLAMA_Q8)
// The int8 row kernels: MC x rows per pass over a weight row, each block's dot in ggml's order.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")

// Types whose vec_dot keeps two accumulators (MXFP4, IQ4_NL's one-row form) take block pairs
// through ``dot2``: no per-block state to carry between calls.
template <typename T, typename = void>
struct HasDot2 : std::false_type {};
template <typename T>
struct HasDot2<T, std::void_t<decltype(T::kPairs)>> : std::bool_constant<T::kPairs> {};

template <typename T, int MC, bool TILED>
void q8_rows_mc(const Q8Call& c, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = c.k / T::BS;
  const Q8Row* x = c.rows.data() + m0;
  // Only the first pass streams the chunk from memory; later passes find it in cache.
  const int64_t ahead = m0 == 0 && !HasDot2<T>::value ? prefetch_spread_rows() : 0;
  const int64_t pf = m0 == 0 && ahead == 0 ? prefetch_rows() : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w + n * c.row_bytes;
    if (pf > 0 && n + pf < n1) {
      prefetch_row(row + pf * c.row_bytes, c.row_bytes);
    }
    Q8Acc st[MC];
    for (int m = 0; m < MC; ++m) st[m] = Q8Acc();  // all zero
    int64_t bi = 0;
    if constexpr (HasDot2<T>::value)
      for (; bi + 2 <= nb; bi += 2) T::template dot2<MC>(row + bi * T::TS, bi, x, st);
    if (ahead > 0 && n + ahead < n1) {
      // Every line of row n + ahead, along with the blocks: blocks under 64 bytes in groups
      // of kPer (at most 64 bytes a group, so no line is skipped), larger ones line by line.
      constexpr int64_t kPer = T::TS < 64 ? 64 / T::TS : 1;
      constexpr int kLines = T::TS < 64 ? 1 : (T::TS + 63) / 64;
      const uint8_t* p = row + ahead * c.row_bytes;
      for (; bi + kPer <= nb; bi += kPer) {
        for (int l = 0; l < kLines; ++l) __builtin_prefetch(p + bi * T::TS + 64 * l, 0, 3);
        for (int64_t j = 0; j < kPer; ++j)
          T::template dot<MC, TILED>(row + (bi + j) * T::TS, bi + j, x, st);
      }
    }
    for (; bi < nb; ++bi) T::template dot<MC, TILED>(row + bi * T::TS, bi, x, st);
    for (int m = 0; m < MC; ++m) c.y[(m0 + m) * c.n_out + n] = T::template finish<TILED>(st[m]);
  }
}

// Passes of 8 x rows, then 4, 2, 1: on AVX2 (16 vector registers) the 8-row pass still keeps
// its integer sums in registers and halves how often each weight block is decoded per x row;
// 64-row prompts took 0-25 % less CPU time than with passes of 4 (Q6_K, Q2_K/Q3_K, IQ types
// most: experiments/results/cpu_kernels.md). Each output's steps are the same in any pass.
// x rows in blocks of kTiledMBlock (a multiple of 8, so the passes are the same as without
// blocks): a block's rows (128 KiB at 2048 values) stay in L2 while the chunk's weight rows pass
// over them. Unblocked, 512 rows (1 MiB of codes) streamed from L3 for every weight row and the
// vec_dot-order types (TQ1_0, TQ2_0, MXFP4, ...) ran ~1.5x slower per row than at 64 rows.
template <typename T, bool TILED>
void q8_rows_t(const Q8Call& c, int64_t n0, int64_t n1) {
  for (int64_t mb = 0; mb < c.m_total; mb += kTiledMBlock) {
    const int64_t me = std::min(c.m_total, mb + kTiledMBlock);
    int64_t m0 = mb;
    for (; m0 + 8 <= me; m0 += 8) q8_rows_mc<T, 8, TILED>(c, m0, n0, n1);
    if (m0 + 4 <= me) q8_rows_mc<T, 4, TILED>(c, m0, n0, n1), m0 += 4;
    if (m0 + 2 <= me) q8_rows_mc<T, 2, TILED>(c, m0, n0, n1), m0 += 2;
    if (m0 < me) q8_rows_mc<T, 1, TILED>(c, m0, n0, n1);
  }
}

// The tiled order (TILED) carries one f32 per output from block to block and nothing else, so
// its K range can be cut into slabs of kTiledSlabK values, the running sums parked in y between
// slabs: every output still takes its blocks' steps in order, the same bits. Per slab, each
// pass over 8 x rows reads 8 x slab rows (16 KiB of codes at 2048 values) from L1 against all
// the chunk's weight rows; unslabbed, a 2048x8192 weight's 8 x rows (64 KiB) did not fit L1,
// and all 64 rows (512 KiB) not L2, so the codes streamed from L3 for every weight row.
//
// Types with ``tiled8`` (the K-quants) take a pass of 8 x rows as one vector per output row,
// lane m x row m, as ggml's AVX2 tiled kernel does: the per-block epilogue (hsums, int ->
// f32, two FMAs) once per 8 x rows instead of once per x row, the same steps in each lane.
template <typename T, typename = void>
struct HasTiled8 : std::false_type {};
template <typename T>
struct HasTiled8<T, std::void_t<decltype(&T::tiled8)>> : std::true_type {};

template <typename T, int MC>
void q8_slab_mc(const Q8Call& c, int64_t m0, int64_t n0, int64_t n1, int64_t b0, int64_t b1) {
  const int64_t pf = m0 == 0 ? prefetch_rows() : 0;  // later passes find the slab in cache
  const Q8Row* x = c.rows.data() + m0;
  if constexpr (MC == 8 && HasTiled8<T>::value) {
    constexpr int64_t kSlabBlocks = std::max<int64_t>(1, kTiledSlabK / T::BS);
    alignas(32) float dx[kSlabBlocks][8];  // the 8 rows' d_x, block by block
    for (int64_t bi = b0; bi < b1; ++bi)
      for (int m = 0; m < 8; ++m) dx[bi - b0][m] = x[m].d[bi];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = c.w + n * c.row_bytes;
      if (pf > 0 && n + pf < n1)
        prefetch_row(row + pf * c.row_bytes + b0 * T::TS, (b1 - b0) * T::TS);
      alignas(32) float ys[8] = {};
      if (b0 > 0)
        for (int m = 0; m < 8; ++m) ys[m] = c.y[(m0 + m) * c.n_out + n];
      __m256 acc = _mm256_load_ps(ys);
      for (int64_t bi = b0; bi < b1; ++bi)
        T::tiled8(row + bi * T::TS, bi, x, _mm256_load_ps(dx[bi - b0]), acc);
      _mm256_store_ps(ys, acc);
      for (int m = 0; m < 8; ++m) c.y[(m0 + m) * c.n_out + n] = ys[m];
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w + n * c.row_bytes;
    if (pf > 0 && n + pf < n1) prefetch_row(row + pf * c.row_bytes + b0 * T::TS, (b1 - b0) * T::TS);
    Q8Acc st[MC];
    for (int m = 0; m < MC; ++m) {
      st[m] = Q8Acc();
      if (b0 > 0) st[m].summs = c.y[(m0 + m) * c.n_out + n];
    }
    for (int64_t bi = b0; bi < b1; ++bi) T::template dot<MC, true>(row + bi * T::TS, bi, x, st);
    for (int m = 0; m < MC; ++m) c.y[(m0 + m) * c.n_out + n] = T::template finish<true>(st[m]);
  }
}

// Long prompts: x rows in blocks of kTiledMBlock, so that one slab of a block's rows (128 KiB)
// stays in L2 while the chunk's weight rows pass over it (512 rows of 2048: 1 MiB, which
// streamed from L3 for every weight row).
template <typename T>
void q8_rows_slabs(const Q8Call& c, int64_t n0, int64_t n1) {
  const int64_t nb = c.k / T::BS, sb = std::max<int64_t>(1, kTiledSlabK / T::BS);
  for (int64_t mb = 0; mb < c.m_total; mb += kTiledMBlock) {
    const int64_t me = std::min(c.m_total, mb + kTiledMBlock);
    for (int64_t b0 = 0; b0 < nb; b0 += sb) {
      const int64_t b1 = std::min(nb, b0 + sb);
      int64_t m0 = mb;
      for (; m0 + 8 <= me; m0 += 8) q8_slab_mc<T, 8>(c, m0, n0, n1, b0, b1);
      if (m0 + 4 <= me) q8_slab_mc<T, 4>(c, m0, n0, n1, b0, b1), m0 += 4;
      if (m0 + 2 <= me) q8_slab_mc<T, 2>(c, m0, n0, n1, b0, b1), m0 += 2;
      if (m0 < me) q8_slab_mc<T, 1>(c, m0, n0, n1, b0, b1);
    }
  }
}

// Types with a decoded block form (Q8Grid: the IQ2/IQ3 grids, whose unpacking costs as much as
// the dots): from kDecodedMinRows x rows each weight row is unpacked once into a thread-local
// buffer and every pass over the x rows reads it (64 rows: 8 unpackings per row become one).
// The same per-output steps as q8_rows_mc.
template <typename T, typename = void>
struct HasDecoded : std::false_type {};
template <typename T>
struct HasDecoded<T, std::void_t<decltype(T::kDecodedVecs)>> : std::true_type {};
constexpr int64_t kDecodedMinRows = 16;
template <typename T, typename = void>
struct DecodedTiledOnly : std::false_type {};  // IQ1: a decoded form for the tiled order only
template <typename T>
struct DecodedTiledOnly<T, std::void_t<decltype(T::kDecodedTiledOnly)>> : std::true_type {};

// Weight row n's decoded blocks [b0, b1) (v, dw: from block b0) against x rows m0..m0+MC-1.
// TILED: the running sums start from y where b0 > 0 (K slabs, as q8_slab_mc); dx8, for 8-row
// passes, the pass's d_x per block as 8 floats (m0 / 8 * nb blocks in).
// xb: rows m0.. as codes + 128 (act-bias, Q8Grid::tiled8_decoded), for 8-row TILED passes,
// from block b0 on.
template <typename T, int MC, bool TILED>
void q8_decoded_pass(const Q8Call& c, int64_t m0, const __m256i* v, const float* dw, int64_t n,
                     const float* dx8, int64_t b0, int64_t b1, const uint8_t* const* xb) {
  const int64_t nb = c.k / T::BS;
  const Q8Row* x = c.rows.data() + m0;
  float* y = c.y + m0 * c.n_out + n;
  if constexpr (TILED && MC == 8) {  // one vector for the 8 outputs (as q8_slab_mc)
    alignas(32) float ys[8] = {};
    if (b0 > 0)
      for (int m = 0; m < 8; ++m) ys[m] = y[m * c.n_out];
    __m256 acc = _mm256_load_ps(ys);
    const float* dx = dx8 + (m0 / 8) * nb * 8;
    for (int64_t bi = b0; bi < b1; ++bi)
      T::tiled8_decoded(v + (bi - b0) * T::kDecodedVecs, dw[bi - b0], bi - b0, xb,
                        _mm256_loadu_ps(dx + bi * 8), acc);
    _mm256_store_ps(ys, acc);
    for (int m = 0; m < 8; ++m) y[m * c.n_out] = ys[m];
    return;
  }
  Q8Acc st[MC];
  for (int m = 0; m < MC; ++m) {
    st[m] = Q8Acc();
    if (TILED && b0 > 0) st[m].summs = y[m * c.n_out];
  }
  for (int64_t bi = b0; bi < b1; ++bi)
    T::template dot_decoded<MC, TILED>(v + (bi - b0) * T::kDecodedVecs, dw[bi - b0], bi, x, st);
  for (int m = 0; m < MC; ++m) y[m * c.n_out] = T::template finish<TILED>(st[m]);
}

// Rows [m0, me) against row n's decoded blocks [b0, b1): passes of 8, then 4, 2, 1. xb: rows
// m0.. biased (xb[m - m0]).
template <typename T, bool TILED>
void q8_decoded_passes(const Q8Call& c, int64_t m0, int64_t me, const __m256i* v, const float* dw,
                       int64_t n, const float* dx8, int64_t b0, int64_t b1,
                       const uint8_t* const* xb) {
  const int64_t mb = m0;
  for (; m0 + 8 <= me; m0 += 8)
    q8_decoded_pass<T, 8, TILED>(c, m0, v, dw, n, dx8, b0, b1, xb + (m0 - mb));
  if (m0 + 4 <= me) q8_decoded_pass<T, 4, TILED>(c, m0, v, dw, n, dx8, b0, b1, xb), m0 += 4;
  if (m0 + 2 <= me) q8_decoded_pass<T, 2, TILED>(c, m0, v, dw, n, dx8, b0, b1, xb), m0 += 2;
  if (m0 < me) q8_decoded_pass<T, 1, TILED>(c, m0, v, dw, n, dx8, b0, b1, xb);
}

// TILED: as q8_rows_slabs, x rows in blocks of kTiledMBlock and K in slabs, each weight row's
// slab decoded once per block of x rows (512 rows: 8 decodings instead of 64 unpackings per
// pass, and the block's x slab stays in L2); the vec_dot order (no slabs: its state is 8 f32
// lanes) decodes each row once for all x rows.
template <typename T, bool TILED>
void q8_rows_decoded(const Q8Call& c, int64_t n0, int64_t n1) {
  const int64_t nb = c.k / T::BS;
  const int64_t sb = TILED ? std::max<int64_t>(1, kTiledSlabK / T::BS) : nb;
  const int64_t mblock = TILED ? kTiledMBlock : c.m_total;
  thread_local std::vector<__m256i> v;
  thread_local std::vector<float> dw, dx8;
  v.resize(size_t(std::min(nb, sb) * T::kDecodedVecs));
  dw.resize(size_t(std::min(nb, sb)));
  const int64_t passes8 = c.m_total / 8;
  if constexpr (TILED) {  // [pass][block][8 rows]
    dx8.resize(size_t(passes8 * nb * 8));
    for (int64_t p = 0; p < passes8; ++p)
      for (int64_t bi = 0; bi < nb; ++bi)
        for (int m = 0; m < 8; ++m) dx8[size_t((p * nb + bi) * 8 + m)] = c.rows[size_t(8 * p + m)].d[bi];
  }
  // The 8-row passes' x slab as codes + 128 (TILED): [row in block][slab block][256], made
  // once per block of x rows and slab, for all the chunk's weight rows; where that is all of x
  // (<= 64 rows, K in one slab), once per thread and call (64 rows: chunks of ~9 weight rows,
  // a 128 KiB copy each had cost ~5 %).
  thread_local std::vector<uint8_t> xbuf;
  thread_local uint64_t xbuf_serial = 0;
  const bool whole = c.m_total <= mblock && nb <= sb && c.x_serial != 0;
  const bool have = whole && xbuf_serial == c.x_serial;
  xbuf_serial = whole ? c.x_serial : 0;
  std::vector<const uint8_t*> xb;
  if constexpr (TILED) {
    if constexpr (T::kActBias) xbuf.resize(size_t(mblock * std::min(nb, sb) * 256));
    xb.resize(size_t(mblock));
  }
  for (int64_t mb = 0; mb < c.m_total; mb += mblock) {
    const int64_t me = std::min(c.m_total, mb + mblock);
    const int64_t m8 = mb + (me - mb) / 8 * 8;  // the 8-row passes' rows
    for (int64_t b0 = 0; b0 < nb; b0 += sb) {
      const int64_t b1 = std::min(nb, b0 + sb);
      if constexpr (TILED && !T::kActBias) {
        for (int64_t m = mb; m < m8; ++m)
          xb[size_t(m - mb)] = (const uint8_t*)(c.rows[size_t(m)].q + b0 * 256);
      } else if constexpr (TILED) {
        const int64_t len = (b1 - b0) * 256;
        for (int64_t m = mb; m < m8; ++m) {
          uint8_t* dst = xbuf.data() + (m - mb) * len;
          const int8_t* src = c.rows[size_t(m)].q + b0 * 256;
          xb[size_t(m - mb)] = dst;  // block bi at (bi - b0) * 256
          if (have) continue;
          for (int64_t i = 0; i < len; i += 32)
            _mm256_storeu_si256((__m256i*)(dst + i),
                                _mm256_xor_si256(load256(src + i), _mm256_set1_epi8(char(0x80))));
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = c.w + n * c.row_bytes;
        for (int64_t bi = b0; bi < b1; ++bi)
          dw[size_t(bi - b0)] = T::decode(row + bi * T::TS, v.data() + (bi - b0) * T::kDecodedVecs);
        q8_decoded_passes<T, TILED>(c, mb, me, v.data(), dw.data(), n, dx8.data(), b0, b1,
                                    xb.data());
      }
    }
  }
}

// A type whose single-row order differs from its multi-row one (IQ4_NL: ggml's vec_dot for
// one x row, llamafile's tinyBLAS from two) names the single-row kernel ``T::OneRow``.
template <typename T, typename = void>
struct OneRowOf {
  using type = T;
};
template <typename T>
struct OneRowOf<T, std::void_t<typename T::OneRow>> {
  using type = typename T::OneRow;
};

template <typename T>
void q8_rows(const Q8Call& c, int64_t n0, int64_t n1) {
  using One = typename OneRowOf<T>::type;
  if constexpr (!std::is_same_v<One, T>) {
    if (c.m_total == 1 || c.id) return q8_rows_t<One, false>(c, n0, n1);
  }
  if constexpr (HasDecoded<T>::value) {
    if (c.m_total >= kDecodedMinRows) {
      if (c.tiled) return q8_rows_decoded<T, true>(c, n0, n1);
      if constexpr (!DecodedTiledOnly<T>::value) return q8_rows_decoded<T, false>(c, n0, n1);
    }
  }
  if constexpr (T::kTiled) {
    if (c.m_total >= kTiledMinRows && c.tiled) return q8_rows_slabs<T>(c, n0, n1);
  }
  q8_rows_t<T, false>(c, n0, n1);
}
#pragma GCC pop_options

template <typename T>
Q8Kernel make_q8(int64_t qtype, bool q8_1 = false) {
  const Q8Gemm g = q8_gemm_for(qtype);
  return {q8_rows<T>, g.fn, T::BS, T::XB, T::OFF, g.pair_group, T::kBias, T::kBsums, q8_1,
          T::kTiled};
}

// XLA:CPU's threads run with flush-to-zero and denormals-are-zero; ggml's do not. Only MXFP4's
// E8M0 scales reach f32 denormals (e < 2, or a product d_x * d_w below 2^-126), so its kernel
// clears both for its run and restores the caller's MXCSR.
template <typename T>
void q8_rows_denormals(const Q8Call& c, int64_t n0, int64_t n1) {
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr & ~0x8040u);  // FTZ (bit 15), DAZ (bit 6)
  q8_rows<T>(c, n0, n1);
  _mm_setcsr(csr);
}

template <typename T>
Q8Kernel make_q8_denormals(int64_t qtype) {
  Q8Kernel k = make_q8<T>(qtype);
  k.fn = q8_rows_denormals<T>;
  return k;
}
#endif  // JLLAMA_Q8

}  // namespace

Kernel pick(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return make<FQ4_0>();
    case kQ4_1: return make<FQ4_1>();
    case kQ5_0: return make<FQ5_0>();
    case kQ5_1: return make<FQ5_1>();
    case kQ8_0: return make<FQ8_0>();
    case kIQ4_NL: return make<FIQ4_NL>();
    case kIQ4_XS: return make<FIQ4_XS>();
    case kQ2_K: return make<FBuf<Q2_K>>();
    case kQ3_K: return make<FBuf<Q3_K>>();
    case kQ4_K: return make<FK<CQ4_K>>();
    case kQ5_K: return make<FK<CQ5_K>>();
    case kQ6_K: return make<FK<CQ6_K>>();
    default: return {nullptr, false};
  }
}

DequantFn pick_dequant(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return dequant_rows<Q4_0>;
    case kQ4_1: return dequant_rows<Q4_1>;
    case kQ5_0: return dequant_rows<Q5_0>;
    case kQ5_1: return dequant_rows<Q5_1>;
    case kQ8_0: return dequant_rows<Q8_0>;
    case kIQ4_NL: return dequant_rows<IQ4_NL>;
    case kIQ4_XS: return dequant_rows<IQ4_XS>;
    case kQ2_K: return dequant_rows<Q2_K>;
    case kQ3_K: return dequant_rows<Q3_K>;
    case kQ4_K: return dequant_rows<Q4_K>;
    case kQ5_K: return dequant_rows<Q5_K>;
    case kQ6_K: return dequant_rows<Q6_K>;
    default: return nullptr;
  }
}

#if defined(JLLAMA_Q8)
Q8Kernel pick_q8(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return make_q8<Q8W4_0>(qtype);
    case kQ4_1: return make_q8<Q8W4_1>(qtype, true);
    case kQ5_0: return make_q8<Q8W5_0>(qtype);
    case kQ5_1: return make_q8<Q8W5_1>(qtype, true);
    case kQ8_0: return make_q8<Q8W8_0>(qtype);
    case kQ4_K: return make_q8<Q8W4_K>(qtype);
    case kQ5_K: return make_q8<Q8W5_K>(qtype);
    case kQ6_K: return make_q8<Q8W6_K>(qtype);
    case kQ2_K: return make_q8<Q8W2_K>(qtype);
    case kQ3_K: return make_q8<Q8W3_K>(qtype);
    case kTQ1_0: return make_q8<Q8WTQ1_0>(qtype);
    case kTQ2_0: return make_q8<Q8WTQ2_0>(qtype);
    case kQ1_0: return make_q8<Q8WQ1_0>(qtype);
    case kQ2_0: return make_q8<Q8WQ2_0>(qtype);
    case kMXFP4: return make_q8_denormals<Q8WMXFP4>(qtype);
    case kNVFP4: return make_q8<Q8WNVFP4>(qtype);
    case kIQ3_XXS: return make_q8<Q8WIQ3_XXS>(qtype);
    case kIQ3_S: return make_q8<Q8WIQ3_S>(qtype);
    case kIQ2_XXS: return make_q8<Q8WIQ2_XXS>(qtype);
    case kIQ2_XS: return make_q8<Q8WIQ2_XS>(qtype);
    case kIQ2_S: return make_q8<Q8WIQ2_S>(qtype);
    case kIQ1_S: return make_q8<Q8WIQ1_S>(qtype);
    case kIQ1_M: return make_q8<Q8WIQ1_M>(qtype);
    case kIQ4_NL: return make_q8<Q8WIQ4_NL>(qtype);
    case kIQ4_XS: return make_q8<Q8WIQ4_XS>(qtype);
    default: return {nullptr, nullptr, 0, 0, 0, 0, false, false, false, false};
  }
}
#endif

}  // namespace jllama

#if defined(JLLAMA_Q8)
namespace jllama {
uint32_t g_iq3xxs_grid[256];
uint32_t g_iq3s_grid[512];
uint64_t g_iq2xxs_grid[256];
uint64_t g_iq2xs_grid[512];
uint64_t g_iq2s_grid[1024];
uint64_t g_iq1s_grid[2048];
}  // namespace jllama

// The IQ3 grids for the int8 kernels, from gguf-py's tables (cpu_ffi calls this at load).
extern "C" __attribute__((visibility("default"))) void JllamaSetIQ3Grids(const uint32_t* xxs,
                                                                          const uint32_t* s) {
  std::memcpy(jllama::g_iq3xxs_grid, xxs, sizeof(jllama::g_iq3xxs_grid));
  std::memcpy(jllama::g_iq3s_grid, s, sizeof(jllama::g_iq3s_grid));
}

// The IQ2 and IQ1 grids (8 bytes a point), likewise.
extern "C" __attribute__((visibility("default"))) void JllamaSetIQ2Grids(const uint64_t* xxs,
                                                                          const uint64_t* xs,
                                                                          const uint64_t* s,
                                                                          const uint64_t* iq1s) {
  std::memcpy(jllama::g_iq2xxs_grid, xxs, sizeof(jllama::g_iq2xxs_grid));
  std::memcpy(jllama::g_iq2xs_grid, xs, sizeof(jllama::g_iq2xs_grid));
  std::memcpy(jllama::g_iq2s_grid, s, sizeof(jllama::g_iq2s_grid));
  std::memcpy(jllama::g_iq1s_grid, iq1s, sizeof(jllama::g_iq1s_grid));
}
#endif
