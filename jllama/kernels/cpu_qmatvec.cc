// Quantized matvec / skinny matmul for XLA:CPU through the FFI: y[m, n] = sum_k x[m, k] W[n, k].
//
// Why C++: XLA:CPU compiles nibble unpacking and any convert fused into a dot to scalar loops,
// so the best pure-XLA decode path reads int8-repacked weights at ~9 G elements/s with ~50 us
// per call. Here each GGUF block is decoded straight into f32 vector registers and FMA'd against
// the activations (the group scale applied once per 16-32 elements, mins through precomputed
// sums of x); the weight is read once, in its GGUF bytes (0.56-1.06 B per element), and row
// chunks are shared between the caller thread and XLA's intra-op pool. One core: Q4_0/Q4_1
// ~16, Q5_0 ~13, Q8_0 ~17-20, Q4_K ~13, Q5_K/Q6_K ~8, Q2_K ~5, Q3_K ~3 G elements/s (Zen 4).
//
// The decoders (Q4_0 ... Q6_K structs) also serve ``JllamaDequant``: f32 rows of a tile for the
// GEMM (prefill) path, where XLA's own GEMM does the multiply.
//
// ``JllamaQMatVecQ8`` (end of file) is the int8 variant that llama.cpp itself runs: x arrives
// already quantized to ggml's Q8_0/Q8_1/Q8_K blocks (jllama/quant/actquant.py), each block is an
// exact VNNI integer dot, and the f32 accumulation follows ggml's x86 vec_dot step by step, so
// the product is bit-identical to llama.cpp's CPU mul_mat (tests/test_cpu_q8_kernel.py drives
// ggml's own). Decode uses it in the default llama.cpp-matching numerics for Q4_0/Q4_1/Q5_0/
// Q5_1/Q8_0/Q4_K/Q5_K/Q6_K (one core, L3-resident weights, 2-vCPU Xeon: Q4_1 ~11, Q8_0 ~19,
// Q4_K ~12 GB/s against ~8, ~16, ~6 for the f32 decoders); the f32 decoders serve the exact-f32
// mode, the other types and the GEMM path.
//
// Built at first use by jllama/kernels/cpu_ffi.py with the host C++ compiler.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ggml type ids (gguf.GGMLQuantizationType).
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11,
                  kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23;

// The IQ4 non-linear code book (ggml's kvalues_iq4nl).
alignas(64) constexpr float kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                              1,    13,   25,  38,  53,  69,  89,  113};

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Each decoder writes one block's BS floats, bit-compatible with gguf-py's dequantize.
struct Q4_0 {
  static constexpr int BS = 32, TS = 18;
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = float(int(qs[j] & 15) - 8) * d;
      out[j + 16] = float(int(qs[j] >> 4) - 8) * d;
    }
  }
};

struct Q4_1 {
  static constexpr int BS = 32, TS = 20;
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = float(qs[j] & 15) * d + m;
      out[j + 16] = float(qs[j] >> 4) * d + m;
    }
  }
};

struct Q5_0 {
  static constexpr int BS = 32, TS = 22;
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 15) | int((qh >> j) & 1) << 4;
      const int hi = (qs[j] >> 4) | int((qh >> (j + 16)) & 1) << 4;
      out[j] = float(lo - 16) * d;
      out[j + 16] = float(hi - 16) * d;
    }
  }
};

struct Q5_1 {
  static constexpr int BS = 32, TS = 24;
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 15) | int((qh >> j) & 1) << 4;
      const int hi = (qs[j] >> 4) | int((qh >> (j + 16)) & 1) << 4;
      out[j] = float(lo) * d + m;
      out[j + 16] = float(hi) * d + m;
    }
  }
};

struct Q8_0 {
  static constexpr int BS = 32, TS = 34;
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) out[j] = float(qs[j]) * d;
  }
};

// Q2_K/Q3_K: element e = h*128 + s*32 + l takes bits 2s..2s+1 of qs[h*32 + l]; group g = e / 16
// (so group g = h*8 + s*2 + l/16). Loops run over 16 contiguous l so they vectorise.
struct Q2_K {
  static constexpr int BS = 256, TS = 84;
  static void decode(const uint8_t* b, float* out) {
    const uint8_t* sc = b;
    const uint8_t* qs = b + 16;
    const float d = f16_to_f32(b + 80), dmin = f16_to_f32(b + 82);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int half = 0; half < 2; ++half) {
          const int g = h * 8 + s * 2 + half;
          const float dl = d * float(sc[g] & 15), ml = dmin * float(sc[g] >> 4);
          const uint8_t* q = qs + h * 32 + half * 16;
          float* o = out + g * 16;
          for (int i = 0; i < 16; ++i) o[i] = dl * float((q[i] >> (2 * s)) & 3) - ml;
        }
  }
};

struct Q3_K {
  static constexpr int BS = 256, TS = 110;
  static void decode(const uint8_t* b, float* out) {
    const uint8_t* hmask = b;
    const uint8_t* qs = b + 32;
    const uint8_t* sc = b + 96;
    const float d = f16_to_f32(b + 108);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int half = 0; half < 2; ++half) {
          const int g = h * 8 + s * 2 + half, hb = h * 4 + s;  // hb: the hmask bit, e / 32
          const int lo = (g < 8 ? sc[g] : sc[g - 8] >> 4) & 15;
          const int hi = (sc[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
          const float dl = d * float((lo | (hi << 4)) - 32);
          const uint8_t* q = qs + h * 32 + half * 16;
          const uint8_t* m = hmask + half * 16;
          float* o = out + g * 16;
          for (int i = 0; i < 16; ++i)
            o[i] = dl * float(int((q[i] >> (2 * s)) & 3) - 4 + 4 * int((m[i] >> hb) & 1));
        }
  }
};

struct IQ4_NL {
  static constexpr int BS = 32, TS = 18;
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * kIQ4Values[qs[j] & 15];
      out[j + 16] = d * kIQ4Values[qs[j] >> 4];
    }
  }
};

// IQ4_XS: eight 32-groups, 6-bit signed scales split into scales_l nibbles and scales_h pairs.
struct IQ4_XS {
  static constexpr int BS = 256, TS = 136;
  static float group_scale(const uint8_t* b, float d, int g) {
    const uint16_t sh = uint16_t(b[2] | (b[3] << 8));
    const int lo = (b[4 + g / 2] >> (4 * (g & 1))) & 15, hi = (sh >> (2 * g)) & 3;
    return d * float((lo | (hi << 4)) - 32);
  }
  static void decode(const uint8_t* b, float* out) {
    const float d = f16_to_f32(b);
    for (int g = 0; g < 8; ++g) {
      const float dl = group_scale(b, d, g);
      const uint8_t* qs = b + 8 + 16 * g;
      for (int j = 0; j < 16; ++j) {
        out[32 * g + j] = dl * kIQ4Values[qs[j] & 15];
        out[32 * g + 16 + j] = dl * kIQ4Values[qs[j] >> 4];
      }
    }
  }
};

// Q4_K/Q5_K: eight 6-bit (scale, min) pairs packed in 12 bytes.
inline void k_scale_min(const uint8_t* s, float d, float dmin, float* sc, float* mn) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = d * float(s[i] & 63);
    mn[i] = dmin * float(s[i + 4] & 63);
    sc[i + 4] = d * float((s[i + 8] & 15) | ((s[i] >> 2) & 48));
    mn[i + 4] = dmin * float((s[i + 8] >> 4) | ((s[i + 4] >> 2) & 48));
  }
}

struct Q4_K {
  static constexpr int BS = 256, TS = 144;
  static void decode(const uint8_t* b, float* out) {
    float sc[8], mn[8];
    k_scale_min(b + 4, f16_to_f32(b), f16_to_f32(b + 2), sc, mn);
    const uint8_t* qs = b + 16;
    for (int c = 0; c < 4; ++c) {
      const float s0 = sc[2 * c], m0 = mn[2 * c], s1 = sc[2 * c + 1], m1 = mn[2 * c + 1];
      for (int l = 0; l < 32; ++l) {
        out[64 * c + l] = s0 * float(qs[32 * c + l] & 15) - m0;
        out[64 * c + 32 + l] = s1 * float(qs[32 * c + l] >> 4) - m1;
      }
    }
  }
};

struct Q5_K {
  static constexpr int BS = 256, TS = 176;
  static void decode(const uint8_t* b, float* out) {
    float sc[8], mn[8];
    k_scale_min(b + 4, f16_to_f32(b), f16_to_f32(b + 2), sc, mn);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48;
    for (int c = 0; c < 4; ++c) {
      const int g0 = 2 * c, g1 = 2 * c + 1;
      for (int l = 0; l < 32; ++l) {
        const int lo = (qs[32 * c + l] & 15) | (((qh[l] >> g0) & 1) << 4);
        const int hi = (qs[32 * c + l] >> 4) | (((qh[l] >> g1) & 1) << 4);
        out[64 * c + l] = sc[g0] * float(lo) - mn[g0];
        out[64 * c + 32 + l] = sc[g1] * float(hi) - mn[g1];
      }
    }
  }
};

