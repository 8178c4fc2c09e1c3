// Prompt GEMM (many x rows) of the int8 kernels, with the row kernels' f32 steps (q8.h). On
// AVX2 machines without AVX-512 VNNI only Q4_0/Q5_0/Q8_0 have one (``lane_gemm`` below, the
// same idea 8 outputs wide). On AVX-512 VNNI, with the weight transposed into lanes: a tile of 16 weight rows is decoded once
// into codes[k / 4][16][4] (u8), so one 512-bit dpbusd against 4 broadcast x codes gives, for
// 16 outputs at once, the 4-element int32 lane that ggml's 256-bit dot forms in its lane
// l = (k / 4) % 8. Each ggml lane of each output then keeps its own f32 register lane, and
// every fma / cvt / hsum step is ggml's, per output, in ggml's order, only 16 outputs wide
// instead of 8 lanes of one output. The row loop over the x rows reuses the decoded tile
// (L1/L2), where the row kernels (vec_dot.cc) decode each weight block again for every 4 x rows
// and pay a horizontal sum per block. K-quants (ggml's tiled order from 8 rows): per group an
// int32 dot times the group's scale (vpmulld), mins through int16 pairs (vpdpwssd), then
// ggml's two fmas per block. It beats ggml's own mul_mat at prompt sizes for every weight
// shape of the registry models (experiments/bench_gemm_vs_ggml.py; experiments/results/
// cpu_kernels.md).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "blocks.h"
#include "f16.h"
#include "q8.h"
#include "q8_dot.h"

#if defined(JLLAMA_Q8)

namespace jllama {
namespace {

#if defined(JLLAMA_Q8_GEMM)
// No reassociation or contraction of the f32 steps below: their order is the point.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")

constexpr int kNR = 16;  // weight rows per tile (one zmm lane each)

// From how many x rows the GEMM beats the row kernels (bench_q8_kernel.py --rows, 2 threads):
// K-quants from 8 (where ggml's tiled order starts), the 32-block types from 16 (at 8 rows
// decoding the tile cost more than it saved: experiments/results/cpu_kernels.md).
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
    t.d[bi * kNR + r] = f16_to_f32(b);
    if constexpr (!T::kBias) t.m[bi * kNR + r] = f16_to_f32(b + 2);
  }
};

template <typename T>
struct GKMin {  // Q4_K/Q5_K: 8 groups of 32, (scale, min) pairs
  static constexpr int BS = 256, G = 8, P = 4;
  static void decode(const uint8_t* b, uint8_t* codes, GemmTile& t, int64_t bi, int r) {
    int sc[8], mn[8];
    k_scale_min_int(b + 4, sc, mn);
    t.d[bi * kNR + r] = f16_to_f32(b);
    t.m[bi * kNR + r] = f16_to_f32(b + 2);
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
    t.d[bi * kNR + r] = f16_to_f32(b + 208);
    for (int c = 0; c < 8; ++c)
      _mm256_storeu_si256((__m256i*)(codes + 32 * c), Q8W6_K::chunk(b, c));
    for (int g = 0; g < 16; ++g) t.sc[(bi * G + g) * kNR + r] = scales[g];
    for (int p = 0; p < 8; ++p)
      t.pr[(bi * P + p) * kNR + r] = int32_t(pack16(scales[2 * p], scales[2 * p + 1]));
  }
};

// Decodes weight rows [n0, n0 + nr) (nr <= 16) into the tile; missing lanes are zero. Rows are
// decoded row-major first, then one 32-bit gather per 4 codes of 16 rows builds the transpose
// (a per-element copy made the tile a sizeable part of a prompt GEMM's time).
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

template <typename G, typename T>
constexpr Q8Gemm gemm_of() {
  return {q8_gemm<G, T>, G::G == 0 ? 0 : 256 / G::G};
}

#pragma GCC pop_options
#endif  // JLLAMA_Q8_GEMM


#if !defined(JLLAMA_Q8_GEMM)
// AVX2 (no AVX-512): the 32-block types with a signed code (Q4_0, Q5_0, Q8_0; ggml's vec_dot
// and llamafile's tinyBLAS_Q0_AVX give them the same f32 steps) as a transposed-tile GEMM, the
// same idea as above 8 outputs wide: a tile of 8 weight rows is decoded once into
// codes[block][l][8 rows][4 codes], so one maddubs against 4 broadcast x codes gives, for 8
// outputs at once, the int32 lane l of ggml's per-block dot. Each output's lane l keeps its
// own f32 register lane (acc[l], 8 registers for 8 outputs of one x row), every fma / cvt is
// ggml's per output in ggml's block order, and hsum_float_8 becomes vertical adds in its
// order. What the row kernels (vec_dot.cc) paid per x row and block and this does not: the
// scale d_w * d_x as a scalar product and its broadcast (here one vmulps for 8 outputs) and
// the weight block's unpacking (here once per tile, slab and block of x rows); the integer
// and f32 work per 32 products is the same (maddubs, madd, bias or sign, cvt, fma).
// x rows come in blocks of kLaneMBlock and K in slabs of kLaneSlabK values (the running
// lanes parked between slabs, 8 floats per output lane: the same steps in the same order),
// so that a tile's slab (8 KiB of codes per 1024 values) stays in L1 and a block's x slab in
// L2 while the block's rows pass over it.
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")

