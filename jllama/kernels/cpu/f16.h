// IEEE half <-> f32, shared by the matvec kernels and the flash attention.
//
// The translation units that include this are compiled with different floating-point flags
// (cpu_ffi.py), so everything here has internal linkage and is always inlined: an inline
// function with external linkage is merged by the linker into one copy, compiled with the flags
// of whichever unit it came from. always_inline also lets these be inlined into code under a
// different ``#pragma GCC optimize`` (q8_dot.h, actquant.cc), where GCC otherwise makes a call.
// The conversions are exact (f16 -> f32) or round to nearest even (f32 -> f16) under any flags.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define JLLAMA_INLINE static inline __attribute__((always_inline))

namespace jllama {

JLLAMA_INLINE float fp16_to_f32(uint16_t h) {
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

// The f16 stored (little-endian, any alignment) at p.
JLLAMA_INLINE float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_f32(h);
}

#if defined(__F16C__)
JLLAMA_INLINE uint16_t f32_to_fp16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// f rounded to the nearest half and back: the value ggml stores as an f16.
JLLAMA_INLINE float f16_round(float f) { return _cvtsh_ss(f32_to_fp16(f)); }
#endif

}  // namespace jllama
