"""deepseek2 (MLA + MoE) against llama.cpp on tiny random GGUF models: all-position logits on a
41-token sequence and 32 greedy tokens, plus the size of the compressed (latent) KV cache.

Variants: V3-style (q LoRA, split attn_k_b/attn_v_b, YaRN with yarn_log_multiplier, sigmoid
gating + selection bias, 4 expert groups of which 2 are used, normalised and scaled weights, a
shared expert, one leading dense layer) in F32 and Q8_0; V2-style with the older unsplit
attn_kv_b and softmax gating; and the Lite layout (plain attn_q, which llama.cpp only accepts
on a 27-layer model).
"""

from __future__ import annotations

import pytest
import tinymodels_moe as tm

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepseek2")
    return {
        "v3_f32": tm.write_deepseek2(d / "ds_v3_f32.gguf"),
        "v3_q8_0": tm.write_deepseek2(d / "ds_v3_q8_0.gguf", quant=tm.Q.Q8_0),
        "v2_kv_b_f32": tm.write_deepseek2(d / "ds_v2_kv_b_f32.gguf", v3=False, yarn=False,
                                          split_kv_b=False),
    }


@pytest.mark.parametrize("name,tol", [("v3_f32", 1e-3), ("v3_q8_0", 0.5), ("v2_kv_b_f32", 1e-3)])
def test_deepseek2_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)


@pytest.mark.slow
def test_deepseek2_lite_matches_llamacpp(tmp_path):
    path = tm.write_deepseek2(tmp_path / "ds_lite_f32.gguf", q_lora=False, v3=False,
                              n_layer=27)
    tm.compare(path, None, tol=1e-3, n_greedy=16)


@pytest.mark.parametrize("cache_type,bytes_per", [("f32", 4), ("f16", 2)])
def test_cache_holds_the_latent_only(models, cache_type, bytes_per):
    """Per token and layer the cache holds kv_lora_rank + rope_dim values, not 2 * H * d; with
    two slots, a sequence decoded in slot 1 (batched steps) still matches llama.cpp; an f16
    cache matches llama.cpp's f16 cache."""
    from jllama.engine.engine import Engine
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.numerics import Numerics

    g = read_gguf(models["v3_f32"])
    spec, model = build_model(g)
    eng = Engine(spec, model, ctx_size=256, n_slots=2, numerics=Numerics(cache_type_k=cache_type, cache_type_v=cache_type))
    meta = g.metadata
    kv_rank = meta["deepseek2.attention.kv_lora_rank"]
    rope_dim = meta["deepseek2.rope.dimension_count"]
    n_layer = meta["deepseek2.block_count"]
    want = n_layer * 2 * eng.max_len * (kv_rank + rope_dim) * bytes_per
    assert eng.cache.nbytes == want
    full = n_layer * 2 * eng.max_len * spec.n_head * (
        meta["deepseek2.attention.key_length_mla"] + meta["deepseek2.attention.value_length_mla"]
    ) * bytes_per
    assert eng.cache.nbytes < full
    if cache_type == "f16":  # ggml rounds q and the softmax to f16 against an f16 cache
        ids = tm.prompt_ids(spec.n_vocab)
        ref = tm.oracle_logits(tm.oracle(models["v3_f32"], cache=cache_type), ids)
        diff = float(abs(eng.logits(ids) - ref).max())
        print(f"\nf16 latent cache vs llama.cpp f16 cache: max|Δlogit| = {diff:.2e}")
        assert diff < 4e-3
    if cache_type == "f32":
        from jllama.engine.sampling import SamplingParams

        ids = tm.prompt_ids(spec.n_vocab)[:8]
        want = tm.oracle_greedy(tm.oracle(models["v3_f32"]), ids, 16)
        assert list(eng.generate(ids, SamplingParams.greedy(), max_tokens=16, slot=1)) == want


@pytest.mark.parametrize("qtype_name,k", [("Q5_0", 128), ("Q8_0", 128), ("Q4_K", 512),
                                          ("Q6_K", 256)])
def test_per_head_products_are_ggmls_batched_mul_mat(qtype_name, k):
    """MLA's ``attn_k_b`` / ``attn_v_b`` products [H, out, in] per head: bit-identical to ggml's
    3-D ``mul_mat`` (batched over heads, as llama.cpp's deepseek2 graph calls it), for one
    decode row, a few rows (vec_dot; tinyBLAS for the 32-blocks) and from 8 rows per head (the
    tiled K-quant GEMM), with the heads' rows interleaved as the model holds them [B, T, H, in]."""
    import ctypes

    import jax
    import jax.numpy as jnp
    import numpy as np
    from llamacpp_oracle import GgmlInitParams, ggml_fill, ggml_libs

    from jllama.gguf.constants import QType
    from jllama.models import deepseek2
    from jllama.quant.qtensor import QTensor
    from jllama.quant.testing import random_blocks

    qtype = QType[qtype_name]
    h, n = 4, 48
    raw = random_blocks(qtype, h * n, k, seed=k).reshape(h, n, -1)
    qt = QTensor(jnp.asarray(raw), int(qtype), (h, n, k))
    base, cpu = ggml_libs()
    fn = jax.jit(lambda x, w: deepseek2._per_head_int8(x, QTensor(w, int(qtype), (h, n, k))))
    assert deepseek2._per_head_int8(jnp.zeros((1, 1, h, k)), qt) is not None  # the int8 path
    for b, t in ((1, 1), (2, 3), (1, 9), (2, 8)):
        rng = np.random.default_rng(b * 100 + t)
        x = rng.standard_normal((b, t, h, k)).astype(np.float32)
        x[..., ::37] *= 8.0  # a few outliers per row, as in a hidden state
        rows = np.ascontiguousarray(np.transpose(x.reshape(b * t, h, k), (1, 0, 2)))  # [H, M, k]
        ctx = base.ggml_init(GgmlInitParams(64 << 20, None, False))
        try:
            w = base.ggml_new_tensor_3d(ctx, int(qtype), k, n, h)
            ggml_fill(base, w, raw)
            a = base.ggml_new_tensor_3d(ctx, 0, k, b * t, h)
            ggml_fill(base, a, rows)
            y = base.ggml_mul_mat(ctx, w, a)  # ne [n, M, H]
            graph = base.ggml_new_graph(ctx)
            base.ggml_build_forward_expand(graph, y)
            assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 1) == 0
            ref = np.empty((h, b * t, n), np.float32)
            ctypes.memmove(ref.ctypes.data, base.ggml_get_data(y), ref.nbytes)
        finally:
            base.ggml_free(ctx)
        want = np.transpose(ref, (1, 0, 2)).reshape(b, t, h, n)
        got = np.asarray(fn(jnp.asarray(x), qt.data))
        bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
        assert bad.size == 0, f"{qtype_name} b={b} t={t}: {bad.size} of {want.size} differ"