struct Q6_K {
  static constexpr int BS = 256, TS = 210;
  static void decode(const uint8_t* b, float* out) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16_to_f32(b + 208);
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {  // 32 elements each: element h*128 + s*32 + l
        const float sc0 = d * float(scales[h * 8 + s * 2]), sc1 = d * float(scales[h * 8 + s * 2 + 1]);
        const int nib = s >> 1, l64 = (s & 1) * 32;
        for (int l = 0; l < 32; ++l) {
          const int lo = (ql[h * 64 + l64 + l] >> (4 * nib)) & 15;
          const int hi = (qh[h * 32 + l] >> (2 * s)) & 3;
          out[h * 128 + s * 32 + l] = float((lo | (hi << 4)) - 32) * (l < 16 ? sc0 : sc1);
        }
      }
    }
  }
};

constexpr int kMaxRows = 8;  // x rows handled per pass over W (more: loop in passes)

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

// y[m0 + m, n] for n in [n0, n1), m < MC: each block is decoded once and used for MC rows of x.
// Rows of W prefetched ahead of the one being read (0: off). Decode streams ~100 MB of weights
// per token; the hardware prefetcher alone left the kernel latency-bound on a 2-vCPU Xeon VM
// (env JLLAMA_CPU_PREFETCH_ROWS, for measurements). The hint is T0, not NTA: a non-temporal
// prefetch evicts the lines from the (large, shared) L3, so weights that would have stayed
// there between tokens came from DRAM every time: 2-3x slower matvecs on an L3-resident
// matrix (experiments/bench_q8_kernel.py --cpu-time; env JLLAMA_CPU_PREFETCH_NTA=1 restores it).
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

using RowsFn = void (*)(const float*, const float*, int64_t, const uint8_t*, int64_t, float*,
                        int64_t, int64_t, int64_t, int64_t);

struct Kernel {
  RowsFn fn;
  bool needs_xsum;
};

template <typename T>
constexpr Kernel make() {
  return {rows_kernel<T>, NeedsXsum<T>::value};
}

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

int block_size(int64_t qtype) { return qtype == kIQ4_NL ? 32 : qtype >= kQ2_K ? 256 : 32; }

inline int64_t helpers_cap() {
  static const int64_t v = [] {
    const char* env = std::getenv("JLLAMA_CPU_KERNEL_THREADS");  // for measurements
    return env ? std::max(0, std::atoi(env) - 1) : int64_t(1) << 20;
  }();
  return v;
}

// Chunks of rows are claimed from a shared counter by the caller and by helpers. The caller
// waits only for chunks a helper has already claimed, so helpers that never run (busy pool, no
// threads) cannot deadlock a call; state is shared_ptr-owned because a late helper may start
// after the call returned.
struct Job {
  virtual void run() = 0;
  virtual ~Job() = default;
};

// Helpers for decode matvecs: a decode step makes ~200 kernel calls of 10-100 us each with small
// XLA ops in between, and waking one of XLA's pool threads per call (futex wake, work stealing)
// costs CPU time. Like llama.cpp's threadpool, these threads can spin for a while after each
// call (JLLAMA_CPU_SPIN_US) and then sleep, so the next call of the same step finds them awake.
// Off by default (0 = XLA's pool): on 2 cores a spinning helper competes with XLA's and
// Python's own threads between calls and steps; interleaved runs on the 2-vCPU Xeon, medians of
// 8 / 4 processes of tg64: SmolLM2 85 / 85 / 76 t/s and Gemma 3 45 / 43 / 40 t/s at 0 / 50 /
// 300 us. One call at a time: a second concurrent caller (several host devices) falls back
// to XLA's pool.
class SpinPool {
 public:
  SpinPool(int64_t n, int64_t spin_us) : spin_(spin_us) {
    for (int64_t i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }

  // Null when disabled; created at the first call with the caller's helper count.
  static SpinPool* get(int64_t helpers) {
    static const int64_t spin_us = [] {
      const char* env = std::getenv("JLLAMA_CPU_SPIN_US");
      return env ? std::max(0, std::atoi(env)) : 0;
    }();
    if (spin_us == 0 || helpers <= 0) return nullptr;
    static SpinPool* pool = new SpinPool(helpers, spin_us);  // never destroyed: threads detached
    return pool;
  }

  bool try_begin(std::shared_ptr<Job> job) {
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return false;
    std::lock_guard<std::mutex> lk(mu_);
    job_ = std::move(job);
    gen_.fetch_add(1, std::memory_order_release);
    if (sleepers_ > 0) cv_.notify_all();
    return true;
  }
  void end() { busy_.store(false, std::memory_order_release); }

 private:
  void loop() {
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

  std::chrono::microseconds spin_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> gen_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t sleepers_ = 0;
  std::shared_ptr<Job> job_;
};

// Runs ``work`` on the caller plus up to ``helpers`` threads; returns when every chunk is done.
template <typename W>
void run_chunks(ffi::ThreadPool& pool, const std::shared_ptr<W>& work, int64_t helpers) {
  SpinPool* sp = SpinPool::get(std::min<int64_t>(pool.num_threads() - 1, helpers_cap()));
  const bool spun = helpers > 0 && sp != nullptr && sp->try_begin(work);
  if (!spun)
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->n_chunks) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }
  if (spun) sp->end();
}

struct Work : Job {
  RowsFn fn;
  const float* x;
  const float* xsum;
  int64_t k, row_bytes, n_out, m_total, chunk_rows, n_chunks;
  const uint8_t* w;
  float* y;
  std::vector<float> xsum_store;
  std::atomic<int64_t> next{0}, done{0};

  void run() override {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      const int64_t n0 = c * chunk_rows, n1 = std::min(n_out, n0 + chunk_rows);
      fn(x, xsum, k, w, row_bytes, y, n_out, m_total, n0, n1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// ``xs_in``: the caller's per-32-element sums of x for the min terms (ggml's Q8_1 block sums
// ``s = fp16(d * sum(q))``, which differ from the sums of the rounded x); null: computed here.
ffi::Error QMatVecRun(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, const float* xs_in,
                      ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> y, int64_t qtype) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("need 2-D x and w");
  const int64_t m = xd[0], k = xd[1], n = wd[0], row_bytes = wd[1];
  const Kernel kern = pick(qtype);
  if (kern.fn == nullptr) return ffi::Error::InvalidArgument("unsupported ggml type");
  if (k % block_size(qtype) != 0) return ffi::Error::InvalidArgument("n_in not a block multiple");
  auto work = std::make_shared<Work>();
  work->fn = kern.fn;
  work->x = x.typed_data();
  // Sums of x over each 32 elements, for the min terms (kept in the shared state).
  if (kern.needs_xsum && xs_in != nullptr) {
    work->xsum_store.assign(xs_in, xs_in + size_t(m) * size_t(k / 32));
  } else if (kern.needs_xsum) {
    work->xsum_store.assign(size_t(m) * size_t(k / 32), 0.f);
    for (int64_t i = 0; i < m * (k / 32); ++i) {
      float s = 0.f;
      for (int j = 0; j < 32; ++j) s += work->x[i * 32 + j];
      work->xsum_store[size_t(i)] = s;
    }
  }
  work->xsum = work->xsum_store.data();
  work->k = k;
  work->row_bytes = row_bytes;
  work->n_out = n;
  work->m_total = m;
  work->w = w.typed_data();
  work->y = y->typed_data();
  // ~64 KiB of weights per chunk: small enough to balance, large enough to amortise the claim.
  work->chunk_rows = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes));
  work->n_chunks = (n + work->chunk_rows - 1) / work->chunk_rows;
  run_chunks(pool, work, std::min({pool.num_threads() - 1, work->n_chunks - 1, helpers_cap()}));
  return ffi::Error::Success();
}

ffi::Error QMatVecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t qtype) {
  return QMatVecRun(pool, x, nullptr, w, y, qtype);
}

ffi::Error QMatVecXsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> xs,
                         ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> y, int64_t qtype) {
  const auto xd = x.dimensions(), sd = xs.dimensions();
  if (xd.size() != 2 || sd.size() != 2 || sd[0] != xd[0] || sd[1] * 32 != xd[1])
    return ffi::Error::InvalidArgument("xs must be [m, k / 32]");
  return QMatVecRun(pool, x, xs.typed_data(), w, y, qtype);
}

template <typename T>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t k, float* out, int64_t n0,
                  int64_t n1) {
  const int64_t nb = k / T::BS;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t bi = 0; bi < nb; ++bi)
      T::decode(w + n * row_bytes + bi * T::TS, out + n * k + bi * T::BS);
}

using DequantFn = void (*)(const uint8_t*, int64_t, int64_t, float*, int64_t, int64_t);

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

