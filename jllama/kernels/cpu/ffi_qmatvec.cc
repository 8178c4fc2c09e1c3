// The matvec kernels' XLA FFI handlers: argument checks, work lists, threads.
//
//   JllamaQMatVec / JllamaQMatVecXs  f32 x against GGUF rows (vec_dot.cc); Xs: with the
//                                    caller's per-32 sums of x for the weight mins
//   JllamaDequant                    f32 rows of a weight tile (blocks.h)
//   JllamaCosSin                     the C library's cosf/sinf (ggml's rope cache)
//   JllamaQuantizeQ8                 ggml's activation quantizer (actquant.cc)
//   JllamaQMatVecQ8                  quantized x (q, d, s) against any number of weights
//   JllamaQMatVecQ8F                 f32 x quantized inside the call, any number of weights
//   JllamaQMatMulId                  ggml's mul_mat_id: x rows routed to stacked experts
//
// The int8 handlers (q8.h) exist where the build machine has AVX2 + FMA + F16C.
// They take ``tiled`` (ggml's GGML_CPU_TILED_MM, Numerics.ggml_tiled_mm) as an attribute,
// since it changes results. Built at first use by jllama/kernels/cpu_ffi.py.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

#include "actquant.h"
#include "blocks.h"
#include "q8.h"
#include "threadpool.h"
#include "vec_dot.h"

namespace ffi = xla::ffi;

namespace jllama {
namespace {

struct Work : ChunkJob {
  RowsFn fn;
  const float* x;
  const float* xsum;
  int64_t k, row_bytes, n_out, m_total, chunk_rows;
  const uint8_t* w;
  float* y;
  std::vector<float> xsum_store;

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
  run_chunks(pool, work, helpers_for(pool, work->n_chunks));
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

// f32 rows of a weight tile, for the GEMM path (the dot itself stays with XLA's Eigen GEMM).
// Single-threaded: it runs inside a scan next to a multi-threaded dot, which costs far more.
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

#if defined(JLLAMA_Q8)
// One weight's GGUF rows as a call reads them: a 2-D buffer, or one expert of a 3-D one.
struct WView {
  const uint8_t* data;
  int64_t n;          // rows (outputs)
  int64_t row_bytes;  // bytes per row
  int64_t n_expert = 0;  // > 0: all experts of a stack [n_expert, n, row_bytes] (mul_mat_id)
};

// Shared state of one q8 call over one or more weights that share the activations (q/k/v,
// gate/up): their row chunks form one work list, so a decode step makes one kernel call (one
// thread hand-off) per group instead of one per weight. Threading as in Work (threadpool.h).
struct Q8Sub {
  Q8Call call;
  Q8Kernel kern;
  bool gemm = false;
  std::vector<int32_t> aux;
  std::vector<int16_t> pairs;
  std::vector<int8_t> xpad;  // x codes at a padded row stride (q8_prepare)
};

struct Q8Work : ChunkJob {
  std::vector<Q8Sub> subs;
  std::vector<int8_t> xq;  // activations quantized by the fused call (q8f), else unused
  std::vector<float> xd, xs;
  std::vector<std::array<int64_t, 3>> chunks;  // (sub, n0, n1)
  std::vector<Q8Sub> masters;  // mul_mat_id: each weight's x side data, all rows

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

// The sums of each g (4, 16 or 32) consecutive codes of q[n] (n a multiple of 32), times mul,
// into out (int32 or int16). Vectorised: the scalar loops cost ~20-60 us on a 64-row prompt
// call, before any thread starts.
template <typename O>
void code_sums(const int8_t* q, int64_t n, int g, int32_t mul, O* out) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256i vmul = _mm256_set1_epi32(mul);
  for (int64_t i = 0; i < n; i += 32) {
    // 8 sums of 4 codes, in order (maddubs: 1 * q in pairs, no saturation)
    const __m256i s4 = _mm256_madd_epi16(
        _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i*)(q + i))), ones16);
    if (g == 4) {
      const __m256i v = _mm256_mullo_epi32(s4, vmul);
      if constexpr (sizeof(O) == 4) {
        _mm256_storeu_si256((__m256i*)(out + i / 4), v);
      } else {
        alignas(32) int32_t t[8];
        _mm256_store_si256((__m256i*)t, v);
        for (int j = 0; j < 8; ++j) out[i / 4 + j] = O(t[j]);
      }
      continue;
    }
    const __m128i h = _mm_hadd_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    const __m128i s16 = _mm_hadd_epi32(h, h);  // [sum of codes 0-15, 16-31, ...]
    const int32_t a = _mm_cvtsi128_si32(s16) * mul, b = _mm_extract_epi32(s16, 1) * mul;
    if (g == 16) {
      out[i / 16] = O(a);
      out[i / 16 + 1] = O(b);
    } else {
      out[i / 32] = O(a + b);
    }
  }
}

