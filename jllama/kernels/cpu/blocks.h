// ggml's block formats: type ids, and one f32 decoder per type (``decode(block, out)`` writes
// the block's BS values, bit-compatible with gguf-py's dequantize). The f32 row kernels
// (vec_dot.cc) build on these; ``JllamaDequant`` writes whole rows with them.
#pragma once

#include <cstdint>
#include <cstring>

#include "f16.h"

// Free functions are static (internal linkage), as in every header here: see f16.h.
namespace jllama {

// ggml type ids (gguf.GGMLQuantizationType).
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11,
                  kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23;
constexpr int64_t kIQ3_XXS = 18, kIQ3_S = 21, kTQ1_0 = 34, kTQ2_0 = 35, kMXFP4 = 39;
constexpr int64_t kNVFP4 = 40, kQ1_0 = 41, kQ2_0 = 42;
constexpr int64_t kIQ2_XXS = 16, kIQ2_XS = 17, kIQ2_S = 22, kIQ1_S = 19, kIQ1_M = 29;

// The IQ4 non-linear code book (ggml's kvalues_iq4nl).
alignas(64) constexpr float kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                              1,    13,   25,  38,  53,  69,  89,  113};

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
  // The 6-bit scales of the 16 groups (stored + 32: the scale is the byte - 32), four per
  // 32-bit word (group 4i + j in byte j of r[i]) from the 12 scale bytes ``sc``: low nibbles of
  // bytes 0-7 for groups 0-7, their high nibbles for 8-15; group g's two high bits at bit
  // 2 (g / 4) of byte 8 + g % 4.
  static void scale_words(const uint8_t* sc, uint32_t* r) {
    uint32_t a[3];  // three loads (one 12-byte copy went through the stack)
    for (int i = 0; i < 3; ++i) std::memcpy(&a[i], sc + 4 * i, 4);
    for (int i = 0; i < 4; ++i)
      r[i] = ((a[i & 1] >> (4 * (i >> 1))) & 0x0f0f0f0f) | ((a[2] >> (2 * i)) & 0x03030303) << 4;
  }
  static void decode(const uint8_t* b, float* out) {
    const uint8_t* hmask = b;
    const uint8_t* qs = b + 32;
    const uint8_t* sc = b + 96;
    const float d = f16_to_f32(b + 108);
    uint32_t sw[4];
    scale_words(sc, sw);
    uint8_t scs[16];
    std::memcpy(scs, sw, 16);
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int half = 0; half < 2; ++half) {
          const int g = h * 8 + s * 2 + half, hb = h * 4 + s;  // hb: the hmask bit, e / 32
          const float dl = d * float(int(scs[g]) - 32);
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
static inline void k_scale_min(const uint8_t* s, float d, float dmin, float* sc, float* mn) {
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
        const float sc0 = d * float(scales[h * 8 + s * 2]);
        const float sc1 = d * float(scales[h * 8 + s * 2 + 1]);
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

// Elements per block of a type.
static inline int block_size(int64_t qtype) {
  return qtype == kIQ4_NL ? 32 : qtype >= kQ2_K ? 256 : 32;
}

}  // namespace jllama
