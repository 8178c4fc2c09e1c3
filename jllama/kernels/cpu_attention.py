"""ggml's CPU flash attention (``cpu/attention.cc``) behind XLA's FFI, bit-identical to
``ggml_flash_attn_ext`` as llama.cpp runs it (f32 Q, f16 K/V cache, causal + sliding-window
mask), compiled at first use into the one kernel library (cpu_ffi.py).

Its translation unit is compiled with its own flags (``cpu_ffi.ATTENTION_FLAGS``), not the
reassociating ones of the matvec kernels: every rounding step is ggml's, so the flags are
strict and each FMA in the source is explicit (``-ffp-contract=off``).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jllama.kernels import cpu_ffi

log = logging.getLogger(__name__)

_TARGET = ("jllama_flash_attn", "JllamaFlashAttn")
# K and/or V cache quantized (ggml's one_chunk only): built where the int8 kernels are
_TARGET_Q = ("jllama_flash_attn_q", "JllamaFlashAttnQ")
FA_TILE_Q = 64  # ggml's GGML_FA_TILE_Q: this many query rows or more take the tiled path
SPLIT_KV_MIN = 512  # one query row over this many keys: ggml splits the keys across threads


@functools.cache
def available() -> bool:
    """Load the kernel library (cpu_ffi builds it once) and register the kernel; False where
    that is not possible (no compiler, neither AVX-512 nor AVX2 + FMA + F16C;
    ``Numerics.cpu_kernels`` is the caller's to check)."""
    lib = cpu_ffi.library()
    if lib is None or not hasattr(lib, _TARGET[1]):  # no AVX-512 / AVX2 branch of ggml's to follow
        return False
    try:
        jax.ffi.register_ffi_target(_TARGET[0], jax.ffi.pycapsule(getattr(lib, _TARGET[1])),
                                    "cpu")
        if hasattr(lib, _TARGET_Q[1]):
            jax.ffi.register_ffi_target(_TARGET_Q[0],
                                        jax.ffi.pycapsule(getattr(lib, _TARGET_Q[1])), "cpu")
    except Exception as e:  # any failure means "use the XLA attention", never a crash
        log.warning("jllama: C++ flash attention unavailable (%s)", e)
        return False
    return True


# ggml type ids of the cache types the quantized-cache kernel reads
QUANT_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
                     "iq4_nl": 20}


def quantized_available() -> bool:
    """The quantized-cache flash attention (ggml's one_chunk with a quantized K and/or V)."""
    return available() and hasattr(cpu_ffi.library(), _TARGET_Q[1])


def ggml_flash_attn_q(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos0: jax.Array,
                      kv_len: int, scale: float, k_type: str, v_type: str, head_dim_v: int,
                      window: int | None = None, softcap: float | None = None,
                      bidir: bool = False, layer: jax.Array | int = 0) -> jax.Array:
    """``ggml_flash_attn`` for a cache with a quantized K and/or V (llama.cpp's -ctk / -ctv
    q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1; the other f16): caches [B, (L,) KVH, S, row] as
    models/kvquant.py stores them (uint8 block rows, or f16). ggml runs one_chunk for every row
    count with such a cache, so there is no neq1 / thread-count dependence. Returns
    [B, T, H * Dv] f32."""
    if not quantized_available():
        raise RuntimeError("the C++ quantized-cache flash attention is not available here")
    b, t, h, _ = q.shape

    def as_bytes(c: jax.Array) -> jax.Array:
        if c.dtype == jnp.uint8:
            return c
        u8 = jax.lax.bitcast_convert_type(c.astype(jnp.float16), jnp.uint8)  # [..., D, 2]
        return u8.reshape(*c.shape[:-1], c.shape[-1] * 2)

    out = jax.ShapeDtypeStruct((b, t, h * head_dim_v), jnp.float32)
    return jax.ffi.ffi_call(_TARGET_Q[0], out, vmap_method="sequential")(
        q.astype(jnp.float32), as_bytes(k_cache), as_bytes(v_cache),
        jnp.asarray(pos0, jnp.int32).reshape(b), jnp.asarray(layer, jnp.int32).reshape(()),
        kv_len=np.int64(kv_len), scale=np.float32(scale), window=np.int64(window or 0),
        softcap=np.float32(softcap or 0.0), bidir=np.int64(bool(bidir)),
        k_type=np.int64(QUANT_CACHE_TYPES[k_type]), v_type=np.int64(QUANT_CACHE_TYPES[v_type]),
        dv=np.int64(head_dim_v),
    )