// Validates one weight against the activations and fills its sub-call; "" when fine. The
// per-row integer side data depends on x and the kernel's kind only, so a weight that follows
// one of the same kind (q/k/v, gate/up) shares its predecessor's instead of summing x again.
const char* q8_prepare(Q8Sub& sub, const Q8In& x, const WView& w, float* y,
                       int64_t qtype, bool tiled, const Q8Sub* prev, bool allow_gemm = true) {
  if (x.q == nullptr || w.data == nullptr) return "need 2-D q, d, s and w";
  const Q8Kernel kern = pick_q8(qtype);
  if (kern.fn == nullptr) return "unsupported ggml type for q8";
  const int64_t m = x.m, k = x.k, n = w.n;
  if (k % kern.bs != 0) return "n_in not a block multiple";
  const int64_t nxb = k / kern.xb;
  if (x.d_rows != m || x.d_cols != nxb) return "d must be [m, k / block]";
  if (kern.q8_1 && (x.s_rows != m || x.s_cols != nxb)) return "s must be [m, k / 32] for Q8_1";
  sub.kern = kern;
  sub.gemm = allow_gemm && use_gemm(kern, m, tiled);
  Q8Call& c = sub.call;
  c.k = k;
  c.n_out = n;
  c.m_total = m;
  c.row_bytes = w.row_bytes;
  c.w = w.data;
  c.y = y;
  c.tiled = tiled;
  const int8_t* qp = x.q;
  c.rows.resize(size_t(m));
  if (prev != nullptr && prev->gemm == sub.gemm && prev->kern.bias == kern.bias &&
      prev->kern.off == kern.off && prev->kern.bsums == kern.bsums &&
      prev->kern.pair_group == kern.pair_group && prev->kern.q8_1 == kern.q8_1 &&
      prev->kern.xb == kern.xb) {
    c.rows = prev->call.rows;  // the same x pointers and side data
    c.x_serial = prev->call.x_serial;
    return "";
  }
  static std::atomic<uint64_t> x_serials{0};
  c.x_serial = ++x_serials;
  // Per-row integer side data: bias (-OFF * sum of 4 codes) or 16-element sums (the row
  // kernels' K-quant mins), and for the K-quant GEMM the group sums as int16 instead.
  const bool k_gemm = sub.gemm && kern.pair_group != 0;
  const int64_t per = kern.bias ? k / 4 : kern.bsums && !k_gemm ? k / 16 : 0;
  sub.aux.resize(size_t(m * per));
  if (per > 0) code_sums(qp, m * k, kern.bias ? 4 : 16, kern.bias ? -kern.off : 1, sub.aux.data());
  // The row kernels with bsums get them as int16 too (Q2_K/Q6_K/ternary madd them directly).
  const int pg = k_gemm ? kern.pair_group : kern.bsums && !sub.gemm ? 16 : 0;
  const int64_t np = pg ? k / pg : 0;
  sub.pairs.resize(size_t(m * np));
  if (np > 0) code_sums(qp, m * k, pg, 1, sub.pairs.data());  // |sum| <= 32 * 127: an int16
  // x rows a multiple of 4 KiB apart (k = 4096, 8192, ...) put a pass's 8 rows in the same L1
  // sets (their addresses agree in bits 6-11): a copy 64 bytes apart per row. (64-row Q4_K
  // products with k = 7936 or 8448 took ~10 % less time per MAC than with k = 8192 unpadded:
  // experiments/results/cpu_kernels.md.)
  int64_t stride = k;
  if (!sub.gemm && m >= kTiledMinRows && k % 4096 == 0) {
    stride = k + 64;
    sub.xpad.resize(size_t(m * stride));
    for (int64_t r = 0; r < m; ++r) std::memcpy(sub.xpad.data() + r * stride, qp + r * k, size_t(k));
    qp = sub.xpad.data();
  }
  for (int64_t r = 0; r < m; ++r)
    c.rows[size_t(r)] = {qp + r * stride, x.d + r * nxb, kern.q8_1 ? x.s + r * nxb : nullptr,
                         sub.aux.data() + r * per, sub.pairs.data() + r * np};
  return "";
}