// f32 rows of a weight tile, for the GEMM path (the dot itself stays with XLA's Eigen GEMM).
// Single-threaded: it runs inside a scan next to a multi-threaded dot and is ~10x cheaper.
ffi::Error DequantImpl(ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> y, int64_t qtype) {
  const auto wd = w.dimensions(), yd = y->dimensions();
  if (wd.size() != 2 || yd.size() != 2) return ffi::Error::InvalidArgument("need 2-D w and y");
  DequantFn fn = pick_dequant(qtype);
  if (fn == nullptr) return ffi::Error::InvalidArgument("unsupported ggml type");
  if (yd[1] % block_size(qtype) != 0) return ffi::Error::InvalidArgument("bad row length");
  fn(w.typed_data(), wd[1], yd[1], y->typed_data(), 0, wd[0]);
  return ffi::Error::Success();
}

// cos and sin of f32 angles through the C library's cosf/sinf: ggml's rope cache calls them, and
// they are not correctly rounded (~1 % of rope angles differ from round(cos(double))), so an
// exact rope needs the same functions, not XLA's or a higher-precision substitute.
ffi::Error CosSinImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> c,
                      ffi::ResultBuffer<ffi::F32> s) {
  const size_t n = x.element_count();
  if (c->element_count() != n || s->element_count() != n)
    return ffi::Error::InvalidArgument("cos/sin outputs must match the input");
  const float* xp = x.typed_data();
  float* cp = c->typed_data();
  float* sp = s->typed_data();
  for (size_t i = 0; i < n; ++i) {
    cp[i] = ::cosf(xp[i]);
    sp[i] = ::sinf(xp[i]);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Int8-activation kernels, bit-exact with ggml's x86 vec_dot (the AVX2 branches of
// ggml-cpu/arch/x86/quants.c, and llamafile's tinyBLAS_Q0_AVX, which accumulates the same way),
// on any AVX2 + FMA + F16C CPU: the integer dots are VNNI's dpbusd where the CPU has it, an
// exact AVX2 emulation otherwise (the same int32 lanes, so the same f32 steps after them). The caller passes x already quantized to ggml's vec_dot type
// (int8 codes + per-block scales: Q8_0/Q8_1 f16 values as f32, Q8_K f32; Q8_1 block sums s).
// Every output element is built in ggml's order: per weight block an exact int32 dot in 8 lanes
// (lane l: elements 4l..4l+3 of each 32-group), converted to f32, ``acc = fma(d_w * d_x, lane,
// acc)`` over blocks, ggml's hsum_float_8, then the type's min term. The integer parts may be
// computed any exact way (bias trick for signed weights below); only the f32 steps must match.
//
// From 8 x rows on, ggml-cpu multiplies K-quant weights with its tiled GEMM instead
// (ggml-cpu/tiled/, ``ggml_tiled_min_batch``), whose f32 steps differ: per 256-block one exact
// int32 s1 = sum_g sc[g] dot_g and (Q4_K/Q5_K) s2 = sum_g mn[g] bsum_g, then
// ``r = fma(-dmin_w, s2, s1 * d_w)`` (Q6_K: ``r = s1 * d_w``) and ``acc = fma(r, d_x, acc)``
// over blocks, no lane split and no hsum (its AVX-512 VNNI microkernel as the oracle build
// compiles it, vfnmadd + vfmadd over memory). Tile shapes, K chunking and threads only regroup
// whole output elements, so they do not enter: the ``kTiled`` kernels below follow that order
// whenever the call has >= 8 rows (``kTiledMinRows``), ggml's src1->ne[1], unless
// GGML_CPU_TILED_MM=0 turns it off, as in ggml.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JLLAMA_Q8 1

// No reassociation or contraction of the f32 steps below: their order is the point.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")

// acc + the sum of 4 u8*s8 products per int32 lane (lane l: bytes 4l..4l+3). U7: every u is
// below 128, which lets the AVX2 form take one maddubs (its int16 pair sums reach 2 * 127 * 128
// < 2^15, no saturation); otherwise u is split into u & 0x7f and u & 0x80, each of whose
// maddubs pair sums fits int16 (-32768 at worst, for 0x80 * -128 twice). Exact either way.
template <bool U7 = false>
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (U7) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
  const __m256i lo = _mm256_and_si256(u, _mm256_set1_epi8(0x7f));
  const __m256i hi = _mm256_and_si256(u, _mm256_set1_epi8(char(0x80)));
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, s), ones));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, s), ones));
#endif
}

inline float hsum8(__m256 x) {  // ggml's hsum_float_8
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

inline float f16f(const uint8_t* p) {  // always-inline intrinsic: no call across the pragma
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }

// 16 bytes of nibbles -> 32 bytes (low nibbles first), as ggml's bytes_from_nibbles_32.
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128((const __m128i*)p);
  const __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
  return _mm256_and_si256(b, _mm256_set1_epi8(15));
}

// Bit i of 32 bits -> 0x10 in byte i (the fifth bit of a Q5 code).
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_maskz_mov_epi8(__mmask32(bits), _mm256_set1_epi8(16));
#else
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(16));
#endif
}

// One x row as the kernels see it. aux: Q4_0/Q5_0/Q8_0: -offset * (sum of each 4 codes), the
// dpbusd start value that turns unsigned weight codes into signed ones; K-quants: the 16-element
// code sums (ggml's Q8_K bsums), as int32.
struct Q8Row {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* aux;
  const int16_t* pairs;  // GEMM, K-quants: group code sums (32: Q4_K/Q5_K, 16: Q6_K) as int16
};

struct Q8Acc {
  __m256 acc;
  __m128 accm;
  float summs;  // also the tiled order's scalar accumulator
};

constexpr int64_t kTiledMinRows = 8;  // ggml_tiled_min_batch

// ggml's own switch, GGML_CPU_TILED_MM=0 (read once, as ggml does): a llama.cpp run with the
// tiled GEMM off is matched by a jllama run with the same environment.
inline bool tiled_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("GGML_CPU_TILED_MM");
    return env == nullptr || std::atoi(env) != 0;
  }();
  return on;
}

inline int32_t hsum_i32(__m256i v) {  // any exact order: integers
  __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 1));
  return _mm_cvtsi128_si32(r);
}

// Lane sums of MC int32x8 vectors into out[MC] (4 at a time through hadd).
template <int MC>
inline void hsum_i32_rows(const __m256i* v, int32_t* out) {
  int m = 0;
  for (; m + 4 <= MC; m += 4) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[m], v[m + 1]),
                                        _mm256_hadd_epi32(v[m + 2], v[m + 3]));
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i*)(out + m), s);
  }
  for (; m < MC; ++m) out[m] = hsum_i32(v[m]);
}

// Q4_0/Q5_0/Q8_0 (Q8_0 activations): weight codes as u8 = code + OFF, the bias undoes OFF.
template <typename D>
struct Q8Signed {
  static constexpr int BS = 32, XB = 32;
  static constexpr bool kBias = true, kBsums = false, kTiled = false;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16f(b);
    const __m256i qw = D::codes(b);
    for (int m = 0; m < MC; ++m) {
      const __m256i p = dpbusd<(D::OFF < 128)>(load256(x[m].aux + bi * 8), qw,
                                             load256(x[m].q + bi * 32));
      st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[m].d[bi]), _mm256_cvtepi32_ps(p),
                                  st[m].acc);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) { return hsum8(a.acc); }
};

struct Q8W4_0 : Q8Signed<Q8W4_0> {
  static constexpr int TS = 18, OFF = 8;
  static __m256i codes(const uint8_t* b) { return nibbles32(b + 2); }
};
struct Q8W5_0 : Q8Signed<Q8W5_0> {
  static constexpr int TS = 22, OFF = 16;
  static __m256i codes(const uint8_t* b) {
    return _mm256_or_si256(nibbles32(b + 6), fifth_bits(b + 2));
  }
};
struct Q8W8_0 : Q8Signed<Q8W8_0> {
  static constexpr int TS = 34, OFF = 128;
  static __m256i codes(const uint8_t* b) {
    return _mm256_xor_si256(load256(b + 2), _mm256_set1_epi8(char(0x80)));
  }
};

// Q4_1/Q5_1 (Q8_1 activations): unsigned codes; summs = fma(m_w, s_x, summs) per block (ggml's
// binary contracts it), added after the hsum.
template <typename D>
struct Q8Min {
  static constexpr int BS = 32, XB = 32;
  static constexpr bool kBias = false, kBsums = false, kTiled = false;
  static constexpr int OFF = 0;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16f(b), mw = f16f(b + 2);
    const __m256i qw = D::codes(b);
    for (int m = 0; m < MC; ++m) {
      const __m256i p = dpbusd<true>(_mm256_setzero_si256(), qw, load256(x[m].q + bi * 32));
      st[m].summs = __builtin_fmaf(mw, x[m].s[bi], st[m].summs);
      st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[m].d[bi]), _mm256_cvtepi32_ps(p),
                                  st[m].acc);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) { return hsum8(a.acc) + a.summs; }
};

