"""Seeded sampling against llama.cpp's (llama-cpp-python 0.3.36): the same seed draws the same
tokens. First llama.cpp's chain from top-k to ``llama_sampler_init_dist(seed)`` on random logit
rows, many draws in a row from one sampler (its generators persist), then whole generations on
the real SmolLM2 Q4_1, where llama.cpp's logits are bit-identical to ours, driven by the chain
llama-server builds (common_sampler_init's default order)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module

from jllama.engine.dist import MT19937, HostSampler
from jllama.engine.sampling import SamplingParams

pytestmark = pytest.mark.oracle


def _chain(low, p: SamplingParams, seed: int):
    """llama-server's sampler chain from top-k on (common/sampling.cpp, default order)."""
    ch = low.llama_sampler_chain_init(low.llama_sampler_chain_default_params())
    for s in (low.llama_sampler_init_top_k(p.top_k),
              low.llama_sampler_init_typical(p.typical_p, p.min_keep),
              low.llama_sampler_init_top_p(p.top_p, p.min_keep),
              low.llama_sampler_init_min_p(p.min_p, p.min_keep),
              low.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, p.min_keep, seed),
              low.llama_sampler_init_temp_ext(p.temperature, p.dynatemp_range,
                                              p.dynatemp_exponent),
              low.llama_sampler_init_dist(seed)):
        low.llama_sampler_chain_add(ch, s)
    return ch


def _apply(low, ch, logits: np.ndarray) -> int:
    n = logits.size
    # llama_token_data {int32 id; float logit; float p}, filled at numpy speed
    buf = np.zeros(n, np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    assert buf.itemsize == ctypes.sizeof(low.llama_token_data)
    buf["id"], buf["logit"] = np.arange(n), logits
    ptr = buf.ctypes.data_as(ctypes.POINTER(low.llama_token_data))
    ta = low.llama_token_data_array(ptr, n, -1, False)
    low.llama_sampler_apply(ch, ctypes.byref(ta))
    return int(ta.data[ta.selected].id)


CASES = {
    "llama-server defaults, temp 1": dict(temperature=1.0),
    "defaults": dict(),
    "top-k off (top-p sorts)": dict(temperature=0.9, top_k=0),
    "top-k off, top-p off (min-p keeps token order)": dict(temperature=1.0, top_k=0,
                                                           top_p=1.0),
    "everything off (the whole row in token order)": dict(temperature=1.0, top_k=0, top_p=1.0,
                                                          min_p=0.0),
    "top-k 300 (bucket sort)": dict(temperature=1.2, top_k=300, top_p=1.0, min_p=0.0),
    "typical last (its own order)": dict(temperature=1.0, typical_p=0.7, top_p=1.0),
    "xtc (own generator)": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                xtc_probability=0.5, xtc_threshold=0.02),
    "dynatemp (sorts)": dict(temperature=0.9, dynatemp_range=0.5, top_k=0, top_p=1.0),
    "min_keep": dict(temperature=1.0, top_k=0, top_p=0.05, min_p=0.9, min_keep=5),
}


@pytest.mark.parametrize("v", [300, 49152])  # small rows and SmolLM2's vocabulary (> 1024)
@pytest.mark.parametrize("name", list(CASES))
def test_draws_match_llamacpp(name, v):
    low = llama_cpp_module().llama_cpp
    p = SamplingParams(**CASES[name])
    rng = np.random.default_rng(v)
    n = 60 if v < 1000 else 12
    for seed in (1, 42, 4242):
        ch = _chain(low, p, seed)
        ours = HostSampler(p, seed)
        try:
            want, got = [], []
            for _ in range(n):
                x = (rng.standard_normal(v) * 3).astype(np.float32)
                want.append(_apply(low, ch, x))
                got.append(ours.sample(x))
        finally:
            low.llama_sampler_free(ch)
        assert got == want, (name, seed)
        assert len(set(want)) > n // 3  # really random draws, not one token


