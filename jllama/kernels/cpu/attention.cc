// Flash attention for XLA:CPU through the FFI, bit-identical to ggml's CPU
// ``ggml_flash_attn_ext`` (f32 Q, f16 K/V, causal / sliding-window mask, optional softcap).
//
// Why: llama-perplexity and llama-cli run with flash attention on, and a 1-ulp difference in
// any activation crosses a Q8 rounding step somewhere downstream and grows into perplexity
// noise (experiments/results/cpu_kernels.md). So this file redoes ggml's arithmetic step by
// step, in ggml's order, with the same intrinsics (same compiler family, same -march=native;
// ggml's AVX-512 branches, or its AVX2 ones on CPUs without AVX-512, whose differences are
// noted where they arise; the vector parts that differ by branch are attention_simd.h):
//
// * one_chunk (fewer than 64 query rows: decode, short prompts): Q rounded to f16, the score
//   is ggml_vec_dot_f16 (four 16-lane f32 FMA accumulators over 64-element steps, folded 0+2,
//   1+3, 0+1, then _mm512_reduce_add_ps; AVX2: 8 lanes, 32-element steps, ggml's
//   GGML_F32x8_REDUCE), online softmax per key with libm expf, and the output
//   accumulated *in f16*: ggml_vec_scale_f16 / ggml_vec_mad_f16, which with AVX512-FP16 are
//   native half multiplies/FMAs on 128-element steps and a scalar f32 tail (all of D = 64).
// * tiled (64 or more query rows): K tile to f32 (packed once per kv head here), scores as a
//   plain FMA chain over d (what simd_gemm does per element), times scale, per-row tile max,
//   expf(Mold - Mnew) rescale,
//   the tile's softmax sum from ggml_v_expf on 16 lanes (AVX2: 8, and its own expf form)
//   summed as doubles, then VKQ += P V as
//   an FMA chain over the tile's keys, finally VKQ * (1 / S).
// * split-KV (one query row, 512+ keys): one_chunk over n_threads key chunks, then ggml's
//   partial merge. Its result depends on llama.cpp's thread count, hence the attribute.
//
// Per-row results do not depend on how rows are grouped into tiles or threads (ggml's tiles
// only share work, not arithmetic), so work units are (batch, head, row block) claimed by the
// caller and XLA pool helpers (threadpool.h). Built with -ffp-contract=off, unlike the matvec
// files: every FMA below is explicit, where GCC contracts ggml's source (found by testing
// against libggml-cpu.so). The f16 conversions are f16.h's, shared with the matvec kernels.
//
// Built at first use by jllama/kernels/cpu_ffi.py (with the matvec kernels, into one library);
// jllama/kernels/cpu_attention.py calls it.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <immintrin.h>
#include <math.h>

#include "xla/ffi/api/ffi.h"

#include "f16.h"
#include "threadpool.h"
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "actquant.h"  // ggml's Q8_0 / Q8_1 quantizers for Q against a quantized K
#include "blocks.h"    // the V row decoders (ggml's to_float)
#include "q8_dot.h"    // the K dots (ggml's vec_dot, one row)
#endif

namespace ffi = xla::ffi;

// ggml's x86 flash attention differs by SIMD branch (vector width, expf, the f16 dot's
// reduction), so each branch a -march=native build can take is redone: AVX-512 (F + DQ) and
// AVX2; both with F16C and FMA. Other CPUs get no kernel (the XLA attention serves them).
#if defined(__F16C__) && defined(__FMA__) && \
    ((defined(__AVX512F__) && defined(__AVX512DQ__)) || defined(__AVX2__))
#define JLLAMA_FA 1
#endif

#if defined(JLLAMA_FA)

#include "attention_simd.h"  // VF, kW, v_expf, soft_max, dot_f16, scale_f16, mad_f16

namespace jllama {
namespace {

constexpr int kTileQ = 64;   // GGML_FA_TILE_Q: ggml's tiled path needs this many query rows
constexpr int kTileKV = 64;  // GGML_FA_TILE_KV
constexpr int64_t kSplitKV = 512;  // ggml splits the keys of a lone query row from this many
constexpr int64_t kMinThreadedWork = int64_t(1) << 19;  // multiply-adds: below, one thread

// ggml_vec_scale_f32: an elementwise multiply however it is vectorised.
inline void scale_f32(int n, float* y, float v) {
  for (int i = 0; i < n; ++i) y[i] *= v;
}

struct Problem {
  const float* q;      // [B, T, H, DK]
  const uint16_t* k;   // [B, KVH, S, DK], or one layer of [B, L, KVH, S, DK]
  const uint16_t* v;   // [B, KVH, S, DV], likewise
  const int32_t* pos0; // [B]
  float* out;          // [B, T, H, DV]
  int64_t B, T, H, KVH, S, DK, DV, kv_len;
  int64_t KVHB;  // heads from one batch row to the next: KVH, or L * KVH in a stacked cache
  float scale, softcap;
  int64_t window, n_split;
  bool tiled;
  bool bidir;  // llama.cpp with causal_attn off: every query sees the keys up to the last one
  // Segments (a vision encoder's window attention, Qwen2.5-VL's block-diagonal mask): query t
  // of row b sees exactly the keys of its run of equal segment ids, [seg_lo, seg_hi]; empty:
  // the causal / window / bidir mask above.
  std::vector<int64_t> seg_lo, seg_hi;  // [B * T]