struct Q8W4_1 : Q8Min<Q8W4_1> {
  static constexpr int TS = 20;
  static __m256i codes(const uint8_t* b) { return nibbles32(b + 4); }
};
struct Q8W5_1 : Q8Min<Q8W5_1> {
  static constexpr int TS = 24;
  static __m256i codes(const uint8_t* b) {
    return _mm256_or_si256(nibbles32(b + 8), fifth_bits(b + 4));
  }
};

// Lane l: sc * (dot of bytes 4l..4l+3), u8 weights (< 32) times s8 codes (|q| <= 127): the
// same int32 lanes as dpbusd followed by mullo by sc, in two uops instead of three (maddubs
// pairs reach 2 * 31 * 127 < 2^15, no saturation). Q4_K/Q5_K; Q6_K measured faster without.
inline __m256i scaled_dot4(__m256i qw, __m256i qy, __m256i sc16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qy), sc16);
}

// The 6-bit scales and mins of a Q4_K/Q5_K block as ints.
inline void k_scale_min_int(const uint8_t* s, int* sc, int* mn) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 63;
    mn[i] = s[i + 4] & 63;
    sc[i + 4] = (s[i + 8] & 15) | ((s[i] >> 2) & 48);
    mn[i + 4] = (s[i + 8] >> 4) | ((s[i + 4] >> 2) & 48);
  }
}

// Q4_K/Q5_K (Q8_K activations): per block sumi = sum_g sc[g] * dot(group g) in 8 lanes,
// acc = fma(d_x * d_w, sumi, acc). Mins: Q4_K keeps 4 f32 lanes of (mn[2i] bs[2i] + mn[2i+1]
// bs[2i+1]) * dmin; Q5_K one scalar summs += dmin * sum_g mn[g] bs[g] (contracted, as built).
// TILED (ggml's tiled GEMM): summs = fma(fma(-dmin_w, s2, s1 * d_w), d_x, summs).
template <typename D>
struct Q8KMin {
  static constexpr int BS = 256, XB = 256;
  static constexpr bool kBias = false, kBsums = true, kTiled = true;
  static constexpr int OFF = 0;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    int sc[8], mn[8];
    k_scale_min_int(b + 4, sc, mn);
    const float dw = f16f(b), dminw = f16f(b + 2);
    __m256i sumi[MC];
    for (int m = 0; m < MC; ++m) sumi[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m256i qw = D::group(b, g);
      const __m256i scv = _mm256_set1_epi16(int16_t(sc[g]));
      for (int m = 0; m < MC; ++m) {
        const __m256i qy = load256(x[m].q + bi * 256 + g * 32);
        sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(qw, qy, scv));
      }
    }
    if constexpr (TILED) {
      int32_t s1[MC];
      hsum_i32_rows<MC>(sumi, s1);
      for (int m = 0; m < MC; ++m) {
        const int32_t* bs = x[m].aux + bi * 16;
        int32_t s2 = 0;
        for (int g = 0; g < 8; ++g) s2 += mn[g] * (bs[2 * g] + bs[2 * g + 1]);
        const float r = __builtin_fmaf(-dminw, float(s2), float(s1[m]) * dw);
        st[m].summs = __builtin_fmaf(r, x[m].d[bi], st[m].summs);
      }
      return;
    }
    for (int m = 0; m < MC; ++m) {
      const float dx = x[m].d[bi];
      const int32_t* bs = x[m].aux + bi * 16;
      int pm[4];
      for (int i = 0; i < 4; ++i)
        pm[i] = mn[2 * i] * (bs[4 * i] + bs[4 * i + 1]) +
                mn[2 * i + 1] * (bs[4 * i + 2] + bs[4 * i + 3]);
      const float dmin = -dx * dminw;
      if constexpr (D::kScalarMins) {
        st[m].summs = __builtin_fmaf(dmin, float(pm[0] + pm[1] + pm[2] + pm[3]), st[m].summs);
      } else {
        const __m128 pmf = _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i*)pm));
        st[m].accm = _mm_fmadd_ps(_mm_set1_ps(dmin), pmf, st[m].accm);
      }
      st[m].acc =
          _mm256_fmadd_ps(_mm256_set1_ps(dx * dw), _mm256_cvtepi32_ps(sumi[m]), st[m].acc);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) {
    if constexpr (TILED) return a.summs;
    if constexpr (D::kScalarMins) return hsum8(a.acc) + a.summs;
    __m128 m = _mm_add_ps(a.accm, _mm_movehl_ps(a.accm, a.accm));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return hsum8(a.acc) + _mm_cvtss_f32(m);
  }
};

struct Q8W4_K : Q8KMin<Q8W4_K> {
  static constexpr int TS = 144;
  static constexpr bool kScalarMins = false;
  static __m256i group(const uint8_t* b, int g) {  // group g: chunk g/2, nibble g%2
    const __m256i q = load256(b + 16 + 32 * (g >> 1));
    return _mm256_and_si256(_mm256_srli_epi16(q, 4 * (g & 1)), _mm256_set1_epi8(15));
  }
};

struct Q8W5_K : Q8KMin<Q8W5_K> {
  static constexpr int TS = 176;
  static constexpr bool kScalarMins = true;
  static __m256i group(const uint8_t* b, int g) {  // plus bit g of qh[l] as 16
    const __m256i q = load256(b + 48 + 32 * (g >> 1));
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(q, 4 * (g & 1)), _mm256_set1_epi8(15));
    const __m256i h = _mm256_and_si256(load256(b + 16), _mm256_set1_epi8(char(1 << g)));
    const __m256i hi = _mm256_slli_epi16(_mm256_srli_epi16(h, g), 4);
    return _mm256_or_si256(lo, hi);
  }
};

// Q6_K: sumi = sum over 32-chunks of {sc[2c] x4 lanes, sc[2c+1] x4} * dot(unsigned codes),
// minus 32 * (bs[2l] sc[2l] + bs[2l+1] sc[2l+1]) in lane l, as ggml's q8sclsub.
// TILED (ggml's tiled GEMM): s1 = the sum of all lanes, summs = fma(s1 * d_w, d_x, summs).
struct Q8W6_K {
  static constexpr int BS = 256, XB = 256, TS = 210, OFF = 0;
  static constexpr bool kBias = false, kBsums = true, kTiled = true;
  // The 6-bit codes (0..63) of 32-element chunk c: low nibbles from ql, 2 high bits from qh.
  static __m256i chunk(const uint8_t* b, int c) {
    const int h = c >> 2, i = c & 3;
    const __m256i ql = load256(b + 64 * h + 32 * (i & 1));
    const __m256i qh = load256(b + 128 + 32 * h);
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (i >> 1)), _mm256_set1_epi8(15));
    const __m256i hi = _mm256_slli_epi16(
        _mm256_and_si256(_mm256_srli_epi16(qh, 2 * i), _mm256_set1_epi8(3)), 4);
    return _mm256_or_si256(lo, hi);
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float dw = f16f(b + 208);
    __m256i sumi[MC];
    for (int m = 0; m < MC; ++m) {
      // lane l: bs[2l] sc[2l] + bs[2l+1] sc[2l+1]
      const int32_t* bs = x[m].aux + bi * 16;
      alignas(32) int32_t t[8];
      for (int l = 0; l < 8; ++l)
        t[l] = bs[2 * l] * int(scales[2 * l]) + bs[2 * l + 1] * int(scales[2 * l + 1]);
      sumi[m] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                 _mm256_slli_epi32(_mm256_load_si256((const __m256i*)t), 5));
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i qw = chunk(b, c);
      const __m256i scv = _mm256_setr_epi32(scales[2 * c], scales[2 * c], scales[2 * c],
                                            scales[2 * c], scales[2 * c + 1], scales[2 * c + 1],
                                            scales[2 * c + 1], scales[2 * c + 1]);
      for (int m = 0; m < MC; ++m) {
        const __m256i qy = load256(x[m].q + bi * 256 + c * 32);
        const __m256i p = dpbusd<true>(_mm256_setzero_si256(), qw, qy);  // codes < 64
        sumi[m] = _mm256_add_epi32(sumi[m], _mm256_mullo_epi32(p, scv));
      }
    }
    if constexpr (TILED) {
      int32_t s1[MC];
      hsum_i32_rows<MC>(sumi, s1);
      for (int m = 0; m < MC; ++m)
        st[m].summs = __builtin_fmaf(float(s1[m]) * dw, x[m].d[bi], st[m].summs);
      return;
    }
    for (int m = 0; m < MC; ++m)
      st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(x[m].d[bi] * dw), _mm256_cvtepi32_ps(sumi[m]),
                                  st[m].acc);
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) {
    if constexpr (TILED) return a.summs;
    return hsum8(a.acc);
  }
};

struct Q8Call {
  int64_t k, n_out, m_total, row_bytes;
  const uint8_t* w;
  float* y;
  std::vector<Q8Row> rows;
};

