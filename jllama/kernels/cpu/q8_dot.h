// The int8 kernels' per-block arithmetic (q8.h says what it reproduces): for each weight type
// its codes as unsigned bytes and one block's dot against MC x rows, in ggml's f32 order
// (vec_dot's 8 lanes, or the tiled order when TILED). Shared by the row kernels (vec_dot.cc)
// and the GEMM's tile decoder (gemm.cc).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "blocks.h"
#include "f16.h"
#include "q8.h"

#if defined(JLLAMA_Q8)

// No reassociation or contraction of the f32 steps below: their order is the point.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")

// Free functions are static (internal linkage), as in every header here: see f16.h.
namespace jllama {

// acc + the sum of 4 u8*s8 products per int32 lane (lane l: bytes 4l..4l+3). U7: every u is
// below 128, which lets the AVX2 form take one maddubs (its int16 pair sums reach 2 * 127 * 128
// < 2^15, no saturation); otherwise u is split into u & 0x7f and u & 0x80, each of whose
// maddubs pair sums fits int16 (-32768 at worst, for 0x80 * -128 twice). Exact either way.
template <bool U7 = false>
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (U7)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
  const __m256i lo = _mm256_and_si256(u, _mm256_set1_epi8(0x7f));
  const __m256i hi = _mm256_and_si256(u, _mm256_set1_epi8(char(0x80)));
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, s), ones));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, s), ones));
#endif
}

static inline float hsum8(__m256 x) {  // ggml's hsum_float_8
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

static inline __m256i load256(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }

// 16 bytes of nibbles -> 32 bytes (low nibbles first), as ggml's bytes_from_nibbles_32.
static inline __m256i nibbles32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128((const __m128i*)p);
  const __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
  return _mm256_and_si256(b, _mm256_set1_epi8(15));
}

// ggml's kvalues_iq4nl, in both 128-bit halves (IQ4_NL and IQ4_XS).
static inline __m256i iq4nl_table() {
  return _mm256_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113, -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69,
                          89, 113);
}

// Types with a scale per 16 values: the block's 16 odd scales 2 s + 1 as int16, those of the
// sub-blocks' first 16 values in the low 128 bits, of their last 16 in the high 128 bits;
// half_scales picks element e of each half (lanes 0-3: the first 16 values, 4-7: the last).
static inline __m256i odd_scales16(__m128i s8) {  // bytes: the low half's 8, the high half's 8
  const __m256i s = _mm256_cvtepu8_epi16(s8);
  return _mm256_add_epi16(_mm256_add_epi16(s, s), _mm256_set1_epi16(1));
}
static inline __m256i half_scales(__m256i all, int e) {
  return _mm256_shuffle_epi8(all, _mm256_set1_epi16(int16_t(((2 * e + 1) << 8) | (2 * e))));
}
// Bit i of 32 bits -> 0x10 in byte i (the fifth bit of a Q5 code).
static inline __m256i fifth_bits(const uint8_t* p) {
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

struct Q8Acc {
  __m256 acc;
  __m128 accm;
  float summs;  // also the tiled order's scalar accumulator
  // MXFP4: ggml's second accumulator (odd blocks), and an even block held back until its odd
  // partner comes (ggml adds a last unpaired block in scalar code after the hsum)
  __m256 acc2;
  __m256i pend;
  float pend_d;
  bool has_pend;
};

static inline int32_t hsum_i32(__m256i v) {  // any exact order: integers
  __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 1));
  return _mm_cvtsi128_si32(r);
}

static inline int32_t hsum_i32_4(__m128i r) {  // any exact order: integers
  r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 1));
  return _mm_cvtsi128_si32(r);
}

// Lane sums of MC int32x8 vectors into out[MC] (4 at a time through hadd).
template <int MC>
static inline void hsum_i32_rows(const __m256i* v, int32_t* out) {
  int m = 0;
  for (; m + 4 <= MC; m += 4) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[m], v[m + 1]),
                                        _mm256_hadd_epi32(v[m + 2], v[m + 3]));
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i*)(out + m), s);
  }
  for (; m < MC; ++m) out[m] = hsum_i32(v[m]);
}

// The lane sums of 8 int32x8 vectors as one vector (lane m: v[m]).
static inline __m256i hsum_i32_8rows(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// Q4_0/Q5_0/Q8_0 (Q8_0 activations): weight codes as u8 = code + OFF, the bias undoes OFF.
// Without VNNI, Q8_0 (OFF 128: dpbusd's emulation takes two maddubs) uses ggml's sign trick
// instead, |w| times sign(x, w) in one maddubs (pairs reach 2 * 128 * 127 < 2^15): the same
// int32 lanes, no bias.
template <typename D>
struct Q8Signed {
  static constexpr int BS = 32, XB = 32;
  static constexpr bool kBias = true, kBsums = false, kTiled = false;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16_to_f32(b);
    if constexpr (D::OFF == 128 && !kVnni) {
      const __m256i w = load256(b + 2), aw = _mm256_sign_epi8(w, w);
      for (int m = 0; m < MC; ++m) {
        const __m256i sx = _mm256_sign_epi8(load256(x[m].q + bi * 32), w);
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
        st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[m].d[bi]), _mm256_cvtepi32_ps(p),
                                    st[m].acc);
      }
      return;
    }
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
  static constexpr bool kBias = kVnni;  // the sign trick (no VNNI) needs no bias
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
    const float dw = f16_to_f32(b), mw = f16_to_f32(b + 2);
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

// Lane l: sc * (dot of bytes 4l..4l+3), u8 weights (< 128) times s8 codes (|q| <= 127): the
// same int32 lanes as dpbusd followed by mullo by sc, in two uops instead of three (maddubs
// pairs reach 2 * 127 * 127 < 2^15, no saturation); sc16 holds lane l's scale in both int16
// halves. Q4_K/Q5_K/Q6_K and the IQ1/IQ2/IQ3 grids.
static inline __m256i scaled_dot4(__m256i qw, __m256i qy, __m256i sc16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qy), sc16);
}

// The 6-bit scales and mins of a Q4_K/Q5_K block as ints.
static inline void k_scale_min_int(const uint8_t* s, int* sc, int* mn) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 63;
    mn[i] = s[i + 4] & 63;
    sc[i + 4] = (s[i + 8] & 15) | ((s[i] >> 2) & 48);
    mn[i + 4] = (s[i + 8] >> 4) | ((s[i + 4] >> 2) & 48);
  }
}

