"""Flash attention over a quantized KV cache (``jllama_flash_attn_q``) against ggml's own
``ggml_flash_attn_ext`` with K/V tensors of the same types and bytes (llama.cpp's -ctk / -ctv),
through ctypes as in test_cpu_attention.py. ggml runs its one_chunk path for every row count
with such a cache; the outputs must be bit-identical."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs
from test_cpu_attention import F16, F32, PREC_F32, mask_rows, require_kernel

from jllama.gguf.constants import qtype_info
from jllama.kernels import cpu_attention
from jllama.models import kvquant


def _cache(x: np.ndarray, kind: str) -> np.ndarray:
    """[KVH, S, D] f32 -> the cache rows jllama stores (f16 values, or ggml block bytes)."""
    if kind == "f16":
        return x.astype(np.float16)
    return np.asarray(jax.jit(kvquant.quantize, static_argnums=1)(jnp.asarray(x), kind))


def _ggml_type(kind: str) -> int:
    return cpu_attention.QUANT_CACHE_TYPES[kind]


def ggml_fa_q(q, kc, vc, kind_k, kind_v, d, dv, pos0, n_kv, scale, window, softcap):
    """ggml's CPU flash attention, one sequence: q [T, H, D] f32, caches [KVH, S, row] in
    jllama's layout (rewritten to llama.cpp's [cells, KVH, row])."""
    base, cpu = ggml_libs()
    t, h, _ = q.shape
    kvh = kc.shape[0]
    ctx = base.ggml_init(GgmlInitParams(512 << 20, None, False))
    assert ctx
    try:
        qt = base.ggml_new_tensor_3d(ctx, F32, d, h, t)
        ggml_fill(base, qt, q.astype(np.float32))
        views = []
        for c, kind, n in ((kc, kind_k, d), (vc, kind_v, dv)):
            tensor = base.ggml_new_tensor_3d(ctx, _ggml_type(kind), n, kvh, n_kv)
            rows = np.ascontiguousarray(c[:, :n_kv].transpose(1, 0, 2))  # [cells, KVH, row]
            ggml_fill(base, tensor, rows)
            rb = rows.shape[-1] * rows.dtype.itemsize
            views.append(base.ggml_view_3d(ctx, tensor, n, kvh, n_kv, rb, rb * kvh, 0))
        mask = base.ggml_new_tensor_2d(ctx, F16, n_kv, t)
        ggml_fill(base, mask, mask_rows(pos0, t, n_kv, window))
        qp = base.ggml_permute(ctx, qt, 0, 2, 1, 3)
        kp = base.ggml_permute(ctx, views[0], 0, 2, 1, 3)
        vp = base.ggml_permute(ctx, views[1], 0, 2, 1, 3)
        out = base.ggml_flash_attn_ext(ctx, qp, kp, vp, mask, scale, 0.0, softcap or 0.0)
        assert base.ggml_prec_set_acc(out, PREC_F32)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
        res = np.empty((t, h * dv), np.float32)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


def _check(kind_k, kind_v, t, h, kvh, d, s, pos0, window=None, softcap=None, seed=0):
    require_kernel()
    assert cpu_attention.quantized_available()
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, t, h, d)).astype(np.float32)
    q[..., rng.integers(0, d, 3)] *= 8.0
    k = (rng.standard_normal((kvh, s, d)) * 1.5).astype(np.float32)
    v = rng.standard_normal((kvh, s, d)).astype(np.float32)
    kc, vc = _cache(k, kind_k), _cache(v, kind_v)
    scale = 1.0 / np.sqrt(d)
    kv_len = pos0 + t
    got = np.asarray(cpu_attention.ggml_flash_attn_q(
        jnp.asarray(q), jnp.asarray(kc)[None], jnp.asarray(vc)[None],
        jnp.asarray([pos0], jnp.int32), kv_len, scale, kind_k, kind_v, d, window=window,
        softcap=softcap))[0]
    ref = ggml_fa_q(q[0], kc, vc, kind_k, kind_v, d, d, pos0, kv_len, scale, window, softcap)
    bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, f"{kind_k}/{kind_v}: {bad.size} of {ref.size} differ"


QUANT = ["q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


@pytest.mark.parametrize("kind", QUANT)
def test_quantized_k_and_v_bit_exact(kind) -> None:
    _check(kind, kind, t=5, h=4, kvh=2, d=64, s=96, pos0=40)  # a short prompt after 40 keys
    _check(kind, kind, t=1, h=4, kvh=2, d=64, s=96, pos0=90, seed=1)  # decode


@pytest.mark.parametrize("kinds", [("q8_0", "f16"), ("f16", "q8_0"), ("q4_1", "q5_0")])
def test_mixed_cache_types_bit_exact(kinds) -> None:
    _check(*kinds, t=3, h=8, kvh=2, d=128, s=80, pos0=60)


def test_window_softcap_and_many_rows_bit_exact() -> None:
    """Gemma-like: a sliding window and a softcap, 70 query rows (ggml's tiled path would
    start at 64 with an f16 cache; a quantized one stays on one_chunk)."""
    _check("q8_0", "q8_0", t=70, h=4, kvh=1, d=256, s=160, pos0=20, window=48, softcap=30.0)


def test_block_bytes_are_the_types() -> None:
    for kind in QUANT:
        assert qtype_info(_ggml_type(kind)).name.lower() == kind