def test_mt19937_matches_the_cpp_standard():
    """[rand.predef]: the 10000th output of a default-constructed std::mt19937 (seed 5489)."""
    g = MT19937(5489)
    for _ in range(9999):
        g.next_u32()
    assert g.next_u32() == 4123659995


GEN_CASES = [
    (42, dict(temperature=1.0)),
    (4242, dict(temperature=0.8)),
    (7, dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)),
    (123, dict(temperature=1.5, top_k=100, top_p=1.0, min_p=0.02)),
]
PROMPT = "<|im_start|>user\nWrite a story about a cat.<|im_end|>\n<|im_start|>assistant\n"
N_TOKENS = 32


@pytest.fixture(scope="module")
def models(smollm2_path):
    from jllama.api import Llama

    oracle = llama_cpp_module().Llama(model_path=str(smollm2_path), n_ctx=256, verbose=False,
                                      n_threads=1, seed=1, flash_attn=True)  # < 512 keys
    yield oracle, Llama(smollm2_path, ctx_size=256)
    oracle.close()


def test_generations_match_llamacpp(models):
    """Whole seeded generations: every token equal to the one llama.cpp's chain draws."""
    oracle, llm = models
    low = llama_cpp_module().llama_cpp
    ids = oracle.tokenize(PROMPT.encode(), add_bos=False, special=True)
    eos = oracle.token_eos()
    for seed, kw in GEN_CASES:
        p = SamplingParams(seed=seed, **kw)
        ch = _chain(low, p, seed)
        want = []
        try:
            oracle.reset()
            oracle.eval(ids)
            while len(want) < N_TOKENS:
                tok = int(low.llama_sampler_sample(ch, oracle.ctx, -1))
                if tok == eos:
                    break
                want.append(tok)
                oracle.eval([tok])
        finally:
            low.llama_sampler_free(ch)
        got = list(llm.engine.generate(ids, p, max_tokens=N_TOKENS, stop_ids={eos}))
        assert got == want, (seed, kw)
        assert len(want) >= 8


