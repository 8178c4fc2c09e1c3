"""QTensor: a weight kept in ggml block form, and the two functions that touch it.

Model code never unpacks blocks itself: it calls ``dequantize(qt)`` or ``qmatmul(x, qt)``, and
those dispatch on the ggml type and the backend at trace time (see ``quant/kernels``).

Layout: for a 2-D weight of logical shape ``(n_out, n_in)`` (numpy order, as GGUF stores it),
``data`` is ``uint8[n_out, n_in // block_size * type_size]`` (the raw GGUF rows), or for float
types the array itself (f32/f16/bf16) with the logical shape. Leading axes (e.g. stacked experts)
are allowed: ``data`` then has them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jllama.gguf.constants import QType, qtype_info

FLOAT_TYPES = {int(QType.F32): jnp.float32, int(QType.F16): jnp.float16, int(QType.BF16): jnp.bfloat16}


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QTensor:
    data: jax.Array
    qtype: int  # static
    shape: tuple[int, ...]  # static, logical (numpy order)

    def tree_flatten(self):
        return (self.data,), (self.qtype, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES

    @property
    def type_name(self) -> str:
        return qtype_info(self.qtype).name

    @property
    def nbytes(self) -> int:
        return int(self.data.size * self.data.dtype.itemsize)


def from_gguf_bytes(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """View a tensor's raw GGUF bytes in QTensor's data layout (no copy)."""
    qtype = int(qtype)
    if qtype in FLOAT_TYPES or qtype == int(QType.F64):
        if qtype == int(QType.BF16):
            import ml_dtypes

            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = {int(QType.F32): np.float32, int(QType.F16): np.float16, int(QType.F64): np.float64}[qtype]
        return raw.view(dt).reshape(shape), qtype
    info = qtype_info(qtype)
    row = shape[-1]
    return raw.reshape(*shape[:-1], row // info.block_size * info.type_size), qtype


def dequantize(qt: QTensor, dtype=jnp.float32) -> jax.Array:
    """The whole tensor in ``dtype``. Used by reference paths and small tensors (norms, embeddings
    rows); hot matmuls go through ``qmatmul``."""
    if qt.is_float:
        return qt.data.astype(dtype)
    from jllama.quant.formats import dequantize_jax

    return dequantize_jax(qt.data, qt.qtype, qt.shape[-1]).astype(dtype)


def take_rows(qt: QTensor, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Embedding lookup: gather rows first, dequantize only those."""
    rows = jnp.take(qt.data, ids, axis=0)
    if qt.is_float:
        return rows.astype(dtype)
    from jllama.quant.formats import dequantize_jax

    return dequantize_jax(rows, qt.qtype, qt.shape[-1]).astype(dtype)


def qmatmul(x: jax.Array, qt: QTensor) -> jax.Array:
    """``x @ W.T`` for a weight ``W`` of shape (n_out, n_in): x[..., n_in] -> [..., n_out].

    The kernel is chosen at trace time by ggml type and backend.
    """
    from jllama.quant.kernels import select_kernel

    return select_kernel(qt.qtype, jax.default_backend())(x, qt)
