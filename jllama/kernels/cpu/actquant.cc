// ggml's activation quantization for the int8 dot, row by row as ggml-cpu does it: Q8_0/Q8_1 as
// the x86 quantize_row_q8_{0,1} (d = amax / 127, codes = round-half-even(x * (127 / amax)), d and
// the Q8_1 block sum s = d * sum(codes) stored as f16), Q8_K as quantize_row_q8_K_ref (scale from
// the signed value of largest magnitude, -127 / max, codes capped at 127, d = 1 / iscale in f32).
// In C rather than XLA because XLA's simplifier rewrites x / 127 into x * (1 / 127) and
// d * sum(q) into sum(q * d), each a rounding step ggml does not take (now and then a block
// then stores another f16 s, and the product moves by a quantum).

#include "actquant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "f16.h"

#if defined(JLLAMA_Q8)

namespace jllama {

#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same steps 16 lanes at a time: max |x| is exact in any order, x * id and iscale * x are
// the same single roundings, roundscale to nearest-even is nearbyint in the default mode, and
// the first element of largest magnitude (Q8_K's sign source) is found by a mask scan.
static inline __m128i round_to_i8(__m512 v) {
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
#elif defined(__AVX2__)
// The same steps 8 lanes at a time, as ggml's AVX2 quantize_row_q8_0/_1 (max |x| is exact in
// any order; x * id, then round-to-nearest-even, is nearbyint in the default mode), and Q8_K's
// reference loop (the first element of largest magnitude gives the sign, found by a scan for
// |x| == amax). The scalar loops cost ~9 ns an element: more than a small prompt GEMM itself
// (experiments/results/cpu_kernels.md).
static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// 32 int32 codes (four vectors, in element order) -> 32 int8 in element order.
static inline __m256i pack_i8(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

void quantize_row_q8(const float* x, int64_t k, int fmt, int8_t* q, float* d, float* s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if (fmt == 2) {  // Q8_K
    for (int64_t b = 0; b < k / 256; ++b) {
      const float* xb = x + b * 256;
      __m256 vmax = _mm256_setzero_ps();
      for (int j = 0; j < 256; j += 8)
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs_mask, _mm256_loadu_ps(xb + j)));
      const float amax = hmax8(vmax);
      int8_t* qb = q + b * 256;
      if (amax == 0.0f) {
        std::memset(qb, 0, 256);
        d[b] = 0.0f;
        continue;
      }
      float mx = 0.0f;
      const __m256 va = _mm256_set1_ps(amax);
      for (int j = 0; j < 256; j += 8) {
        const int hit = _mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_and_ps(abs_mask, _mm256_loadu_ps(xb + j)), va, _CMP_EQ_OQ));
        if (hit) {
          mx = xb[j + __builtin_ctz(unsigned(hit))];
          break;
        }
      }
      const float iscale = -127.0f / mx;
      const __m256 vs = _mm256_set1_ps(iscale), cap = _mm256_set1_ps(127.0f);
      for (int j = 0; j < 256; j += 32) {
        __m256i c[4];
        for (int h = 0; h < 4; ++h)
          c[h] = _mm256_cvtps_epi32(_mm256_min_ps(
              _mm256_round_ps(_mm256_mul_ps(vs, _mm256_loadu_ps(xb + j + 8 * h)), kRound), cap));
        _mm256_storeu_si256((__m256i*)(qb + j), pack_i8(c[0], c[1], c[2], c[3]));
      }
      d[b] = 1.0f / iscale;
    }
    return;
  }
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + b * 32;
    __m256 v[4];
    for (int h = 0; h < 4; ++h) v[h] = _mm256_loadu_ps(xb + 8 * h);
    const __m256 m01 = _mm256_max_ps(_mm256_and_ps(abs_mask, v[0]), _mm256_and_ps(abs_mask, v[1]));
    const __m256 m23 = _mm256_max_ps(_mm256_and_ps(abs_mask, v[2]), _mm256_and_ps(abs_mask, v[3]));
    const float amax = hmax8(_mm256_max_ps(m01, m23));
    const float dd = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i c[4];
    for (int h = 0; h < 4; ++h) c[h] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[h], id), kRound));
    _mm256_storeu_si256((__m256i*)(q + b * 32), pack_i8(c[0], c[1], c[2], c[3]));
    d[b] = f16_round(dd);
    if (fmt == 1) {
      __m256i t = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
      __m128i r = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
      r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 1));
      s[b] = f16_round(dd * (float)_mm_cvtsi128_si32(r));
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

namespace {

// Prompt-sized inputs are split in row chunks over the caller and the helper threads, as ggml
// quantizes src1 in every thread of a mul_mat.
struct QuantizeWork : ChunkJob {
  const float* x;
  int8_t* q;
  float *d, *s;
  int64_t k, nb, ns, rows_per, m;
  int fmt;

  void run() override {
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      for (int64_t r = c * rows_per; r < std::min(m, (c + 1) * rows_per); ++r)
        quantize_row_q8(x + r * k, k, fmt, q + r * k, d + r * nb, s + r * ns);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

}  // namespace

void quantize_rows_q8(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k, int fmt,
                      int8_t* q, float* d, float* s) {
  const int64_t nb = k / (fmt == kFmtQ8_K ? 256 : 32), ns = fmt == kFmtQ8_1 ? k / 32 : 0;
  auto work = std::make_shared<QuantizeWork>();
  work->x = x;
  work->q = q;
  work->d = d;
  work->s = s;
  work->k = k, work->nb = nb, work->ns = ns, work->m = m, work->fmt = fmt;
  work->rows_per = std::max<int64_t>(1, (32 << 10) / k);  // ~128 KiB of x per chunk
  work->n_chunks = (m + work->rows_per - 1) / work->rows_per;
  run_chunks(pool, work, helpers_for(pool, work->n_chunks));
}

}  // namespace jllama

#endif  // JLLAMA_Q8
