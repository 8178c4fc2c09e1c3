"""Activation quantization as llama.cpp's CPU matmuls do it.

ggml's CPU backend multiplies a quantized weight by activations that it first quantizes to the
weight type's ``vec_dot_type``: Q8_0 blocks (32 values, f16 scale) for Q4_0/Q5_0/Q8_0/IQ4_NL,
Q8_1 for Q4_1/Q5_1, Q8_K (256 values, f32 scale) for the K-quants and IQ4_XS. That rounding moves
SmolLM2's logits by up to ~1.4 against an exact f32 product, enough to flip greedy choices. Doing
the same rounding (in f32, before the dot) makes our logits track llama.cpp's closely; it is on by
default and can be turned off for the "exact" numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jllama.gguf.constants import QType

_Q8_0 = {QType.Q4_0, QType.Q5_0, QType.Q8_0, QType.IQ4_NL}
_Q8_1 = {QType.Q4_1, QType.Q5_1}
_Q8_K = {QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS}
# ggml-cpu's type_traits_cpu[...].vec_dot_type of the ternary, MXFP4, NVFP4, Q1_0/Q2_0 and IQ3
# types
_Q8_0 |= {QType.MXFP4, QType.NVFP4, QType.Q1_0, QType.Q2_0}
_Q8_K |= {QType.TQ1_0, QType.TQ2_0, QType.IQ3_XXS, QType.IQ3_S}
_Q8_K |= {QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ1_S, QType.IQ1_M}


def vec_dot_block(qtype: int) -> tuple[int, bool] | None:
    """(block size, f16 scale?) of the activation format ggml uses with this weight type."""
    t = QType(qtype)
    if t in _Q8_0 or t in _Q8_1:
        return 32, True
    if t in _Q8_K:
        return 256, False
    return None


def act_format(qtype: int) -> str | None:
    """ggml's vec_dot activation type for this weight type ("q8_0", "q8_1", "q8_K"), or None
    where ggml multiplies in f32: weights with the same format can share one quantized x."""
    t = QType(qtype)
    return "q8_0" if t in _Q8_0 else "q8_1" if t in _Q8_1 else "q8_K" if t in _Q8_K else None


def quantize_activations(x: jax.Array, qtype: int) -> jax.Array:
    """Round ``x[..., n]`` to the values ggml's vec_dot would see (returned as f32)."""
    return quantize_activations_ex(x, qtype)[0]


def opaque(x: jax.Array) -> jax.Array:
    """x as a value XLA cannot see into: no ``a / c -> a * (1 / c)``, no ``1 / sqrt -> rsqrt``,
    no folding of ``(a * c) * c`` into ``a * (c * c)``, and no ``a * b + c`` fused into one FMA
    by XLA:CPU's code generator; rewrites that round differently from the C code whose rounding
    we reproduce (here and in models.common). The barrier stops the algebraic rewrites, but
    XLA:CPU drops it before fusing; the select (an identity: NaN stays NaN) stands between a
    multiply and an add in the fused loop, so LLVM cannot contract them."""
    x = jax.lax.optimization_barrier(x)
    if jnp.ndim(x) == 0:
        return x
    return jnp.where(jnp.isnan(x), jnp.array(jnp.nan, x.dtype), x)


