"""Pallas decode attention (one new token per sequence) over a padded KV cache, flash-decoding
style: online softmax over blocks of the cache, never touching blocks past a sequence's length.

Why a kernel: the XLA path reads the whole ``max_len`` cache for every sequence and materialises
the scores; decode is bandwidth-bound, so the win is reading only ``length`` positions of K/V.

GQA: one program per (sequence, kv head) handles that head's whole query group as the M side of
the dots (padded to 16 rows, Triton's dot minimum), so each K/V block is read once per group.

Two variants of the same math:
- ``"loop"`` (GPU/Triton, and the default in interpret mode): grid (batch, kv_heads); the cache
  block is the whole ``[max_len, d]`` row of that head (on Triton only a pointer), and a
  ``fori_loop`` with a data-dependent trip count loads ``block_l`` positions at a time.
- ``"pipelined"`` (TPU/Mosaic): grid (batch, kv_heads, blocks) with the lengths scalar-prefetched;
  the K/V index maps clamp the block index into the valid range, so steps past the length repeat
  the previous block index (the pipeline then issues no DMA) and ``pl.when`` skips their compute.
  Running max / denominator / accumulator live in VMEM scratch across the sequential block axis.

Optional ``window`` (sliding-window layers: keys at positions ``>= length - window`` only) and
``softcap`` (``c * tanh(s / c)`` on the scores, Gemma 2) follow ``models.common.attention``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jllama.kernels.pallas_qmatmul import compiler_params

_SQ = pl.squeezed
_MIN_ROWS = 16  # Triton dot: M, N, K >= 16


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _block_len(max_len: int, block_l: int) -> int:
    """Largest power of two <= block_l dividing max_len (0 if none >= 16)."""
    b = block_l
    while b >= _MIN_ROWS and max_len % b:
        b //= 2
    return b if b >= _MIN_ROWS else 0


def _block_range(length, bl: int, window: int | None):
    """[first, end) block indices holding the positions this query may attend to."""
    # lax.div, not //: lengths are >= 0, and jnp's floor division lowers to a sign op that
    # Mosaic only handles on a known TPU generation.
    end = jax.lax.div(length + (bl - 1), bl)
    first = 0 if window is None else jax.lax.div(jnp.maximum(length - window, 0), bl)
    return first, end


def _scores(q, k, start, length, bl: int, window: int | None, softcap: float | None):
    s = jax.lax.dot_general(
        q,
        k,
        (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # [G, bl]
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, bl), 1)
    valid = pos < length
    if window is not None:
        valid = valid & (pos >= length - window)
    return jnp.where(valid, s, -jnp.inf)


def _online_update(s, v, m, l, acc):
    """One flash step: fold scores ``s`` [G, bl] and values ``v`` [bl, dv] into (m, l, acc)."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p, v, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc + pv


