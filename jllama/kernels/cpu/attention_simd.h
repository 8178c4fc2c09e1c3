// The vector parts of ggml's flash attention that differ by x86 SIMD branch, for attention.cc:
// per branch the f32 vector type (VF, kW lanes) and its operations, the lane sums,
// ggml_v_expf, ggml_vec_scale_f16 / ggml_vec_mad_f16; over them, ggml_vec_soft_max_f32 and
// ggml_vec_dot_f16, whose steps are the same at either width. A -march=native build of ggml
// takes its AVX-512 branch (F + DQ) or, without AVX-512, its AVX2 one (+ FMA + F16C); each is
// redone here with the same intrinsics, in ggml's order.
//
// Part of attention.cc's translation unit, and only of it: it is compiled with that unit's
// flags (-ffp-contract=off, every FMA explicit), and its definitions have internal linkage.
// attention.cc includes it where one of the two branches is built (JLLAMA_FA).
#pragma once

#include <cmath>
#include <cstdint>

#include <immintrin.h>
#include <math.h>

#include "f16.h"

namespace jllama {
namespace {

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// ----------------------------------------------------------------- ggml's AVX-512 branch

// f32 vectors for the width-independent parts (simd_gemm, whose per-element FMA chains are the
// same at any width).
using VF = __m512;
constexpr int kW = 16;
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vset1(float v) { return _mm512_set1_ps(v); }
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vfmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vload_h(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
// The f32 sums of all lanes: ggml_vec_dot_f16's (GGML_F32_VEC_REDUCE after its folds) and
// ggml_vec_soft_max_f32's; both _mm512_reduce_add_ps here.
inline float reduce_dot(VF v) { return _mm512_reduce_add_ps(v); }
inline float reduce_soft_max(VF v) { return _mm512_reduce_add_ps(v); }

// ggml_v_expf (vec.h, AVX-512): ARM's optimized-routines expf, ~1.5 ulp.
inline __m512 v_expf(__m512 x) {
  const __m512 r = _mm512_set1_ps(0x1.8p23f);
  const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), r);
  const __m512 n = _mm512_sub_ps(z, r);
  const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
  const __mmask16 d = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192), _CMP_GT_OQ);
  const __m512 u = _mm512_mul_ps(b, b);
  const __m512 j = _mm512_fmadd_ps(
      _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b,
                                      _mm512_set1_ps(0x1.573e2ep-5f)),
                      u,
                      _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b,
                                      _mm512_set1_ps(0x1.fffdb6p-2f))),
      u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f)));
  const __m512 res = _mm512_scalef_ps(j, n);
  if (_mm512_kortestz(d, d)) return res;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 alt = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, zero, _CMP_LE_OQ),
                                          _mm512_set1_ps(INFINITY), zero);
  return _mm512_mask_blend_ps(d, res, alt);
}

// ggml_vec_scale_f16 / ggml_vec_mad_f16. With AVX512-FP16 ggml computes in half precision on
// 128-element steps (v rounded to half first); otherwise in f32 lanes stored back as half on
// 64-element steps. The scalar tail is f32 arithmetic rounded to half once.
#if defined(__AVX512FP16__)
constexpr int kF16Step = 128;
#else
constexpr int kF16Step = 64;
#endif

void scale_f16(int n, uint16_t* y, float v) {
  const int np = n & ~(kF16Step - 1);
#if defined(__AVX512FP16__)
  const __m512h vx = _mm512_set1_ph((_Float16)v);
  for (int i = 0; i < np; i += 32) {
    const __m512h ay = _mm512_mul_ph(_mm512_loadu_ph(y + i), vx);
    _mm512_storeu_ph(y + i, ay);
  }
#else
  const __m512 vx = _mm512_set1_ps(v);
  for (int i = 0; i < np; i += 16) {
    __m512 ay = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(y + i)));
    ay = _mm512_mul_ps(ay, vx);
    _mm256_storeu_si256((__m256i*)(y + i), _mm512_cvtps_ph(ay, 0));
  }