// The same 8 scales (bytes 0-7) and 8 mins (bytes 8-15) in one vector, from three 32-bit
// loads (ggml's utmp shuffle).
static inline __m128i k_scales_mins(const uint8_t* s) {
  uint32_t u0, u1, u2;
  std::memcpy(&u0, s, 4);
  std::memcpy(&u1, s + 4, 4);
  std::memcpy(&u2, s + 8, 4);
  const uint32_t k6 = 0x3f3f3f3f, k4 = 0x0f0f0f0f, k2 = 0x03030303;
  return _mm_setr_epi32(int(u0 & k6), int((u2 & k4) | (((u0 >> 6) & k2) << 4)), int(u1 & k6),
                        int(((u2 >> 4) & k4) | (((u1 >> 6) & k2) << 4)));
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
  // The tiled order for 8 x rows at once, lane m of the vectors x row m (dx: their d_x, acc:
  // their running sums): each lane takes the scalar form's steps (fnmadd is fma(-a, b, c)).
  // The mins: lane l of a row = mn[l] (bs[2l] + bs[2l+1]), one 256-bit madd per x row.
  static void tiled8(const uint8_t* b, int64_t bi, const Q8Row* x, __m256 dx, __m256& acc) {
    __m256i sumi[8], pm[8];
    const __m128i sm = sums<8>(b, bi, x, sumi);
    const __m128i mn16 = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
    const __m256i mn2 = _mm256_set_m128i(_mm_unpackhi_epi16(mn16, mn16), _mm_unpacklo_epi16(mn16, mn16));
    for (int m = 0; m < 8; ++m) pm[m] = _mm256_madd_epi16(load256(x[m].pairs + bi * 16), mn2);
    const __m256 s1 = _mm256_cvtepi32_ps(hsum_i32_8rows(sumi));
    const __m256 s2 = _mm256_cvtepi32_ps(hsum_i32_8rows(pm));
    const __m256 r = _mm256_fnmadd_ps(_mm256_set1_ps(f16_to_f32(b + 2)), s2,
                                      _mm256_mul_ps(s1, _mm256_set1_ps(f16_to_f32(b))));
    acc = _mm256_fmadd_ps(r, dx, acc);
  }
  // The groups' scaled dots; returns the block's scales and mins (k_scales_mins).
  template <int MC>
  __attribute__((always_inline)) static __m128i sums(const uint8_t* b, int64_t bi,
                                                     const Q8Row* x, __m256i* sumi) {
    const __m128i sm = k_scales_mins(b + 4);
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
    for (int m = 0; m < MC; ++m) sumi[m] = _mm256_setzero_si256();
    if constexpr (MC >= 8) {
      // A pass of 8 x rows: a rolled loop over pairs of groups. Fully unrolled, GCC hoisted
      // the 8 groups' codes and scales out of the x-row loop and spilled them and the sums
      // to the stack (16 ymm registers); this way the 8 sums, two groups and their scales
      // stay in registers.
#pragma GCC unroll 1
      for (int c = 0; c < 4; ++c) {
        const __m256i qa = D::group(b, 2 * c), qb = D::group(b, 2 * c + 1);
        const __m256i sa = half_scales(sc16, 2 * c), sb = half_scales(sc16, 2 * c + 1);
        for (int m = 0; m < MC; ++m)
          sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(qa, load256(x[m].q + bi * 256 + c * 64), sa));
        for (int m = 0; m < MC; ++m)
          sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(qb, load256(x[m].q + bi * 256 + c * 64 + 32), sb));
      }
      return sm;
    }
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m256i qw = D::group(b, g);
      const __m256i scv = half_scales(sc16, g);  // sc[g] in every lane
      for (int m = 0; m < MC; ++m) {
        const __m256i qy = load256(x[m].q + bi * 256 + g * 32);
        sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(qw, qy, scv));
      }
    }
    return sm;
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16_to_f32(b), dminw = f16_to_f32(b + 2);
    __m256i sumi[MC];
    __m128i pm[MC];
    const __m128i mn16 = _mm_cvtepu8_epi16(_mm_srli_si128(sums<MC>(b, bi, x, sumi), 8));
    // lane i: mn[2i] (bs[4i] + bs[4i+1]) + mn[2i+1] (bs[4i+2] + bs[4i+3])
    for (int m = 0; m < MC; ++m) {
      const __m256i bs = load256(x[m].pairs + bi * 16);  // int16 16-sums; their pair sums fit
      const __m128i b32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
      pm[m] = _mm_madd_epi16(mn16, b32);
    }
    if constexpr (TILED) {
      int32_t s1[MC];
      hsum_i32_rows<MC>(sumi, s1);
      for (int m = 0; m < MC; ++m) {
        const int32_t s2 = hsum_i32_4(pm[m]);
        const float r = __builtin_fmaf(-dminw, float(s2), float(s1[m]) * dw);
        st[m].summs = __builtin_fmaf(r, x[m].d[bi], st[m].summs);
      }
      return;
    }
    for (int m = 0; m < MC; ++m) {
      const float dx = x[m].d[bi];
      const float dmin = -dx * dminw;
      if constexpr (D::kScalarMins) {
        st[m].summs = __builtin_fmaf(dmin, float(hsum_i32_4(pm[m])), st[m].summs);
      } else {
        st[m].accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(pm[m]), st[m].accm);
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
    // bit g to bit 4 in one 16-bit shift (the high byte's bit g lands on its own bit 4 too)
    const __m256i qh = load256(b + 16);
    const __m256i h = g <= 4 ? _mm256_slli_epi16(qh, 4 - g) : _mm256_srli_epi16(qh, g - 4);
    return _mm256_or_si256(lo, _mm256_and_si256(h, _mm256_set1_epi8(16)));
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
  static void tiled8(const uint8_t* b, int64_t bi, const Q8Row* x, __m256 dx, __m256& acc) {
    __m256i sumi[8];
    sums<8>(b, bi, x, sumi);
    const __m256 s1 = _mm256_cvtepi32_ps(hsum_i32_8rows(sumi));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(s1, _mm256_set1_ps(f16_to_f32(b + 208))), dx, acc);
  }
  template <int MC>
  __attribute__((always_inline)) static void sums(const uint8_t* b, int64_t bi, const Q8Row* x,
                                                  __m256i* sumi) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)scales));
    for (int m = 0; m < MC; ++m) {
      // lane l: bs[2l] sc[2l] + bs[2l+1] sc[2l+1] (int16 bsums)
      const __m256i t = _mm256_madd_epi16(load256(x[m].pairs + bi * 16), sc16);
      sumi[m] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(t, 5));
    }
    if constexpr (MC >= 8) {
      // 8 x rows: rolled, as Q8KMin::sums (unrolled, GCC spilled the sums to the stack)
#pragma GCC unroll 1
      for (int c = 0; c < 8; ++c) {
        const __m256i qw = chunk(b, c);
        const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(scales[2 * c + 1]),
                                             _mm_set1_epi16(scales[2 * c]));
        for (int m = 0; m < MC; ++m)
          sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(qw, load256(x[m].q + bi * 256 + c * 32), scv));
      }
      return;
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i qw = chunk(b, c);
      // int16 sc[2c] in the low 128 bits, sc[2c+1] in the high ones: codes < 64, so the
      // maddubs pairs (<= 2 * 63 * 127) fit int16 and scaled_dot4 gives dpbusd's lanes times
      // the scale exactly, without mullo (4 cycles per ymm on Zen 1: Q6_K at 512 rows ran at
      // 0.56x of ggml there; experiments/results/cpu_kernels.md)
      const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(scales[2 * c + 1]),
                                           _mm_set1_epi16(scales[2 * c]));
      for (int m = 0; m < MC; ++m) {
        const __m256i qy = load256(x[m].q + bi * 256 + c * 32);
        sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(qw, qy, scv));
      }
    }
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16_to_f32(b + 208);
    __m256i sumi[MC];
    sums<MC>(b, bi, x, sumi);
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


// ------------------------------------------------------- TQ1_0, TQ2_0, IQ1, IQ2, IQ3, MXFP4
// No llamafile path for these, and no tiled GEMM for TQ1_0/TQ2_0/MXFP4: every row count takes
// vec_dot there (IQ1/IQ2/IQ3 take the tiled GEMM from 8 rows). Their AVX2 vec_dots as the
// oracle build compiles them (mul + add contracted to one FMA).

// The IQ3 grids (ggml's iq3xxs_grid / iq3s_grid: 4 bytes per point) and the IQ2/IQ1 grids
// (8 bytes per point; IQ1's bytes are int8 -1/0/1), uploaded once from gguf-py's tables by
// cpu_ffi (JllamaSetIQ3Grids, JllamaSetIQ2Grids) before any of these kernels runs.
extern uint32_t g_iq3xxs_grid[256];
extern uint32_t g_iq3s_grid[512];
extern uint64_t g_iq2xxs_grid[256];
extern uint64_t g_iq2xs_grid[512];
extern uint64_t g_iq2s_grid[1024];
extern uint64_t g_iq1s_grid[2048];

// 32 bits -> 32 sign bytes (byte i from bit i): -1 where the bit is set, else 1, for
// _mm256_sign_epi8 (q8 codes are never -128, so sign() is exact negation).
static inline __m256i bit_signs32(uint32_t bits) {
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  const __m256i sel = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), shuf), sel);
  return _mm256_or_si256(_mm256_cmpeq_epi8(b, sel), _mm256_set1_epi8(1));
}

// 7 sign bits (+ the even-parity 8th) -> 8 sign bytes, -1 where set, else 1 (ggml's
// keven_signs_q2xs), built at compile time.
struct EvenSignMasks {
  uint64_t m[128];
  constexpr EvenSignMasks() : m() {
    for (int s = 0; s < 128; ++s) {
      int p = 0;
      for (int k = 0; k < 7; ++k) p ^= (s >> k) & 1;
      const int bits = s | (p << 7);
      uint64_t v = 0;
      for (int k = 0; k < 8; ++k) v |= uint64_t((bits >> k) & 1 ? 0xff : 0x01) << (8 * k);
      m[s] = v;
    }
  }
};
inline constexpr EvenSignMasks kEvenSignMasks{};

// The sign bytes of 32 values from four 7-bit sign fields.
static inline __m256i even_signs32(uint32_t s0, uint32_t s1, uint32_t s2, uint32_t s3) {
  return _mm256_setr_epi64x(int64_t(kEvenSignMasks.m[s0]), int64_t(kEvenSignMasks.m[s1]),
                            int64_t(kEvenSignMasks.m[s2]), int64_t(kEvenSignMasks.m[s3]));
}

// Ternary: codes 0..2 (the trit + 1). Lane l = sum over the 8 chunks of 32 of dot(codes, q8)
// minus bs[2l] + bs[2l+1] (ggml subtracts the bsums in the int16 lanes that pair into lane l),
// acc = fma(lane, d_x * d_w, acc).
template <typename D>
struct Q8Ternary {
  static constexpr int BS = 256, XB = 256, OFF = 0;
  static constexpr bool kBias = false, kBsums = true, kTiled = false;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    __m256i qw[8];
    D::codes(b, qw);
    const float dw = f16_to_f32(b + D::TS - 2);
    for (int m = 0; m < MC; ++m) {
      // int16 pair sums over all 8 chunks, minus the 16-sums (|total| <= 8 * 2 * 2 * 128 + 16
      // * 128 < 2^15), then one madd: lane l = sum - bs[2l] - bs[2l+1], the same int32 lanes
      // as a madd per chunk (8 madds and int32 adds fewer per block and x row)
      const int8_t* qy = x[m].q + bi * 256;
      __m256i p = _mm256_maddubs_epi16(qw[0], load256(qy));
      for (int c = 1; c < 8; ++c)
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(qw[c], load256(qy + 32 * c)));
      p = _mm256_sub_epi16(p, load256(x[m].pairs + bi * 16));
      const __m256i sumi = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
      st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(x[m].d[bi] * dw), _mm256_cvtepi32_ps(sumi),
                                  st[m].acc);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) { return hsum8(a.acc); }
};