@functools.cache
def default_threads() -> int:
    """llama.cpp's default thread count (common's ``cpu_get_num_math``: the physical cores, i.e.
    distinct sets of hyperthread siblings); only the split-KV decode path depends on it. Pass
    the ``-t`` llama.cpp ran with where that differs (hybrid CPUs: llama.cpp counts P-cores)."""
    sib = {p.read_text().strip() for p in
           Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings")}
    return len(sib) or os.cpu_count() or 1


def ggml_flash_attn(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos0: jax.Array,
                    kv_len: int, scale: float, window: int | None = None,
                    softcap: float | None = None, n_threads: int | None = None,
                    neq1: int | None = None, workers: int = 0, kv_pad: int = 0,
                    bidir: bool = False, layer: jax.Array | int = 0,
                    segments: jax.Array | None = None) -> jax.Array:
    """ggml's ``flash_attn_ext`` (CPU) with jllama's layouts.

    q: [B, T, H, D] f32, the T new queries at absolute positions ``pos0[b] .. pos0[b] + T - 1``;
    k_cache / v_cache: [B, KVH, S, D] / [B, KVH, S, Dv] float16 already holding this call's keys
    (positions ``>= kv_len`` are never read; ``kv_len`` is static). Query head h reads kv head
    ``h // (H // KVH)``. Key j is visible to a query at position p iff ``j <= p`` and, with a
    window, ``p - j < window`` (llama.cpp's ``is_masked_swa``, standard type). Returns
    [B, T, H * Dv] f32.

    ``neq1``: the query rows of the ggml ubatch (default T), which picks ggml's path: tiled from
    64 rows, split-KV for a lone row over ``kv_len >= 512`` keys (then ``n_threads``, llama.cpp's
    thread count, sets the key chunks), one_chunk otherwise. Masked keys are never read, so
    ``kv_len`` may exceed the filled positions; for split-KV it must be llama.cpp's n_kv,
    ``min(cells, max(256, ceil(used / 256) * 256))``, for the chunk boundaries to agree.
    Slot j of the cache is taken to hold position j (key order is ggml's summation order).
    ``workers``: threads used here (0 = XLA's pool); results do not depend on it.
    ``kv_pad``: when > 0 (and B == 1), n_kv is taken as llama.cpp computes it from the
    position, ``max(kv_pad, ceil((pos0 + T) / kv_pad) * kv_pad)`` (llama.cpp pads by 256),
    instead of ``kv_len``: the engine's static kv buckets need not be llama.cpp's n_kv.
    ``bidir``: llama.cpp's ``causal_attn`` off (an image's tokens in Gemma 3, a vision
    encoder): every query sees the keys up to the last query's position (the window, if any,
    still counts back from its own position).
    ``layer`` (traced or static): with stacked caches [B, L, KVH, S, D] (a scanned decoder's),
    the layer read, in place.
    ``segments`` [B, T] int32 (keys = the queries, pos0 0): query t sees exactly the keys of its
    run of equal ids, ggml with a block-diagonal mask (Qwen2.5-VL's window attention).
    """
    if not available():
        raise RuntimeError("the C++ flash attention kernel is not available on this machine")
    b, t, h, d = q.shape
    dv = v_cache.shape[-1]
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    out = jax.ShapeDtypeStruct((b, t, h * dv), jnp.float32)
    return jax.ffi.ffi_call(_TARGET[0], out, vmap_method="sequential")(
        q.astype(jnp.float32), k_cache.astype(jnp.float16), v_cache.astype(jnp.float16),
        jnp.asarray(pos0, jnp.int32).reshape(b), layer,
        (jnp.zeros((0,), jnp.int32) if segments is None
         else jnp.asarray(segments, jnp.int32).reshape(-1)),
        kv_len=np.int64(kv_len), scale=np.float32(scale), window=np.int64(window or 0),
        softcap=np.float32(softcap or 0.0),
        n_threads=np.int64(n_threads if n_threads else default_threads()),
        neq1=np.int64(neq1 or t), workers=np.int64(workers), kv_pad=np.int64(kv_pad),
        bidir=np.int64(bool(bidir)),
    )