ffi::Error q8_launch(ffi::ThreadPool& pool, const std::shared_ptr<Q8Work>& work, const Q8In& x,
                     const WView* ws, float* const* ys, const int64_t* qtypes,
                     int nw, bool tiled) {
  work->subs.resize(size_t(nw));
  for (int i = 0; i < nw; ++i) {
    const char* err = q8_prepare(work->subs[size_t(i)], x, ws[i], ys[i], qtypes[i], tiled,
                                 i > 0 ? &work->subs[size_t(i - 1)] : nullptr);
    if (*err) return ffi::Error::InvalidArgument(err);
    const Q8Call& c = work->subs[size_t(i)].call;
    // Row kernels: ~64 KiB of weights per chunk and pass over 8 x rows, so that a prompt's
    // chunks stay as short as a decode step's (a 64-row call of a 256-row weight was 3 chunks,
    // which 2 threads split 2:1) and each chunk's weights stay in L1/L2 across its passes;
    // the GEMM: one tile of weight rows (times all x rows: plenty of work per claim).
    // In the tiled order the row kernels pass over one K slab at a time (vec_dot.cc
    // q8_rows_slabs): what stays in cache across passes is the chunk's slab of each row.
    // (the row kernels take x rows in blocks of kTiledMBlock: a chunk's weights are re-read
    // per block, so they are sized against one block's passes)
    const int64_t passes = (std::min(x.m, kTiledMBlock) + 7) / 8;
    const Q8Sub& sub = work->subs[size_t(i)];
    const bool slabs = !sub.gemm && sub.kern.tiled && tiled && x.m >= kTiledMinRows &&
                       (c.k > kTiledSlabK || x.m > kTiledMBlock);
    const int64_t pass_bytes =
        slabs ? c.row_bytes * std::min(c.k, kTiledSlabK) / c.k : c.row_bytes;
    // There every chunk reads all of x once per slab (64 rows of 8192: 512 KiB, more than L2;
    // 512 rows of 2048: 1 MiB, in blocks of 64 rows), so its chunks are longer: up to 256 KiB
    // of slab weights (64-row Q2_K/Q3_K/Q4_K 2048x8192: 2-15 % less time than 64 KiB), but at
    // least 32 chunks to share between threads.
    const int64_t rows =
        sub.gemm ? int64_t(kGemmChunk)
        : slabs  ? std::max<int64_t>(1, std::min((256 << 10) / std::max<int64_t>(1, pass_bytes),
                                                 (c.n_out + 31) / 32))
                 : std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, pass_bytes * passes));
    for (int64_t n0 = 0; n0 < c.n_out; n0 += rows)
      work->chunks.push_back({i, n0, std::min(c.n_out, n0 + rows)});
  }
  work->n_chunks = int64_t(work->chunks.size());
  run_chunks(pool, work, helpers_for(pool, work->n_chunks));
  return ffi::Error::Success();
}

// The weights (RemainingArgs, u8 GGUF rows) and outputs (RemainingRets, f32) of a variadic
// call, one qtype each. With ``layers`` = 0 the arguments are the weights. With ``layers`` >= 1
// (a scanned decoder's loop body, or stacked experts) they are an index (s32 [2]: layer,
// expert) and then, per weight, that weight in each of the ``layers`` layers with a qtype each:
// the call reads the indexed layer's in place, and of a 3-D weight [n_expert, n, row_bytes]
// the indexed expert's rows (a dynamic slice in XLA would copy them every step).
// ``wmeta``: four numbers per weight argument: the byte offset of the weight in its buffer
// (nonzero for GGUF blocks mapped from a file where they start off XLA's 64-byte alignment:
// the buffer then starts that many bytes earlier, flat), experts (0 for a 2-D weight), rows,
// row bytes.
struct Weights {
  std::vector<WView> ws;
  std::vector<float*> ys;
  std::vector<int64_t> qt;
};

