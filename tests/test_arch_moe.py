"""Mixture-of-experts architectures (Mixtral-style ``llama``, ``qwen3moe``, ``qwen2moe``) against
llama.cpp on tiny random GGUF models: all-position logits on a 41-token sequence and 32 greedy
tokens. The 41-token prefill runs the grouped (sorted, tiled) expert path, decode steps the
gathered (k experts per token) path.

* With llama.cpp's CPU defaults (flash attention, f16 cache) the quantized models give the same
  logits bit for bit and the same greedy tokens, where this machine has the C++ kernels that
  reproduce ggml (int8 vec_dot: VNNI; flash attention: AVX-512); skipped elsewhere.
* Each MoE layer, fed llama.cpp's own input (its ``ffn_norm`` output), reproduces llama.cpp's
  routing (router logits, probabilities, chosen experts' weights, their renormalisation) bit for
  bit on any machine, and the weighted expert sum too where the experts' products are ggml's
  (F32 experts; quantized ones with the int8 kernels).
* Without flash attention and with an f32 cache (paths jllama only approximates), F32 models
  agree to float rounding, quantized ones within the spread of llama.cpp's activation rounding:
  test_arch_moe_f32_cache.py (a file of its own so that pytest-xdist's ``--dist loadfile`` can
  run it beside this one: each is minutes of compiles on a 2-core machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tinymodels_moe as tm

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))

pytestmark = pytest.mark.oracle

# qwen3moe_iq4_nl: ggml's mul_mat_id sums IQ4_NL in vec_dot's order for every row count, its
# mul_mat in llamafile's from 2 rows (the experts then run one row at a time, moe.py)
# qwen3moe_nvfp4: ggml's vec_dot for NVFP4 in mul_mat and mul_mat_id alike
QUANTIZED = ["llama_q8_0", "qwen3moe_q4_0", "qwen2moe_q8_0", "qwen3moe_iq4_nl", "qwen3moe_nvfp4"]


def _exact_kernels_missing(path) -> str | None:
    """Why this machine cannot reproduce llama.cpp's CPU logits for this file bit for bit (None:
    it can): the int8 kernels for every quantized weight type, ggml's flash attention kernel."""
    from jllama.gguf.reader import read_gguf
    from jllama.kernels import cpu_attention, cpu_ffi

    if not cpu_attention.available():
        return "no C++ flash attention on this CPU (it needs AVX-512, or AVX2 with FMA and F16C)"
    types = {int(t.qtype) for t in read_gguf(path).tensors.values() if len(t.shape) >= 2}
    missing = sorted(t for t in types if t != 0 and not cpu_ffi.q8_supported(t))
    return (f"no int8 kernel on this CPU for ggml types {missing} (needs AVX2, FMA and F16C)"
            if missing else None)


@pytest.mark.parametrize("name", QUANTIZED)
def test_bit_exact_with_llamacpps_cpu_defaults(models, name):
    """Flash attention on and an f16 cache on both sides: every logit of the 41-token prefill
    identical (max |d| = 0) and 32 greedy tokens identical."""
    why = _exact_kernels_missing(models[name])
    if why:
        pytest.skip(why)
    tm.compare(models[name], None, tol=0.0, cache="f16", flash_attn=True)


ROUTING = ["ffn_moe_logits", "ffn_moe_probs", "ffn_moe_weights", "ffn_moe_weights_sum",
           "ffn_moe_weights_norm", "ffn_shexp_gate_inp", "ffn_shexp_gate"]


@pytest.mark.parametrize("name", ["llama_f32", "qwen3moe_f32", "qwen2moe_f32", *QUANTIZED])
def test_moe_layer_reproduces_llamacpp_on_its_input(models, name):
    """llama.cpp (flash attention on) runs a 41-token prompt and a 1-token one (grouped and
    gathered expert paths here); its eval callback gives each layer's ``ffn_norm`` output and
    the MoE's tensors. jllama's MoE on that input: routing bit for bit; ``ffn_moe_out`` (the
    weighted sum of the routed experts) bit for bit where the expert products are ggml's (F32
    experts: its vec_dot_f32 step by step; quantized: the int8 kernels), else within f32 noise;
    qwen2moe's shared expert likewise where the int8 kernels cover it."""
    import jax
    import jax.numpy as jnp
    from numerics_vs_llamacpp import llamacpp_tensors

    from jllama.gguf.reader import read_gguf
    from jllama.kernels import cpu_ffi
    from jllama.models import build_model, common
    from jllama.numerics import Numerics, use

    path = models[name]
    g = read_gguf(path)
    num = Numerics(taps=True)
    spec, model = build_model(g, numerics=num)
    qtypes = {int(t.qtype) for n, t in g.tensors.items() if "_exps" in n or "_shexp" in n}
    quantized = qtypes != {0}
    int8 = quantized and all(cpu_ffi.q8_supported(t) for t in qtypes)
    experts_exact = int8 or not quantized
    for n_tok in (41, 1):
        ids = tm.prompt_ids(spec.n_vocab)[:n_tok]
        ref = llamacpp_tensors(str(path), ids, flash_attn=True, n_ubatch=512,
                               keep=lambda k: k.startswith(("ffn_norm", "ffn_moe", "ffn_shexp")))
        hs = [jnp.asarray(ref[f"ffn_norm-{il}"].reshape(n_tok, -1)) for il in range(spec.n_layer)]

        def ffns(hs):
            # every layer's MoE in one program (one compile instead of one per layer): each
            # layer's taps carry the index set while it is traced, as decoder_forward sets it
            out = []
            for il, h in enumerate(hs):
                common._TAP_LAYER = il
                out.append(model.blocks[il].ffn(h))
            return out

        common.TAP_SINK.clear()
        with use(num):
            jax.block_until_ready(jax.jit(ffns)(hs))
        ours = dict(common.TAP_SINK)
        for il in range(spec.n_layer):
            checked = []
            for key in [f"{k}-{il}" for k in ROUTING if f"{k}-{il}" in ref]:
                np.testing.assert_array_equal(ours[key].reshape(-1), ref[key].reshape(-1),
                                              err_msg=f"{name} T={n_tok} {key}")
                checked.append(key)
            for k, exact in (("ffn_moe_out", experts_exact), ("ffn_shexp", int8)):
                key = f"{k}-{il}"
                if key not in ref:
                    continue
                a, b = ours[key].reshape(-1), ref[key].reshape(-1)
                if exact:
                    np.testing.assert_array_equal(a, b, err_msg=f"{name} T={n_tok} {key}")
                else:
                    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
                checked.append(key)
            assert f"ffn_moe_out-{il}" in checked and f"ffn_moe_probs-{il}" in checked


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tm.write_test_models(tmp_path_factory.mktemp("moe"))


