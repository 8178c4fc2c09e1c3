"""QTensor: a weight kept in ggml block form, and the two functions that touch it.

Model code never unpacks blocks itself: it calls ``dequantize(qt)`` or ``qmatmul(x, qt)``, and
those dispatch on the ggml type and the backend at trace time (see ``quant/kernels``).

Layout: for a 2-D weight of logical shape ``(n_out, n_in)`` (numpy order, as GGUF stores it),
``data`` is ``uint8[n_out, n_in // block_size * type_size]`` (the raw GGUF rows), or for float
types the array itself (f32/f16/bf16) with the logical shape. Leading axes (e.g. stacked experts)
are allowed: ``data`` then has them too.

``layout`` (static) says how ``data`` is stored: ``"gguf"`` is the above; ``"i8"`` is a tuple
``(codes int8 [n_out, n_in], scales f32 [n_out, n_in // g][, mins f32 [n_out, n_in // g]])``, the
load-time repacking that XLA:CPU dequantizes fast without the C++ kernels (see
``quant/kernels/cpu_repack.py``); ``"pallas"`` is the Pallas kernel's k-major planes
(``quant/kernels/pallas_qmatmul.py``). Call ``prepare(qt, backend)`` once at load; every function
here accepts every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jllama.gguf.constants import QType, qtype_info

FLOAT_TYPES = {
    int(QType.F32): jnp.float32,
    int(QType.F16): jnp.float16,
    int(QType.BF16): jnp.bfloat16,
}


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QTensor:
    data: Any  # jax.Array, or a tuple of arrays for layout "i8"
    qtype: int  # static
    shape: tuple[int, ...]  # static, logical (numpy order)
    layout: str = "gguf"  # static

    def tree_flatten(self):
        return (self.data,), (self.qtype, self.shape, self.layout)

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
        return sum(int(a.size * a.dtype.itemsize) for a in jax.tree_util.tree_leaves(self.data))


def from_gguf_bytes(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """View a tensor's raw GGUF bytes in QTensor's data layout (no copy)."""
    qtype = int(qtype)
    if qtype in FLOAT_TYPES or qtype == int(QType.F64):
        if qtype == int(QType.BF16):
            import ml_dtypes

            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = {
                int(QType.F32): np.float32,
                int(QType.F16): np.float16,
                int(QType.F64): np.float64,
            }[qtype]
        return raw.view(dt).reshape(shape), qtype
    info = qtype_info(qtype)
    row = shape[-1]
    return raw.reshape(*shape[:-1], row // info.block_size * info.type_size), qtype


def prepare(qt: QTensor, backend: str | None = None) -> QTensor:
    """Put a weight, once at load time, in the layout the backend's fast kernel reads.

    On CPU with the C++ kernels available (``kernels/cpu_ffi``) GGUF blocks are already that
    layout. Without them, supported 2-D quantized weights are repacked to layout ``"i8"`` (about
    2x the bytes of 4-bit blocks, but XLA:CPU streams int8 ~10x faster than it unpacks nibbles).
    On GPU/TPU they become the Pallas kernel's ``"pallas"`` planes. Anything else is returned
    unchanged.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        try:
            from jllama.quant.kernels.pallas_qmatmul import prepare_pallas
        except ImportError:
            return qt
        return prepare_pallas(qt)
    from jllama.quant.kernels import cpu_ffi

    if cpu_ffi.available():
        return qt
    return repack_i8(qt)


def repack_i8(qt: QTensor) -> QTensor:
    """Layout ``"i8"`` (int8 codes + f32 scales/mins) for a 2-D weight of a supported type."""
    from jllama.quant.kernels import cpu_repack

    if (
        qt.layout != "gguf"
        or qt.is_float
        or len(qt.shape) != 2
        or not cpu_repack.supported(qt.qtype)
    ):
        return qt
    r = cpu_repack.repack(np, np.asarray(qt.data), qt.qtype, qt.shape[-1])
    parts = (r.codes, r.scales) if r.mins is None else (r.codes, r.scales, r.mins)
    return QTensor(tuple(jnp.asarray(a) for a in parts), qt.qtype, qt.shape, "i8")


def _dequantize_i8(data: tuple, qtype: int) -> jax.Array:
    from jllama.quant.kernels import cpu_repack

    group = cpu_repack.LAYOUTS[int(qtype)].group
    r = cpu_repack.Repacked(data[0], data[1], data[2] if len(data) > 2 else None)
    return cpu_repack.dequantize_repacked(jnp, r, group)


def dequantize(qt: QTensor, dtype=jnp.float32) -> jax.Array:
    """The whole tensor in ``dtype``. Used by reference paths and small tensors (norms, embeddings
    rows); hot matmuls go through ``qmatmul``."""
    if qt.layout == "i8":
        return _dequantize_i8(qt.data, qt.qtype).astype(dtype)
    if qt.layout == "pallas":
        from jllama.quant.kernels.pallas_qmatmul import dequantize_planes

        return dequantize_planes(tuple(qt.data), qt.qtype, qt.shape).astype(dtype)
    if qt.is_float:
        return qt.data.astype(dtype)
    from jllama.quant.formats import dequantize_jax

    return dequantize_jax(qt.data, qt.qtype, qt.shape[-1]).astype(dtype)


def take_rows(qt: QTensor, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Embedding lookup: gather rows first, dequantize only those."""
    if qt.layout == "i8":
        rows = tuple(jnp.take(a, ids, axis=0) for a in qt.data)
        return _dequantize_i8(rows, qt.qtype).astype(dtype)
    if qt.layout == "pallas":  # k-major planes: gather the columns holding those rows
        from jllama.quant.kernels.pallas_qmatmul import take_rows_planes

        return take_rows_planes(tuple(qt.data), qt.qtype, qt.shape, ids).astype(dtype)
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
