"""ggml's CPU f32 steps XLA cannot express cheaply (``cpu/ggml_f32.cc``) behind XLA's FFI,
built into the kernel library with the other CPU kernels (cpu_ffi.py): the C library's ``expf`` (ggml
calls it for the elements a SIMD register does not cover, and it is not correctly rounded),
ggml's f32 ``mul_mat`` (serial FMA chains) and its rope cache's angles (a serial product chain);
models/ggml_f32.py has the same steps in XLA.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jllama.kernels import cpu_ffi

log = logging.getLogger(__name__)

_TARGETS = {"jllama_expf": "JllamaExpf", "jllama_f32_mul_mat": "JllamaF32MulMat",
            "jllama_rope_angles": "JllamaRopeAngles"}


@functools.cache
def available() -> bool:
    """Load the kernel library (cpu_ffi builds it once, ``cpu/ggml_f32.cc`` among its units)
    and register these kernels; False where that is not possible."""
    lib = cpu_ffi.library()
    if lib is None:
        return False
    try:
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    except Exception as e:  # any failure means "use the XLA steps", never a crash
        log.warning("jllama: C++ f32 kernels unavailable (%s)", e)
        return False
    return True


def expf(x: jax.Array) -> jax.Array:
    """``expf(x)`` elementwise on f32 from the C library (the caller checks ``available()``)."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call("jllama_expf", out, vmap_method="sequential")(x.astype(jnp.float32))


def mul_mat(x: jax.Array, w: jax.Array, lanes: int, sgemm: bool) -> jax.Array:
    """ggml's f32 ``mul_mat``: x [N, K], w [M, K] -> [N, M] (the caller checks ``available()``)."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("jllama_f32_mul_mat", out, vmap_method="sequential")(
        x.astype(jnp.float32), w.astype(jnp.float32), lanes=np.int64(lanes),
        sgemm=np.int64(bool(sgemm)))


def rope_angles(pos: jax.Array, theta_scale: float, pairs: int) -> jax.Array:
    """ggml's rope cache angles [..., pairs] from f32 positions [...]: the position, then times
    ``theta_scale`` once per pair, each product rounded (the caller checks ``available()``)."""
    out = jax.ShapeDtypeStruct((*pos.shape, pairs), jnp.float32)
    return jax.ffi.ffi_call("jllama_rope_angles", out, vmap_method="sequential")(
        pos.astype(jnp.float32), theta_scale=np.float32(theta_scale))
