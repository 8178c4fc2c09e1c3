"""Quantized matmul kernels, chosen at trace time by ggml type and backend.

``reference``: dequantize the whole weight, then an f32 dot. Always correct, used as the oracle
for the fast paths and as the fallback for any type without one.
``xla_cpu`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): C++ decode+dot kernels through the
FFI on GGUF blocks, or without a compiler a pure-XLA tile-at-a-time dequantize + f32 dot on weights
repacked at load by ``qtensor.prepare``.
``pallas_qmatmul`` (GPU/TPU, when present): reads its load-time planes (or GGUF blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Kernel = Callable[[jax.Array, "object"], jax.Array]

# Activation rows above which a GPU matmul dequantizes and calls the vendor GEMM instead of Pallas.
PALLAS_MAX_ROWS = 16


def reference_qmatmul(x: jax.Array, qt) -> jax.Array:
    from jllama.quant.qtensor import dequantize

    w = dequantize(qt, jnp.float32)
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w)


def _tiled_or_reference(x: jax.Array, qt) -> jax.Array:
    """The XLA tiled kernel for 2-D weights of a supported type, else the reference."""
    from jllama.quant.kernels import xla_cpu

    if qt.is_float or len(qt.shape) != 2 or not xla_cpu.supported(qt.qtype):
        return reference_qmatmul(x, qt)
    return xla_cpu.qmatmul(x, qt)


def _pallas_kernel(qtype: int) -> Kernel | None:
    try:
        from jllama.quant.kernels import pallas_qmatmul as pq
    except ImportError:
        return None
    if not pq.supported(qtype):
        return None

    def kernel(x: jax.Array, qt) -> jax.Array:
        # Pallas reads its planes or raw GGUF blocks; anything else takes the reference path.
        if qt.layout not in ("gguf", "pallas") or len(qt.shape) != 2:
            return reference_qmatmul(x, qt)
        rows = 1
        for n in x.shape[:-1]:
            rows *= n
        if rows > PALLAS_MAX_ROWS and jax.default_backend() != "tpu":
            # measured on an H200 (experiments/results/gpu.md): for a prefill GEMM, dequantizing
            # the weight once and letting cuBLAS multiply is 15x faster than our Triton kernel;
            # for decode (a few rows) the kernel that reads only the packed blocks wins
            return reference_qmatmul(x, qt)
        return pq.pallas_qmatmul(x, qt)

    return kernel


def select_kernel(qtype: int, backend: str) -> Kernel:
    """Pick the implementation of ``x @ W.T`` for this weight type on this backend."""
    from jllama.quant.kernels import xla_cpu

    if backend in ("gpu", "cuda", "rocm", "tpu"):
        kernel = _pallas_kernel(qtype)
        return kernel if kernel is not None else reference_qmatmul
    if xla_cpu.supported(qtype):
        return _tiled_or_reference
    return reference_qmatmul