struct Q8WTQ2_0 : Q8Ternary<Q8WTQ2_0> {
  static constexpr int TS = 66;
  static void codes(const uint8_t* b, __m256i* qw) {  // chunk 4j + s: bits 2s of bytes 32j..
    for (int c = 0; c < 8; ++c)
      qw[c] = _mm256_and_si256(_mm256_srli_epi16(load256(b + 32 * (c >> 2)), 2 * (c & 3)),
                               _mm256_set1_epi8(3));
  }
};

struct Q8WTQ1_0 : Q8Ternary<Q8WTQ1_0> {
  static constexpr int TS = 54;
  // Byte q times 9 mod 256 in every byte (a 16-bit shift, masked so no bit crosses bytes).
  static inline __m256i times9(__m256i q) {
    return _mm256_add_epi8(
        _mm256_and_si256(_mm256_slli_epi16(q, 3), _mm256_set1_epi8(char(0xf8))), q);
  }
  // Trit of every byte q' = u8(q * 3^n): (3 q') >> 8 = (a + (a + 1) / 2 + 1) / 2 >> 6 with a =
  // max(q' - 1, 0), in two byte averages (checked for all 256 values).
  static inline __m256i trits(__m256i q) {
    const __m256i a = _mm256_subs_epu8(q, _mm256_set1_epi8(1));
    const __m256i c = _mm256_avg_epu8(a, _mm256_avg_epu8(a, _mm256_setzero_si256()));
    return _mm256_and_si256(_mm256_srli_epi16(c, 6), _mm256_set1_epi8(3));
  }
  // Chunks 0-4: trit n of bytes 0..31; chunks 5-7: trits 0-4 of bytes 32..47 (16 values each),
  // then trits 0-3 of the 4 qh bytes (16 values), as ggml's layout.
  static void codes(const uint8_t* b, __m256i* qw) {
    const __m256i a0 = load256(b);
    const __m256i a1 = _mm256_add_epi8(a0, _mm256_add_epi8(a0, a0));
    const __m256i a2 = times9(a0);
    qw[0] = trits(a0);
    qw[1] = trits(a1);
    qw[2] = trits(a2);
    qw[3] = trits(times9(a1));
    qw[4] = trits(times9(a2));
    uint32_t h;
    std::memcpy(&h, b + 48, 4);
    // low half: bytes 32..47; high half: the qh bytes in every dword (dword 4 + n takes trit n)
    const __m256i c0 = _mm256_set_m128i(_mm_set1_epi32(int(h)), _mm_loadu_si128((const __m128i*)(b + 32)));
    const __m256i c1 = _mm256_add_epi8(c0, _mm256_add_epi8(c0, c0));
    const __m256i c2 = times9(c0), c3 = times9(c1), c4 = times9(c2);
    // the products gathered into three vectors first (trits works byte by byte), so three
    // trit extractions instead of five
    const __m256i h01 = _mm256_blend_epi32(c0, c1, 0x20);  // dword 5 from c1
    const __m256i h23 = _mm256_blend_epi32(c2, c3, 0x80);  // dword 7 from c3
    qw[5] = trits(_mm256_permute2x128_si256(c0, c1, 0x20));
    qw[6] = trits(_mm256_permute2x128_si256(c2, c3, 0x20));
    qw[7] = trits(_mm256_blend_epi32(c4, _mm256_blend_epi32(h01, h23, 0xc0), 0xf0));
  }
};

// Q1_0 (Q8_0 activations): 128 sign bits (+d where set, -d where clear) and an f16 d per
// block, four q8 blocks against it. ggml's AVX2 vec_dot: lane l of q8 block j = the dot of
// its sign-applied codes 4l..4l+3; blk = d_x0 * lane, then blk = fma(d_xj, lane, blk) for
// j = 1..3, acc = fma(d_w, blk, acc) per weight block; the hsum at the end. Every row count
// takes vec_dot (no llamafile or tiled path for Q1_0 in ggml-cpu).
struct Q8WQ1_0 {
  static constexpr int BS = 128, XB = 32, TS = 18, OFF = 0;
  static constexpr bool kBias = false, kBsums = false, kTiled = false;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16_to_f32(b);
    __m256i sg[4];
    for (int j = 0; j < 4; ++j) {
      uint32_t bits;
      std::memcpy(&bits, b + 2 + 4 * j, 4);
      sg[j] = bit_signs32(~bits);  // -1 where the bit is clear
    }
    const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1);
    for (int m = 0; m < MC; ++m) {
      const int8_t* qy = x[m].q + bi * 128;
      const float* dx = x[m].d + bi * 4;
      __m256 blk = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        const __m256i p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(one8, _mm256_sign_epi8(load256(qy + 32 * j), sg[j])), one16);
        const __m256 v = _mm256_cvtepi32_ps(p);
        blk = j == 0 ? _mm256_mul_ps(_mm256_set1_ps(dx[0]), v)
                     : _mm256_fmadd_ps(_mm256_set1_ps(dx[j]), v, blk);
      }
      st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(dw), blk, st[m].acc);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) { return hsum8(a.acc); }
};

// Q2_0 (Q8_0 activations): 64 two-bit codes c (value (c - 1) d, four per byte from the low
// bits up) and an f16 d per block, two q8 blocks against it. ggml-cpu has no x86 SIMD form:
// its scalar vec_dot, as the oracle build compiles it, every product rounded before its add
// (the FMA form differed from ggml in 19 of 37 outputs): per q8 block j an exact int s_j,
// sumi += d_xj * s_j from 0, then per weight block sumf += d_w * sumi; no lanes, no hsum.
struct Q8WQ2_0 {
  static constexpr int BS = 64, XB = 32, TS = 18, OFF = 0;
  static constexpr bool kBias = false, kBsums = false, kTiled = false;
  // Codes of 32 values (8 bytes) in value order, one per byte.
  static inline __m256i codes32(const uint8_t* q) {
    uint64_t v;
    std::memcpy(&v, q, 8);
    const __m256i rep = _mm256_shuffle_epi8(  // byte i / 4 into byte i of each 128-bit half
        _mm256_set1_epi64x(int64_t(v)),
        _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                         4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7));
    const __m256i pos = _mm256_set1_epi32(0x03020100);  // byte i: i % 4
    __m256i c = _mm256_setzero_si256();
    for (int s = 0; s < 4; ++s) {  // 16-bit shifts: the mask keeps each byte's own bits
      const __m256i v2 = _mm256_and_si256(_mm256_srli_epi16(rep, 2 * s), _mm256_set1_epi8(3));
      c = _mm256_or_si256(c, _mm256_and_si256(_mm256_cmpeq_epi8(pos, _mm256_set1_epi8(char(s))), v2));
    }
    return c;
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = f16_to_f32(b);
    const __m256i c0 = codes32(b + 2), c1 = codes32(b + 10);
    const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1);
    for (int m = 0; m < MC; ++m) {
      const int8_t* qy = x[m].q + bi * 64;
      const float* dx = x[m].d + bi * 2;
      float sumi = 0.0f;
      for (int j = 0; j < 2; ++j) {
        const __m256i y = load256(qy + 32 * j);
        // sum (c - 1) y = sum c y - sum y, in int16 pairs (|each| <= 2 * 3 * 127), exact
        const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(j ? c1 : c0, y),
                                             _mm256_maddubs_epi16(one8, y));
        const int32_t s = hsum_i32(_mm256_madd_epi16(p16, one16));
        sumi = sumi + dx[j] * float(s);
      }
      st[m].summs = st[m].summs + dw * sumi;
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) { return a.summs; }
};