#endif
  // The tail, 16 lanes at a time: per element still f32(y) * v rounded to half once.
  int i = np;
  const __m512 vf = _mm512_set1_ps(v);
  for (; i + 16 <= n; i += 16) {
    const __m512 ay = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(y + i)));
    _mm256_storeu_si256((__m256i*)(y + i), _mm512_cvtps_ph(_mm512_mul_ps(ay, vf), 0));
  }
  for (; i < n; ++i) y[i] = f32_to_fp16(fp16_to_f32(y[i]) * v);
}

void mad_f16(int n, uint16_t* y, const uint16_t* x, float v) {
  const int np = n & ~(kF16Step - 1);
#if defined(__AVX512FP16__)
  const __m512h vx = _mm512_set1_ph((_Float16)v);
  for (int i = 0; i < np; i += 32) {
    const __m512h ay = _mm512_fmadd_ph(_mm512_loadu_ph(x + i), vx, _mm512_loadu_ph(y + i));
    _mm512_storeu_ph(y + i, ay);
  }
#else
  const __m512 vx = _mm512_set1_ps(v);
  for (int i = 0; i < np; i += 16) {
    const __m512 ax = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + i)));
    __m512 ay = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(y + i)));
    ay = _mm512_fmadd_ps(ax, vx, ay);
    _mm256_storeu_si256((__m256i*)(y + i), _mm512_cvtps_ph(ay, 0));
  }
#endif
  // The tail: ggml's scalar ``y + x*v`` in f32, which GCC contracts into one FMA, rounded to
  // half; 16 lanes at a time here, the same per element.
  int i = np;
  const __m512 vf = _mm512_set1_ps(v);
  for (; i + 16 <= n; i += 16) {
    const __m512 ax = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + i)));
    const __m512 ay = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(y + i)));
    _mm256_storeu_si256((__m256i*)(y + i), _mm512_cvtps_ph(_mm512_fmadd_ps(ax, vf, ay), 0));
  }
  for (; i < n; ++i) y[i] = f32_to_fp16(std::fmaf(fp16_to_f32(x[i]), v, fp16_to_f32(y[i])));
}

#else
// ----------------------------------------------------------------- ggml's AVX2 branch
// (AVX2 + FMA + F16C: GGML_F32/F16 with 8 lanes, GGML_F16_STEP 32, no AVX512-FP16)

using VF = __m256;
constexpr int kW = 8;
inline VF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF vset1(float v) { return _mm256_set1_ps(v); }
inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vfmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vload_h(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline void vstore_h(uint16_t* p, VF v) { _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, 0)); }

// ggml_vec_dot_f16's GGML_F32x8_REDUCE after its folds: low + high half, then two hadds.
inline float reduce_dot(VF v) {
  const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t1 = _mm_hadd_ps(t0, t0);
  return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}

// ggml_vec_soft_max_f32's f32 sum of 8 lanes: (high + low half), movehl, movehdup.
inline float reduce_soft_max(VF v) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// ggml_v_expf (vec.h, AVX2 + FMA): the AVX-512 form's reduction and polynomial, but the
// polynomial's constant term is left out (c4 * b, not fma(c4, b, 1)) and the result is
// k + k * j with k = 2^n made from z's bits; for 126 < |n| <= 192 the scale is split into two
// factors (s2 + s2 * j) * s1, beyond that s1 * s1 (0 or inf).
inline __m256 v_expf(__m256 x) {
  const __m256 r = _mm256_set1_ps(0x1.8p23f);
  const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
  const __m256 n = _mm256_sub_ps(z, r);
  const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                    _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
  const __m256 k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(0x3f800000)));
  const __m256 an = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), n);
  const __m256 c = _mm256_cmp_ps(an, _mm256_set1_ps(126), _CMP_GT_OQ);
  const __m256 u = _mm256_mul_ps(b, b);
  const __m256 j = _mm256_fmadd_ps(
      _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b,
                                      _mm256_set1_ps(0x1.573e2ep-5f)),
                      u,
                      _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b,
                                      _mm256_set1_ps(0x1.fffdb6p-2f))),
      u, _mm256_mul_ps(_mm256_set1_ps(0x1.ffffecp-1f), b));
  const __m256 res = _mm256_fmadd_ps(j, k, k);
  if (!_mm256_movemask_ps(c)) return res;
  const __m256i g = _mm256_and_si256(
      _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
      _mm256_set1_epi32(int(0x82000000u)));
  const __m256 s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000)));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
  const __m256 d = _mm256_cmp_ps(an, _mm256_set1_ps(192), _CMP_GT_OQ);
  const __m256 mid = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
  return _mm256_blendv_ps(_mm256_blendv_ps(res, mid, c), _mm256_mul_ps(s1, s1), d);
}