def _q8_parts(x: jax.Array, qtype: int):
    """ggml's quantize_row_q8_{0,1,K} in f32: (codes as f32 [..., nb, bs], d32 (the unrounded
    scale) or None, d (the stored scale, as f32) [..., nb, 1]), or None where ggml keeps f32."""
    spec = vec_dot_block(qtype)
    if spec is None:
        return None
    bs, f16_scale = spec
    n = x.shape[-1]
    if n % bs:
        return None
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], n // bs, bs)
    if f16_scale:
        amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
        # Each value rounded where ggml's C rounds it: left visible, XLA rewrites ``x / 127``
        # as ``x * (1 / 127)`` and ``(a / b) * c`` as ``(a * c) / b``, which round differently
        # (and then so, now and then, does the f16 of the Q8_1 block sum s = d * sum(q)).
        d32 = opaque(amax / opaque(jnp.float32(127.0)))
        inv = opaque(jnp.where(amax > 0, 127.0 / amax, 0.0))  # as ggml's AVX quantize_row_q8_x
        q = jnp.round(xb * inv)  # nearest-even, as _mm256_round_ps(_MM_ROUND_NEAREST)
        return q, d32, d32.astype(jnp.float16).astype(jnp.float32)
    # Q8_K: scale from the signed value of largest magnitude (the first one, as ggml's strict
    # ``ax > amax`` scan), f32 scale. Two min-reductions instead of argmax + gather (XLA:CPU's
    # argmax is a scalar loop), same choice on ties of +amax and -amax.
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    iota = jnp.arange(bs, dtype=jnp.int32)
    first_pos = jnp.min(jnp.where(xb == amax, iota, bs), axis=-1, keepdims=True)
    first_neg = jnp.min(jnp.where(xb == -amax, iota, bs), axis=-1, keepdims=True)
    mx = jnp.where(first_pos <= first_neg, amax, -amax)
    iscale = jnp.where(mx != 0, -127.0 / mx, 0.0)
    q = jnp.minimum(jnp.round(xb * iscale), 127.0)
    return q, None, jnp.where(iscale != 0, 1.0 / iscale, 0.0)


def quantize_activations_ex(x: jax.Array, qtype: int) -> tuple[jax.Array, jax.Array | None]:
    """(rounded x, s_err): for Q8_1 (Q4_1/Q5_1 weights) ``s_err[..., n_blocks]`` is how much
    ggml's stored block sum ``s = fp16(d * sum(q))`` differs from ``sum(x_hat)``; the dot adds
    ``m_w * s`` per block, so the product needs ``m_w * s_err`` added (``q8_1_correction``)."""
    parts = _q8_parts(x, qtype)
    if parts is None:
        return x, None
    q, d32, d = parts
    s_err = None
    if QType(qtype) in _Q8_1:
        sq = jnp.sum(q, axis=-1)
        s_err = (d32[..., 0] * sq).astype(jnp.float16).astype(jnp.float32) - d[..., 0] * sq
    return (q * d).reshape(x.shape), s_err


def quantize_activations_q8(
    x: jax.Array, qtype: int
) -> tuple[jax.Array, jax.Array, jax.Array | None] | None:
    """x as ggml stores it for the int8 dot: (codes int8 ``[..., n]``, block scales f32
    ``[..., n / block]`` (Q8_0/Q8_1: the f16 value), Q8_1 block sums ``s = fp16(d * sum(q))``
    f32 ``[..., n / 32]`` or None). The same rounding as ``quantize_activations_ex``: codes
    times scales are its rounded x. None where ggml multiplies in f32."""
    parts = _q8_parts(x, qtype)
    if parts is None:
        return None
    q, d32, d = parts
    s = None
    if QType(qtype) in _Q8_1:
        s = (d32[..., 0] * jnp.sum(q, axis=-1)).astype(jnp.float16).astype(jnp.float32)
    return q.astype(jnp.int8).reshape(x.shape), d[..., 0], s


def q8_1_correction(s_err: jax.Array, qt) -> jax.Array | None:
    """``sum_b m_w[n, b] * s_err[..., b]`` ([..., n_out]) for a Q4_1/Q5_1 weight in GGUF
    layout: the part of ggml's dot that our f32 kernels cannot see. Small per product but
    systematic (it moves SmolLM2's perplexity by ~0.5 %)."""
    if qt.layout != "gguf" or len(qt.shape) != 2:
        return None
    n_out, n_in = qt.shape
    blocks = qt.natural().data.reshape(n_out, n_in // 32, -1)
    m16 = blocks[:, :, 2].astype(jnp.uint16) | (blocks[:, :, 3].astype(jnp.uint16) << 8)
    m = jax.lax.bitcast_convert_type(m16, jnp.float16).astype(jnp.float32)
    return jnp.einsum("...b,nb->...n", s_err, m)