// IQ2, IQ3: per 32 values 8 grid points (unsigned, < 64) against the sign-applied q8; lane l
// of sub-block j times its odd scale (int16 per lane: IQ2_XS/IQ2_S scale each 16 values, lanes
// 0-3 and 4-7), summed over j; acc = fma(d_w * d_x, lane, acc). The final hsum is times kFinal
// (IQ3_XXS's half steps 0.25, IQ2's eighths 0.125).
// TILED (ggml's tiled GEMM, which takes IQ2 and IQ3 too): s1 = the block's exact sum, d0 = d_w
// * kFinal, summs = fma(d0 * s1, d_x, summs).
// D::unpack(b, j, pre, g, sg, sc): sub-block j's |points| (u8), sign bytes (+-1, for sign_epi8)
// and int16 scales; one sub-block at a time, so the decoded block never leaves the registers.
// pre = D::prep(b): what the type decodes once per block (its scales, where packed).
// Many x rows (q8_rows_decoded, vec_dot.cc): decode(b, v) writes the unpacked block (per
// sub-block g, sg, sc: kDecodedVecs vectors) once per weight row, and dot_decoded runs the same
// steps on it for every pass over 8 x rows, instead of unpacking the grid again per pass.
// ACT_BIAS: the tiled 8-row passes in ggml's act-bias form (|w| <= 64; see tiled8_decoded).
template <typename D, bool ACT_BIAS = true>
struct Q8Grid {
  static constexpr int BS = 256, XB = 256, OFF = 0;
  static constexpr bool kBias = false, kBsums = false, kTiled = true;
  static constexpr bool kActBias = ACT_BIAS;
  static constexpr int kDecodedVecs = 25;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const __m256i pre = D::prep(b);
    dot_with<MC, TILED>(
        f16_to_f32(b),
        [&](int j, __m256i& g, __m256i& sg, __m256i& sc) { D::unpack(b, j, pre, g, sg, sc); },
        bi, x, st);
  }
  // Per sub-block |w|, w (int8, never 0: it signs q8 as the sign bytes would) and the scales,
  // then act_bias_corr's vector.
  static float decode(const uint8_t* b, __m256i* v) {  // returns d_w
    const __m256i pre = D::prep(b);
    for (int j = 0; j < 8; ++j) {
      __m256i sg;
      D::unpack(b, j, pre, v[3 * j], sg, v[3 * j + 2]);
      v[3 * j + 1] = _mm256_sign_epi8(v[3 * j], sg);
    }
    if constexpr (ACT_BIAS) act_bias_corr(v);
    return f16_to_f32(b);
  }
  // The tiled 8-row form (ggml's act-bias MAC, tiled-kernel.cpp): x + 128 (unsigned, a copy
  // made once per block of x rows) against the signed w in one maddubs (|pair| <= 2 * 255 * 43
  // < 2^15: the grids' largest point is 43) instead of sign(x, w) and |w|: one op less per x
  // row and sub-block. The biased dot is the exact one plus 128 * sum_j sum(sc_j * w_j),
  // subtracted from the block's int32 total (exact: only that total enters the f32 steps).
  // v[24]: that correction in every lane.
  static void act_bias_corr(__m256i* v) {
    __m256i t = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j)
      t = _mm256_add_epi32(t, scaled_dot4(_mm256_set1_epi8(1), v[3 * j + 1], v[3 * j + 2]));
    v[24] = _mm256_slli_epi32(_mm256_set1_epi32(hsum_i32(t)), 7);
  }
  template <int MC, bool TILED = false>
  static void dot_decoded(const __m256i* v, float dw, int64_t bi, const Q8Row* x, Q8Acc* st) {
    dot_with<MC, TILED>(
        dw,
        [&](int j, __m256i& g, __m256i& sg, __m256i& sc) {
          g = v[3 * j], sg = v[3 * j + 1], sc = v[3 * j + 2];
        },
        bi, x, st);
  }
  // The tiled order for 8 x rows in one vector (lane m: x row m, dx their d_x), as Q8KMin's.
  // xb: the 8 rows' codes + 128 as uint8 (ACT_BIAS; else the int8 codes), this block's at
  // xb[m] + 256 * bi.
  static void tiled8_decoded(const __m256i* v, float dw, int64_t bi, const uint8_t* const* xb,
                             __m256 dx, __m256& acc) {
    __m256i sumi[8];
    for (int m = 0; m < 8; ++m) sumi[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      for (int m = 0; m < 8; ++m) {
        const __m256i q = load256(xb[m] + bi * 256 + 32 * j);
        sumi[m] = _mm256_add_epi32(
            sumi[m], ACT_BIAS ? scaled_dot4(q, v[3 * j + 1], v[3 * j + 2])
                              : scaled_dot4(v[3 * j], _mm256_sign_epi8(q, v[3 * j + 1]), v[3 * j + 2]));
      }
    __m256i s1 = hsum_i32_8rows(sumi);
    if constexpr (ACT_BIAS) s1 = _mm256_sub_epi32(s1, v[24]);
    const __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(dw * D::kFinal));
    acc = _mm256_fmadd_ps(r, dx, acc);
  }
  template <int MC, bool TILED, typename U>
  __attribute__((always_inline)) static void dot_with(float dw, U unpack, int64_t bi,
                                                      const Q8Row* x, Q8Acc* st) {
    __m256i sumi[MC];
    for (int m = 0; m < MC; ++m) sumi[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256i g, sg, sc;
      unpack(j, g, sg, sc);
      for (int m = 0; m < MC; ++m) {
        const __m256i qy = _mm256_sign_epi8(load256(x[m].q + bi * 256 + 32 * j), sg);
        sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(g, qy, sc));
      }
    }
    for (int m = 0; m < MC; ++m) {
      if constexpr (TILED) {
        const float r = float(hsum_i32(sumi[m])) * (dw * D::kFinal);
        st[m].summs = __builtin_fmaf(r, x[m].d[bi], st[m].summs);
      } else {
        st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[m].d[bi]),
                                    _mm256_cvtepi32_ps(sumi[m]), st[m].acc);
      }
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) {
    if constexpr (TILED) return a.summs;
    return D::kFinal * hsum8(a.acc);
  }
};

// Eight 4-byte grid points, picked by 8 indices (uint8 or int), as one vector.
template <typename I>
static inline __m256i grid8(const uint32_t* grid, const I* i) {
  return _mm256_setr_epi32(int(grid[i[0]]), int(grid[i[1]]), int(grid[i[2]]), int(grid[i[3]]),
                           int(grid[i[4]]), int(grid[i[5]]), int(grid[i[6]]), int(grid[i[7]]));
}

struct Q8WIQ3_XXS : Q8Grid<Q8WIQ3_XXS> {
  static constexpr int TS = 98;
  static constexpr float kFinal = 0.25f;
  static __m256i prep(const uint8_t*) { return _mm256_setzero_si256(); }
  static void unpack(const uint8_t* b, int j, __m256i, __m256i& g, __m256i& sg, __m256i& sc) {
    uint32_t aux;
    std::memcpy(&aux, b + 66 + 4 * j, 4);
    g = grid8(g_iq3xxs_grid, b + 2 + 8 * j);
    sg = even_signs32(aux & 127, (aux >> 7) & 127, (aux >> 14) & 127, (aux >> 21) & 127);
    sc = _mm256_set1_epi16(int16_t(2 * (aux >> 28) + 1));
  }
};

struct Q8WIQ3_S : Q8Grid<Q8WIQ3_S> {
  static constexpr int TS = 110;
  static constexpr float kFinal = 1.0f;
  // The 8 odd scales 2 s + 1 as int16, in both halves (half_scales picks sub-block j's).
  static __m256i prep(const uint8_t* b) {
    int32_t raw;
    std::memcpy(&raw, b + 106, 4);
    const __m128i s4 = _mm_cvtsi32_si128(raw);
    const __m128i m4 = _mm_set1_epi8(15);
    const __m128i s8 = _mm_unpacklo_epi8(_mm_and_si128(s4, m4), _mm_and_si128(_mm_srli_epi16(s4, 4), m4));
    return odd_scales16(_mm_unpacklo_epi64(s8, s8));
  }
  static void unpack(const uint8_t* b, int j, __m256i pre, __m256i& g, __m256i& sg, __m256i& sc) {
    const uint8_t *qs = b + 2, *qh = b + 66, *signs = b + 74;
    // The 8 grid indices qs[8j + k] | (bit k of qh[j]) << 8 in 32-bit lanes (bit k moved to bit
    // 8 by a shift by 8 - k), as ggml's. (One vpgatherdd instead of the 8 loads: 0.97-0.98 of
    // ggml at one row against 1.00 here.)
    const __m256i hi = _mm256_and_si256(
        _mm256_sllv_epi32(_mm256_set1_epi32(qh[j]), _mm256_setr_epi32(8, 7, 6, 5, 4, 3, 2, 1)),
        _mm256_set1_epi32(0x100));
    const __m256i idx = _mm256_or_si256(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qs + 8 * j))), hi);
    alignas(32) uint32_t ix[8];
    _mm256_store_si256((__m256i*)ix, idx);
    g = grid8(g_iq3s_grid, ix);
    uint32_t bits;
    std::memcpy(&bits, signs + 4 * j, 4);
    sg = bit_signs32(bits);
    sc = half_scales(pre, j);
  }
};

static inline __m256i grid4(const uint64_t* grid, int i0, int i1, int i2, int i3) {
  return _mm256_setr_epi64x(int64_t(grid[i0]), int64_t(grid[i1]), int64_t(grid[i2]),
                            int64_t(grid[i3]));
}

// IQ2_XS / IQ2_S: 8 bytes, the low nibble of byte j scaling sub-block j's first 16 values, the
// high its last 16 (element j of each half).
static inline __m256i nibble_scales16(const uint8_t* p) {
  const __m128i b8 = _mm_loadl_epi64((const __m128i*)p);
  const __m128i m4 = _mm_set1_epi8(15);
  return odd_scales16(_mm_unpacklo_epi64(_mm_and_si128(b8, m4),
                                         _mm_and_si128(_mm_srli_epi16(b8, 4), m4)));
}

struct Q8WIQ2_XXS : Q8Grid<Q8WIQ2_XXS> {
  static constexpr int TS = 66;
  static constexpr float kFinal = 0.125f;
  static __m256i prep(const uint8_t*) { return _mm256_setzero_si256(); }
  static void unpack(const uint8_t* b, int j, __m256i, __m256i& g, __m256i& sg, __m256i& sc) {
    const uint8_t* q = b + 2 + 8 * j;  // 4 grid indices, then signs and scale
    uint32_t aux;
    std::memcpy(&aux, q + 4, 4);
    g = grid4(g_iq2xxs_grid, q[0], q[1], q[2], q[3]);
    sg = even_signs32(aux & 127, (aux >> 7) & 127, (aux >> 14) & 127, (aux >> 21) & 127);
    sc = _mm256_set1_epi16(int16_t(2 * (aux >> 28) + 1));
  }
};

