"""KV cache storage types: f32, f16, bf16, and the ggml block formats llama.cpp's
``--cache-type-k/-v`` accept: q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1.

Quantized caches hold the exact GGUF block bytes (uint8 rows of ``head_dim / 32 * type_size``)
so one dequantizer (``quant.formats.dequantize_jax``) serves weights and cache alike. New keys
and values are quantized in-jit as ggml-cpu's ``from_float`` does for a cache write
(``ggml_cpy`` into the cache): q8_0 scale = amax / 127 (the x86 quantizer rounds half to even);
the others as ggml's reference quantizers (``quantize_row_*_ref``): q4_0 / q5_0 scale = (signed
max) / -8 / -16, q4_1 / q5_1 (max - min) / 15 / 31 with the min, iq4_nl codes nearest to x / d0
(d0 = signed max / -127) and the weighted least-squares scale (weights x^2, no search: ntry -1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jllama.errors import ConfigError
from jllama.gguf.constants import QType, qtype_info
from jllama.quant.actquant import opaque

FLOAT_KV = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
QUANT_KV = {"q8_0": int(QType.Q8_0), "q4_0": int(QType.Q4_0), "q4_1": int(QType.Q4_1),
            "iq4_nl": int(QType.IQ4_NL), "q5_0": int(QType.Q5_0), "q5_1": int(QType.Q5_1)}
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
        # ggml-cpu's x86 quantize_row_q8_0: d = amax / 127, id = 127 / amax (not 1 / d),
        # codes rounded half to even (_mm256_round_ps)
        amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
        c127 = opaque(jnp.full_like(amax, 127.0))
        d = amax / c127
        inv = jnp.where(amax != 0, c127 / jnp.where(amax != 0, amax, 1.0), 0.0)
        q = jnp.round(opaque(xb * inv)).astype(jnp.int8)
        blocks = jnp.concatenate([_f16_bytes(d), jax.lax.bitcast_convert_type(q, jnp.uint8)], axis=-1)
    elif name in ("q4_0", "q5_0", "iq4_nl"):  # the first value of the largest magnitude
        idx = jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True)
        mx = jnp.take_along_axis(xb, idx, axis=-1)
        if name == "iq4_nl":
            blocks = _iq4_nl(xb, mx)
        else:
            d = mx / (-8.0 if name == "q4_0" else -16.0)  # powers of two: exact
            inv = jnp.where(d != 0, 1.0 / opaque(d), 0.0)  # not -8 / mx: C's steps
            top = 15 if name == "q4_0" else 31
            # (int8_t)(x * id + 8.5 / 16.5): >= 0.5 here, so truncation is floor
            q = jnp.clip(jnp.floor(opaque(xb * inv) + (top + 2) / 2), 0, top).astype(jnp.uint8)
            blocks = jnp.concatenate([_f16_bytes(d), *_pack5(q, name == "q5_0")], axis=-1)
    else:  # q4_1, q5_1: scale (max - min) / (2^bits - 1) and the min
        top = 15 if name == "q4_1" else 31
        mn = jnp.min(xb, axis=-1, keepdims=True)
        # the divisor as an array behind opaque: a scalar constant there becomes * (1 / top)
        d = (jnp.max(xb, axis=-1, keepdims=True) - mn) / opaque(jnp.full_like(mn, top))
        inv = jnp.where(d != 0, 1.0 / opaque(d), 0.0)  # XLA made 1 / (a / b) b / a
        q = jnp.clip(jnp.floor(opaque((xb - mn) * inv) + 0.5), 0, top).astype(jnp.uint8)
        blocks = jnp.concatenate([_f16_bytes(d), _f16_bytes(mn), *_pack5(q, name == "q5_1")],
                                 axis=-1)
    return blocks.reshape(*x.shape[:-1], -1)


def _pack5(q: jax.Array, five: bool) -> list[jax.Array]:
    """Codes [..., 32] -> [qh (4 bytes, bit j = bit 4 of code j), if five] + nibbles (16 bytes:
    code j low, j + 16 high)."""
    out = [(q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)]
    if five:
        bit = ((q >> 4) & 1).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
        qh = jnp.sum(bit, axis=-1, keepdims=True, dtype=jnp.uint32)  # disjoint bits: exact
        out.insert(0, ((qh >> jnp.arange(0, 32, 8, dtype=jnp.uint32)) & 0xFF).astype(jnp.uint8))
    return out


def _iq4_nl(xb: jax.Array, mx: jax.Array) -> jax.Array:
    """ggml's quantize_row_iq4_nl_ref on blocks [..., 32]: codes nearest to x / d0 in the
    16-value table (a tie goes up), d = sum w q x / sum w q q with w = x^2, each sum in order."""
    from jllama.quant.formats import KVALUES_IQ4NL

    vals = jnp.asarray(KVALUES_IQ4NL, jnp.float32)
    d0 = mx / opaque(jnp.full_like(mx, -127.0))  # an array: see quantize
    al = opaque((1.0 / opaque(d0)) * xb)
    # best_index_int8: the first value above al (binary search), then the nearer neighbour
    up = jnp.clip(jnp.sum(al[..., None] >= vals, axis=-1), 1, 15)
    lo_v, hi_v = vals[up - 1], vals[up]
    code = jnp.where(opaque(al - lo_v) < opaque(hi_v - al), up - 1, up)
    code = jnp.where(al <= vals[0], 0, jnp.where(al >= vals[15], 15, code))
    q = vals[code]
    wq = opaque(opaque(xb * xb) * q)
    tx, t2 = opaque(wq * xb), opaque(wq * q)
    sx = s2 = jnp.zeros_like(mx[..., 0])
    for j in range(32):  # in order, as the C loop
        sx = opaque(sx + tx[..., j])
        s2 = opaque(s2 + t2[..., j])
    d = jnp.where(s2 > 0, sx / jnp.where(s2 > 0, s2, 1.0), 0.0)[..., None]
    # a block below GROUP_MAX_EPS keeps d = 0 (ggml leaves its codes stale: values all 0 either way)
    d = jnp.where(jnp.max(jnp.abs(xb), axis=-1, keepdims=True) < 1e-15, 0.0, d)
    c = code.astype(jnp.uint8)
    return jnp.concatenate([_f16_bytes(d), c[..., :16] | (c[..., 16:] << 4)], axis=-1)


def dequantize(rows: jax.Array, name: str, head_dim: int) -> jax.Array:
    """Cache rows -> f32 [..., D]."""
    if name in FLOAT_KV:
        return rows.astype(jnp.float32)
    from jllama.quant.formats import dequantize_jax

    return dequantize_jax(rows, QUANT_KV[name], head_dim)