  const uint16_t* krow(int64_t b, int64_t h, int64_t j) const {
    return k + ((b * KVHB + h / (H / KVH)) * S + j) * DK;
  }
  const uint16_t* vrow(int64_t b, int64_t h, int64_t j) const {
    return v + ((b * KVHB + h / (H / KVH)) * S + j) * DV;
  }
  const float* qrow(int64_t b, int64_t t, int64_t h) const {
    return q + ((b * T + t) * H + h) * DK;
  }
  float* orow(int64_t b, int64_t t, int64_t h) const { return out + ((b * T + t) * H + h) * DV; }
  // The keys [lo, hi] query t of row b sees: ggml's mask is 0 there, -INF elsewhere
  // (llama.cpp's causal + is_masked_swa, or the segments).
  void keys(int64_t b, int64_t t, int64_t* lo, int64_t* hi) const {
    if (!seg_lo.empty()) {
      *lo = seg_lo[b * T + t], *hi = seg_hi[b * T + t];
      return;
    }
    const int64_t p = pos0[b] + t;
    *lo = window > 0 ? p - window + 1 : 0;
    *hi = bidir ? pos0[b] + T - 1 : p;
  }
  bool visible(int64_t b, int64_t t, int64_t j) const {
    int64_t lo, hi;
    keys(b, t, &lo, &hi);
    return j >= lo && j <= hi;
  }
  // ggml divides scale by the softcap up front, then multiplies tanh by the softcap.
  float kq_scale() const { return softcap != 0.0f ? scale / softcap : scale; }
};

// ggml_compute_forward_flash_attn_ext_f16_one_chunk for one query row over keys [c0, c1).
// Writes M, S and the unnormalised VKQ (f32) when ``partial`` is set, else the output row.
void one_chunk_row(const Problem& P, int64_t b, int64_t t, int64_t h, int64_t c0, int64_t c1,
                   float* partial, std::vector<uint16_t>& buf) {
  const int DK = (int)P.DK, DV = (int)P.DV;
  buf.resize(DK + DV);
  uint16_t* qh = buf.data();
  uint16_t* vkq = buf.data() + DK;
  const float* pq = P.qrow(b, t, h);
  for (int d = 0; d < DK; ++d) qh[d] = f32_to_fp16(pq[d]);
  std::memset(vkq, 0, DV * sizeof(uint16_t));
  const float sc = P.kq_scale();
  float S = 0.0f, M = -INFINITY;
  for (int64_t j = c0; j < c1; ++j) {
    if (!P.visible(b, t, j)) continue;
    float s = dot_f16(DK, P.krow(b, h, j), qh);
    s = s * sc;
    if (P.softcap != 0.0f) s = P.softcap * tanhf(s);
    float ms = 1.0f, vs = 1.0f;
    if (s > M) {
      const float mold = M;
      M = s;
      ms = expf(mold - M);
      scale_f16(DV, vkq, ms);
    } else {
      vs = expf(s - M);
    }
    mad_f16(DV, vkq, P.vrow(b, h, j), vs);
    S = std::fmaf(S, ms, vs);  // ggml's ``S = S*ms + vs``, contracted by GCC
  }
  if (partial != nullptr) {
    partial[0] = M;
    partial[1] = S;
    for (int d = 0; d < DV; ++d) partial[2 + d] = fp16_to_f32(vkq[d]);
    return;
  }
  const float sinv = S == 0.0f ? 0.0f : 1.0f / S;
  float* o = P.orow(b, t, h);
  for (int d = 0; d < DV; ++d) o[d] = fp16_to_f32(vkq[d]) * sinv;
}

// ggml_flash_attn_ext_reduce_partials for one head: chunks merged in order.
void reduce_partials(const Problem& P, int64_t b, int64_t h, const float* parts) {
  const int DV = (int)P.DV;
  const int64_t chunk = (P.kv_len + P.n_split - 1) / P.n_split;
  float* o = P.orow(b, 0, h);
  std::fill(o, o + DV, 0.0f);
  float M = -INFINITY, S = 0.0f;
  for (int64_t c = 0; c < P.n_split; ++c) {
    if (c * chunk >= P.kv_len) continue;
    const float* part = parts + c * (2 + DV);
    const float mc = part[0], sc = part[1];
    if (sc == 0.0f) continue;
    const float mnew = fmaxf(M, mc);
    const float so = expf(M - mnew);
    const float sn = expf(mc - mnew);
    for (int d = 0; d < DV; ++d) o[d] = std::fmaf(o[d], so, part[2 + d] * sn);
    S = std::fmaf(S, so, sc * sn);
    M = mnew;
  }
  if (S != 0.0f) scale_f32(DV, o, 1.0f / S);
}

// simd_gemm for the scores of R query rows against the transposed K tile: each score is an FMA
// chain over d in order, from zero, then times the scale (ggml_vec_scale_f32).
template <int R>
inline void kq_block(const Problem& P, int64_t b, int64_t h, int64_t t, const float* kt,
                     float sc, float* out) {
  constexpr int C = kTileKV / kW;
  const float* pq[R];
  VF acc[R][C];
  for (int i = 0; i < R; ++i) {
    pq[i] = P.qrow(b, t + i, h);
    for (int c = 0; c < C; ++c) acc[i][c] = vzero();
  }
  for (int64_t d = 0; d < P.DK; ++d) {
    for (int c = 0; c < C; ++c) {
      const VF kv = vload(kt + d * kTileKV + kW * c);
      for (int i = 0; i < R; ++i) acc[i][c] = vfmadd(kv, vset1(pq[i][d]), acc[i][c]);
    }
  }
  const VF vs = vset1(sc);
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) vstore(out + i * kTileKV + kW * c, vmul(acc[i][c], vs));
}
// Query rows per kq_block: R * kTileKV / kW accumulators stay in registers.
constexpr int kKqRows = kW == 16 ? 4 : 1;

// simd_gemm for VKQ += P V of R rows: per element an FMA chain over the tile's keys in order,
// every key below n included as in ggml (masked ones with p = 0); the padding keys, p = 0 times
// stale or zero V in ggml, are left out.
template <int R>
inline void pv_block(const float* p, int n, const float* vt, int64_t DV, float* vkq) {
  int64_t d = 0;
  for (; d + 4 * kW <= DV; d += 4 * kW) {
    VF acc[R][4];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 4; ++c) acc[i][c] = vload(vkq + i * DV + d + kW * c);
    for (int j = 0; j < n; ++j) {
      const float* vr = vt + j * DV + d;
      const VF v0 = vload(vr), v1 = vload(vr + kW), v2 = vload(vr + 2 * kW), v3 = vload(vr + 3 * kW);
      for (int i = 0; i < R; ++i) {
        const VF pv = vset1(p[i * kTileKV + j]);
        acc[i][0] = vfmadd(v0, pv, acc[i][0]);
        acc[i][1] = vfmadd(v1, pv, acc[i][1]);
        acc[i][2] = vfmadd(v2, pv, acc[i][2]);
        acc[i][3] = vfmadd(v3, pv, acc[i][3]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 4; ++c) vstore(vkq + i * DV + d + kW * c, acc[i][c]);
  }
  for (; d + kW <= DV; d += kW) {
    for (int i = 0; i < R; ++i) {
      VF a = vload(vkq + i * DV + d);
      for (int j = 0; j < n; ++j) a = vfmadd(vload(vt + j * DV + d), vset1(p[i * kTileKV + j]), a);
      vstore(vkq + i * DV + d, a);
    }
  }
  for (; d < DV; ++d)
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < n; ++j)
        vkq[i * DV + d] = std::fmaf(vt[j * DV + d], p[i * kTileKV + j], vkq[i * DV + d]);
}


// The K and V tiles in f32 as ggml's tiled path packs them, converted once per kv head (not
// once per query tile): K transposed [DK][kTileKV] so the keys are the SIMD lanes, V [kTileKV][DV],
// both zero padded. Layout [B, KVH, n_tiles, tile].
struct KVTiles {
  std::vector<float> k, v;
  int64_t n_tiles = 0;
  const float* kt(const Problem& P, int64_t b, int64_t h, int64_t tile) const {
    return k.data() + (((b * P.KVH + h / (P.H / P.KVH)) * n_tiles) + tile) * P.DK * kTileKV;
  }
  const float* vt(const Problem& P, int64_t b, int64_t h, int64_t tile) const {
    return v.data() + (((b * P.KVH + h / (P.H / P.KVH)) * n_tiles) + tile) * kTileKV * P.DV;
  }
  void pack(const Problem& P, int64_t u) {  // u = (b * KVH + g) * n_tiles + tile
    const int64_t tile = u % n_tiles, bg = u / n_tiles;
    const int64_t b = bg / P.KVH, h = (bg % P.KVH) * (P.H / P.KVH);
    float* kt = k.data() + u * P.DK * kTileKV;
    float* vt = v.data() + u * kTileKV * P.DV;
    const int64_t ic = tile * kTileKV;
    const int n = (int)std::max<int64_t>(0, std::min<int64_t>(kTileKV, P.kv_len - ic));
    std::fill(kt, kt + P.DK * kTileKV, 0.0f);
    std::fill(vt, vt + kTileKV * P.DV, 0.0f);
    for (int j = 0; j < n; ++j) {
      const uint16_t* kr = P.krow(b, h, ic + j);
      for (int64_t d = 0; d < P.DK; ++d) kt[d * kTileKV + j] = fp16_to_f32(kr[d]);
      const uint16_t* vr = P.vrow(b, h, ic + j);
      for (int64_t d = 0; d < P.DV; ++d) vt[j * P.DV + d] = fp16_to_f32(vr[d]);
    }
  }
};

// ggml_compute_forward_flash_attn_ext_tiled for rows [t0, t1) (at most kTileQ) of one head.
struct TileBuf {
  std::vector<float> kq, vkq, m, s;
};

void tiled_rows(const Problem& P, const KVTiles& kv, int64_t b, int64_t h, int64_t t0,
                int64_t t1, TileBuf& w) {
  const int DV = (int)P.DV;
  const int rows = (int)(t1 - t0);
  w.kq.resize(kTileQ * kTileKV);
  w.vkq.assign((size_t)kTileQ * DV, 0.0f);
  w.m.assign(kTileQ, -INFINITY);
  w.s.assign(kTileQ, 0.0f);
  float* kq = w.kq.data();
  const float sc = P.kq_scale();
  for (int64_t ic = 0; ic < P.kv_len; ic += kTileKV) {
    const int n = (int)std::min<int64_t>(kTileKV, P.kv_len - ic);
    bool any = false;
    for (int r = 0; r < rows && !any; ++r)
      for (int j = 0; j < n && !any; ++j) any = P.visible(b, t0 + r, ic + j);
    if (!any) continue;  // ggml skips a tile that is masked for all its rows
    const float* kt = kv.kt(P, b, h, ic / kTileKV);
    const float* vt = kv.vt(P, b, h, ic / kTileKV);
    int r = 0;
    for (; r + kKqRows <= rows; r += kKqRows)
      kq_block<kKqRows>(P, b, h, t0 + r, kt, sc, kq + r * kTileKV);
    for (; r < rows; ++r) kq_block<1>(P, b, h, t0 + r, kt, sc, kq + r * kTileKV);
    for (r = 0; r < rows; ++r) {
      float* kr = kq + r * kTileKV;
      if (P.softcap != 0.0f)
        for (int j = 0; j < kTileKV; ++j) kr[j] = tanhf(kr[j]) * P.softcap;
      // The mask: keys [lo, hi] are visible (causal, sliding window, segment), padding is not.
      int64_t lo, hi;
      P.keys(b, t0 + r, &lo, &hi);
      const int64_t jlo = std::max<int64_t>(0, lo - ic), jhi = std::min<int64_t>(n, hi - ic + 1);
      for (int j = 0; j < kTileKV; ++j)
        if (j < jlo || j >= jhi) kr[j] = -INFINITY;
      // ggml_vec_max_f32: an exact max (a -0/+0 tie changes nothing downstream).
      float tmax = -INFINITY;
      for (int j = 0; j < kTileKV; ++j) tmax = tmax > kr[j] ? tmax : kr[j];
      if (tmax == -INFINITY) {  // ggml zeroes the row: its V products add exact zeros
        std::fill(kr, kr + kTileKV, 0.0f);
        continue;
      }
      const float mold = w.m[r];
      const float mnew = fmaxf(mold, tmax);
      float* vkq = w.vkq.data() + (size_t)r * DV;
      if (mnew > mold) {
        const float ms = expf(mold - mnew);
        scale_f32(DV, vkq, ms);
        w.s[r] *= ms;
      }
      w.m[r] = mnew;
      w.s[r] += soft_max(kTileKV, kr, kr, mnew);
    }
    for (r = 0; r + 2 <= rows; r += 2)
      pv_block<2>(kq + r * kTileKV, n, vt, DV, w.vkq.data() + (size_t)r * DV);
    for (; r < rows; ++r) pv_block<1>(kq + r * kTileKV, n, vt, DV, w.vkq.data() + (size_t)r * DV);
  }
  for (int r = 0; r < rows; ++r) {
    const float sinv = w.s[r] == 0.0f ? 0.0f : 1.0f / w.s[r];
    const float* vkq = w.vkq.data() + (size_t)r * DV;
    float* o = P.orow(b, t0 + r, h);
    for (int d = 0; d < DV; ++d) o[d] = vkq[d] * sinv;
  }
}

// Work units (the chunks of threadpool.h's ChunkJob): first the K/V tile packing, then the
// (batch, head, row block) units.
struct Work final : ChunkJob {
  Problem P;
  int64_t n_units = 0, rows_per_unit = 1, units_per_head = 1;
  std::vector<float> parts;  // split-KV partials [B, H, n_split, 2 + DV]
  KVTiles kv;                // tiled path: packed K/V tiles, filled by the first n_prep units
  int64_t n_prep = 0;
  std::atomic<int64_t> prepped{0};