struct Q8WIQ2_XS : Q8Grid<Q8WIQ2_XS> {
  static constexpr int TS = 74;
  static constexpr float kFinal = 0.125f;
  static __m256i prep(const uint8_t* b) { return nibble_scales16(b + 66); }
  static void unpack(const uint8_t* b, int j, __m256i pre, __m256i& g, __m256i& sg, __m256i& sc) {
    uint16_t q[4];  // 9 bits grid index, 7 sign bits
    std::memcpy(q, b + 2 + 8 * j, 8);
    g = grid4(g_iq2xs_grid, q[0] & 511, q[1] & 511, q[2] & 511, q[3] & 511);
    sg = even_signs32(q[0] >> 9, q[1] >> 9, q[2] >> 9, q[3] >> 9);
    sc = half_scales(pre, j);
  }
};

struct Q8WIQ2_S : Q8Grid<Q8WIQ2_S> {
  static constexpr int TS = 82;
  static constexpr float kFinal = 0.125f;
  static __m256i prep(const uint8_t* b) { return nibble_scales16(b + 74); }
  static void unpack(const uint8_t* b, int j, __m256i pre, __m256i& g, __m256i& sg, __m256i& sc) {
    const uint8_t *q = b + 2 + 4 * j, *signs = b + 34;
    const int h = b[66 + j];
    g = grid4(g_iq2s_grid, q[0] | ((h << 8) & 0x300), q[1] | ((h << 6) & 0x300),
              q[2] | ((h << 4) & 0x300), q[3] | ((h << 2) & 0x300));
    uint32_t bits;
    std::memcpy(&bits, signs + 4 * j, 4);
    sg = bit_signs32(bits);
    sc = half_scales(pre, j);
  }
};

// IQ4_XS: per 32 values the kvalues_iq4nl values as |value| against the q8 codes with the
// value's sign (ggml's mul_add_epi8), times the 6-bit scale - 32 (signed int16 lanes:
// exact, |pair sum| <= 2 * 127 * 127); no final factor. The tiled GEMM (ggml's tiled.cpp, no
// min) takes it from 8 rows like the IQ2/IQ3 types.
// Its |w| up to 127 would overflow the act-bias pairs: the tiled passes keep the sign form
// (ggml's tiled kernel too).
struct Q8WIQ4_XS : Q8Grid<Q8WIQ4_XS, false> {
  static constexpr int TS = 136;
  static constexpr float kFinal = 1.0f;
  static __m256i prep(const uint8_t*) { return _mm256_setzero_si256(); }
  static void unpack(const uint8_t* b, int j, __m256i, __m256i& g, __m256i& sg, __m256i& sc) {
    uint16_t sh;
    std::memcpy(&sh, b + 2, 2);
    const __m256i kv = _mm256_shuffle_epi8(iq4nl_table(), nibbles32(b + 8 + 16 * j));
    g = _mm256_sign_epi8(kv, kv);
    sg = kv;  // never 0
    const int ls = ((b[4 + (j >> 1)] >> (4 * (j & 1))) & 15) | (((sh >> (2 * j)) & 3) << 4);
    sc = _mm256_set1_epi16(int16_t(ls - 32));
  }
};

// IQ1: grid points in {-1, 0, 1} (as |g| against q8 times sign(g)), plus a +-1/8 delta
// per 32 (IQ1_S) or per 8 values (IQ1_M); lane l of sub-block j times its odd scale, summed
// over j, acc = fma(d_w * d_x, lane, acc). IQ1_S's delta goes through the bsums: summs =
// fma(d, sum over j of delta_j * scale_j * (bsums of j), summs), final hsum(acc) + summs / 8;
// IQ1_M's per lane as the grid's: acc2 = fma(d, delta lanes, acc2), final hsum(acc) +
// hsum(acc2) / 8. TILED: s1 = 8 * (grid sum) + (delta sum), exact; d0 = d_w / 8, summs =
// fma(d0 * s1, d_x, summs).
// D::unpack(b, j, pre, pts, sc, dsg, dl): sub-block j's grid points (int8 -1/0/1), int16 scales
// and its delta: IQ1_M as sign bytes (+-1 per 8 values), IQ1_S as the signed scale dl; pre =
// D::prep(b), the block's scales decoded once.
struct IQ1Final {  // the decoded IQ1 codes are 8 g + delta: eighths
  static constexpr float kFinal = 0.125f;
};
template <typename D>
struct Q8IQ1 {
  static constexpr int BS = 256, XB = 256, OFF = 0;
  static constexpr bool kBias = false, kBsums = D::kDeltaBsums, kTiled = true;
  // Many x rows, tiled order only (q8_rows_decoded): each sub-block decoded once per weight row
  // as Q8Grid's (|w|, sign bytes of w, scales) with w = 8 g + delta (-9..9, never 0), so one
  // dot per x row gives 8 * (grid sum) + (delta sum), the tiled order's s1, instead of the
  // grid dot plus a delta dot or delta products, and with Q8Grid's steps after it (d0 = d_w / 8).
  // (The vec_dot order keeps the two sums apart, so it has no decoded form.)
  static constexpr int kDecodedVecs = 25;
  static constexpr bool kDecodedTiledOnly = true, kActBias = true;  // |w| <= 9
  static float decode(const uint8_t* b, __m256i* v) {
    const __m256i pre = D::prep(b);
    for (int j = 0; j < 8; ++j) {
      __m256i pts, sc, dsg;
      int32_t dl = 0;
      D::unpack(b, j, pre, pts, sc, dsg, dl);
      if constexpr (D::kDeltaBsums) dsg = _mm256_set1_epi8(dl < 0 ? -1 : 1);
      const __m256i w = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), pts), dsg);
      v[3 * j] = _mm256_sign_epi8(w, w);
      v[3 * j + 1] = w;
      v[3 * j + 2] = sc;
    }
    Q8Grid<IQ1Final>::act_bias_corr(v);
    return D::scale(b);
  }
  template <int MC, bool TILED>
  static void dot_decoded(const __m256i* v, float dw, int64_t bi, const Q8Row* x, Q8Acc* st) {
    static_assert(TILED, "IQ1's decoded form is the tiled order's");
    Q8Grid<IQ1Final>::dot_decoded<MC, true>(v, dw, bi, x, st);
  }
  static void tiled8_decoded(const __m256i* v, float dw, int64_t bi, const uint8_t* const* xb,
                             __m256 dx, __m256& acc) {
    Q8Grid<IQ1Final>::tiled8_decoded(v, dw, bi, xb, dx, acc);
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const float dw = D::scale(b);
    const __m256i ones = _mm256_set1_epi8(1);
    __m256i sumi[MC], sumd[MC];
    int32_t sumi1[MC];
    for (int m = 0; m < MC; ++m) {
      sumi[m] = sumd[m] = _mm256_setzero_si256();
      sumi1[m] = 0;
    }
    const __m256i pre = D::prep(b);
    // IQ1_S, 4+ x rows: sub-block j's delta * scale for its two 16-sums, then one madd per x
    // row; fewer rows keep the scalar products (the vector's store and reload cost more there)
    constexpr bool kVecDelta = D::kDeltaBsums && MC >= 4;
    alignas(32) int16_t dls[16];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256i pts, sc, dsg;
      int32_t dl;
      D::unpack(b, j, pre, pts, sc, dsg, dl);
      const __m256i g = _mm256_sign_epi8(pts, pts);  // |point|
      if constexpr (kVecDelta) dls[2 * j] = dls[2 * j + 1] = int16_t(dl);
      for (int m = 0; m < MC; ++m) {
        const __m256i q = load256(x[m].q + bi * 256 + 32 * j);
        // q8 times the point's sign (0 where the point is 0: its |g| is 0 too)
        sumi[m] = _mm256_add_epi32(sumi[m], scaled_dot4(g, _mm256_sign_epi8(q, pts), sc));
        if constexpr (D::kDeltaBsums && !kVecDelta) {
          const int32_t* bs = x[m].aux + bi * 16 + 2 * j;
          sumi1[m] += (bs[0] + bs[1]) * dl;
        } else if constexpr (!D::kDeltaBsums) {
          sumd[m] = _mm256_add_epi32(sumd[m], scaled_dot4(ones, _mm256_sign_epi8(q, dsg), sc));
        }
      }
    }
    if constexpr (kVecDelta) {
      // sum_j (bs[2j] + bs[2j+1]) dl_j in one madd per x row (exact integers: any order)
      const __m256i dlv = _mm256_load_si256((const __m256i*)dls);
      for (int m = 0; m < MC; ++m)
        sumi1[m] = hsum_i32(_mm256_madd_epi16(load256(x[m].pairs + bi * 16), dlv));
    }
    for (int m = 0; m < MC; ++m) {
      if constexpr (!D::kDeltaBsums) sumi1[m] = hsum_i32(sumd[m]);
      if constexpr (TILED) {
        const float r = float(8 * hsum_i32(sumi[m]) + sumi1[m]) * (dw * 0.125f);
        st[m].summs = __builtin_fmaf(r, x[m].d[bi], st[m].summs);
      } else {
        const float d = x[m].d[bi] * dw;
        st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[m]), st[m].acc);
        if constexpr (D::kDeltaBsums)
          st[m].summs = __builtin_fmaf(d, float(sumi1[m]), st[m].summs);
        else
          st[m].acc2 =
              _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumd[m]), st[m].acc2);
      }
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) {
    if constexpr (TILED) return a.summs;
    if constexpr (D::kDeltaBsums) return hsum8(a.acc) + 0.125f * a.summs;
    return hsum8(a.acc) + 0.125f * hsum8(a.acc2);
  }
};

