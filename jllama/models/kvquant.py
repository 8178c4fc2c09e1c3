"""KV cache storage types: f32, f16, bf16, and ggml block formats q8_0 / q4_0.

Quantized caches hold the exact GGUF block bytes (uint8 rows of ``head_dim / 32 * type_size``)
so one dequantizer (``quant.formats.dequantize_jax``) serves weights and cache alike. New keys
and values are quantized in-jit as ggml's reference quantizers do (``quantize_row_q8_0_ref``,
``quantize_row_q4_0_ref``): q8_0 scale = amax / 127, q4_0 scale = (signed max) / -8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jllama.errors import ConfigError
from jllama.gguf.constants import QType, qtype_info

FLOAT_KV = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
QUANT_KV = {"q8_0": int(QType.Q8_0), "q4_0": int(QType.Q4_0)}
KV_TYPES = (*FLOAT_KV, *QUANT_KV)


def check_kv_type(name: str, head_dim: int) -> None:
    if name not in KV_TYPES:
        raise ConfigError(f"unknown KV cache type '{name}' (known: {', '.join(KV_TYPES)})")
    if name in QUANT_KV and head_dim % 32:
        raise ConfigError(f"KV cache type {name} needs a head size that is a multiple of 32, "
                          f"this model's is {head_dim}")


def row_shape(name: str, head_dim: int) -> tuple[int, jnp.dtype]:
    """Last-axis length and dtype of one cached head vector."""
    if name in FLOAT_KV:
        return head_dim, FLOAT_KV[name]
    info = qtype_info(QUANT_KV[name])
    return head_dim // info.block_size * info.type_size, jnp.uint8


def bytes_per_token(name: str, head_dim: int, n_kv_heads: int) -> int:
    n, dt = row_shape(name, head_dim)
    return n * jnp.dtype(dt).itemsize * n_kv_heads


def _f16_bytes(d: jax.Array) -> jax.Array:
    """f32 [..., 1] -> uint8 [..., 2] little-endian f16."""
    u16 = jax.lax.bitcast_convert_type(d.astype(jnp.float16), jnp.uint16)
    return jnp.concatenate([(u16 & 0xFF).astype(jnp.uint8), (u16 >> 8).astype(jnp.uint8)], axis=-1)


def quantize(x: jax.Array, name: str) -> jax.Array:
    """x [..., D] float -> cache rows [..., row] (float cast or GGUF block bytes)."""
    if name in FLOAT_KV:
        return x.astype(FLOAT_KV[name])
    d_all = x.shape[-1]
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], d_all // 32, 32)
    if name == "q8_0":
        amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
        d = amax / 127.0
        inv = jnp.where(d > 0, 1.0 / d, 0.0)
        q = jnp.round(xb * inv).astype(jnp.int8)
        blocks = jnp.concatenate([_f16_bytes(d), jax.lax.bitcast_convert_type(q, jnp.uint8)], axis=-1)
    else:  # q4_0
        idx = jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True)
        mx = jnp.take_along_axis(xb, idx, axis=-1)
        d = mx / -8.0
        inv = jnp.where(d != 0, 1.0 / d, 0.0)
        q = jnp.clip(jnp.floor(xb * inv + 8.5), 0, 15).astype(jnp.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        blocks = jnp.concatenate([_f16_bytes(d), packed], axis=-1)
    return blocks.reshape(*x.shape[:-1], -1)


def dequantize(rows: jax.Array, name: str, head_dim: int) -> jax.Array:
    """Cache rows -> f32 [..., D]."""
    if name in FLOAT_KV:
        return rows.astype(jnp.float32)
    from jllama.quant.formats import dequantize_jax

    return dequantize_jax(rows, QUANT_KV[name], head_dim)
