// Int8-activation kernels, bit-exact with ggml's x86 vec_dot (the AVX2 branches of
// ggml-cpu/arch/x86/quants.c, and llamafile's tinyBLAS_Q0_AVX, which accumulates the same way),
// on any AVX2 + FMA + F16C CPU: the integer dots are VNNI's dpbusd where the CPU has it, an
// exact AVX2 emulation otherwise (the same int32 lanes, so the same f32 steps after them).
// The caller passes x already quantized to ggml's vec_dot type
// (int8 codes + per-block scales: Q8_0/Q8_1 f16 values as f32, Q8_K f32; Q8_1 block sums s).
// Every output element is built in ggml's order: per weight block an exact int32 dot in 8 lanes
// (lane l: elements 4l..4l+3 of each 32-group), converted to f32, ``acc = fma(d_w * d_x, lane,
// acc)`` over blocks, ggml's hsum_float_8, then the type's min term. The integer parts may be
// computed any exact way (bias trick for signed weights, q8_dot.h); only the f32 steps must
// match.
//
// From 8 x rows on, ggml-cpu multiplies K-quant (and IQ1/IQ2/IQ3) weights with its tiled GEMM instead
// (ggml-cpu/tiled/, ``ggml_tiled_min_batch``), whose f32 steps differ: per 256-block one exact
// int32 s1 = sum_g sc[g] dot_g and (Q2_K/Q4_K/Q5_K) s2 = sum_g mn[g] bsum_g, then
// ``r = fma(-dmin_w, s2, s1 * d_w)`` (Q3_K/Q6_K: ``r = s1 * d_w``) and ``acc = fma(r, d_x,
// acc)`` over blocks, no lane split and no hsum (its AVX-512 VNNI microkernel as the oracle
// build compiles it, vfnmadd + vfmadd over memory; its AVX2 one, explicit FMAs). Tile shapes, K chunking and threads only regroup
// whole output elements, so they do not enter: the ``kTiled`` kernels follow that order
// whenever the call has >= 8 rows (``kTiledMinRows``), ggml's src1->ne[1], and ``Q8Call::tiled``
// is set. That flag is ggml's own switch (GGML_CPU_TILED_MM=0 turns the tiled GEMM off), which
// changes results, so it is no environment read here: it comes with each call as the FFI
// attribute ``tiled`` (Numerics.ggml_tiled_mm on the Python side).
//
// This header: which kernels exist on the build machine and how the FFI handlers
// (ffi_qmatvec.cc) call them. The row kernels are in vec_dot.cc, the prompt GEMM in gemm.cc,
// the per-block arithmetic both share in q8_dot.h.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JLLAMA_Q8 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define JLLAMA_Q8_GEMM 1  // the prompt GEMM (gemm.cc); without it AVX2's, Q4_0/Q5_0/Q8_0 only
#endif
#endif

#if defined(JLLAMA_Q8)

// Shared between this library's files only: hidden, so calls between them are direct.
#pragma GCC visibility push(hidden)

namespace jllama {

// One x row as the kernels see it. aux: Q4_0/Q5_0/Q8_0: -offset * (sum of each 4 codes), the
// dpbusd start value that turns unsigned weight codes into signed ones; K-quants: the 16-element
// code sums (ggml's Q8_K bsums), as int32.
struct Q8Row {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* aux;
  // GEMM, K-quants: group code sums (32: Q4_K/Q5_K, 16: Q6_K) as int16; row kernels with
  // bsums: the 16-element sums as int16
  const int16_t* pairs;
};

constexpr int64_t kTiledMinRows = 8;  // ggml_tiled_min_batch
// The row kernels' K slab in the tiled order (vec_dot.cc q8_rows_slabs): 8 x rows' codes of
// one slab fill half of a 32 KiB L1.
constexpr int64_t kTiledSlabK = 2048;
constexpr int64_t kTiledMBlock = 64;  // x rows per block there (a multiple of 8)

// One weight against all x rows.
struct Q8Call {
  int64_t k, n_out, m_total, row_bytes;
  const uint8_t* w;
  float* y;
  std::vector<Q8Row> rows;
  bool tiled;  // ggml's tiled K-quant order from kTiledMinRows rows (GGML_CPU_TILED_MM)
  // ggml's mul_mat_id: never llamafile's order (IQ4_NL: the single-row kernel, vec_dot's
  // order, for every row count); the tiled order as mul_mat, per expert from kTiledMinRows
  bool id = false;
  // Which x this is (new per prepared x, shared by the weights of a fused call that share
  // their x rows): a thread's biased copy of a small x serves all its chunks of the call
  // (vec_dot.cc q8_rows_decoded). 0: none.
  uint64_t x_serial = 0;
};

// Weight rows [n0, n1) of a call.
using Q8Fn = void (*)(const Q8Call&, int64_t, int64_t);

struct Q8Kernel {
  Q8Fn fn, gemm;  // row-major kernel; transposed-tile GEMM (null: none on this CPU)
  int bs, xb, off, pair_group;  // pair_group: the GEMM's x code sums per int16 (K-quants)
  bool bias, bsums, q8_1, tiled;
};

// The kernels of a ggml type (fn null: none). vec_dot.cc.
Q8Kernel pick_q8(int64_t qtype);

// The GEMM of a type and its pair_group (null, 0: none on this CPU). gemm.cc.
struct Q8Gemm {
  Q8Fn fn;
  int pair_group;
};
Q8Gemm q8_gemm_for(int64_t qtype);

// Whether a call of m x rows takes the GEMM: from its minimum row count, and for K-quants only
// where ggml takes its tiled order (the GEMM has no vec_dot order for them). gemm.cc.
bool use_gemm(const Q8Kernel& kern, int64_t m, bool tiled);

constexpr int kGemmChunk = 16;  // weight rows per GEMM work item: one tile

}  // namespace jllama

#pragma GCC visibility pop

#endif  // JLLAMA_Q8