// ggml_vec_scale_f16 / ggml_vec_mad_f16: f32 lanes stored back as half (32-element steps, a
// scalar tail with the same per-element arithmetic: y * v, and y + x * v contracted by GCC into
// one FMA), so 8 lanes over every whole group of 8, then scalar.
void scale_f16(int n, uint16_t* y, float v) {
  const __m256 vx = _mm256_set1_ps(v);
  int i = 0;
  for (; i + 8 <= n; i += 8) vstore_h(y + i, _mm256_mul_ps(vload_h(y + i), vx));
  for (; i < n; ++i) y[i] = f32_to_fp16(fp16_to_f32(y[i]) * v);
}

void mad_f16(int n, uint16_t* y, const uint16_t* x, float v) {
  const __m256 vx = _mm256_set1_ps(v);
  int i = 0;
  for (; i + 8 <= n; i += 8) vstore_h(y + i, _mm256_fmadd_ps(vload_h(x + i), vx, vload_h(y + i)));
  for (; i < n; ++i) y[i] = f32_to_fp16(std::fmaf(fp16_to_f32(x[i]), v, fp16_to_f32(y[i])));
}
#endif  // SIMD branch

// ggml_vec_soft_max_f32: y = exp(x - max) by ggml_v_expf kW lanes at a time, each vector's sum
// in f32 added to the ggml_float (double) total; scalar libm expf on the tail.
double soft_max(int n, float* y, const float* x, float max) {
  int i = 0;
  double sum = 0.0;
  for (; i + kW - 1 < n; i += kW) {
    const VF val = v_expf(vsub(vload(x + i), vset1(max)));
    vstore(y + i, val);
    sum += (double)reduce_soft_max(val);
  }
  for (; i < n; ++i) {
    const float val = expf(x[i] - max);
    sum += (double)val;
    y[i] = val;
  }
  return sum;
}

// ggml_vec_dot_f16 (x = K row, y = Q in f16): four kW-lane f32 FMA accumulators over 4 * kW
// element steps (AVX-512: 64, AVX2: 32), folded 0+2, 1+3, 0+1, then reduce_dot; the leftovers
// as f32 products added in double.
float dot_f16(int n, const uint16_t* x, const uint16_t* y) {
  const int np = n & ~(4 * kW - 1);
  VF sum[4] = {vzero(), vzero(), vzero(), vzero()};
  for (int i = 0; i < np; i += 4 * kW)
    for (int j = 0; j < 4; ++j)
      sum[j] = vfmadd(vload_h(x + i + kW * j), vload_h(y + i + kW * j), sum[j]);
  sum[0] = vadd(sum[0], sum[2]);
  sum[1] = vadd(sum[1], sum[3]);
  sum[0] = vadd(sum[0], sum[1]);
  double sumf = (double)reduce_dot(sum[0]);
  for (int i = np; i < n; ++i) sumf += (double)(fp16_to_f32(x[i]) * fp16_to_f32(y[i]));
  return (float)sumf;
}

}  // namespace
}  // namespace jllama