template <typename T, int MC, bool TILED>
void q8_rows_mc(const Q8Call& c, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = c.k / T::BS, pf = prefetch_rows();
  const Q8Row* x = c.rows.data() + m0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w + n * c.row_bytes;
    if (pf > 0 && n + pf < n1) {
      prefetch_row(row + pf * c.row_bytes, c.row_bytes);
    }
    Q8Acc st[MC];
    for (int m = 0; m < MC; ++m) st[m] = {_mm256_setzero_ps(), _mm_setzero_ps(), 0.f};
    for (int64_t bi = 0; bi < nb; ++bi) T::template dot<MC, TILED>(row + bi * T::TS, bi, x, st);
    for (int m = 0; m < MC; ++m) c.y[(m0 + m) * c.n_out + n] = T::template finish<TILED>(st[m]);
  }
}

template <typename T, bool TILED>
void q8_rows_t(const Q8Call& c, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + 4 <= c.m_total; m0 += 4) q8_rows_mc<T, 4, TILED>(c, m0, n0, n1);
  if (m0 + 2 <= c.m_total) q8_rows_mc<T, 2, TILED>(c, m0, n0, n1), m0 += 2;
  if (m0 < c.m_total) q8_rows_mc<T, 1, TILED>(c, m0, n0, n1);
}

template <typename T>
void q8_rows(const Q8Call& c, int64_t n0, int64_t n1) {
  if constexpr (T::kTiled) {
    if (c.m_total >= kTiledMinRows && tiled_enabled()) return q8_rows_t<T, true>(c, n0, n1);
  }
  q8_rows_t<T, false>(c, n0, n1);
}


// ---------------------------------------------------------------------------------------------
// Prompt GEMM (many x rows), same f32 steps as above, on AVX-512 VNNI with the weight transposed
// into lanes: a tile of 16 weight rows is decoded once into codes[k / 4][16][4] (u8), so one
// 512-bit dpbusd against 4 broadcast x codes gives, for 16 outputs at once, the 4-element int32
// lane that ggml's 256-bit dot forms in its lane l = (k / 4) % 8. Each ggml lane of each output
// then keeps its own f32 register lane, and every fma / cvt / hsum step is ggml's, per output,
// in ggml's order, only 16 outputs wide instead of 8 lanes of one output. The row loop over the
// x rows reuses the decoded tile (L1/L2), where the row-major kernels above decode each weight
// block again for every 4 x rows and pay a horizontal sum per block. K-quants (ggml's tiled
// order from 8 rows): per group an int32 dot times the group's scale (vpmulld), mins through
// int16 pairs (vpdpwssd), then ggml's two fmas per block. At 512 rows, 2 threads, against ggml's
// own mul_mat (experiments/bench_gemm_vs_ggml.py): Q5_0 1.3-2.0x its tinyBLAS, Q8_0 1.4x, Q4_1
// 3-4.5x its vec_dot, Q4_K/Q6_K 1.4-1.6x its tiled K-quant GEMM.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define JLLAMA_Q8_GEMM 1

constexpr int kNR = 16;  // weight rows per tile (one zmm lane each)

// From how many x rows the GEMM beats the row kernels (bench_q8_kernel.py --rows, 2 threads):
// K-quants from 8 (where ggml's tiled order starts), the 32-block types from 16 (at 8 rows
// decoding the tile cost more than it saved: Q4_1 1536x576 249 vs 138 us; at 16: 220 vs 261).
// JLLAMA_Q8_GEMM_MIN_ROWS=N overrides both (0: off), for measurements.
inline int64_t gemm_min_rows(bool k_quant) {
  static const int64_t env_v = [] {
    const char* env = std::getenv("JLLAMA_Q8_GEMM_MIN_ROWS");
    return env ? int64_t(std::atoi(env)) : int64_t(-1);
  }();
  return env_v >= 0 ? env_v : k_quant ? 8 : 16;
}

// One tile's weights, decoded (thread-local, reused across calls).
struct GemmTile {
  std::vector<uint32_t> codes;  // [k / 4][16]: 4 u8 codes of one weight row per lane
  std::vector<float> d, m;      // [blocks][16]: d_w; m_w (Q4_1/Q5_1) or dmin_w (Q4_K/Q5_K)
  std::vector<int32_t> sc, pr;  // K-quants: [blocks][groups][16] scales, [blocks][pairs][16]
  std::vector<uint8_t> row;     // the tile's rows decoded row-major, [16][k]
};

inline uint32_t pack16(int a, int b) { return uint32_t(uint16_t(int16_t(a))) | uint32_t(b) << 16; }

// Per type: decode(b, codes, tile, bi, r) writes block bi of weight row r.
template <typename T>
struct GLane {  // Q4_0/Q5_0/Q8_0 (bias) and Q4_1/Q5_1 (mins): 32-blocks
  static constexpr int BS = 32, G = 0, P = 0;
  static void decode(const uint8_t* b, uint8_t* codes, GemmTile& t, int64_t bi, int r) {
    _mm256_storeu_si256((__m256i*)codes, T::codes(b));
    t.d[bi * kNR + r] = f16f(b);
    if constexpr (!T::kBias) t.m[bi * kNR + r] = f16f(b + 2);
  }
};

template <typename T>
struct GKMin {  // Q4_K/Q5_K: 8 groups of 32, (scale, min) pairs
  static constexpr int BS = 256, G = 8, P = 4;
  static void decode(const uint8_t* b, uint8_t* codes, GemmTile& t, int64_t bi, int r) {
    int sc[8], mn[8];
    k_scale_min_int(b + 4, sc, mn);
    t.d[bi * kNR + r] = f16f(b);
    t.m[bi * kNR + r] = f16f(b + 2);
    for (int g = 0; g < 8; ++g) {
      _mm256_storeu_si256((__m256i*)(codes + 32 * g), T::group(b, g));
      t.sc[(bi * G + g) * kNR + r] = sc[g];
    }
    for (int p = 0; p < 4; ++p)
      t.pr[(bi * P + p) * kNR + r] = int32_t(pack16(mn[2 * p], mn[2 * p + 1]));
  }
};

struct GQ6K {  // Q6_K: 16 groups of 16, signed 8-bit scales, codes 0..63 (minus 32 via bsums)
  static constexpr int BS = 256, G = 16, P = 8;
  static void decode(const uint8_t* b, uint8_t* codes, GemmTile& t, int64_t bi, int r) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    t.d[bi * kNR + r] = f16f(b + 208);
    for (int c = 0; c < 8; ++c)
      _mm256_storeu_si256((__m256i*)(codes + 32 * c), Q8W6_K::chunk(b, c));
    for (int g = 0; g < 16; ++g) t.sc[(bi * G + g) * kNR + r] = scales[g];
    for (int p = 0; p < 8; ++p)
      t.pr[(bi * P + p) * kNR + r] = int32_t(pack16(scales[2 * p], scales[2 * p + 1]));
  }
};

// Decodes weight rows [n0, n0 + nr) (nr <= 16) into the tile; missing lanes are zero. Rows are
// decoded row-major first, then one 32-bit gather per 4 codes of 16 rows builds the transpose
// (a per-element copy made the tile cost ~0.3 us per weight row, a tenth of a 512-row GEMM).
template <typename G>
void gemm_decode(const Q8Call& c, int64_t n0, int nr, GemmTile& t) {
  const int64_t k = c.k, nb = k / G::BS, ts = c.row_bytes / nb;
  if (nr < kNR) {  // lanes past the last row: zero codes and scales
    t.row.assign(size_t(k * kNR), 0);
    t.d.assign(size_t(nb * kNR), 0.f);
    t.m.assign(size_t(nb * kNR), 0.f);
    t.sc.assign(size_t(nb * G::G * kNR), 0);
    t.pr.assign(size_t(nb * G::P * kNR), 0);
  } else {
    t.row.resize(size_t(k * kNR));
    t.d.resize(size_t(nb * kNR));
    t.m.resize(size_t(nb * kNR));
    t.sc.resize(size_t(nb * G::G * kNR));
    t.pr.resize(size_t(nb * G::P * kNR));
  }
  t.codes.resize(size_t(k / 4 * kNR));
  for (int r = 0; r < nr; ++r) {
    const uint8_t* w = c.w + (n0 + r) * c.row_bytes;
    uint8_t* dst = t.row.data() + r * k;
    for (int64_t bi = 0; bi < nb; ++bi) G::decode(w + bi * ts, dst + bi * G::BS, t, bi, r);
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                           12, 13, 14, 15),
                                         _mm512_set1_epi32(int32_t(k)));
  const uint8_t* src = t.row.data();
  for (int64_t q = 0; q < k / 4; ++q)
    _mm512_storeu_si512(&t.codes[size_t(q * kNR)], _mm512_i32gather_epi32(idx, src + 4 * q, 1));
}