// BMI2's pdep is one fast instruction on Intel (Haswell on) and Zen 3 on, but microcode on Zen 1
// / Zen 2 (tens of cycles per call: IQ1_S / IQ1_M prompt GEMMs ran at 0.67x of ggml on a Zen 1,
// experiments/results/cpu_kernels.md), where shifts and masks are much cheaper.
#if defined(__BMI2__) && !defined(__znver1__) && !defined(__znver2__)
#define JLLAMA_FAST_PDEP 1
#endif

// Four IQ1 grid points: index k = q[k] | (3 high bits << 8), the high bits given as ``hi`` (at
// bits 8-10 of 16-bit field k); the 4 low bytes spread into the fields.
static inline __m256i iq1_grid4(const uint8_t* q, uint64_t hi) {
  uint32_t lo;
  std::memcpy(&lo, q, 4);
#if defined(JLLAMA_FAST_PDEP)
  const uint64_t idx = _pdep_u64(lo, 0x00ff00ff00ff00ffULL) | hi;
#else
  uint64_t x = lo;
  x = (x | x << 16) & 0x0000ffff0000ffffULL;
  const uint64_t idx = ((x | x << 8) & 0x00ff00ff00ff00ffULL) | hi;
#endif
  return grid4(g_iq1s_grid, int(idx & 0xffff), int((idx >> 16) & 0xffff),
               int((idx >> 32) & 0xffff), int(idx >> 48));
}

// Four W-bit fields (field k at bits W k of ``bits``) to bits 8.. of four 16-bit fields.
template <int W>
static inline uint64_t spread_fields(uint64_t bits) {
  constexpr uint64_t f = ((uint64_t(1) << W) - 1) << 8;
#if defined(JLLAMA_FAST_PDEP)
  return _pdep_u64(bits, f | f << 16 | f << 32 | f << 48);
#else
  return (bits << 8 & f) | (bits << (24 - W) & f << 16) | (bits << (40 - 2 * W) & f << 32) |
         (bits << (56 - 3 * W) & f << 48);
#endif
}

struct Q8WIQ1_S : Q8IQ1<Q8WIQ1_S> {
  static constexpr int TS = 50;
  static constexpr bool kDeltaBsums = true;
  static float scale(const uint8_t* b) { return f16_to_f32(b); }
  static __m256i prep(const uint8_t* b) {  // the 8 odd scales (bits 12-14 of the qh words)
    const __m128i v = _mm_loadu_si128((const __m128i*)(b + 34));
    const __m128i s = _mm_and_si128(_mm_srli_epi16(v, 12), _mm_set1_epi16(7));
    return _mm256_broadcastsi128_si256(_mm_add_epi16(_mm_add_epi16(s, s), _mm_set1_epi16(1)));
  }
  static void unpack(const uint8_t* b, int j, __m256i pre, __m256i& pts, __m256i& sc, __m256i&,
                     int32_t& dl) {
    const uint8_t* q = b + 2 + 4 * j;
    uint16_t h;
    std::memcpy(&h, b + 34 + 2 * j, 2);
    pts = iq1_grid4(q, spread_fields<3>(h));  // bits 3k..3k+2 of h
    sc = half_scales(pre, j);
    const int ls = 2 * ((h >> 12) & 7) + 1;
    dl = h & 0x8000 ? -ls : ls;
  }
};

struct Q8WIQ1_M : Q8IQ1<Q8WIQ1_M> {
  static constexpr int TS = 56;
  static constexpr bool kDeltaBsums = false;
  static float scale(const uint8_t* b) {  // an f16 in the top nibbles of the 4 scale words
    uint16_t sc[4];
    std::memcpy(sc, b + 48, 8);
    const uint16_t h = uint16_t((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) |
                                ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
    return f16_to_f32(reinterpret_cast<const uint8_t*>(&h));
  }
  // 16 3-bit scales, 4 per scale word (bits 0-11; the top nibbles hold the f16 d): word w's
  // fields at bits 0, 6 (first 16 values of sub-blocks 2w, 2w+1) and 3, 9 (their last 16).
  // Shifted per 64-bit lane by 0, 6 | 3, 9: element 4 o + w of each half is sub-block 2w + o's.
  static __m256i prep(const uint8_t* b) {
    uint64_t w;
    std::memcpy(&w, b + 48, 8);
    const __m256i f =
        _mm256_srlv_epi64(_mm256_set1_epi64x(int64_t(w)), _mm256_setr_epi64x(0, 6, 3, 9));
    const __m256i s = _mm256_and_si256(f, _mm256_set1_epi16(7));
    return _mm256_add_epi16(_mm256_add_epi16(s, s), _mm256_set1_epi16(1));
  }
  static void unpack(const uint8_t* b, int j, __m256i pre, __m256i& pts, __m256i& sc,
                     __m256i& dsg, int32_t&) {
    const uint8_t *q = b + 4 * j, *h = b + 32 + 2 * j;
    uint16_t hh;
    std::memcpy(&hh, h, 2);
    pts = iq1_grid4(q, spread_fields<4>(hh & 0x7777u));  // nibble k, 3 bits
    sc = half_scales(pre, 4 * (j & 1) + (j >> 1));
    // the delta signs of the 4 groups of 8: bits 3 and 7 of h[0], h[1], one per 64-bit lane
    const __m256i sel = _mm256_setr_epi64x(0x08, 0x80, 0x800, 0x8000);
    const __m256i neg = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(hh), sel), sel);
    dsg = _mm256_or_si256(neg, _mm256_set1_epi8(1));
  }
};

// MXFP4 and IQ4_NL (Q8_0 activations): 4-bit indices into a table of int8 values (MXFP4: e2m1
// values doubled; IQ4_NL: ggml's kvalues_iq4nl), per block p (8 lanes) = |value| times the q8
// code with the value's sign (exact: |value| <= 127), scale d = d_x * d_w. PAIRS (ggml's AVX2
// vec_dot for these types): two accumulators (even and odd blocks) added before the hsum; an
// unpaired last block is added after it as float(sum) * d. Without PAIRS (llamafile's
// tinyBLAS_Q0_AVX, which ggml runs for IQ4_NL from 2 x rows): acc = fma(d, p, acc), hsum.
template <typename D, bool PAIRS>
struct Q8Lut0 {
  static constexpr int BS = 32, XB = 32, OFF = 0;
  static constexpr bool kBias = false, kBsums = false, kTiled = false, kPairs = PAIRS;
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const __m256i kv = _mm256_shuffle_epi8(D::table(), nibbles32(b + D::QS));
    const __m256i ak = _mm256_sign_epi8(kv, kv);
    const float dw = D::scale(b);
    for (int m = 0; m < MC; ++m) {
      const __m256i p = dpbusd<true>(_mm256_setzero_si256(), ak,
                                     _mm256_sign_epi8(load256(x[m].q + bi * 32), kv));
      const float d = x[m].d[bi] * dw;
      if constexpr (!PAIRS) {
        st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), st[m].acc);
      } else if ((bi & 1) == 0) {
        st[m].pend = p;
        st[m].pend_d = d;
        st[m].has_pend = true;
      } else {
        st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(st[m].pend_d), _mm256_cvtepi32_ps(st[m].pend),
                                    st[m].acc);
        st[m].acc2 = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), st[m].acc2);
        st[m].has_pend = false;
      }
    }
  }
  // PAIRS: blocks bi (even) and bi + 1 at once, straight into the two accumulators (the row
  // loop takes pairs this way and leaves only an unpaired last block to dot's pend).
  template <int MC>
  static void dot2(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const __m256i kv0 = _mm256_shuffle_epi8(D::table(), nibbles32(b + D::QS));
    const __m256i kv1 = _mm256_shuffle_epi8(D::table(), nibbles32(b + D::TS + D::QS));
    const __m256i ak0 = _mm256_sign_epi8(kv0, kv0), ak1 = _mm256_sign_epi8(kv1, kv1);
    const float dw0 = D::scale(b), dw1 = D::scale(b + D::TS);
    for (int m = 0; m < MC; ++m) {
      const int8_t* qy = x[m].q + bi * 32;
      const __m256i p0 =
          dpbusd<true>(_mm256_setzero_si256(), ak0, _mm256_sign_epi8(load256(qy), kv0));
      const __m256i p1 =
          dpbusd<true>(_mm256_setzero_si256(), ak1, _mm256_sign_epi8(load256(qy + 32), kv1));
      st[m].acc = _mm256_fmadd_ps(_mm256_set1_ps(x[m].d[bi] * dw0), _mm256_cvtepi32_ps(p0),
                                  st[m].acc);
      st[m].acc2 = _mm256_fmadd_ps(_mm256_set1_ps(x[m].d[bi + 1] * dw1), _mm256_cvtepi32_ps(p1),
                                   st[m].acc2);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) {
    if constexpr (!PAIRS) return hsum8(a.acc);
    float s = hsum8(_mm256_add_ps(a.acc, a.acc2));
    if (a.has_pend) s = s + float(hsum_i32(a.pend)) * a.pend_d;
    return s;
  }
};