constexpr int kLNR = 8;                // weight rows per tile (one int32 / f32 lane each)
constexpr int64_t kLaneSlabK = 2048;   // values per K slab
constexpr int64_t kLaneMBlock = 64;    // x rows per block

// From how many x rows the tiles beat the row kernels (one thread, 2048x2048, CPU time: at 16
// and 32 rows the tile decoding cost more than it saved, at 64 it was 2-4 % faster, at 512
// ~10 %, and on 2048x8192 Q4_0 at 512 rows 1.7x; experiments/results/cpu_kernels.md).
// JLLAMA_Q8_GEMM_MIN_ROWS=N overrides it (0: off), for measurements.
inline int64_t gemm_min_rows(bool k_quant) {
  static const int64_t env_v = [] {
    const char* env = std::getenv("JLLAMA_Q8_GEMM_MIN_ROWS");
    return env ? int64_t(std::atoi(env)) : int64_t(-1);
  }();
  return env_v >= 0 ? env_v : k_quant ? 0 : 64;
}

// The transpose of 8 rows of 8 int32 (v[r][l] -> v[l][r]), in place.
inline void transpose8(__m256i* v) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3
    const __m256i* a = t + 4 * h;
    u[4 * h + 0] = _mm256_unpacklo_epi64(a[0], a[2]);  // lanes 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(a[0], a[2]);  // 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(a[1], a[3]);  // 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(a[1], a[3]);  // 3 | 7
  }
  for (int l = 0; l < 4; ++l) {
    v[l] = _mm256_permute2x128_si256(u[l], u[4 + l], 0x20);
    v[l + 4] = _mm256_permute2x128_si256(u[l], u[4 + l], 0x31);
  }
}

// Q8_0's codes + 128 would overflow maddubs' int16 pairs: it takes the sign form, VNNI or not.
template <typename T>
constexpr bool kLaneSign = T::OFF >= 128;

// A tile's slab, decoded (thread-local, reused): per block 8 code vectors (lane l: 4 codes of
// each of the 8 rows), and for the sign form (Q8_0 without VNNI) their absolute values next.
struct LaneTile {
  std::vector<__m256i> codes;
  std::vector<__m256> dw;
  std::vector<__m256> park;  // [x rows of the block][8]: the lanes between K slabs
};

// Weight rows [n0, n0 + nr), blocks [b0, b1) into t; rows past nr are zero (scale 0).
template <typename T>
void lane_decode(const Q8Call& c, int64_t n0, int nr, int64_t b0, int64_t b1, LaneTile& t) {
  constexpr int V = kLaneSign<T> ? 16 : 8;
  const int64_t nbs = b1 - b0;
  t.codes.resize(size_t(nbs * V));
  t.dw.resize(size_t(nbs));
  const uint8_t* rows[kLNR];
  for (int r = 0; r < kLNR; ++r) rows[r] = c.w + (n0 + std::min(r, nr - 1)) * c.row_bytes;
  for (int64_t bi = b0; bi < b1; ++bi) {
    __m256i v[8];
    alignas(16) uint16_t h[8];
    for (int r = 0; r < kLNR; ++r) {
      const uint8_t* b = rows[r] + bi * T::TS;
      if (r >= nr) {
        v[r] = _mm256_setzero_si256();
        h[r] = 0;
        continue;
      }
      v[r] = kLaneSign<T> ? load256(b + 2) : T::codes(b);
      std::memcpy(&h[r], b, 2);
    }
    transpose8(v);
    __m256i* out = &t.codes[size_t((bi - b0) * V)];
    for (int l = 0; l < 8; ++l) {
      _mm256_store_si256(out + l, v[l]);
      if constexpr (kLaneSign<T>) _mm256_store_si256(out + 8 + l, _mm256_sign_epi8(v[l], v[l]));
    }
    t.dw[size_t(bi - b0)] = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)h));
  }
}

