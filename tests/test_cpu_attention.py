"""The C++ flash attention (``jllama_flash_attn``) against ggml's own ``ggml_flash_attn_ext``.

The oracle is llama-cpp-python's libggml-base/-cpu driven through ctypes on a plain ggml
context (no backend buffers, so no AMX/repack extra buffer types), with the inputs built as
llama.cpp's ``build_attn_mha`` builds them: q [D, H, T] f32 permuted to [D, T, H], K/V as
permuted views of an f16 cache [D, KVH, cells], an f16 mask [n_kv, T] of 0 / -INF (causal and
``is_masked_swa``), F32 precision. ggml picks its path from the query count (one_chunk below 64
rows, tiled from 64, split-KV for one row over 512+ keys, chunked by the thread count). The
outputs must be bit-identical.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

from jllama.kernels import cpu_attention

F32, F16 = 0, 1  # ggml types
PREC_F32 = 10


def mask_rows(pos0: int, t: int, n_kv: int, window: int | None) -> np.ndarray:
    """llama.cpp's f16 KQ mask [T, n_kv]: 0 where key j is visible from query pos0 + i (causal,
    and ``is_masked_swa`` standard: masked when p - j >= n_swa), -INF elsewhere."""
    p = pos0 + np.arange(t)[:, None]
    j = np.arange(n_kv)[None, :]
    vis = j <= p
    if window:
        vis &= (p - j) < window
    return np.where(vis, 0.0, -np.inf).astype(np.float16)


def ggml_fa(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, n_kv: int, scale: float,
            window: int | None, softcap: float | None, n_threads: int) -> np.ndarray:
    """ggml's CPU flash attention for one sequence: q [T, H, D] f32, caches k/v [KVH, S, D] f16
    (jllama's layout, rewritten to llama.cpp's [cells, KVH, D]); returns [T, H * Dv] f32."""
    base, cpu = ggml_libs()
    t, h, d = q.shape
    kvh, _, dv = v.shape
    ctx = base.ggml_init(GgmlInitParams(512 << 20, None, False))
    assert ctx
    try:
        qt = base.ggml_new_tensor_3d(ctx, F32, d, h, t)
        ggml_fill(base, qt, q.astype(np.float32))
        kc = base.ggml_new_tensor_3d(ctx, F16, d, kvh, n_kv)  # the cache: one row per cell
        ggml_fill(base, kc, k[:, :n_kv].transpose(1, 0, 2).astype(np.float16))
        vc = base.ggml_new_tensor_3d(ctx, F16, dv, kvh, n_kv)
        ggml_fill(base, vc, v[:, :n_kv].transpose(1, 0, 2).astype(np.float16))
        kview = base.ggml_view_3d(ctx, kc, d, kvh, n_kv, d * 2, d * kvh * 2, 0)
        vview = base.ggml_view_3d(ctx, vc, dv, kvh, n_kv, dv * 2, dv * kvh * 2, 0)
        mask = base.ggml_new_tensor_2d(ctx, F16, n_kv, t)
        ggml_fill(base, mask, mask_rows(pos0, t, n_kv, window))
        qp = base.ggml_permute(ctx, qt, 0, 2, 1, 3)
        kp = base.ggml_permute(ctx, kview, 0, 2, 1, 3)
        vp = base.ggml_permute(ctx, vview, 0, 2, 1, 3)
        out = base.ggml_flash_attn_ext(ctx, qp, kp, vp, mask, scale, 0.0, softcap or 0.0)
        assert base.ggml_prec_set_acc(out, PREC_F32)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        res = np.empty((t, h * dv), np.float32)  # ggml's result is [Dv, H, T]
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


def require_kernel() -> None:
    if os.environ.get("JLLAMA_NO_FFI", "") not in ("", "0"):
        pytest.skip("JLLAMA_NO_FFI is set: the C++ kernels are off by request")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    words = set(flags.split())
    if not {"f16c", "fma"} <= words or not ({"avx512f", "avx512dq"} <= words or "avx2" in words):
        pytest.skip("neither AVX-512 nor AVX2 (with FMA, F16C) on this CPU: the kernel mirrors "
                    "those x86 branches of ggml only and is not built here")
    assert cpu_attention.available(), "C++ flash attention failed to build (see the log)"


def inputs(b: int, t: int, h: int, kvh: int, d: int, s: int, seed: int):
    """Queries and an f16 cache with the spread of real activations (a few large outliers)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    q[..., rng.integers(0, d, 3)] *= 8.0
    k = (rng.standard_normal((b, kvh, s, d)) * 1.5).astype(np.float16)
    v = rng.standard_normal((b, kvh, s, d)).astype(np.float16)
    return q, k, v


def ours(q, k, v, pos0, kv_len, scale, window=None, softcap=None, n_threads=1, workers=0):
    return np.asarray(cpu_attention.ggml_flash_attn(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos0, jnp.int32), kv_len,
        scale, window=window, softcap=softcap, n_threads=n_threads, workers=workers))