inline __m512i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Lane-order types: acc[m][l] over 32-blocks, ggml's hsum_float_8 over l at the end.
template <typename T, int MR>
void gemm_lane_rows(const Q8Call& c, const GemmTile& t, int64_t m0, float* out) {
  const int64_t nb = c.k / 32;
  const Q8Row* x = c.rows.data() + m0;
  __m512 acc[MR][8], summ[MR];
  for (int m = 0; m < MR; ++m) {
    summ[m] = _mm512_setzero_ps();
    for (int l = 0; l < 8; ++l) acc[m][l] = _mm512_setzero_ps();
  }
  for (int64_t bi = 0; bi < nb; ++bi) {
    const __m512 dw = _mm512_loadu_ps(&t.d[size_t(bi * kNR)]);
    __m512 sc[MR];
    for (int m = 0; m < MR; ++m) {
      sc[m] = _mm512_mul_ps(dw, _mm512_set1_ps(x[m].d[bi]));
      if constexpr (!T::kBias)
        summ[m] = _mm512_fmadd_ps(_mm512_loadu_ps(&t.m[size_t(bi * kNR)]),
                                  _mm512_set1_ps(x[m].s[bi]), summ[m]);
    }
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) {
      const int64_t qi = bi * 8 + l;
      const __m512i w = _mm512_loadu_si512(&t.codes[size_t(qi * kNR)]);
      for (int m = 0; m < MR; ++m) {
        const __m512i init = T::kBias ? _mm512_set1_epi32(x[m].aux[qi]) : _mm512_setzero_si512();
        const __m512i p = _mm512_dpbusd_epi32(init, w, bcast32(x[m].q + 4 * qi));
        acc[m][l] = _mm512_fmadd_ps(sc[m], _mm512_cvtepi32_ps(p), acc[m][l]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {  // ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)), as hsum_float_8
    const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][4], acc[m][0]),
                                   _mm512_add_ps(acc[m][6], acc[m][2]));
    const __m512 b = _mm512_add_ps(_mm512_add_ps(acc[m][5], acc[m][1]),
                                   _mm512_add_ps(acc[m][7], acc[m][3]));
    __m512 r = _mm512_add_ps(a, b);
    if constexpr (!T::kBias) r = _mm512_add_ps(r, summ[m]);
    _mm512_storeu_ps(out + m * kNR, r);
  }
}

// K-quants in ggml's tiled order: per 256-block exact s1 (and s2), then
// r = fma(-dmin_w, s2, s1 * d_w) (Q6_K: s1 * d_w), acc = fma(r, d_x, acc).
template <typename G, int MR>
void gemm_k_rows(const Q8Call& c, const GemmTile& t, int64_t m0, float* out) {
  constexpr bool kMins = G::G == 8;
  constexpr int GS = 256 / G::G;  // group size: 32 or 16
  const int64_t nb = c.k / 256;
  const Q8Row* x = c.rows.data() + m0;
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t bi = 0; bi < nb; ++bi) {
    __m512i s1[MR], s2[MR];
    for (int m = 0; m < MR; ++m) s1[m] = s2[m] = _mm512_setzero_si512();
    for (int g = 0; g < G::G; ++g) {
      __m512i dot[MR];
      for (int m = 0; m < MR; ++m) dot[m] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int j = 0; j < GS / 4; ++j) {
        const int64_t qi = (bi * 256 + g * GS) / 4 + j;
        const __m512i w = _mm512_loadu_si512(&t.codes[size_t(qi * kNR)]);
        for (int m = 0; m < MR; ++m)
          dot[m] = _mm512_dpbusd_epi32(dot[m], w, bcast32(x[m].q + 4 * qi));
      }
      const __m512i sc = _mm512_loadu_si512(&t.sc[size_t((bi * G::G + g) * kNR)]);
      for (int m = 0; m < MR; ++m) s1[m] = _mm512_add_epi32(s1[m], _mm512_mullo_epi32(dot[m], sc));
    }
    for (int p = 0; p < G::P; ++p) {  // mins (Q4_K/Q5_K) or 32-offsets (Q6_K) per pair of groups
      const __m512i pr = _mm512_loadu_si512(&t.pr[size_t((bi * G::P + p) * kNR)]);
      for (int m = 0; m < MR; ++m)
        s2[m] = _mm512_dpwssd_epi32(s2[m], pr, bcast32(x[m].pairs + bi * 2 * G::P + 2 * p));
    }
    const __m512 dw = _mm512_loadu_ps(&t.d[size_t(bi * kNR)]);
    for (int m = 0; m < MR; ++m) {
      __m512 r;
      if constexpr (kMins) {
        const __m512 ndmin =
            _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(&t.m[size_t(bi * kNR)]));
        r = _mm512_fmadd_ps(ndmin, _mm512_cvtepi32_ps(s2[m]),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(s1[m]), dw));
      } else {
        const __m512i s = _mm512_sub_epi32(s1[m], _mm512_slli_epi32(s2[m], 5));
        r = _mm512_mul_ps(_mm512_cvtepi32_ps(s), dw);
      }
      acc[m] = _mm512_fmadd_ps(r, _mm512_set1_ps(x[m].d[bi]), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * kNR, acc[m]);
}

template <typename G, typename T, int MR>
void gemm_rows(const Q8Call& c, const GemmTile& t, int64_t m0, float* out) {
  if constexpr (G::G == 0) gemm_lane_rows<T, MR>(c, t, m0, out);
  else gemm_k_rows<G, MR>(c, t, m0, out);
}

// All x rows against weight rows [n0, n1), tile by tile.
template <typename G, typename T>
void q8_gemm(const Q8Call& c, int64_t n0, int64_t n1) {
  constexpr int MR = G::G == 0 ? 2 : 4;
  static thread_local GemmTile tile;
  alignas(64) float out[MR * kNR];
  for (int64_t t0 = n0; t0 < n1; t0 += kNR) {
    const int nr = int(std::min<int64_t>(kNR, n1 - t0));
    gemm_decode<G>(c, t0, nr, tile);
    const __mmask16 mask = __mmask16((1u << nr) - 1);
    auto store = [&](int64_t m0, int rows) {
      for (int m = 0; m < rows; ++m)
        _mm512_mask_storeu_ps(c.y + (m0 + m) * c.n_out + t0, mask, _mm512_loadu_ps(out + m * kNR));
    };
    int64_t m0 = 0;
    for (; m0 + MR <= c.m_total; m0 += MR) gemm_rows<G, T, MR>(c, tile, m0, out), store(m0, MR);
    for (; m0 < c.m_total; ++m0) gemm_rows<G, T, 1>(c, tile, m0, out), store(m0, 1);
  }
}
#endif  // AVX-512 VNNI
#pragma GCC pop_options

using Q8Fn = void (*)(const Q8Call&, int64_t, int64_t);

struct Q8Kernel {
  Q8Fn fn, gemm;  // row-major kernel; transposed-tile GEMM (null: none on this CPU)
  int bs, xb, off, pair_group;  // pair_group: the GEMM's x code sums per int16 (K-quants)
  bool bias, bsums, q8_1, tiled;
};

template <typename T, typename G>
constexpr Q8Kernel make_q8(bool q8_1 = false) {
#if defined(JLLAMA_Q8_GEMM)
  constexpr Q8Fn gemm = q8_gemm<G, T>;
  constexpr int pg = G::G == 0 ? 0 : 256 / G::G;
#else
  constexpr Q8Fn gemm = nullptr;
  constexpr int pg = 0;
#endif
  return {q8_rows<T>, gemm, T::BS, T::XB, T::OFF, pg, T::kBias, T::kBsums, q8_1, T::kTiled};
}

#if !defined(JLLAMA_Q8_GEMM)
template <typename T> struct GLane {};
template <typename T> struct GKMin {};
struct GQ6K {};
#endif

Q8Kernel pick_q8(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return make_q8<Q8W4_0, GLane<Q8W4_0>>();
    case kQ4_1: return make_q8<Q8W4_1, GLane<Q8W4_1>>(true);
    case kQ5_0: return make_q8<Q8W5_0, GLane<Q8W5_0>>();
    case kQ5_1: return make_q8<Q8W5_1, GLane<Q8W5_1>>(true);
    case kQ8_0: return make_q8<Q8W8_0, GLane<Q8W8_0>>();
    case kQ4_K: return make_q8<Q8W4_K, GKMin<Q8W4_K>>();
    case kQ5_K: return make_q8<Q8W5_K, GKMin<Q8W5_K>>();
    case kQ6_K: return make_q8<Q8W6_K, GQ6K>();
    default: return {nullptr, nullptr, 0, 0, 0, 0, false, false, false, false};
  }
}

constexpr int kGemmChunk = 16;  // weight rows per GEMM work item: one tile

// Whether a call of m x rows takes the GEMM: from gemm_min_rows rows, and for K-quants only
// where ggml takes its tiled order (the GEMM has no vec_dot order for them).
bool use_gemm(const Q8Kernel& kern, int64_t m) {
#if defined(JLLAMA_Q8_GEMM)
  const int64_t lo = gemm_min_rows(kern.tiled);
  if (kern.gemm == nullptr || lo <= 0 || m < lo) return false;
  return !kern.tiled || (m >= kTiledMinRows && tiled_enabled());
#else
  (void)kern, (void)m;
  return false;
#endif
}