def test_llama_with_experts_builds_moe_layers(models):
    """llama with ``expert_count > 0`` (Mixtral-style) is the shared decoder with routed experts
    in every layer, renormalised softmax gating; the same blocks, so they share one graphdef."""
    from flax import nnx

    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model
    from jllama.models.decoder import Decoder
    from jllama.models.moe import GATING_SOFTMAX, MoE

    _, m = build_model(read_gguf(models["llama_f32"]))
    assert isinstance(m, Decoder)
    assert all(isinstance(b.ffn, MoE) for b in m.blocks)
    cfg = m.blocks[0].ffn.cfg
    assert (cfg.n_expert, cfg.n_used, cfg.gating, cfg.norm_weights) == (4, 2, GATING_SOFTMAX, True)
    assert nnx.graphdef(m.blocks[0]) == nnx.graphdef(m.blocks[1])


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

        def run(x, m=m):
            logits = x @ w("ffn_gate_inp.weight").data.T
            ids, wts = moe.route(logits, m.cfg, w("exp_probs_b.bias").data)
            ya, yb = m._gathered(x, ids), m._grouped(x, ids)
            return ids, wts, ya, yb, moe.combine(ya, wts), moe.combine(yb, wts)

        # under one jit, as the model runs them (eagerly each lax.scan compiled anew per call)
        ids, wts, ya, yb, a, b = jax.jit(run)(x)
        np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))  # same per-row products
        # brute force: every expert densely, weights scattered
        ref = np.zeros((n_tok, d), np.float32)
        # host copies once (the same values; indexing the device arrays was a dispatch each)
        wg, wu, wd = (np.asarray(w(f"ffn_{p}_exps.weight").data) for p in ("gate", "up", "down"))
        xn, ids, wts = np.asarray(x), np.asarray(ids), np.asarray(wts)
        for n in range(n_tok):
            for j in range(2):
                k = int(ids[n, j])
                g = wg[k] @ xn[n]
                u = wu[k] @ xn[n]
                h = np.asarray(jax.nn.silu(g)) * u
                ref[n] += float(wts[n, j]) * (wd[k] @ h)
        np.testing.assert_allclose(np.asarray(a), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(b), ref, rtol=1e-4, atol=1e-4)


def test_kquant_experts_bit_exact_with_llamacpp(tmp_path):
    """Q4_K_M experts (Q4_K gate/up, Q6_K down) with 8 or more prompt rows per expert: from 8
    rows ggml's ``mul_mat`` switches K-quants to its tiled order while ``mul_mat_id`` stays in
    vec_dot's, so the grouped expert call (one int8 ``mul_mat_id`` per weight group) must keep
    vec_dot's order for every expert's rows. Qwen3-30B-A3B's layout at width 256 (8 experts,
    top 4: a 41-token prompt gives each expert ~20 rows), quantized as llama-quantize does."""
    import test_synth

    from jllama.convert import synth
    from jllama.quant.mixes import mix_from_base
    from jllama.quant.quantize import quantize_file

    shape = synth.scaled(synth.SHAPES["qwen3-30b-a3b"], 1, tiny=True)
    src = tmp_path / "f32.gguf"
    synth.write(shape, src, test_synth._vocab(shape), seed=3)
    path = tmp_path / "q4_k_m.gguf"
    quantize_file(src, path, mix_from_base("q4_k_m"))
    why = _exact_kernels_missing(path)
    if why:
        pytest.skip(why)
    tm.compare(path, None, tol=0.0, cache="f16", flash_attn=True, n_greedy=8)