def check(q, k, v, pos0, kv_len, scale, window=None, softcap=None, n_threads=1, workers=0):
    got = ours(q, k, v, pos0, kv_len, scale, window, softcap, n_threads, workers)
    for bi in range(q.shape[0]):
        ref = ggml_fa(q[bi], k[bi], v[bi], int(pos0[bi]), kv_len, scale, window, softcap,
                      n_threads)
        g = got[bi]
        bad = np.flatnonzero(g.view(np.uint32) != ref.view(np.uint32))
        assert bad.size == 0, (
            f"b={bi}: {bad.size} of {ref.size} differ, e.g. index {bad[0]}: "
            f"{g.flat[bad[0]]!r} vs ggml {ref.flat[bad[0]]!r}"
        )


SMOL = dict(h=9, kvh=3, d=64)   # SmolLM2-135M
GEMMA = dict(h=4, kvh=1, d=256)  # Gemma 3 270M (sliding window 512 on 5 of 6 layers)


@pytest.mark.parametrize("t", [1, 5, 63, 64, 100])
@pytest.mark.parametrize("shape", [SMOL, GEMMA], ids=["smollm2", "gemma3"])
def test_prompt_and_decode_shapes_bit_exact(shape, t) -> None:
    """Queries continuing a cache (pos0 > 0) on both sides of the 64-row tiled threshold."""
    require_kernel()
    pos0 = np.array([37, 0])
    kv_len = 37 + t
    q, k, v = inputs(2, t, shape["h"], shape["kvh"], shape["d"], kv_len + 3, seed=t)
    check(q, k, v, pos0, kv_len, 1.0 / np.sqrt(shape["d"]))


@pytest.mark.parametrize("t", [1, 5, 64, 100])
def test_sliding_window_and_softcap_bit_exact(t) -> None:
    """Gemma's window (small here so it bites) with and without a logit softcap."""
    require_kernel()
    pos0 = np.array([150])
    kv_len = 150 + t
    q, k, v = inputs(1, t, 4, 1, 256, kv_len, seed=100 + t)
    check(q, k, v, pos0, kv_len, 0.0625, window=40)
    check(q, k, v, pos0, kv_len, 0.0625, window=40, softcap=30.0)


def test_512_token_prefill_two_threads_bit_exact() -> None:
    """A full 512-token ubatch (tiled, several KV tiles, ggml on 2 threads), also windowed."""
    require_kernel()
    q, k, v = inputs(1, 512, 9, 3, 64, 512, seed=5)
    check(q, k, v, np.array([0]), 512, 0.125, n_threads=2)
    q, k, v = inputs(1, 512, 4, 1, 256, 600, seed=6)
    check(q, k, v, np.array([88]), 600, 0.0625, window=512, n_threads=2, workers=2)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_split_kv_decode_bit_exact(n_threads) -> None:
    """One query over 512+ keys: ggml splits the keys into n_threads chunks and merges them."""
    require_kernel()
    pos0 = np.array([700])
    q, k, v = inputs(1, 1, 9, 3, 64, 768, seed=7)
    check(q, k, v, pos0, 768, 0.125, n_threads=n_threads)
    q, k, v = inputs(1, 1, 4, 1, 256, 768, seed=8)
    check(q, k, v, pos0, 768, 0.0625, window=512, n_threads=n_threads)


def test_rows_do_not_depend_on_worker_threads() -> None:
    require_kernel()
    q, k, v = inputs(1, 100, 9, 3, 64, 140, seed=9)
    one = ours(q, k, v, np.array([40]), 140, 0.125, workers=1)
    two = ours(q, k, v, np.array([40]), 140, 0.125, workers=2)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))


def test_under_jit() -> None:
    require_kernel()
    q, k, v = inputs(1, 5, 9, 3, 64, 20, seed=10)
    f = jax.jit(lambda a, b_, c, p: cpu_attention.ggml_flash_attn(a, b_, c, p, 12, 0.125,
                                                                    n_threads=1))
    got = np.asarray(f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                       jnp.asarray([7], jnp.int32)))
    ref = ggml_fa(q[0], k[0], v[0], 7, 12, 0.125, None, None, 1)
    np.testing.assert_array_equal(got[0].view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("t", [3, 70])
def test_large_scores_underflow_bit_exact(t) -> None:
    """Scores hundreds apart: exp underflows to 0 (ggml_v_expf's out-of-range lanes, libm expf)."""
    require_kernel()
    q, k, v = inputs(1, t, 9, 3, 64, 90 + t, seed=11)
    q *= 40.0
    check(q, k, v, np.array([90]), 90 + t, 0.125)
    check(q, k, v, np.array([90]), 90 + t, 0.125, softcap=50.0)


@pytest.mark.parametrize("t", [4, 80])
def test_same_layout_as_jllama_attention(t) -> None:
    """Same semantics as ``jllama.models.common.attention`` (GQA head map, window, output
    layout), up to ggml's f16 accumulation: a layout slip would be O(1) off, not 1e-3."""
    require_kernel()
    from jllama.models.common import attention

    q, k, v = inputs(2, t, 4, 2, 64, 100 + t, seed=12)
    pos0 = np.array([90, 3])
    kv_len = 90 + t
    for window in (None, 20):
        got = ours(q, k, v, pos0, kv_len, 0.125, window=window)
        ref = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   jnp.asarray(pos0, jnp.int32), kv_len, 0.125, window=window,
                                   k_type="f16", v_type="f16"))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2)