// Shared state of one q8 call over one or more weights that share the activations (q/k/v,
// gate/up): their row chunks form one work list, so a decode step makes one kernel call (one
// thread hand-off) per group instead of one per weight. Threading as in Work.
struct Q8Sub {
  Q8Call call;
  Q8Kernel kern;
  bool gemm = false;
  std::vector<int32_t> aux;
  std::vector<int16_t> pairs;
};

struct Q8Work : Job {
  std::vector<Q8Sub> subs;
  std::vector<int8_t> xq;  // activations quantized by the fused call (q8f), else unused
  std::vector<float> xd, xs;
  std::vector<std::array<int64_t, 3>> chunks;  // (sub, n0, n1)
  int64_t n_chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void run() override {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      const auto& [i, n0, n1] = chunks[size_t(c)];
      const Q8Sub& sub = subs[size_t(i)];
      (sub.gemm ? sub.kern.gemm : sub.kern.fn)(sub.call, n0, n1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The activations in ggml's vec_dot format: codes [m, k], scales [m, d_cols], Q8_1 sums.
struct Q8In {
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t m, k, d_rows, d_cols, s_rows, s_cols;
};

Q8In q8_in(ffi::Buffer<ffi::S8>& q, ffi::Buffer<ffi::F32>& d, ffi::Buffer<ffi::F32>& s) {
  const auto qd = q.dimensions(), dd = d.dimensions(), sd = s.dimensions();
  if (qd.size() != 2 || dd.size() != 2 || sd.size() != 2) return {nullptr, nullptr, nullptr};
  return {q.typed_data(), d.typed_data(), s.typed_data(), qd[0], qd[1], dd[0], dd[1], sd[0],
          sd[1]};
}

// Validates one weight against the activations and fills its sub-call; "" when fine. The
// per-row integer side data depends on x and the kernel's kind only, so a weight that follows
// one of the same kind (q/k/v, gate/up) shares its predecessor's instead of summing x again.
const char* q8_prepare(Q8Sub& sub, const Q8In& x, ffi::Buffer<ffi::U8>& w, float* y,
                       int64_t qtype, const Q8Sub* prev) {
  const auto wd = w.dimensions();
  if (x.q == nullptr || wd.size() != 2) return "need 2-D q, d, s and w";
  const Q8Kernel kern = pick_q8(qtype);
  if (kern.fn == nullptr) return "unsupported ggml type for q8";
  const int64_t m = x.m, k = x.k, n = wd[0];
  if (k % kern.bs != 0) return "n_in not a block multiple";
  const int64_t nxb = k / kern.xb;
  if (x.d_rows != m || x.d_cols != nxb) return "d must be [m, k / block]";
  if (kern.q8_1 && (x.s_rows != m || x.s_cols != nxb)) return "s must be [m, k / 32] for Q8_1";
  sub.kern = kern;
  sub.gemm = use_gemm(kern, m);
  Q8Call& c = sub.call;
  c.k = k;
  c.n_out = n;
  c.m_total = m;
  c.row_bytes = wd[1];
  c.w = w.typed_data();
  c.y = y;
  const int8_t* qp = x.q;
  c.rows.resize(size_t(m));
  if (prev != nullptr && prev->gemm == sub.gemm && prev->kern.bias == kern.bias &&
      prev->kern.off == kern.off && prev->kern.bsums == kern.bsums &&
      prev->kern.pair_group == kern.pair_group && prev->kern.q8_1 == kern.q8_1 &&
      prev->kern.xb == kern.xb) {
    c.rows = prev->call.rows;  // the same x pointers and side data
    return "";
  }
  // Per-row integer side data: bias (-OFF * sum of 4 codes) or 16-element sums (the row
  // kernels' K-quant mins), and for the K-quant GEMM the group sums as int16 instead.
  const bool k_gemm = sub.gemm && kern.pair_group != 0;
  const int64_t per = kern.bias ? k / 4 : kern.bsums && !k_gemm ? k / 16 : 0;
  const int64_t grp = kern.bias ? 4 : 16;
  sub.aux.assign(size_t(m * per), 0);
  for (int64_t i = 0; i < m * per; ++i) {
    int32_t t = 0;
    for (int j = 0; j < grp; ++j) t += qp[i * grp + j];
    sub.aux[size_t(i)] = kern.bias ? -kern.off * t : t;
  }
  const int64_t np = k_gemm ? k / kern.pair_group : 0;
  sub.pairs.assign(size_t(m * np), 0);
  for (int64_t i = 0; i < m * np; ++i) {  // |sum| <= 32 * 127: an int16
    int32_t t = 0;
    for (int j = 0; j < kern.pair_group; ++j) t += qp[i * kern.pair_group + j];
    sub.pairs[size_t(i)] = int16_t(t);
  }
  for (int64_t r = 0; r < m; ++r)
    c.rows[size_t(r)] = {qp + r * k, x.d + r * nxb, kern.q8_1 ? x.s + r * nxb : nullptr,
                         sub.aux.data() + r * per, sub.pairs.data() + r * np};
  return "";
}

ffi::Error q8_launch(ffi::ThreadPool& pool, const std::shared_ptr<Q8Work>& work, const Q8In& x,
                     ffi::Buffer<ffi::U8>* const* ws, float* const* ys, const int64_t* qtypes,
                     int nw) {
  work->subs.resize(size_t(nw));
  for (int i = 0; i < nw; ++i) {
    const char* err = q8_prepare(work->subs[size_t(i)], x, *ws[i], ys[i], qtypes[i],
                                 i > 0 ? &work->subs[size_t(i - 1)] : nullptr);
    if (*err) return ffi::Error::InvalidArgument(err);
    const Q8Call& c = work->subs[size_t(i)].call;
    // ~64 KiB of weights per chunk: small enough to balance, large enough to amortise a claim;
    // the GEMM: one tile of weight rows (times all x rows: plenty of work per claim).
    const int64_t rows = work->subs[size_t(i)].gemm
                             ? int64_t(kGemmChunk)
                             : std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, c.row_bytes));
    for (int64_t n0 = 0; n0 < c.n_out; n0 += rows)
      work->chunks.push_back({i, n0, std::min(c.n_out, n0 + rows)});
  }
  work->n_chunks = int64_t(work->chunks.size());
  run_chunks(pool, work, std::min({pool.num_threads() - 1, work->n_chunks - 1, helpers_cap()}));
  return ffi::Error::Success();
}

ffi::Error q8_run(ffi::ThreadPool& pool, ffi::Buffer<ffi::S8>& q, ffi::Buffer<ffi::F32>& d,
                  ffi::Buffer<ffi::F32>& s, ffi::Buffer<ffi::U8>* const* ws,
                  float* const* ys, const int64_t* qtypes, int nw) {
  return q8_launch(pool, std::make_shared<Q8Work>(), q8_in(q, d, s), ws, ys, qtypes, nw);
}

ffi::Error QMatVecQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> d,
                         ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::U8> w,
                         ffi::ResultBuffer<ffi::F32> y, int64_t qtype) {
  ffi::Buffer<ffi::U8>* ws[1] = {&w};
  float* ys[1] = {y->typed_data()};
  return q8_run(pool, q, d, s, ws, ys, &qtype, 1);
}

ffi::Error QMatVecQ8x2Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> d,
                           ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::U8> w0,
                           ffi::Buffer<ffi::U8> w1, ffi::ResultBuffer<ffi::F32> y0,
                           ffi::ResultBuffer<ffi::F32> y1, int64_t qtype0, int64_t qtype1) {
  ffi::Buffer<ffi::U8>* ws[2] = {&w0, &w1};
  float* ys[2] = {y0->typed_data(), y1->typed_data()};
  const int64_t qt[2] = {qtype0, qtype1};
  return q8_run(pool, q, d, s, ws, ys, qt, 2);
}

ffi::Error QMatVecQ8x3Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> d,
                           ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::U8> w0,
                           ffi::Buffer<ffi::U8> w1, ffi::Buffer<ffi::U8> w2,
                           ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                           ffi::ResultBuffer<ffi::F32> y2, int64_t qtype0, int64_t qtype1,
                           int64_t qtype2) {
  ffi::Buffer<ffi::U8>* ws[3] = {&w0, &w1, &w2};
  float* ys[3] = {y0->typed_data(), y1->typed_data(), y2->typed_data()};
  const int64_t qt[3] = {qtype0, qtype1, qtype2};
  return q8_run(pool, q, d, s, ws, ys, qt, 3);
}

