// ggml's CPU f32 steps that XLA cannot express cheaply, for XLA:CPU through the FFI (see
// jllama/models/ggml_f32.py for the same steps in XLA, and for where ggml takes them).
//
// * JllamaExpf: the C library's expf elementwise. ggml's vector ops send the elements a SIMD
//   register does not cover (a row's tail, whole rows shorter than one: a router's softmax over
//   4-12 experts, the 1-element shared-expert gate) through it, and glibc's expf is not
//   correctly rounded (it differs from round(exp(double)) on about 1 in 2000 floats).
// * JllamaF32MulMat: ggml's f32 mul_mat, y[n, m] = sum_k x[n, k] w[m, k], in ggml's order:
//   llamafile's tinyBLAS (``lanes`` FMA chains over k, then the halving horizontal sum) where
//   ggml hands it the product (sgemm, 2+ rows, m % 4 == 0, k % lanes == 0), else
//   ggml_vec_dot_f32 (four lane-wide FMA accumulators over steps of 4 * lanes, folded 0+2, 1+3,
//   0+1, the horizontal sum of the ISA, then the leftover products added one by one). The
//   FMA chains are serial per output; in XLA they cost an f64 emulation per step.
// * JllamaRopeAngles: ggml's rope cache angles, theta = position, then theta *= theta_scale once
//   per pair, in f32. In XLA the serial chain became one fusion per pair, each repeating the
//   chain up to it (128 per rope at head dim 256): most of a Gemma 3 program's code, its
//   compile and its load (experiments/results/scale.md, "Gemma 3's programs").
//
// Part of the kernel library cpu_ffi.py builds, with -ffp-contract=off: every FMA is an
// explicit fmaf (one rounding), every other product is rounded before its add. Registered by
// jllama/kernels/cpu_ggml_f32.py.

#include <cmath>
#include <cstddef>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

__attribute__((optimize("no-tree-vectorize")))  // no libmvec: its expf rounds differently
static void expf_loop(const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = ::expf(x[i]);
}

static ffi::Error ExpfImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const size_t n = x.element_count();
  if (y->element_count() != n) return ffi::Error::InvalidArgument("expf: output must match");
  expf_loop(x.typed_data(), y->typed_data(), n);
  return ffi::Error::Success();
}

// v[0] after repeatedly adding the upper half of v onto its lower half (hsum_float_8,
// _mm512_reduce_add_ps)
static inline float hsum_tree(float* v, int lanes) {
  for (int h = lanes / 2; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) v[i] = v[i] + v[i + h];
  return v[0];
}

// L lanes as L / 8 vectors of 8 (lane-wise arithmetic: the vector width does not enter)
template <int L>
struct Lanes {
  static constexpr int V = L / 8;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 v[V];
  void zero() {
    for (int i = 0; i < V; ++i) v[i] = _mm256_setzero_ps();
  }
  void fma(const float* a, const float* b) {  // v = a * b + v, one rounding per lane
    for (int i = 0; i < V; ++i)
      v[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8 * i), _mm256_loadu_ps(b + 8 * i), v[i]);
  }
  void store(float* out) const {
    for (int i = 0; i < V; ++i) _mm256_storeu_ps(out + 8 * i, v[i]);
  }
#else
  float v[L];
  void zero() {
    for (int i = 0; i < L; ++i) v[i] = 0.0f;
  }
  void fma(const float* a, const float* b) {
    for (int i = 0; i < L; ++i) v[i] = std::fmaf(a[i], b[i], v[i]);
  }
  void store(float* out) const {
    for (int i = 0; i < L; ++i) out[i] = v[i];
  }
#endif
};

// tinyBLAS outputs y[0 .. 4) of one x row against 4 weight rows: four independent chains
template <int L>
static void dot4_tinyblas(const float* x, const float* w, int64_t k, float* y) {
  Lanes<L> acc[4];
  for (auto& a : acc) a.zero();
  for (int64_t s = 0; s < k; s += L)
    for (int j = 0; j < 4; ++j) acc[j].fma(x + s, w + j * k + s);
  for (int j = 0; j < 4; ++j) {
    float v[L];
    acc[j].store(v);
    y[j] = hsum_tree(v, L);
  }
}

template <int L>
static float dot_vec_f32(const float* x, const float* w, int64_t k) {
  constexpr int64_t step = 4 * L;
  const int64_t kk = k - k % step;
  Lanes<L> acc[4];
  for (auto& a : acc) a.zero();
  for (int64_t s = 0; s < kk; s += step)
    for (int j = 0; j < 4; ++j) acc[j].fma(x + s + j * L, w + s + j * L);
  float a[4][L], v[L];
  for (int j = 0; j < 4; ++j) acc[j].store(a[j]);
  for (int l = 0; l < L; ++l) v[l] = (a[0][l] + a[2][l]) + (a[1][l] + a[3][l]);
  float out;
  if (L == 8) {  // AVX: upper onto lower 128 bits, then two hadds
    float t[4];
    for (int i = 0; i < 4; ++i) t[i] = v[i] + v[i + 4];
    out = (t[0] + t[1]) + (t[2] + t[3]);
  } else {
    out = hsum_tree(v, L);
  }
  for (int64_t i = kk; i < k; ++i) {
    const float p = x[i] * w[i];
    out = out + p;
  }
  return out;
}

template <int L>
static void mul_mat(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k,
                    bool sgemm) {
  if (sgemm && n >= 2 && m % 4 == 0 && k % L == 0) {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < m; c += 4) dot4_tinyblas<L>(x + r * k, w + c * k, k, y + r * m + c);
    return;
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < m; ++c) y[r * m + c] = dot_vec_f32<L>(x + r * k, w + c * k, k);
}

static ffi::Error F32MulMatImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> y, int64_t lanes, int64_t sgemm) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("f32 mul_mat: x [n, k] and w [m, k] expected");
  const int64_t n = xd[0], k = xd[1], m = wd[0];
  if (y->element_count() != static_cast<size_t>(n * m))
    return ffi::Error::InvalidArgument("f32 mul_mat: output must be [n, m]");
  if (lanes == 8)
    mul_mat<8>(x.typed_data(), w.typed_data(), y->typed_data(), n, m, k, sgemm != 0);
  else if (lanes == 16)
    mul_mat<16>(x.typed_data(), w.typed_data(), y->typed_data(), n, m, k, sgemm != 0);
  else
    return ffi::Error::InvalidArgument("f32 mul_mat: lanes must be 8 or 16");
  return ffi::Error::Success();
}

// pos [n] -> angles [n, pairs]: row r is pos[r], pos[r] * s, (pos[r] * s) * s, ... each product
// rounded to f32 (this file is built without contraction or reassociation).
static ffi::Error RopeAnglesImpl(ffi::Buffer<ffi::F32> pos, ffi::ResultBuffer<ffi::F32> ang,
                                 float theta_scale) {
  const size_t n = pos.element_count();
  if (n == 0) return ffi::Error::Success();
  const size_t pairs = ang->element_count() / n;
  if (pairs * n != ang->element_count())
    return ffi::Error::InvalidArgument("rope angles: output must be [n, pairs]");
  const float* p = pos.typed_data();
  float* out = ang->typed_data();
  for (size_t r = 0; r < n; ++r) {
    float th = p[r];
    for (size_t i = 0; i < pairs; ++i) {
      out[r * pairs + i] = th;
      th = th * theta_scale;
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaExpf, ExpfImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaF32MulMat, F32MulMatImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("lanes")
                                  .Attr<int64_t>("sgemm"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaRopeAngles, RopeAnglesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("theta_scale"));
