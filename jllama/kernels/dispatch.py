"""Quantized ``x @ W.T``, dequantization and row lookup, chosen at trace time by ggml type,
weight layout, backend and the current ``Numerics``.

``reference_qmatmul``: dequantize the whole weight, then an f32 dot. Always correct, the oracle
for the fast paths and the fallback for any type without one.
``xla_cpu`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): C++ decode+dot kernels through the
FFI on GGUF blocks, or without the C++ kernels a pure-XLA tile-at-a-time dequantize + f32 dot on
weights repacked at load (layout ``"i8"``, ``cpu_repack``).
``pallas_qmatmul`` (GPU/TPU; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4, NVFP4, Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K, IQ4_XS, TQ1_0, TQ2_0 at the GGUF's bits per weight; IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
IQ3_S, IQ1_S, IQ1_M decoded at load to 4-bit codes, ~4.3-4.6 bits per weight; Q1_0, Q2_0 as
Q4_0 blocks of their values): reads its load-time planes (layout ``"pallas"``) or GGUF blocks.
Other types dequantize + dot there.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jllama.kernels import cpu_repack, pallas_qmatmul, xla_cpu
from jllama.quant.formats import dequantize_jax
from jllama.quant.qtensor import QTensor, gguf_data_shape

Kernel = Callable[[jax.Array, QTensor], jax.Array]

# Activation rows above which a GPU matmul dequantizes and calls the vendor GEMM instead of
# Pallas: for a prefill GEMM the vendor GEMM on a once-dequantized weight wins, for decode (a
# few rows) the kernel that reads only the packed blocks does (experiments/results/gpu.md).
PALLAS_MAX_ROWS = 16


def reference_qmatmul(x: jax.Array, qt: QTensor) -> jax.Array:
    w = dequantize(qt, jnp.float32)
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w)


def _tiled_or_reference(x: jax.Array, qt: QTensor) -> jax.Array:
    """The XLA:CPU kernel for 2-D weights of a supported type, else the reference."""
    if qt.is_float or len(qt.shape) != 2 or not xla_cpu.supported(qt.qtype):
        return reference_qmatmul(x, qt)
    return xla_cpu.qmatmul(x, qt)


def _pallas(x: jax.Array, qt: QTensor) -> jax.Array:
    # Pallas reads its planes or raw GGUF blocks; anything else takes the reference path
    if qt.layout not in ("gguf", "pallas") or len(qt.shape) != 2:
        return reference_qmatmul(x, qt)
    if xla_cpu.rows(x) > PALLAS_MAX_ROWS and jax.default_backend() != "tpu":
        return reference_qmatmul(x, qt)
    return pallas_qmatmul.pallas_qmatmul(x, qt)


def select_kernel(qtype: int, backend: str) -> Kernel:
    """The implementation of ``x @ W.T`` for this weight type on this backend."""
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return _pallas if pallas_qmatmul.supported(qtype) else reference_qmatmul
    if xla_cpu.supported(qtype):
        return _tiled_or_reference
    return reference_qmatmul


def qmatmul(x: jax.Array, qt: QTensor) -> jax.Array:
    """``x[..., n_in] @ W.T -> [..., n_out]`` for a weight of shape (n_out, n_in)."""
    return select_kernel(qt.qtype, jax.default_backend())(x, qt)


def prepare(qt: QTensor, backend: str | None = None) -> QTensor:
    """Put a weight, once at load time, in the layout the backend's fast kernel reads.

    On CPU with the C++ kernels GGUF blocks are already that layout. Without them, supported 2-D
    quantized weights are repacked to layout ``"i8"`` (about 2x the bytes of 4-bit blocks, but
    XLA:CPU streams int8 codes far faster than it unpacks nibbles). On GPU/TPU they become the
    Pallas kernel's ``"pallas"`` planes. Anything else is returned unchanged.
    """
    backend = backend or jax.default_backend()
    qt = qt.natural()
    if backend != "cpu":
        return pallas_qmatmul.prepare_pallas(qt)
    return qt if xla_cpu.ffi_on() else repack_i8(qt)


def repack_i8(qt: QTensor) -> QTensor:
    """Layout ``"i8"`` (int8 codes + f32 scales/mins) for a 2-D weight of a supported type."""
    qt = qt.natural()
    if (qt.layout != "gguf" or qt.is_float or len(qt.shape) != 2
            or not cpu_repack.supported(qt.qtype)):
        return qt
    r = cpu_repack.repack(np, np.asarray(qt.data), qt.qtype, qt.shape[-1])
    parts = (r.codes, r.scales) if r.mins is None else (r.codes, r.scales, r.mins)
    return QTensor(tuple(jnp.asarray(a) for a in parts), qt.qtype, qt.shape, "i8")


def _dequantize_i8(data: tuple, qtype: int) -> jax.Array:
    group = cpu_repack.LAYOUTS[int(qtype)].group
    r = cpu_repack.Repacked(data[0], data[1], data[2] if len(data) > 2 else None)
    return cpu_repack.dequantize_repacked(jnp, r, group)


def dequantize(qt: QTensor, dtype=jnp.float32) -> jax.Array:
    """The whole tensor in ``dtype``, any layout. For reference paths and small tensors (norms,
    biases); hot matmuls go through ``qmatmul``."""
    qt = qt.natural()
    if qt.layout == "i8":
        return _dequantize_i8(qt.data, qt.qtype).astype(dtype)
    if qt.layout == "pallas":
        return pallas_qmatmul.dequantize_planes(tuple(qt.data), qt.qtype, qt.shape).astype(dtype)
    if qt.is_float:
        return qt.data.astype(dtype)
    return dequantize_jax(qt.data, qt.qtype, qt.shape[-1]).astype(dtype)


def take_rows(qt: QTensor, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Embedding lookup: gather rows first, dequantize only those."""
    if qt.layout == "i8":
        rows = tuple(jnp.take(a, ids, axis=0) for a in qt.data)
        return _dequantize_i8(rows, qt.qtype).astype(dtype)
    if qt.layout == "pallas":  # k-major planes: gather the columns holding those rows
        return pallas_qmatmul.take_rows_planes(tuple(qt.data), qt.qtype, qt.shape,
                                               ids).astype(dtype)
    if qt.offset:  # flat bytes from the file mapping: gather each row's bytes in place
        rb = gguf_data_shape(qt.qtype, qt.shape)[-1]
        idx = qt.offset + ids.astype(jnp.int32)[..., None] * rb + jnp.arange(rb, dtype=jnp.int32)
        return dequantize_jax(jnp.take(qt.data, idx, axis=0), qt.qtype,
                              qt.shape[-1]).astype(dtype)
    rows = jnp.take(qt.data, ids, axis=0)
    if qt.is_float:
        return rows.astype(dtype)
    return dequantize_jax(rows, qt.qtype, qt.shape[-1]).astype(dtype)