// ggml's activation quantization for the int8 dot, row by row as ggml-cpu does it: Q8_0/Q8_1 as
// the x86 quantize_row_q8_{0,1} (d = amax / 127, codes = round-half-even(x * (127 / amax)), d and
// the Q8_1 block sum s = d * sum(codes) stored as f16), Q8_K as quantize_row_q8_K_ref (scale from
// the signed value of largest magnitude, -127 / max, codes capped at 127, d = 1 / iscale in f32).
// In C rather than XLA because XLA's simplifier rewrites x / 127 into x * (1 / 127) and
// d * sum(q) into sum(q * d), each a rounding step ggml does not take (~1 block in 10^4 then
// stores another f16 s, and the product moves by a quantum).
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")
float f16_round(float x) { return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same steps 16 lanes at a time: max |x| is exact in any order, x * id and iscale * x are
// the same single roundings, roundscale to nearest-even is nearbyint in the default mode, and
// the first element of largest magnitude (Q8_K's sign source) is found by a mask scan.
inline __m128i round_to_i8(__m512 v) {
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(
      _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
}

void quantize_row_q8(const float* x, int64_t k, int fmt, int8_t* q, float* d, float* s) {
  if (fmt == 2) {  // Q8_K
    for (int64_t b = 0; b < k / 256; ++b) {
      const float* xb = x + b * 256;
      __m512 vmax = _mm512_setzero_ps();
      for (int j = 0; j < 256; j += 16)
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xb + j)));
      const float amax = _mm512_reduce_max_ps(vmax);
      int8_t* qb = q + b * 256;
      if (amax == 0.0f) {
        std::memset(qb, 0, 256);
        d[b] = 0.0f;
        continue;
      }
      float mx = 0.0f;
      for (int j = 0; j < 256; j += 16) {
        const __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(xb + j)),
                                                   _mm512_set1_ps(amax));
        if (hit) {
          mx = xb[j + __builtin_ctz(hit)];
          break;
        }
      }
      const float iscale = -127.0f / mx;
      const __m512 vs = _mm512_set1_ps(iscale);
      for (int j = 0; j < 256; j += 16) {
        const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(vs, _mm512_loadu_ps(xb + j)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(qb + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(
                                                 _mm512_min_ps(v, _mm512_set1_ps(127.0f)))));
      }
      d[b] = 1.0f / iscale;
    }
    return;
  }
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + b * 32;
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float dd = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    const __m128i q0 = round_to_i8(_mm512_mul_ps(x0, id)), q1 = round_to_i8(_mm512_mul_ps(x1, id));
    _mm_storeu_si128((__m128i*)(q + b * 32), q0);
    _mm_storeu_si128((__m128i*)(q + b * 32 + 16), q1);
    d[b] = f16_round(dd);
    if (fmt == 1) {
      const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_cvtepi8_epi32(q0),
                                                               _mm512_cvtepi8_epi32(q1)));
      s[b] = f16_round(dd * (float)sum);
    }
  }
}
#else
void quantize_row_q8(const float* x, int64_t k, int fmt, int8_t* q, float* d, float* s) {
  if (fmt == 2) {  // Q8_K
    for (int64_t b = 0; b < k / 256; ++b) {
      const float* xb = x + b * 256;
      float amax = 0.0f, mx = 0.0f;
      for (int j = 0; j < 256; ++j) {
        const float ax = std::fabs(xb[j]);
        if (ax > amax) amax = ax, mx = xb[j];
      }
      int8_t* qb = q + b * 256;
      if (amax == 0.0f) {
        std::memset(qb, 0, 256);
        d[b] = 0.0f;
        continue;
      }
      const float iscale = -127.0f / mx;
      for (int j = 0; j < 256; ++j) {
        const float v = std::nearbyint(iscale * xb[j]);
        qb[j] = (int8_t)std::min(127.0f, v);
      }
      d[b] = 1.0f / iscale;
    }
    return;
  }
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float dd = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int8_t* qb = q + b * 32;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int v = (int)std::nearbyint(xb[j] * id);
      qb[j] = (int8_t)v;
      sum += v;
    }
    d[b] = f16_round(dd);
    if (fmt == 1) s[b] = f16_round(dd * (float)sum);
  }
}
#endif
#pragma GCC pop_options

// Prompt-sized inputs are split in row chunks over the caller and the helper threads, as ggml
// quantizes src1 in every thread of a mul_mat.
struct QuantizeWork : Job {
  const float* x;
  int8_t* q;
  float *d, *s;
  int64_t k, nb, ns, rows_per, m, n_chunks;
  int fmt;
  std::atomic<int64_t> next{0}, done{0};

  void run() override {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      for (int64_t r = c * rows_per; r < std::min(m, (c + 1) * rows_per); ++r)
        quantize_row_q8(x + r * k, k, fmt, q + r * k, d + r * nb, s + r * ns);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error QuantizeQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::S8> q, ffi::ResultBuffer<ffi::F32> d,
                          ffi::ResultBuffer<ffi::F32> s, int64_t fmt) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const int64_t m = xd[0], k = xd[1], bs = fmt == 2 ? 256 : 32;
  if (fmt < 0 || fmt > 2 || k % bs != 0) return ffi::Error::InvalidArgument("bad format or k");
  const int64_t nb = k / bs, ns = fmt == 1 ? k / 32 : 0;
  if ((int64_t)d->element_count() != m * nb || (int64_t)s->element_count() != m * ns)
    return ffi::Error::InvalidArgument("bad output sizes");
  auto work = std::make_shared<QuantizeWork>();
  work->x = x.typed_data();
  work->q = q->typed_data();
  work->d = d->typed_data();
  work->s = s->typed_data();
  work->k = k, work->nb = nb, work->ns = ns, work->m = m, work->fmt = int(fmt);
  work->rows_per = std::max<int64_t>(1, (32 << 10) / k);  // ~128 KiB of x per chunk
  work->n_chunks = (m + work->rows_per - 1) / work->rows_per;
  run_chunks(pool, work, std::min({pool.num_threads() - 1, work->n_chunks - 1, helpers_cap()}));
  return ffi::Error::Success();
}

// Decode: quantization and product in one call (f32 x in), one thunk and one set of XLA
// buffers fewer per weight group; the same quantize_row_q8, so the same bits.
ffi::Error q8f_run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::U8>* const* ws,
                   float* const* ys, const int64_t* qtypes, int nw) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const Q8Kernel k0 = pick_q8(qtypes[0]);
  if (k0.fn == nullptr) return ffi::Error::InvalidArgument("unsupported ggml type for q8");
  const int fmt = k0.q8_1 ? 1 : k0.xb == 256 ? 2 : 0;
  for (int i = 1; i < nw; ++i) {
    const Q8Kernel ki = pick_q8(qtypes[i]);
    if (ki.fn == nullptr || ki.q8_1 != k0.q8_1 || ki.xb != k0.xb)
      return ffi::Error::InvalidArgument("weights of one call must share the activation format");
  }
  const int64_t m = xd[0], k = xd[1], bs = fmt == 2 ? 256 : 32;
  if (k % bs != 0) return ffi::Error::InvalidArgument("n_in not a block multiple");
  const int64_t nb = k / bs, ns = fmt == 1 ? k / 32 : 0;
  auto work = std::make_shared<Q8Work>();
  work->xq.resize(size_t(m * k));
  work->xd.resize(size_t(m * nb));
  work->xs.resize(size_t(m * ns));
  for (int64_t r = 0; r < m; ++r)
    quantize_row_q8(x.typed_data() + r * k, k, fmt, work->xq.data() + r * k,
                    work->xd.data() + r * nb, work->xs.data() + r * ns);
  const Q8In in{work->xq.data(), work->xd.data(), work->xs.data(), m, k, m, nb, m, ns};
  return q8_launch(pool, work, in, ws, ys, qtypes, nw);
}

// x f32 [m, k], then any number of weights sharing its activation format and as many outputs.
ffi::Error QMatVecQ8FImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, ffi::Span<const int64_t> qtypes) {
  const size_t nw = args.size();
  if (nw == 0 || rets.size() != nw || qtypes.size() != nw)
    return ffi::Error::InvalidArgument("need one output and one qtype per weight");
  std::vector<ffi::Buffer<ffi::U8>> wb;
  std::vector<ffi::Buffer<ffi::U8>*> ws;
  std::vector<float*> ys;
  for (size_t i = 0; i < nw; ++i) {
    auto w = args.get<ffi::Buffer<ffi::U8>>(i);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error() || y.has_error()) return ffi::Error::InvalidArgument("bad weight or output");
    wb.push_back(*w);
    ys.push_back((*y)->typed_data());
  }
  for (auto& w : wb) ws.push_back(&w);
  return q8f_run(pool, x, ws.data(), ys.data(), qtypes.begin(), int(nw));
}

#endif  // JLLAMA_Q8

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaDequant, DequantImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaCosSin, CosSinImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVec, QMatVecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecXs, QMatVecXsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

#if defined(JLLAMA_Q8)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQuantizeQ8, QuantizeQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fmt"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecQ8, QMatVecQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecQ8x2, QMatVecQ8x2Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype0")
                                  .Attr<int64_t>("qtype1"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecQ8x3, QMatVecQ8x3Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype0")
                                  .Attr<int64_t>("qtype1")
                                  .Attr<int64_t>("qtype2"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecQ8F, QMatVecQ8FImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes"));
#endif