  void unit(int64_t u, TileBuf& tb, std::vector<uint16_t>& hb) {
    if (u < n_prep) {
      kv.pack(P, u);
      prepped.fetch_add(1, std::memory_order_release);
      return;
    }
    // Every packing unit was claimed before this one, by a thread that is running it.
    while (prepped.load(std::memory_order_acquire) < n_prep) _mm_pause();
    u -= n_prep;
    const int64_t bh = u / units_per_head, k = u % units_per_head;
    const int64_t b = bh / P.H, h = bh % P.H;
    if (P.n_split > 0) {  // split-KV: unit = one key chunk of one head
      const int64_t chunk = (P.kv_len + P.n_split - 1) / P.n_split;
      const int64_t c0 = k * chunk, c1 = std::min(c0 + chunk, P.kv_len);
      float* part = parts.data() + (bh * P.n_split + k) * (2 + P.DV);
      if (c0 < P.kv_len) one_chunk_row(P, b, 0, h, c0, c1, part, hb);
      return;
    }
    const int64_t t0 = k * rows_per_unit, t1 = std::min(P.T, t0 + rows_per_unit);
    if (P.tiled) {
      tiled_rows(P, kv, b, h, t0, t1, tb);
    } else {
      for (int64_t t = t0; t < t1; ++t) one_chunk_row(P, b, t, h, 0, P.kv_len, nullptr, hb);
    }
  }
  void run() override {
    TileBuf tb;
    std::vector<uint16_t> hb;
    for (int64_t u; (u = next.fetch_add(1)) < n_prep + n_units;) {  // n_chunks
      unit(u, tb, hb);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// A cache is [B, KVH, S, row] or, stacked (every layer of a scanned decoder in one buffer),
// [B, L, KVH, S, row], read in place at layer ``layer`` (slicing it in XLA would copy the
// layer's cache every step). Sets L, the layer and the dimension offset; null or the error.
template <typename Dims>
const char* cache_layout(const Dims& qd, const Dims& kd, const Dims& vd, const int32_t* layer,
                         int64_t* L, int64_t* il, size_t* o) {
  const bool stacked = kd.size() == 5;
  if (qd.size() != 4 || kd.size() != vd.size() || (kd.size() != 4 && !stacked))
    return "q must be 4-D, k and v both 4-D or both 5-D";
  *L = stacked ? kd[1] : 1;
  *il = stacked ? (int64_t)layer[0] : 0;
  if (stacked && (vd[1] != *L || *il < 0 || *il >= *L)) return "layer out of range";
  *o = stacked ? 1 : 0;
  return nullptr;
}

ffi::Error FlashAttnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                         ffi::Buffer<ffi::F16> k, ffi::Buffer<ffi::F16> v,
                         ffi::Buffer<ffi::S32> pos0, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> segments, ffi::ResultBuffer<ffi::F32> out,
                         int64_t kv_len, float scale, int64_t window, float softcap,
                         int64_t n_threads, int64_t neq1, int64_t workers, int64_t kv_pad,
                         int64_t bidir) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  int64_t L, il;
  size_t o;
  if (const char* err = cache_layout(qd, kd, vd, layer.typed_data(), &L, &il, &o))
    return ffi::Error::InvalidArgument(err);
  auto w = std::make_shared<Work>();
  Problem& P = w->P;
  P.B = qd[0], P.T = qd[1], P.H = qd[2], P.DK = qd[3];
  P.KVH = kd[1 + o], P.S = kd[2 + o], P.DV = vd[3 + o];
  P.KVHB = L * P.KVH;
  if (kd[0] != P.B || vd[0] != P.B || vd[1 + o] != P.KVH || vd[2 + o] != P.S ||
      kd[3 + o] != P.DK)
    return ffi::Error::InvalidArgument("k/v shapes do not match q");
  if (P.KVH <= 0 || P.H % P.KVH != 0) return ffi::Error::InvalidArgument("H % KVH != 0");
  if (kv_len < 0 || kv_len > P.S) return ffi::Error::InvalidArgument("kv_len out of range");
  if ((int64_t)pos0.element_count() != P.B) return ffi::Error::InvalidArgument("pos0 must be [B]");
  P.q = q.typed_data();
  P.k = reinterpret_cast<const uint16_t*>(k.typed_data()) + il * P.KVH * P.S * P.DK;
  P.v = reinterpret_cast<const uint16_t*>(v.typed_data()) + il * P.KVH * P.S * P.DV;
  P.pos0 = pos0.typed_data();
  P.out = out->typed_data();
  P.kv_len = kv_len;
  P.scale = scale;
  P.softcap = softcap;
  P.window = window;
  P.bidir = bidir != 0;
  if (segments.element_count() > 0) {
    if ((int64_t)segments.element_count() != P.B * P.T)
      return ffi::Error::InvalidArgument("segments must be [B * T] or empty");
    const int32_t* sg = segments.typed_data();
    P.seg_lo.resize((size_t)(P.B * P.T));
    P.seg_hi.resize((size_t)(P.B * P.T));
    for (int64_t b = 0; b < P.B; ++b) {
      for (int64_t t = 0; t < P.T;) {  // each run of equal ids sees itself (keys = queries)
        int64_t e = t;
        while (e + 1 < P.T && sg[b * P.T + e + 1] == sg[b * P.T + t]) ++e;
        for (int64_t u = t; u <= e; ++u) P.seg_lo[b * P.T + u] = t, P.seg_hi[b * P.T + u] = e;
        t = e + 1;
      }
    }
  }
  const int64_t rows = neq1 > 0 ? neq1 : P.T;  // ggml's neq1 picks the path
  P.tiled = rows >= kTileQ;
  if (kv_pad > 0 && P.B == 1) {
    // llama.cpp's n_kv for this call: the cells in use rounded up to its padding (256), which
    // sets where split-KV decode cuts the keys. Keys past the last position are masked (never
    // read), so this may exceed the static kv_len, though not the cache.
    const int64_t used = (int64_t)P.pos0[0] + P.T;
    const int64_t padded = (used + kv_pad - 1) / kv_pad * kv_pad;
    P.kv_len = std::min<int64_t>(P.S, std::max<int64_t>(kv_pad, padded));
    kv_len = P.kv_len;
  }
  P.n_split = (rows == 1 && P.T == 1 && kv_len >= kSplitKV) ? std::max<int64_t>(1, n_threads) : 0;
  if (P.B * P.T * P.H == 0) return ffi::Error::Success();
  if (P.n_split > 0) {
    w->units_per_head = P.n_split;
    w->parts.assign((size_t)(P.B * P.H * P.n_split * (2 + P.DV)), 0.0f);
  } else {
    // Tiles of 64 rows for the tiled path; for one_chunk, small row blocks balance threads.
    w->rows_per_unit = P.tiled ? kTileQ : std::max<int64_t>(1, std::min<int64_t>(16, P.T / 2));
    w->units_per_head = (P.T + w->rows_per_unit - 1) / w->rows_per_unit;
  }
  w->n_units = P.B * P.H * w->units_per_head;
  if (P.tiled) {  // only the tiles some query can see: keys up to the last query position
    int64_t need = 0;
    for (int64_t b = 0; b < P.B; ++b) need = std::max<int64_t>(need, (int64_t)P.pos0[b] + P.T);
    need = std::max<int64_t>(0, std::min(need, kv_len));
    w->kv.n_tiles = (need + kTileKV - 1) / kTileKV;
    w->n_prep = P.B * P.KVH * w->kv.n_tiles;
    w->kv.k.resize((size_t)(w->n_prep * P.DK * kTileKV));
    w->kv.v.resize((size_t)(w->n_prep * kTileKV * P.DV));
  }
  // A decode step's attention over a short context is little work: handing half of it to a
  // pool thread (futex wake, then the caller waits for its claimed units) cost more than it
  // saved (experiments/results/cpu_kernels.md). Threads do not change the result.
  int64_t visible = 0;
  for (int64_t b = 0; b < P.B; ++b)
    visible = std::max<int64_t>(visible, std::min<int64_t>(kv_len, (int64_t)P.pos0[b] + P.T));
  const bool small = P.B * P.T * P.H * visible * (P.DK + P.DV) < kMinThreadedWork;
  const int64_t want = workers > 0 ? workers : small ? 1 : pool.num_threads() + 1;
  w->n_chunks = w->n_prep + w->n_units;
  const int64_t helpers = std::min<int64_t>({want - 1, (int64_t)pool.num_threads(),
                                             w->n_chunks - 1});
  run_chunks(pool, w, helpers, /*spin=*/false);  // exactly ``helpers`` of XLA's threads
  if (P.n_split > 0) {
    for (int64_t bh = 0; bh < P.B * P.H; ++bh)
      reduce_partials(P, bh / P.H, bh % P.H,
                      w->parts.data() + bh * P.n_split * (2 + P.DV));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jllama

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaFlashAttn, jllama::FlashAttnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kv_len")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("neq1")
                                  .Attr<int64_t>("workers")
                                  .Attr<int64_t>("kv_pad")
                                  .Attr<int64_t>("bidir"));


// ------------------------------------------------------------------ quantized K and/or V
// ggml_compute_forward_flash_attn_ext_f16_one_chunk with a quantized K or V cache (llama.cpp's
// -ctk / -ctv q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1; the other side f16 or quantized). ggml takes
// one_chunk for every row count then (its tiled and split-KV paths need f16/f32 K and V of one
// type), so that is the only order here: per query row, Q converted to K's vec_dot type (f16, or
// ggml's Q8_0 / Q8_1 quantizer), per visible key s = vec_dot(K row, Q) (the int8 kernels' block
// dot for one row), s * scale (softcap: tanh), the online softmax with libm expf, and V
// accumulated as ggml does: an f16 V into an f16 VKQ (scale_f16 / mad_f16), a quantized V
// decoded to f32 (its to_float) into an f32 VKQ (vec_scale_f32 / vec_mad_f32, FMAs), S = S*ms +
// vs contracted, finally VKQ * (1 / S).
#if defined(JLLAMA_Q8)
namespace jllama {
namespace {

constexpr int64_t kF16 = 1;  // ggml's GGML_TYPE_F16

struct QProblem {
  const float* q;      // [B, T, H, DK]
  const uint8_t* k;    // [B, KVH, S, KR] (KR bytes a row), or one layer of [B, L, KVH, S, KR]
  const uint8_t* v;    // likewise, VR bytes a row
  const int32_t* pos0; // [B]
  float* out;          // [B, T, H * DV]
  int64_t B, T, H, KVH, S, DK, DV, KR, VR, KVHB, kv_len, window, k_type, v_type;
  float scale, softcap;
  bool bidir;
  const uint8_t* krow(int64_t b, int64_t h, int64_t j) const {
    return k + ((b * KVHB + h / (H / KVH)) * S + j) * KR;
  }
  const uint8_t* vrow(int64_t b, int64_t h, int64_t j) const {
    return v + ((b * KVHB + h / (H / KVH)) * S + j) * VR;
  }
};

template <typename T, typename = void>
struct Paired : std::false_type {};
template <typename T>
struct Paired<T, std::void_t<decltype(T::kPairs)>> : std::bool_constant<T::kPairs> {};

// vec_dot of one K row against the quantized query, as q8_rows_mc computes one output.
template <typename KT>
float kdot(const uint8_t* row, int64_t nb, const Q8Row& x) {
  Q8Acc st = Q8Acc();
  int64_t bi = 0;
  if constexpr (Paired<KT>::value)
    for (; bi + 2 <= nb; bi += 2) KT::template dot2<1>(row + bi * KT::TS, bi, &x, &st);
  for (; bi < nb; ++bi) KT::template dot<1, false>(row + bi * KT::TS, bi, &x, &st);
  return KT::template finish<false>(st);
}

template <typename VT>
void decode_row(const uint8_t* r, float* out, int64_t n) {
  for (int64_t i = 0; i < n / VT::BS; ++i) VT::decode(r + i * VT::TS, out + i * VT::BS);
}
using DecodeFn = void (*)(const uint8_t*, float*, int64_t);

DecodeFn v_decoder(int64_t t) {
  switch (t) {
    case kQ8_0: return decode_row<Q8_0>;
    case kQ4_0: return decode_row<Q4_0>;
    case kQ4_1: return decode_row<Q4_1>;
    case kQ5_0: return decode_row<Q5_0>;
    case kQ5_1: return decode_row<Q5_1>;
    case kIQ4_NL: return decode_row<IQ4_NL>;
    default: return nullptr;
  }
}

// One query row. KT: a q8_dot.h type, or void for an f16 K (ggml_vec_dot_f16, Q in f16).
template <typename KT>
void qkv_row(const QProblem& P, int64_t b, int64_t t, int64_t h, DecodeFn vdec) {
  const int DK = (int)P.DK, DV = (int)P.DV;
  const float* pq = P.q + ((b * P.T + t) * P.H + h) * P.DK;
  std::vector<uint16_t> qh, vkq16;
  std::vector<int8_t> qq;
  std::vector<float> qd, qs, vkq, v32;
  std::vector<int32_t> aux;
  Q8Row x{};
  if constexpr (std::is_void_v<KT>) {
    qh.resize(DK);
    for (int d = 0; d < DK; ++d) qh[d] = f32_to_fp16(pq[d]);
  } else {
    qq.resize(DK), qd.resize(DK / 32), qs.resize(DK / 32);
    constexpr bool q8_1 = std::is_same_v<KT, Q8W4_1> || std::is_same_v<KT, Q8W5_1>;
    quantize_row_q8(pq, DK, q8_1 ? kFmtQ8_1 : kFmtQ8_0, qq.data(), qd.data(), qs.data());
    if constexpr (KT::kBias) {  // the dpbusd start values: -OFF * (each 4 codes' sum)
      aux.resize(DK / 4);
      for (int i = 0; i < DK / 4; ++i)
        aux[i] = -KT::OFF * (qq[4 * i] + qq[4 * i + 1] + qq[4 * i + 2] + qq[4 * i + 3]);
    }
    x.q = qq.data(), x.d = qd.data(), x.s = qs.data(), x.aux = aux.data();
  }
  const bool vf16 = P.v_type == kF16;
  if (vf16) vkq16.assign(DV, 0);
  else vkq.assign(DV, 0.0f), v32.resize(DV);
  const float sc = P.softcap != 0.0f ? P.scale / P.softcap : P.scale;
  const int64_t p = P.pos0[b] + t;
  const int64_t lo = P.window > 0 ? p - P.window + 1 : 0;
  const int64_t hi = std::min<int64_t>(P.bidir ? P.pos0[b] + P.T - 1 : p, P.kv_len - 1);
  float S = 0.0f, M = -INFINITY;
  for (int64_t j = std::max<int64_t>(lo, 0); j <= hi; ++j) {
    float s;
    if constexpr (std::is_void_v<KT>) {
      s = dot_f16(DK, reinterpret_cast<const uint16_t*>(P.krow(b, h, j)), qh.data());
    } else {
      s = kdot<KT>(P.krow(b, h, j), DK / KT::BS, x);
    }
    s = s * sc;
    if (P.softcap != 0.0f) s = P.softcap * tanhf(s);
    float ms = 1.0f, vs = 1.0f;
    if (s > M) {
      const float mold = M;
      M = s;
      ms = expf(mold - M);
      if (vf16) scale_f16(DV, vkq16.data(), ms);
      else scale_f32(DV, vkq.data(), ms);
    } else {
      vs = expf(s - M);
    }
    if (vf16) {
      mad_f16(DV, vkq16.data(), reinterpret_cast<const uint16_t*>(P.vrow(b, h, j)), vs);
    } else {
      vdec(P.vrow(b, h, j), v32.data(), DV);
      for (int d = 0; d < DV; ++d) vkq[d] = std::fmaf(v32[d], vs, vkq[d]);  // ggml_vec_mad_f32
    }
    S = std::fmaf(S, ms, vs);
  }
  const float sinv = S == 0.0f ? 0.0f : 1.0f / S;
  float* o = P.out + ((b * P.T + t) * P.H + h) * P.DV;
  for (int d = 0; d < DV; ++d) o[d] = (vf16 ? fp16_to_f32(vkq16[d]) : vkq[d]) * sinv;
}

using RowFn = void (*)(const QProblem&, int64_t, int64_t, int64_t, DecodeFn);

RowFn k_row_fn(int64_t t) {
  switch (t) {
    case kF16: return qkv_row<void>;
    case kQ8_0: return qkv_row<Q8W8_0>;
    case kQ4_0: return qkv_row<Q8W4_0>;
    case kQ4_1: return qkv_row<Q8W4_1>;
    case kQ5_0: return qkv_row<Q8W5_0>;
    case kQ5_1: return qkv_row<Q8W5_1>;
    case kIQ4_NL: return qkv_row<Q8WIQ4_NL1>;
    default: return nullptr;
  }
}

struct QWork final : ChunkJob {
  QProblem P{};
  RowFn row = nullptr;
  DecodeFn vdec = nullptr;
  int64_t rows_per_chunk = 1;
  void run() override {
    const int64_t rows = P.B * P.T * P.H;
    for (int64_t c; (c = next.fetch_add(1)) < n_chunks;) {
      for (int64_t r = c * rows_per_chunk; r < std::min(rows, (c + 1) * rows_per_chunk); ++r)
        row(P, r / (P.T * P.H), r / P.H % P.T, r % P.H, vdec);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error FlashAttnQImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::U8> k, ffi::Buffer<ffi::U8> v,
                          ffi::Buffer<ffi::S32> pos0, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> out, int64_t kv_len, float scale,
                          int64_t window, float softcap, int64_t bidir, int64_t k_type,
                          int64_t v_type, int64_t dv) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  int64_t L, il;
  size_t o;
  if (const char* err = cache_layout(qd, kd, vd, layer.typed_data(), &L, &il, &o))
    return ffi::Error::InvalidArgument(err);
  auto w = std::make_shared<QWork>();
  QProblem& P = w->P;
  P.B = qd[0], P.T = qd[1], P.H = qd[2], P.DK = qd[3], P.DV = dv;
  P.KVH = kd[1 + o], P.S = kd[2 + o], P.KR = kd[3 + o], P.VR = vd[3 + o];
  P.KVHB = L * P.KVH;
  const RowFn row = k_row_fn(k_type);
  const DecodeFn vdec = v_type == kF16 ? nullptr : v_decoder(v_type);
  if (row == nullptr || (v_type != kF16 && vdec == nullptr))
    return ffi::Error::InvalidArgument("unsupported K or V cache type");
  if (kd[0] != P.B || vd[0] != P.B || vd[1 + o] != P.KVH || vd[2 + o] != P.S)
    return ffi::Error::InvalidArgument("k/v shapes do not match q");
  if (P.KVH <= 0 || P.H % P.KVH != 0) return ffi::Error::InvalidArgument("H % KVH != 0");
  if (P.DK % 32 != 0 || P.DV % 32 != 0) return ffi::Error::InvalidArgument("head dims % 32");
  if (kv_len < 0 || kv_len > P.S) return ffi::Error::InvalidArgument("kv_len out of range");
  if ((int64_t)pos0.element_count() != P.B) return ffi::Error::InvalidArgument("pos0 must be [B]");
  P.q = q.typed_data();
  P.k = k.typed_data() + il * P.KVH * P.S * P.KR;
  P.v = v.typed_data() + il * P.KVH * P.S * P.VR;
  P.pos0 = pos0.typed_data();
  P.out = out->typed_data();
  P.kv_len = kv_len, P.scale = scale, P.softcap = softcap, P.window = window;
  P.bidir = bidir != 0, P.k_type = k_type, P.v_type = v_type;
  // Rows are independent (each its own online softmax), so threads never change the result;
  // a short decode step stays on the caller's thread (waking a helper cost more, as for f16)
  w->row = row, w->vdec = vdec;
  const int64_t rows = P.B * P.T * P.H;
  if (rows == 0) return ffi::Error::Success();
  w->rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>(16, rows / 8));
  w->n_chunks = (rows + w->rows_per_chunk - 1) / w->rows_per_chunk;
  int64_t visible = 0;
  for (int64_t b = 0; b < P.B; ++b)
    visible = std::max<int64_t>(visible, std::min<int64_t>(kv_len, (int64_t)P.pos0[b] + P.T));
  const bool small = rows * visible * (P.DK + P.DV) < kMinThreadedWork;
  const int64_t helpers = small ? 0 : std::min<int64_t>((int64_t)pool.num_threads(),
                                                         w->n_chunks - 1);
  run_chunks(pool, w, helpers, /*spin=*/false);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jllama

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaFlashAttnQ, jllama::FlashAttnQImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kv_len")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("bidir")
                                  .Attr<int64_t>("k_type")
                                  .Attr<int64_t>("v_type")
                                  .Attr<int64_t>("dv"));
#endif  // JLLAMA_Q8

#endif  // JLLAMA_FA