def _final(low, ch, logits: np.ndarray) -> tuple[dict[int, float], bool, int]:
    """llama.cpp's candidates after its chain and draw: id -> p, the ``sorted`` flag, the pick."""
    n = logits.size
    buf = np.zeros(n, np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    buf["id"], buf["logit"] = np.arange(n), logits
    ptr = buf.ctypes.data_as(ctypes.POINTER(low.llama_token_data))
    ta = low.llama_token_data_array(ptr, n, -1, False)
    low.llama_sampler_apply(ch, ctypes.byref(ta))
    start = (ctypes.addressof(ta.data.contents) - buf.ctypes.data) // buf.itemsize  # XTC moves it
    got = buf[start: start + ta.size]
    return ({int(i): float(p) for i, p in zip(got["id"], got["p"], strict=True)},
            bool(ta.sorted), int(got["id"][ta.selected]))


@pytest.mark.parametrize("name", ["defaults", "typical last (its own order)",
                                  "xtc (own generator)",
                                  "top-k off, top-p off (min-p keeps token order)"])
def test_post_sampling_probs_match_llamacpp(name):
    """What llama-server reports as post-sampling probabilities (the candidates and ``p`` its
    dist sampler leaves, common_sampler_get_candidates) is what HostSampler.final_probs gives:
    the same tokens with bit-equal probabilities, in descending probability."""
    low = llama_cpp_module().llama_cpp
    p = SamplingParams(**CASES[name])
    rng = np.random.default_rng(5)
    ch = _chain(low, p, 99)
    ours = HostSampler(p, 99)
    try:
        for _ in range(20):
            x = (rng.standard_normal(300) * 3).astype(np.float32)
            want, _, pick = _final(low, ch, x)
            assert ours.sample(x) == pick
            ids, probs = ours.final_probs()
            assert dict(zip(ids.tolist(), probs.tolist(), strict=True)) == want
            assert np.all(np.diff(probs) <= 0)
    finally:
        low.llama_sampler_free(ch)


def test_grammar_redraw_matches_llamacpp(tmp_path):
    """A draw the grammar rejects is redrawn as common_sampler_sample does: the grammar masks
    the same logits, then the whole chain runs again and dist draws again from its generator.
    llama.cpp's grammar sampler on a byte vocabulary (tests/llamacpp_grammar.py) against
    jllama's GrammarConstraint.pick with the request's HostSampler."""
    from llamacpp_grammar import GrammarOracle

    from jllama.server.grammar import GrammarConstraint, compile_grammar

    gbnf = 'root ::= [0-9]+ ("." [0-9]+)? " " [a-z]+'
    o = GrammarOracle(tmp_path)
    low = o.low
    n_vocab = low.llama_vocab_n_tokens(o.vocab)
    # bytes 0..255 are tokens 0..255; merges and specials are -inf in every row, so a
    # placeholder stands for their text
    vocab = [bytes([b]) for b in range(256)] + [b"\xff\xff"] * (n_vocab - 256)
    params = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.3,
              top_k=0, top_p=0.9, min_p=0.0, seed=11)]
    rng = np.random.default_rng(2)
    redraws = 0
    try:
        for p in params:
            ch = _chain(low, p, p.seed)
            gr = low.llama_sampler_init_grammar(o.vocab, gbnf.encode(), b"root")
            ours = HostSampler(p)
            con = GrammarConstraint(vocab, frozenset({o.eos}), compile_grammar(gbnf))
            try:
                for _ in range(24):
                    x = np.full(n_vocab, -np.inf, np.float32)
                    x[:256] = rng.standard_normal(256).astype(np.float32) * 2
                    x[ord("0"):ord("9") + 1] += 2.0  # digits and letters now and then
                    x[ord("a"):ord("z") + 1] += 1.0
                    x[o.eos] = 1.0
                    _, _, tok = _final(low, ch, x)
                    if not o._allowed(gr, tok):
                        masked = x.copy()
                        for t in range(n_vocab):
                            if np.isfinite(masked[t]) and not o._allowed(gr, t):
                                masked[t] = -np.inf
                        _, _, tok = _final(low, ch, masked)
                        redraws += 1
                    got = con.pick(ours.sample(x), x, p.temperature, p.top_p, None, p.top_k,
                                   p.min_p, ours)
                    assert got == tok
                    if tok == o.eos:
                        break
                    low.llama_sampler_accept(gr, tok)
                    con.advance(tok)
            finally:
                low.llama_sampler_free(ch)
                low.llama_sampler_free(gr)
    finally:
        o.close()
    assert redraws >= 5  # the grammar really rejected draws


@pytest.mark.parametrize("version,temp", [(1, 1.0), (2, 0.8), (2, 1.5), (1, 0.7)])
def test_mirostat_draws_match_llamacpp(version, temp):
    """Mirostat's chain (temperature, then mirostat with its own generator and its ``mu``
    moving with each draw): the same tokens, candidates and probabilities as llama.cpp's."""
    low = llama_cpp_module().llama_cpp
    v, seed = 2000, 31
    p = SamplingParams(temperature=temp, mirostat=version, mirostat_tau=4.0, mirostat_eta=0.2)
    ch = low.llama_sampler_chain_init(low.llama_sampler_chain_default_params())
    low.llama_sampler_chain_add(ch, low.llama_sampler_init_temp(temp))
    low.llama_sampler_chain_add(ch, low.llama_sampler_init_mirostat(v, seed, 4.0, 0.2, 100)
                                if version == 1 else
                                low.llama_sampler_init_mirostat_v2(seed, 4.0, 0.2))
    ours = HostSampler(p, seed)
    rng = np.random.default_rng(version)
    try:
        picks = set()
        for _ in range(40):
            x = (rng.standard_normal(v) * 2.5).astype(np.float32)
            want, _, pick = _final(low, ch, x)
            assert ours.sample(x) == pick
            ids, probs = ours.final_probs()
            assert dict(zip(ids.tolist(), probs.tolist(), strict=True)) == want
            picks.add(pick)
    finally:
        low.llama_sampler_free(ch)
    assert len(picks) > 10
