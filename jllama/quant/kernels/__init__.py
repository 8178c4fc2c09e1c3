"""Quantized matmul kernels, chosen at trace time by ggml type and backend.

``reference``: dequantize the whole weight, then an f32 dot. Always correct, used as the oracle
for the fast paths and as the fallback for any type without one.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Kernel = Callable[[jax.Array, "object"], jax.Array]


def reference_qmatmul(x: jax.Array, qt) -> jax.Array:
    from jllama.quant.qtensor import dequantize

    w = dequantize(qt, jnp.float32)
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w)


def select_kernel(qtype: int, backend: str) -> Kernel:
    """Pick the implementation of ``x @ W.T`` for this weight type on this backend."""
    return reference_qmatmul
