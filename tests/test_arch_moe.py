"""Mixture-of-experts architectures (Mixtral-style ``llama``, ``qwen3moe``, ``qwen2moe``) against
llama.cpp on tiny random GGUF models: all-position logits on a 41-token sequence and 32 greedy
tokens.

F32 models must agree to float rounding; quantized ones (experts quantized as 3-D blocks) within
the spread of llama.cpp's own activation rounding. The 41-token prefill runs the grouped
(sorted, tiled) expert path, decode steps the gathered (k experts per token) path.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinymodels_moe as tm

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    return {
        "llama_f32": tm.write_llama_moe(d / "llama_moe_f32.gguf"),
        "llama_q8_0": tm.write_llama_moe(d / "llama_moe_q8_0.gguf", quant=tm.Q.Q8_0),
        "qwen3moe_f32": tm.write_qwen3moe(d / "qwen3moe_f32.gguf"),
        "qwen3moe_q4_0": tm.write_qwen3moe(d / "qwen3moe_q4_0.gguf", quant=tm.Q.Q4_0),
        "qwen2moe_f32": tm.write_qwen2moe(d / "qwen2moe_f32.gguf"),
        "qwen2moe_q8_0": tm.write_qwen2moe(d / "qwen2moe_q8_0.gguf", quant=tm.Q.Q8_0),
    }


@pytest.mark.parametrize("name,tol", [("llama_f32", 1e-3), ("llama_q8_0", 0.5)])
def test_llama_moe_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)  # through build_model's llama -> llama_moe dispatch


def test_llama_with_experts_dispatches_to_moe(models):
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    _, m = build_model(read_gguf(models["llama_f32"]))
    assert type(m).__module__ == "jllama.models.llama_moe"


@pytest.mark.parametrize("name,tol", [("qwen3moe_f32", 1e-3), ("qwen3moe_q4_0", 0.5)])
def test_qwen3moe_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)


@pytest.mark.parametrize("name,tol", [("qwen2moe_f32", 1e-3), ("qwen2moe_q8_0", 0.5)])
def test_qwen2moe_matches_llamacpp(models, name, tol):
    tm.compare(models[name], None, tol=tol)


@pytest.mark.parametrize("n_tok", [5, 37])
def test_gathered_and_grouped_match_brute_force(n_tok):
    """The decode (gather k experts) and prefill (sorted tiles) formulations agree with a
    per-token loop, with softmax / sigmoid / softmax-weight gating, selection bias, scaling."""
    import jax
    import jax.numpy as jnp

    from jllama.models import moe
    from jllama.models.common import Weights
    from jllama.quant.qtensor import QTensor

    rng = np.random.default_rng(0)
    e, d, f = 6, 32, 64

    def qt(a):
        return QTensor(jnp.asarray(a, jnp.float32), 0, a.shape)

    w = Weights({
        "ffn_gate_inp.weight": qt(rng.standard_normal((e, d))),
        "ffn_gate_exps.weight": qt(rng.standard_normal((e, f, d)) / 6),
        "ffn_up_exps.weight": qt(rng.standard_normal((e, f, d)) / 6),
        "ffn_down_exps.weight": qt(rng.standard_normal((e, d, f)) / 8),
        "exp_probs_b.bias": qt(rng.standard_normal(e)),
    })
    x = jnp.asarray(rng.standard_normal((n_tok, d)), jnp.float32)
    for gating in (moe.GATING_SOFTMAX, moe.GATING_SIGMOID, moe.GATING_SOFTMAX_WEIGHT):
        m = moe.MoE(w, "", moe.MoEConfig(e, 2, gating, norm_weights=True, scale=2.5))
        logits = x @ w("ffn_gate_inp.weight").data.T
        ids, wts = moe.route(logits, m.cfg, w("exp_probs_b.bias").data)
        ya, yb = m._gathered(x, ids), m._grouped(x, ids)
        np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))  # same per-row products
        a, b = moe.combine(ya, wts), moe.combine(yb, wts)
        # brute force: every expert densely, weights scattered
        ref = np.zeros((n_tok, d), np.float32)
        for n in range(n_tok):
            for j in range(2):
                k = int(ids[n, j])
                g = np.asarray(w("ffn_gate_exps.weight").data[k]) @ np.asarray(x[n])
                u = np.asarray(w("ffn_up_exps.weight").data[k]) @ np.asarray(x[n])
                h = np.asarray(jax.nn.silu(g)) * u
                ref[n] += float(wts[n, j]) * (np.asarray(w("ffn_down_exps.weight").data[k]) @ h)
        np.testing.assert_allclose(np.asarray(a), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(b), ref, rtol=1e-4, atol=1e-4)
