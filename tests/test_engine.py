"""Engine behaviour: prompt cache, rewind, buckets (no recompiles), context shift, KV cache types.

References here are the engine's own uncached / f32 paths (the forward pass itself is checked
against llama.cpp in test_llama_oracle.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from jllama.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(smollm2_path):
    from jllama.gguf.reader import read_gguf
    from jllama.models import build_model

    return build_model(read_gguf(smollm2_path))


def _engine(model, cache_type: str = "f16", match_llamacpp: bool = True, **kw):
    from jllama.engine.engine import Engine
    from jllama.numerics import Numerics

    spec, m = model
    num = Numerics(match_llamacpp=match_llamacpp, cache_type_k=cache_type, cache_type_v=cache_type)
    return Engine(spec, m, numerics=num, **kw)


def _text_ids(model, n, seed=0):
    """Natural-ish token ids: the model's own sampled continuation of a BOS."""
    eng = _engine(model, ctx_size=256)
    out = list(eng.generate([1, 504, 3458, 282, 4649, 314], SamplingParams(temperature=0.8, seed=seed),
                            max_tokens=n))
    return [1, 504, 3458, 282, 4649, 314] + out


def test_prompt_cache_reuses_prefix_and_matches_fresh(model):
    # match_llamacpp=False: llama.cpp-style activation rounding's round() amplifies the harmless
    # summation-order differences between chunkings into O(0.5) logit changes, which would hide
    # whether the cache logic itself is exact; an f16 cache would amplify them too
    eng = _engine(model, ctx_size=256, cache_type="f32", match_llamacpp=False)
    rng = np.random.default_rng(0)
    shared = rng.integers(100, 40000, 120).tolist()
    a = shared + [11, 12]
    b = shared + [13, 14, 15]
    eng.prefill_cached(a, 0)
    lg_cached, reused = eng.prefill_cached(b, 0)
    assert reused == len(shared)
    fresh = _engine(model, ctx_size=256, cache_type="f32", match_llamacpp=False).prefill(b, 0)
    assert np.abs(np.asarray(lg_cached) - np.asarray(fresh)).max() < 1e-3
    # identical prompt: everything but the last token is reused
    _, reused = eng.prefill_cached(b, 0)
    assert reused == len(b) - 1


def test_no_recompile_after_warmup(model):
    eng = _engine(model, ctx_size=256)
    for n in (5, 9):  # same prefill bucket (16), same kv bucket
        list(eng.generate(list(range(100, 100 + n)), SamplingParams.greedy(), max_tokens=4))
    progs = (eng._forward_slot, eng._decode_sample, eng._decode_loop)
    sizes = [p._cache_size() for p in progs]
    assert sizes[2] == 1  # greedy decoding ran as device chunks, one program
    for n in (7, 12, 3):  # other chunk lengths (max_tokens - n) are a traced value, not a shape
        list(eng.generate(list(range(200, 200 + n)), SamplingParams.greedy(), max_tokens=6))
    assert [p._cache_size() for p in progs] == sizes


def test_context_shift_generates_past_the_context(model):
    ctx = 96
    eng = _engine(model, ctx_size=ctx)
    prompt = [1, 504, 3458, 282, 4649, 314]
    out = list(eng.generate(prompt, SamplingParams(temperature=0.7, seed=3), max_tokens=3 * ctx,
                            on_full="shift", n_keep=len(prompt)))
    assert len(out) == 3 * ctx
    assert eng.timings.extra["shifts"] >= 2
    # coherence: a fresh model finds the post-shift continuation far more likely than noise
    tail = out[-ctx + 8 :]
    lg = _engine(model, ctx_size=ctx).logits(tail)
    lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
    nll = -np.mean([lp[i, tail[i + 1]] for i in range(len(tail) - 1)])
    noise = np.random.default_rng(1).integers(100, 40000, len(tail)).tolist()
    lg2 = _engine(model, ctx_size=ctx).logits(noise)
    lp2 = lg2 - np.logaddexp.reduce(lg2, axis=-1, keepdims=True)
    nll_noise = -np.mean([lp2[i, noise[i + 1]] for i in range(len(noise) - 1)])
    print(f"\npost-shift continuation PPL {np.exp(nll):.1f} vs noise {np.exp(nll_noise):.1f}")
    assert np.exp(nll) < 60 and nll < nll_noise - 3


def test_stop_when_full_by_default(model):
    eng = _engine(model, ctx_size=32)
    out = list(eng.generate(list(range(100, 120)), SamplingParams.greedy(), max_tokens=100))
    assert len(out) == 32 - 20 + 1 - 1 or eng.timings.extra.get("context_full")


def test_padded_last_chunk_fits_the_cache_room(model):
    """The worst padding: a 257-token chunk runs as a 512-row bucket ending 255 rows past its
    last token, here right at the end of the context. The cache keeps only that much room
    (ctx rounded to 256, + 256 rows); too little and the write would be clamped into the
    wrong rows: the logits must equal those of an engine with a far larger cache."""
    rng = np.random.default_rng(3)
    ids = rng.integers(100, 40000, 768).tolist()
    small = _engine(model, ctx_size=768)
    assert small.max_len == 1024
    big = _engine(model, ctx_size=2048)
    got = [np.asarray(e.prefill(ids[:511], 0)) for e in (small, big)]
    got += [np.asarray(e.prefill(ids[511:], 0)) for e in (small, big)]
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[2], got[3])


# q4_1 and q5_0 share these paths (their bytes: tests/test_kvquant.py). Measured 2026-12-08
# with llama.cpp's Hadamard rotation of quantized caches (models/common.kv_rotation): q4_0
# 0.052, iq4_nl 0.036, q5_1 0.011 (without it 0.142, 0.108, 0.025: the bounds need it)
@pytest.mark.parametrize("kind,max_kld", [("f16", 0.01), ("q8_0", 0.02), ("q4_0", 0.1),
                                           ("iq4_nl", 0.08), ("q5_1", 0.02)])
def test_kv_cache_types(model, kind, max_kld):
    from jllama.models.kvquant import bytes_per_token

    spec, _ = model
    ids = _text_ids(model, 60)
    ref = _engine(model, ctx_size=128, cache_type="f32").logits(ids)
    eng = _engine(model, ctx_size=128, cache_type=kind)
    lg = eng.logits(ids)
    lp_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
    kld = float(np.mean(np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1)))
    per_tok = 2 * spec.n_layer * bytes_per_token(kind, spec.head_dim, spec.n_head_kv)
    print(f"\n{kind}: KLD vs f32 cache {kld:.5f}, {per_tok} bytes/token")
    assert eng.cache.nbytes == per_tok * eng.max_len  # the formula, measured
    assert kld < max_kld
    # formula: q8_0 stores 34 bytes per 32 values, f16 2 bytes per value
    expected = {"f16": 2 * spec.head_dim, "q8_0": spec.head_dim // 32 * 34,
                "q4_0": spec.head_dim // 32 * 18, "q4_1": spec.head_dim // 32 * 20,
                "iq4_nl": spec.head_dim // 32 * 18, "q5_0": spec.head_dim // 32 * 22,
                "q5_1": spec.head_dim // 32 * 24}[kind]
    assert per_tok == 2 * spec.n_layer * spec.n_head_kv * expected