ffi::Error weights(ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                   ffi::Span<const int64_t> qtypes, int64_t layers,
                   ffi::Span<const int64_t> wmeta, Weights& out, bool all_experts = false) {
  const size_t nw = rets.size();
  const size_t nl = size_t(std::max<int64_t>(1, layers));
  const size_t first = layers >= 1 ? 1 : 0;
  if (nw == 0 || args.size() != first + nw * nl || qtypes.size() != nw * nl)
    return ffi::Error::InvalidArgument("need one output per weight, one qtype per weight/layer");
  if (wmeta.size() != 4 * nw * nl)
    return ffi::Error::InvalidArgument("need four wmeta numbers per weight/layer");
  size_t il = 0;
  int64_t ie = -1;
  if (first) {
    auto idx = args.get<ffi::Buffer<ffi::S32>>(0);
    if (idx.has_error() || idx->element_count() != 2)
      return ffi::Error::InvalidArgument("bad layer index");
    const int32_t v = idx->typed_data()[0];
    if (v < 0 || size_t(v) >= nl) return ffi::Error::InvalidArgument("layer out of range");
    il = size_t(v);
    ie = idx->typed_data()[1];
  }
  for (size_t i = 0; i < nw; ++i) {
    const size_t j = i * nl + il;
    auto w = args.get<ffi::Buffer<ffi::U8>>(first + j);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error() || y.has_error()) return ffi::Error::InvalidArgument("bad weight or output");
    const int64_t off = wmeta[4 * j], ne = wmeta[4 * j + 1], n = wmeta[4 * j + 2],
                  rb = wmeta[4 * j + 3];
    if (off < 0 || ne < 0 || n < 0 || rb <= 0 ||
        int64_t(w->element_count()) != off + std::max<int64_t>(ne, 1) * n * rb)
      return ffi::Error::InvalidArgument("weight buffer size does not match its wmeta");
    const uint8_t* base = w->typed_data() + off;
    WView v{};
    if (ne == 0 && !all_experts) {
      v = {base, n, rb};
    } else if (ne > 0 && all_experts) {
      v = {base, n, rb, ne};
    } else if (ne > 0 && first) {
      if (ie < 0 || ie >= ne) return ffi::Error::InvalidArgument("expert out of range");
      v = {base + ie * n * rb, n, rb};
    } else {
      return ffi::Error::InvalidArgument("weights must be 2-D, or 3-D with an expert index");
    }
    out.ws.push_back(v);
    out.ys.push_back((*y)->typed_data());
    out.qt.push_back(qtypes[j]);
  }
  return ffi::Error::Success();
}

// x as int8 codes q [m, k], scales d [m, k / block], Q8_1 sums s [m, k / 32] (else [m, 0]),
// then any number of weights sharing that activation format and as many outputs.
ffi::Error QMatVecQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> d,
                         ffi::Buffer<ffi::F32> s, ffi::RemainingArgs args,
                         ffi::RemainingRets rets, ffi::Span<const int64_t> qtypes, bool tiled,
                         int64_t layers, ffi::Span<const int64_t> wmeta) {
  Weights wts;
  if (ffi::Error err = weights(args, rets, qtypes, layers, wmeta, wts); err.failure()) return err;
  return q8_launch(pool, std::make_shared<Q8Work>(), q8_in(q, d, s), wts.ws.data(),
                   wts.ys.data(), wts.qt.data(), int(wts.ws.size()), tiled);
}

ffi::Error QuantizeQ8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::S8> q, ffi::ResultBuffer<ffi::F32> d,
                          ffi::ResultBuffer<ffi::F32> s, int64_t fmt) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const int64_t m = xd[0], k = xd[1], bs = fmt == kFmtQ8_K ? 256 : 32;
  if (fmt < 0 || fmt > 2 || k % bs != 0) return ffi::Error::InvalidArgument("bad format or k");
  const int64_t nb = k / bs, ns = fmt == kFmtQ8_1 ? k / 32 : 0;
  if ((int64_t)d->element_count() != m * nb || (int64_t)s->element_count() != m * ns)
    return ffi::Error::InvalidArgument("bad output sizes");
  quantize_rows_q8(pool, x.typed_data(), m, k, int(fmt), q->typed_data(), d->typed_data(),
                   s->typed_data());
  return ffi::Error::Success();
}