def _finish(l, acc):
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def _loop_call(q, k, v, lengths, *, scale, bl, window, softcap, interpret, backend):
    b, kvh, g, d = q.shape
    max_len, dv = k.shape[2], v.shape[3]

    def kernel(len_ref, q_ref, k_ref, v_ref, o_ref):
        length = len_ref[0]
        qs = q_ref[...].astype(jnp.float32) * scale
        first, end = _block_range(length, bl, window)

        def step(j, carry):
            start = j * bl
            kb = k_ref[pl.ds(start, bl), :].astype(jnp.float32)
            vb = v_ref[pl.ds(start, bl), :].astype(jnp.float32)
            s = _scores(qs, kb, start, length, bl, window, softcap)
            return _online_update(s, vb, *carry)

        init = (
            jnp.full((g, 1), -jnp.inf, jnp.float32),
            jnp.zeros((g, 1), jnp.float32),
            jnp.zeros((g, dv), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(first, end, step, init)
        o_ref[...] = _finish(l, acc).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid=(b, kvh),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h: (i,)),
            pl.BlockSpec((_SQ, _SQ, g, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, max_len, d), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, max_len, dv), lambda i, h: (i, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((_SQ, _SQ, g, dv), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, g, dv), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(backend, interpret, ("parallel", "parallel")),
        name="decode_attention",
    )(lengths, q, k, v)


def _pipelined_call(q, k, v, lengths, *, scale, bl, window, softcap, interpret, backend):
    from jax.experimental.pallas import tpu as pltpu

    b, kvh, g, d = q.shape
    max_len, dv = k.shape[2], v.shape[3]
    n_blocks = max_len // bl

    def kv_index(i, h, j, lens):
        first, end = _block_range(lens[i], bl, window)
        jj = jnp.minimum(jnp.maximum(j, first), jnp.maximum(end - 1, first))
        return (i, h, jj, 0)

    def kernel(lens_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc):
        i, j = pl.program_id(0), pl.program_id(2)
        length = lens_ref[i]
        first, end = _block_range(length, bl, window)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when((j >= first) & (j < end))
        def _step():
            qs = q_ref[...].astype(jnp.float32) * scale
            s = _scores(qs, k_ref[...].astype(jnp.float32), j * bl, length, bl, window, softcap)
            m, l, acc = _online_update(
                s, v_ref[...].astype(jnp.float32), m_sc[...], l_sc[...], acc_sc[...]
            )
            m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

        @pl.when(j == n_blocks - 1)
        def _done():
            o_ref[...] = _finish(l_sc[...], acc_sc[...]).astype(o_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kvh, n_blocks),
        in_specs=[
            pl.BlockSpec((_SQ, _SQ, g, d), lambda i, h, j, lens: (i, h, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, bl, d), kv_index),
            pl.BlockSpec((_SQ, _SQ, bl, dv), kv_index),
        ],
        out_specs=pl.BlockSpec((_SQ, _SQ, g, dv), lambda i, h, j, lens: (i, h, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, 1), jnp.float32),
            pltpu.VMEM((g, dv), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kvh, g, dv), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(backend, interpret, ("parallel", "parallel", "arbitrary")),
        name="decode_attention_pipelined",
    )(lengths, q, k, v)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "window", "softcap", "block_l", "variant", "interpret", "backend"),
)
def pallas_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    block_l: int = 128,
    variant: str | None = None,
    interpret: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """Attention of one query token per sequence over its first ``lengths[b]`` cache positions.

    q ``[B, H, D]``; caches ``[B, KVH, max_len, D]`` / ``[B, KVH, max_len, Dv]`` (H a multiple of
    KVH) already holding the new token's key/value; lengths ``int [B]`` (0 gives zeros).
    Returns ``[B, H, Dv]`` in q's dtype. ``variant``: ``"loop"`` or ``"pipelined"``; default
    ``"pipelined"`` on TPU, else ``"loop"``. ``backend``: the platform to lower for (default:
    JAX's default backend).
    """
    b, h, d = q.shape
    _, kvh, max_len, _ = k_cache.shape
    if h % kvh:
        raise ValueError(f"{h} query heads is not a multiple of {kvh} kv heads")
    if variant is None:
        variant = "pipelined" if (backend or jax.default_backend()) == "tpu" else "loop"
    lengths = jnp.minimum(lengths.astype(jnp.int32), max_len)
    bl = _block_len(max_len, block_l)
    if bl == 0:  # odd cache length: pad (a copy per call; caches are normally bucketed)
        pad = -max_len % _MIN_ROWS
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, widths), jnp.pad(v_cache, widths)
        max_len += pad
        bl = _block_len(max_len, block_l)
    dv = v_cache.shape[-1]
    dp, dvp = _next_pow2(d), _next_pow2(dv)
    if (dp, dvp) != (d, dv):  # Triton tensors are powers of two; zero features change nothing
        q = jnp.pad(q, ((0, 0), (0, 0), (0, dp - d)))
        k_cache = jnp.pad(k_cache, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, 0), (0, 0), (0, dvp - dv)))
        d = dp
    g = h // kvh
    gp = max(_MIN_ROWS, _next_pow2(g))
    qg = q.reshape(b, kvh, g, d)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    call = {"loop": _loop_call, "pipelined": _pipelined_call}[variant]
    out = call(
        qg, k_cache, v_cache, lengths,
        scale=scale, bl=bl, window=window, softcap=softcap, interpret=interpret, backend=backend,
    )  # fmt: skip
    return out[:, :, :g, :dv].reshape(b, h, dv)