// e8m0 / 2 as f32 bits for every exponent byte, built at compile time: MXFP4's scale as one
// load per block instead of a compare and select (ggml-cpu's own form is a table, too).
struct E8M0Half {
  uint32_t bits[256];
  constexpr E8M0Half() : bits() {
    for (int e = 0; e < 256; ++e) bits[e] = e < 2 ? 0x00200000u << e : uint32_t(e - 1) << 23;
  }
};
inline constexpr E8M0Half kE8M0Half{};

struct MXFP4Codes {
  static constexpr int TS = 17, QS = 1;
  static __m256i table() {
    return _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3,
                            4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  }
  static float scale(const uint8_t* b) {
    float f;
    std::memcpy(&f, &kE8M0Half.bits[b[0]], 4);
    return f;
  }
};

struct IQ4NLCodes {
  static constexpr int TS = 18, QS = 2;
  static __m256i table() { return iq4nl_table(); }
  static float scale(const uint8_t* b) { return f16_to_f32(b); }
};

struct Q8WMXFP4 : Q8Lut0<MXFP4Codes, true> {
  static constexpr int TS = MXFP4Codes::TS;
};

// NVFP4 (Q8_0 activations, two q8 blocks per 64-value block): four 16-value sub-blocks, each
// with its UE4M3 scale; sub-block s in qs bytes 8s..8s+7, its values 0..7 the low nibbles and
// 8..15 the high ones. ggml's AVX2 vec_dot (arch/x86/quants.c, every row count: no llamafile,
// repack or tiled path takes NVFP4): per block, sub-blocks 0|1 against q8 block 2bi and 2|3
// against 2bi + 1 as int32 lanes (lanes 0-3 the first sub-block, 4-7 the second), then
// acc = fma([s0 x4 | s1 x4], p01, acc), acc = fma([s2 x4 | s3 x4], p23, acc) with
// s = d_w(UE4M3) * d_x; one accumulator, hsum. No scale or product is an f32 denormal
// (UE4M3 / 2 >= 2^-10, f16 d_x >= 2^-24).
struct UE4M3Half {  // ggml_ue4m3_to_fp32 (the value halved) for every byte, as ggml's table
  float v[256];
  constexpr UE4M3Half() : v() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 0xF, m = b & 7;
      float f = e == 0 ? float(m) : float(8 + m);  // times 2^-10, or 2^(e-11): exact steps
      for (int i = 0; i < (e == 0 ? 10 : 11); ++i) f *= 0.5f;
      for (int i = 0; i < (e == 0 ? 0 : e); ++i) f *= 2.0f;
      v[b] = (b == 0 || b == 0x7F) ? 0.0f : f;
    }
  }
};
inline constexpr UE4M3Half kUE4M3Half{};

struct Q8WNVFP4 {
  static constexpr int BS = 64, XB = 32, OFF = 0, TS = 36;
  static constexpr bool kBias = false, kBsums = false, kTiled = false;
  // The 32 e2m1 values (doubled) of two sub-blocks from their 16 bytes, in element order.
  static inline __m256i values(const uint8_t* qs) {
    const __m128i t = _mm_loadu_si128((const __m128i*)qs);
    const __m128i m4 = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(t, m4), hi = _mm_and_si128(_mm_srli_epi16(t, 4), m4);
    const __m256i q = _mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi));
    return _mm256_shuffle_epi8(MXFP4Codes::table(), q);
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    const __m256i kv01 = values(b + 4), kv23 = values(b + 20);
    const __m256i ak01 = _mm256_sign_epi8(kv01, kv01), ak23 = _mm256_sign_epi8(kv23, kv23);
    const float w0 = kUE4M3Half.v[b[0]], w1 = kUE4M3Half.v[b[1]];
    const float w2 = kUE4M3Half.v[b[2]], w3 = kUE4M3Half.v[b[3]];
    for (int m = 0; m < MC; ++m) {
      const int8_t* qy = x[m].q + bi * 64;
      const __m256i p01 =
          dpbusd<true>(_mm256_setzero_si256(), ak01, _mm256_sign_epi8(load256(qy), kv01));
      const __m256i p23 =
          dpbusd<true>(_mm256_setzero_si256(), ak23, _mm256_sign_epi8(load256(qy + 32), kv23));
      const float dy0 = x[m].d[2 * bi], dy1 = x[m].d[2 * bi + 1];
      const __m256 s01 = _mm256_set_m128(_mm_set1_ps(w1 * dy0), _mm_set1_ps(w0 * dy0));
      const __m256 s23 = _mm256_set_m128(_mm_set1_ps(w3 * dy1), _mm_set1_ps(w2 * dy1));
      st[m].acc = _mm256_fmadd_ps(s01, _mm256_cvtepi32_ps(p01), st[m].acc);
      st[m].acc = _mm256_fmadd_ps(s23, _mm256_cvtepi32_ps(p23), st[m].acc);
    }
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) { return hsum8(a.acc); }
};

// IQ4_NL: llamafile's order from 2 x rows; ``OneRow``, ggml's vec_dot for a single x row (the
// row kernels pick it by the call's row count, vec_dot.cc).
struct Q8WIQ4_NL1 : Q8Lut0<IQ4NLCodes, true> {
  static constexpr int TS = IQ4NLCodes::TS;
};
struct Q8WIQ4_NL : Q8Lut0<IQ4NLCodes, false> {
  static constexpr int TS = IQ4NLCodes::TS;
  using OneRow = Q8WIQ4_NL1;
};


// Q2_K/Q3_K (Q8_K activations), as ggml's AVX2 vec_dot: 32-element chunk c (0..7) holds 16-groups
// 2c and 2c+1, so lane l of the block's int32 sumi is sum_c sc[2c + l/4] * (dot of bytes
// 4l..4l+3 of chunk c), its pairs from maddubs, scaled by madd (get_scale_shuffle_q3k).
// Q2_K: acc = fma(-d_x * dmin_w, mins lane l = mn[2l] bs[2l] + mn[2l+1] bs[2l+1], acc), then
// acc = fma(d_x * d_w, sumi, acc); Q3_K: the second step only (its codes low2 - qh are signed,
// -4..3: both parts through maddubs, their int16 pair sums subtracted, as ggml does).
// TILED (ggml's tiled GEMM, tiled-kernel.cpp, SUBBLK 16): s1 = the sum of all lanes, Q2_K
// r = fma(-dmin_w, s2 = sum_g mn[g] bs[g], s1 * d_w), Q3_K r = s1 * d_w; summs = fma(r, d_x, summs).
//
// The scale (and Q2_K min) of the chunk's two groups as int16: group 2c in the low 128 bits,
// 2c+1 in the high, picked from the block's 16 int16 values ``all`` (group g in element g).
static inline __m256i k16_pair_scales(__m256i all, int c) {
  const __m128i half = c < 4 ? _mm256_castsi256_si128(all) : _mm256_extracti128_si256(all, 1);
  const int s = c & 3;
  const __m256i shuf = _mm256_set_m128i(_mm_set1_epi16(int16_t(((4 * s + 3) << 8) | (4 * s + 2))),
                                        _mm_set1_epi16(int16_t(((4 * s + 1) << 8) | (4 * s))));
  return _mm256_shuffle_epi8(_mm256_set_m128i(half, half), shuf);
}

// The same from the block's 16 scale bytes in both 128-bit halves (bytes16), in one shuffle:
// SHIFT 0 puts the byte in each int16's low byte, zero-extended (unsigned scales); SHIFT 8 in
// its high byte, the lane then 256 times the signed scale, and the block's int32 sums come out
// 256 times too (exact: |sum| < 2^31 for Q3_K) until one arithmetic shift by 8 per block.
// Saves the widening and the two half broadcasts per block that k16_pair_scales needs.
template <int SHIFT>
static inline __m256i k16_byte_scales(__m256i bytes16, int c) {
  const auto lane = [](int g) {
    return SHIFT == 0 ? int16_t(0x8000 | g) : int16_t((g << 8) | 0x80);
  };
  return _mm256_shuffle_epi8(bytes16, _mm256_set_m128i(_mm_set1_epi16(lane(2 * c + 1)),
                                                       _mm_set1_epi16(lane(2 * c))));
}

// The 2-bit codes of chunk c: bits 2(c%4).. of qs[32 (c/4) + l].
static inline __m256i k16_low2(const uint8_t* qs, int c) {
  const __m256i q = load256(qs + 32 * (c >> 2));
  return _mm256_and_si256(_mm256_srli_epi16(q, 2 * (c & 3)), _mm256_set1_epi8(3));
}

