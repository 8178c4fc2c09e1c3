// The C library's expf elementwise, for XLA:CPU through the FFI.
//
// ggml's vector ops send the tail of a row that does not fill a SIMD register (and whole rows
// shorter than one: a router's softmax over 4-12 experts, the 1-element shared-expert gate)
// through the C library's expf, which is not correctly rounded: glibc's differs from
// round(exp(double)) on about 1 in 2000 floats. An exact reproduction needs the same function.
//
// Built at first use by jllama/kernels/cpu_libm.py, without vectorisation (a vectorised loop
// could call libmvec's expf, which rounds differently).

#include <cmath>
#include <cstddef>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error ExpfImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const size_t n = x.element_count();
  if (y->element_count() != n) return ffi::Error::InvalidArgument("expf: output must match");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  for (size_t i = 0; i < n; ++i) yp[i] = ::expf(xp[i]);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JllamaExpf, ExpfImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