// x rows [m0, m1) against the tile's slab [b0, b1) (the first slab: b0 == 0, the last: b1 ==
// nb), 8 outputs per x row into y at column n0 (nr of them).
template <typename T>
void lane_rows(const Q8Call& c, LaneTile& t, int64_t m0, int64_t m1, int64_t b0, int64_t b1,
               int64_t n0, int nr) {
  constexpr int V = kLaneSign<T> ? 16 : 8;
  const int64_t nb = c.k / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m = m0; m < m1; ++m) {
    const Q8Row& x = c.rows[size_t(m)];
    __m256* park = &t.park[size_t((m - m0) * 8)];
    __m256 acc[8];
    for (int l = 0; l < 8; ++l) acc[l] = b0 == 0 ? _mm256_setzero_ps() : park[l];
    const __m256i* w = t.codes.data();
    const __m256* dw = t.dw.data();
    const int8_t* q = x.q + b0 * 32;
    const int32_t* ax = kLaneSign<T> ? nullptr : x.aux + b0 * 8;
    const float* dx = x.d + b0;
    for (int64_t bi = b0; bi < b1; ++bi, w += V, q += 32, ++dw, ++dx) {
      const __m256 sc = _mm256_mul_ps(*dw, _mm256_broadcast_ss(dx));
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l) {
        int32_t q4;
        std::memcpy(&q4, q + 4 * l, 4);
        const __m256i xb = _mm256_set1_epi32(q4);
        __m256i p;
        if constexpr (!kLaneSign<T>) {  // codes + OFF (< 128), the x side's -OFF * sum of 4
          p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w[l], xb), ones),
                               _mm256_set1_epi32(ax[l]));
        } else {  // ggml's sign trick: |w| times sign(x, w)
          p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[8 + l], _mm256_sign_epi8(xb, w[l])), ones);
        }
        acc[l] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[l]);
      }
      if constexpr (!kLaneSign<T>) ax += 8;
    }
    if (b1 < nb) {
      for (int l = 0; l < 8; ++l) park[l] = acc[l];
      continue;
    }
    // hsum_float_8 per output: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))
    const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[4], acc[0]), _mm256_add_ps(acc[6], acc[2]));
    const __m256 b = _mm256_add_ps(_mm256_add_ps(acc[5], acc[1]), _mm256_add_ps(acc[7], acc[3]));
    const __m256 r = _mm256_add_ps(a, b);
    float* y = c.y + m * c.n_out + n0;
    if (nr == kLNR) {
      _mm256_storeu_ps(y, r);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, r);
      for (int i = 0; i < nr; ++i) y[i] = tmp[i];
    }
  }
}

// All x rows against weight rows [n0, n1): blocks of x rows, K slabs, tiles of 8 rows.
template <typename T>
void lane_gemm(const Q8Call& c, int64_t n0, int64_t n1) {
  static thread_local LaneTile tile;
  const int64_t nb = c.k / 32, sb = kLaneSlabK / 32;
  tile.park.resize(size_t(kLaneMBlock * 8));
  for (int64_t mb = 0; mb < c.m_total; mb += kLaneMBlock) {
    const int64_t me = std::min(c.m_total, mb + kLaneMBlock);
    for (int64_t t0 = n0; t0 < n1; t0 += kLNR) {
      const int nr = int(std::min<int64_t>(kLNR, n1 - t0));
      for (int64_t b0 = 0; b0 < nb; b0 += sb) {
        const int64_t b1 = std::min(nb, b0 + sb);
        lane_decode<T>(c, t0, nr, b0, b1, tile);
        lane_rows<T>(c, tile, mb, me, b0, b1, t0, nr);
      }
    }
  }
}

#pragma GCC pop_options
#endif  // !JLLAMA_Q8_GEMM

}  // namespace

Q8Gemm q8_gemm_for(int64_t qtype) {
#if defined(JLLAMA_Q8_GEMM)
  switch (qtype) {
    case kQ4_0: return gemm_of<GLane<Q8W4_0>, Q8W4_0>();
    case kQ4_1: return gemm_of<GLane<Q8W4_1>, Q8W4_1>();
    case kQ5_0: return gemm_of<GLane<Q8W5_0>, Q8W5_0>();
    case kQ5_1: return gemm_of<GLane<Q8W5_1>, Q8W5_1>();
    case kQ8_0: return gemm_of<GLane<Q8W8_0>, Q8W8_0>();
    case kQ4_K: return gemm_of<GKMin<Q8W4_K>, Q8W4_K>();
    case kQ5_K: return gemm_of<GKMin<Q8W5_K>, Q8W5_K>();
    case kQ6_K: return gemm_of<GQ6K, Q8W6_K>();
    default: break;
  }
#else
  switch (qtype) {
    case kQ4_0: return {lane_gemm<Q8W4_0>, 0};
    case kQ5_0: return {lane_gemm<Q8W5_0>, 0};
    case kQ8_0: return {lane_gemm<Q8W8_0>, 0};
    default: break;
  }
#endif
  (void)qtype;
  return {nullptr, 0};
}

bool use_gemm(const Q8Kernel& kern, int64_t m, bool tiled) {
#if defined(JLLAMA_Q8)
  const int64_t lo = gemm_min_rows(kern.tiled);
  if (kern.gemm == nullptr || lo <= 0 || m < lo) return false;
  return !kern.tiled || (m >= kTiledMinRows && tiled);
#else
  (void)kern, (void)m, (void)tiled;
  return false;
#endif
}

}  // namespace jllama

#endif  // JLLAMA_Q8