// f32 x [m, k] in the activation format all of ``qtypes`` share (ggml's vec_dot type), into
// ``work``'s buffers; ``pool``: split over threads (prompts), null: one row after another on
// the calling thread (decode: a few rows, no hand-off). The same quantize_row_q8, same bits.
ffi::Error quantize_x(ffi::ThreadPool* pool, const float* x, int64_t m, int64_t k,
                      const int64_t* qtypes, int nw, Q8Work& work, Q8In& in) {
  const Q8Kernel k0 = pick_q8(qtypes[0]);
  if (k0.fn == nullptr) return ffi::Error::InvalidArgument("unsupported ggml type for q8");
  for (int i = 1; i < nw; ++i) {
    const Q8Kernel ki = pick_q8(qtypes[i]);
    if (ki.fn == nullptr || ki.q8_1 != k0.q8_1 || ki.xb != k0.xb)
      return ffi::Error::InvalidArgument("weights of one call must share the activation format");
  }
  const int fmt = k0.q8_1 ? kFmtQ8_1 : k0.xb == 256 ? kFmtQ8_K : kFmtQ8_0;
  const int64_t bs = fmt == kFmtQ8_K ? 256 : 32;
  if (k % bs != 0) return ffi::Error::InvalidArgument("n_in not a block multiple");
  const int64_t nb = k / bs, ns = fmt == kFmtQ8_1 ? k / 32 : 0;
  work.xq.resize(size_t(m * k));
  work.xd.resize(size_t(m * nb));
  work.xs.resize(size_t(m * ns));
  if (pool != nullptr) {
    quantize_rows_q8(*pool, x, m, k, fmt, work.xq.data(), work.xd.data(), work.xs.data());
  } else {
    for (int64_t r = 0; r < m; ++r)
      quantize_row_q8(x + r * k, k, fmt, work.xq.data() + r * k, work.xd.data() + r * nb,
                      work.xs.data() + r * ns);
  }
  in = {work.xq.data(), work.xd.data(), work.xs.data(), m, k, m, nb, m, ns};
  return ffi::Error::Success();
}

// Decode: quantization and product in one call (f32 x in), one thunk and one set of XLA
// buffers fewer per weight group.
ffi::Error QMatVecQ8FImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, ffi::Span<const int64_t> qtypes_all, bool tiled,
                          int64_t layers, ffi::Span<const int64_t> wmeta) {
  Weights wts;
  if (ffi::Error err = weights(args, rets, qtypes_all, layers, wmeta, wts); err.failure()) return err;
  const int64_t* qtypes = wts.qt.data();
  const int nw = int(wts.ws.size());
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  auto work = std::make_shared<Q8Work>();
  Q8In in{};
  if (ffi::Error err = quantize_x(nullptr, x.typed_data(), xd[0], xd[1], qtypes, nw, *work, in);
      err.failure())
    return err;
  return q8_launch(pool, work, in, wts.ws.data(), wts.ys.data(), qtypes, nw, tiled);
}