template <typename D>
struct Q8K16 {
  static constexpr int BS = 256, XB = 256, OFF = 0;
  static constexpr bool kBias = false, kTiled = true;
  static void tiled8(const uint8_t* b, int64_t bi, const Q8Row* x, __m256 dx, __m256& acc) {
    __m256i sumi[8];
    sums<8>(b, bi, x, sumi);
    D::tiled8_block(b, bi, x, sumi, dx, acc);
  }
  template <int MC, bool TILED = false>
  static void dot(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st) {
    __m256i sumi[MC];
    sums<MC>(b, bi, x, sumi);
    D::template finish_block<MC, TILED>(b, bi, x, st, sumi);
  }
  template <int MC>
  __attribute__((always_inline)) static void sums(const uint8_t* b, int64_t bi, const Q8Row* x,
                                                  __m256i* sumi) {
    const __m256i sb = D::scale_bytes(b);
    for (int m = 0; m < MC; ++m) sumi[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i scv = k16_byte_scales<D::kScaleShift>(sb, c);
      __m256i qw, qh;
      D::chunk(b, c, qw, qh);
      for (int m = 0; m < MC; ++m) {
        const __m256i qy = load256(x[m].q + bi * 256 + c * 32);
        __m256i p = _mm256_maddubs_epi16(qw, qy);  // pairs: |sum| <= 2 * 3 * 128, no saturation
        if constexpr (D::kHigh) p = _mm256_sub_epi16(p, _mm256_maddubs_epi16(qh, qy));
        sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(p, scv));
      }
    }
    if constexpr (D::kScaleShift != 0)
      for (int m = 0; m < MC; ++m) sumi[m] = _mm256_srai_epi32(sumi[m], D::kScaleShift);
  }
  template <bool TILED = false>
  static float finish(const Q8Acc& a) {
    if constexpr (TILED) return a.summs;
    return hsum8(a.acc);
  }
};

struct Q8W2_K : Q8K16<Q8W2_K> {
  static constexpr int TS = 84;
  static constexpr bool kHigh = false, kBsums = true;
  static constexpr int kScaleShift = 0;  // scales 0..15: zero-extended
  static __m256i scale_bytes(const uint8_t* b) {
    const __m128i sc = _mm_and_si128(_mm_loadu_si128((const __m128i*)b), _mm_set1_epi8(15));
    return _mm256_broadcastsi128_si256(sc);
  }
  static __m256i mins16(const uint8_t* b) {
    const __m128i v = _mm_loadu_si128((const __m128i*)b);
    return _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)));
  }
  // Codes 0..3, unsigned: no high part.
  static void chunk(const uint8_t* b, int c, __m256i& qw, __m256i&) { qw = k16_low2(b + 16, c); }
  static void tiled8_block(const uint8_t* b, int64_t bi, const Q8Row* x, const __m256i* sumi,
                           __m256 dx, __m256& acc) {
    const __m256i mn = mins16(b);
    __m256i prod[8];
    for (int m = 0; m < 8; ++m) prod[m] = _mm256_madd_epi16(mn, load256(x[m].pairs + bi * 16));
    const __m256 s1 = _mm256_cvtepi32_ps(hsum_i32_8rows(sumi));
    const __m256 s2 = _mm256_cvtepi32_ps(hsum_i32_8rows(prod));
    const __m256 r = _mm256_fnmadd_ps(_mm256_set1_ps(f16_to_f32(b + 82)), s2,
                                      _mm256_mul_ps(s1, _mm256_set1_ps(f16_to_f32(b + 80))));
    acc = _mm256_fmadd_ps(r, dx, acc);
  }
  template <int MC, bool TILED>
  static void finish_block(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st,
                           const __m256i* sumi) {
    const float dw = f16_to_f32(b + 80), dminw = f16_to_f32(b + 82);
    const __m256i mn = mins16(b);
    __m256i prod[MC];  // lane l: mn[2l] bs[2l] + mn[2l+1] bs[2l+1]
    for (int m = 0; m < MC; ++m) prod[m] = _mm256_madd_epi16(mn, load256(x[m].pairs + bi * 16));
    if constexpr (TILED) {
      int32_t s1[MC], s2[MC];
      hsum_i32_rows<MC>(sumi, s1);
      hsum_i32_rows<MC>(prod, s2);
      for (int m = 0; m < MC; ++m) {
        const float r = __builtin_fmaf(-dminw, float(s2[m]), float(s1[m]) * dw);
        st[m].summs = __builtin_fmaf(r, x[m].d[bi], st[m].summs);
      }
      return;
    }
    for (int m = 0; m < MC; ++m) {
      const float dx = x[m].d[bi];
      // fnmadd(dx * dminw, ...) = fma(-dx * dminw, ...): negation is exact, no sign flip needed
      st[m].acc = _mm256_fnmadd_ps(_mm256_set1_ps(dx * dminw), _mm256_cvtepi32_ps(prod[m]),
                                   st[m].acc);
      st[m].acc =
          _mm256_fmadd_ps(_mm256_set1_ps(dx * dw), _mm256_cvtepi32_ps(sumi[m]), st[m].acc);
    }
  }
};

struct Q8W3_K : Q8K16<Q8W3_K> {
  static constexpr int TS = 110;
  static constexpr bool kHigh = true, kBsums = true;  // bsums: tiled8's bias term
  // The tiled order for 8 x rows (Q8K16::tiled8's role): only s1, the block's total, enters it,
  // so the codes are taken unsigned, low2 | hbit << 2 = code + 4 (0..7, one maddubs per x row
  // instead of two and a subtraction, as ggml's tiled kernel with its BIAS 4), and 4 * sum_g
  // sc[g] bs[g] (x's 16-sums) taken off once per block: the same exact s1.
  static void tiled8(const uint8_t* b, int64_t bi, const Q8Row* x, __m256 dx, __m256& acc) {
    const __m256i all = scales16(b);
    const __m256i hm = load256(b);
    __m256i sumi[8];
    for (int m = 0; m < 8; ++m) sumi[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i scv = k16_pair_scales(all, c);
      // bit c of each hmask byte to bit 2 (16-bit shifts: the high byte's bit c lands on its
      // own bit 2 too)
      const __m256i hb = c <= 2 ? _mm256_slli_epi16(hm, 2 - c) : _mm256_srli_epi16(hm, c - 2);
      const __m256i code = _mm256_or_si256(k16_low2(b + 32, c),
                                           _mm256_and_si256(hb, _mm256_set1_epi8(4)));
      for (int m = 0; m < 8; ++m) {
        const __m256i qy = load256(x[m].q + bi * 256 + c * 32);
        sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(_mm256_maddubs_epi16(code, qy), scv));
      }
    }
    for (int m = 0; m < 8; ++m) {
      const __m256i t = _mm256_madd_epi16(load256(x[m].pairs + bi * 16), all);
      sumi[m] = _mm256_sub_epi32(sumi[m], _mm256_slli_epi32(t, 2));
    }
    tiled8_block(b, bi, x, sumi, dx, acc);
  }
  static constexpr int kScaleShift = 8;  // signed scales -32..31: 256 s per lane
  static __m128i scale_bytes128(const uint8_t* b) {
    uint32_t w[4];
    Q3_K::scale_words(b + 96, w);
    const __m128i v = _mm_set_epi32(int(w[3]), int(w[2]), int(w[1]), int(w[0]));
    return _mm_sub_epi8(v, _mm_set1_epi8(32));
  }
  static __m256i scale_bytes(const uint8_t* b) {
    return _mm256_broadcastsi128_si256(scale_bytes128(b));
  }
  static __m256i scales16(const uint8_t* b) { return _mm256_cvtepi8_epi16(scale_bytes128(b)); }
  // Codes low2 - qh, -4..3: qh = 4 where bit c of hmask[l] is clear, as ggml's q3h: bit c moved
  // to bit 2 by one 16-bit shift (the high byte's bit c lands on its own bit 2 too), then andnot.
  static void chunk(const uint8_t* b, int c, __m256i& qw, __m256i& qh) {
    const __m256i hm = load256(b);
    const __m256i hb = c <= 2 ? _mm256_slli_epi16(hm, 2 - c) : _mm256_srli_epi16(hm, c - 2);
    qh = _mm256_andnot_si256(hb, _mm256_set1_epi8(4));
    qw = k16_low2(b + 32, c);
  }
  static void tiled8_block(const uint8_t* b, int64_t, const Q8Row*, const __m256i* sumi,
                           __m256 dx, __m256& acc) {
    const __m256 s1 = _mm256_cvtepi32_ps(hsum_i32_8rows(sumi));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(s1, _mm256_set1_ps(f16_to_f32(b + 108))), dx, acc);
  }
  template <int MC, bool TILED>
  static void finish_block(const uint8_t* b, int64_t bi, const Q8Row* x, Q8Acc* st,
                           const __m256i* sumi) {
    const float dw = f16_to_f32(b + 108);
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
};

}  // namespace jllama

#pragma GCC pop_options
#endif  // JLLAMA_Q8