// ggml's mul_mat_id (ggml_compute_forward_mul_mat_id) for the routed experts of a prompt: the
// x rows routed to each expert of stacked weights [n_expert, n, row_bytes] against that
// expert's rows, read in place, all experts and weights in one work list (one thread hand-off
// per weight group and layer, instead of a scan of per-expert tiles with one call each).
// x [m, k] f32 is quantized once (a token's row serves all k of its experts); ``rows`` [P]
// names the x row of each output row, grouped by expert as ``counts`` [n_expert] says (their
// sum is P); one output [P, n] per weight. Each expert's products in the order mul_mat_id
// gives them: its tiled order for an expert with kTiledMinRows rows or more where ``tiled``
// (ggml_compute_forward_mul_mat_id_tiled decides per expert), else vec_dot's (never
// llamafile's, which mul_mat takes for IQ4_NL from two rows).
// RemainingArgs: the 3-D weights (``layers`` 0), or the index (s32 [2]: layer, unused) and
// each weight in every layer, as ``weights``.
ffi::Error QMatMulIdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> rows,
                         ffi::Buffer<ffi::S32> counts, ffi::RemainingArgs args,
                         ffi::RemainingRets rets, ffi::Span<const int64_t> qtypes_all,
                         bool tiled, int64_t layers, ffi::Span<const int64_t> wmeta) {
  Weights wts;
  if (ffi::Error err = weights(args, rets, qtypes_all, layers, wmeta, wts, /*all_experts=*/true);
      err.failure())
    return err;
  const size_t nw = wts.ws.size();
  const std::vector<WView>& ws = wts.ws;
  const int64_t* qts = wts.qt.data();
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const int64_t m = xd[0], n_rows = int64_t(rows.element_count());
  const int64_t n_exp = int64_t(counts.element_count());
  const int32_t* rp = rows.typed_data();
  const int32_t* cp = counts.typed_data();
  int64_t total = 0;
  for (int64_t e = 0; e < n_exp; ++e) {
    if (cp[e] < 0) return ffi::Error::InvalidArgument("negative expert row count");
    total += cp[e];
  }
  if (total != n_rows) return ffi::Error::InvalidArgument("expert row counts must sum to rows");
  for (int64_t r = 0; r < n_rows; ++r)
    if (rp[r] < 0 || rp[r] >= m) return ffi::Error::InvalidArgument("x row out of range");
  for (size_t i = 0; i < nw; ++i) {
    if (ws[i].n_expert != n_exp)
      return ffi::Error::InvalidArgument("weights must be [n_expert, n, row_bytes]");
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (int64_t((*y)->element_count()) != n_rows * ws[i].n)
      return ffi::Error::InvalidArgument("outputs must be [rows, n]");
  }
  auto work = std::make_shared<Q8Work>();
  Q8In in{};
  if (ffi::Error err = quantize_x(&pool, x.typed_data(), m, xd[1], qts, int(nw), *work, in);
      err.failure())
    return err;
  if (n_rows == 0) return ffi::Error::Success();
  const int64_t k = xd[1];
  const std::vector<float*>& ys = wts.ys;
  // Per weight, the side data of all m x rows once (``masters``); each expert's sub-call then
  // points at its rows' entries.
  auto& masters = work->masters;
  masters.resize(nw);
  for (size_t i = 0; i < nw; ++i) {
    const char* err = q8_prepare(masters[i], in, ws[i], nullptr, qts[i], tiled,
                                 i > 0 ? &masters[i - 1] : nullptr, /*allow_gemm=*/false);
    if (*err) return ffi::Error::InvalidArgument(err);
  }
  for (size_t i = 0; i < nw; ++i) {
    const Q8Call& mc = masters[i].call;
    int64_t start = 0;
    for (int64_t e = 0; e < n_exp; start += cp[e], ++e) {
      if (cp[e] == 0) continue;
      Q8Sub sub;
      sub.kern = masters[i].kern;
      Q8Call& c = sub.call;
      c.k = k;
      c.n_out = ws[i].n;
      c.m_total = cp[e];
      c.row_bytes = ws[i].row_bytes;
      c.w = ws[i].data + e * ws[i].n * ws[i].row_bytes;
      c.y = ys[i] + start * ws[i].n;
      c.tiled = tiled;
      c.id = true;
      c.rows.resize(size_t(cp[e]));
      for (int64_t r = 0; r < cp[e]; ++r) c.rows[size_t(r)] = mc.rows[size_t(rp[start + r])];
      const int64_t passes = (std::min(c.m_total, kTiledMBlock) + 7) / 8;  // as q8_launch
      const int64_t chunk =
          std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, c.row_bytes * passes));
      const int64_t si = int64_t(work->subs.size());
      for (int64_t n0 = 0; n0 < c.n_out; n0 += chunk)
        work->chunks.push_back({si, n0, std::min(c.n_out, n0 + chunk)});
      work->subs.push_back(std::move(sub));
    }
  }
  work->n_chunks = int64_t(work->chunks.size());
  run_chunks(pool, work, helpers_for(pool, work->n_chunks));
  return ffi::Error::Success();
}
#endif  // JLLAMA_Q8

}  // namespace
}  // namespace jllama

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaDequant, jllama::DequantImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaCosSin, jllama::CosSinImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVec, jllama::QMatVecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecXs, jllama::QMatVecXsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

#if defined(JLLAMA_Q8)
XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQuantizeQ8, jllama::QuantizeQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fmt"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecQ8, jllama::QMatVecQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<bool>("tiled")
                                  .Attr<int64_t>("layers")
                                  .Attr<ffi::Span<const int64_t>>("wmeta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatVecQ8F, jllama::QMatVecQ8FImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<bool>("tiled")
                                  .Attr<int64_t>("layers")
                                  .Attr<ffi::Span<const int64_t>>("wmeta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaQMatMulId, jllama::QMatMulIdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<bool>("tiled")
                                  .Attr<int64_t>("layers")
                                  .Attr<ffi::Span<const int64_t>>("wmeta"));
#endif
