"""Mirostat (v1, v2) and DRY against llama.cpp's own samplers (llama-cpp-python 0.3.36's
``llama_sampler_init_mirostat*`` / ``llama_sampler_init_dry`` through ctypes), over sequences of
steps: the oracle sampler is fed the same logits and the same accepted tokens as ours, and its
state (mirostat's mu, read from its context) is compared after every step."""

from __future__ import annotations

import ctypes
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testdata
from llamacpp_oracle import llama_cpp_module

from jllama.engine import dry
from jllama.engine.sampling import (
    BatchSampling,
    SamplingParams,
    apply_penalties,
    mirostat_candidates,
    mirostat_update,
    sample_state,
)

V = 300


TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _token_array(low, logits):
    """A llama_token_data_array over every token (built through numpy: a vocabulary's worth
    of ctypes structs per step is slow)."""
    n = len(logits)
    buf = np.zeros(n, TOKEN_DATA)
    buf["id"] = np.arange(n)
    buf["logit"] = logits
    arr = (low.llama_token_data * n).from_buffer(buf)
    ta = low.llama_token_data_array(arr, n, -1, False)
    ta._keep = (buf, arr)  # the buffer lives as long as the array
    return ta


def _result(ta) -> np.ndarray:
    """The array's first ``size`` entries, as numpy."""
    buf = ta._keep[0]
    assert ctypes.addressof(ta.data.contents) == buf.ctypes.data
    return buf[: ta.size]


def _mu(smpl, version: int) -> float:
    """mirostat's mu, read from the sampler's context (llama_sampler_mirostat: n_vocab, seed,
    seed_cur, tau, eta, m, mu; llama_sampler_mirostat_v2: seed, seed_cur, tau, eta, mu)."""
    ctx = ctypes.cast(smpl, ctypes.POINTER(ctypes.c_void_p * 2)).contents[1]
    return ctypes.c_float.from_address(ctx + (24 if version == 1 else 16)).value


MIROSTAT = {
    "v1": dict(mirostat=1, temperature=0.8),
    "v1 tau 3 eta 0.3": dict(mirostat=1, temperature=1.0, mirostat_tau=3.0, mirostat_eta=0.3),
    "v1 greedy temperature": dict(mirostat=1, temperature=0.0),
    "v2": dict(mirostat=2, temperature=0.8),
    "v2 tau 2 eta 0.5": dict(mirostat=2, temperature=1.2, mirostat_tau=2.0, mirostat_eta=0.5),
}


@pytest.mark.parametrize("name", list(MIROSTAT))
def test_mirostat_steps_match_llamacpp(name):
    """Per step: the tokens mirostat keeps, their renormalised probabilities, and mu after the
    token the oracle drew (llama.cpp's chain with mirostat: temperature, then mirostat)."""
    low = llama_cpp_module().llama_cpp
    params = SamplingParams(**MIROSTAT[name])
    sp = BatchSampling.stack([params])
    version = params.mirostat
    temp = low.llama_sampler_init_temp(params.temperature)
    miro = (low.llama_sampler_init_mirostat(V, 1234, params.mirostat_tau,
                                            params.mirostat_eta, 100) if version == 1 else
            low.llama_sampler_init_mirostat_v2(1234, params.mirostat_tau, params.mirostat_eta))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cands = jax.jit(mirostat_candidates)
    update = jax.jit(mirostat_update)
    mu = jnp.asarray([params.initial_mu()], jnp.float32)
    sizes = []
    try:
        assert _mu(miro, version) == pytest.approx(float(mu[0]), abs=0)
        for step in range(24):
            logits = (rng.standard_normal(V) * rng.choice([1.0, 3.0, 6.0])).astype(np.float32)
            ta = _token_array(low, logits)
            low.llama_sampler_apply(temp, ctypes.byref(ta))
            low.llama_sampler_apply(miro, ctypes.byref(ta))
            want = {ta.data[i].id: ta.data[i].p for i in range(ta.size)}
            chosen = ta.data[ta.selected].id
            p = np.asarray(cands(jnp.asarray(logits[None]), sp, mu))[0]
            ours = {int(i): float(p[i]) for i in np.nonzero(p > 0)[0]}
            assert set(ours) == set(want), (name, step, sorted(set(ours) ^ set(want))[:10])
            np.testing.assert_allclose([ours[i] for i in sorted(want)],
                                       [want[i] for i in sorted(want)], rtol=1e-5, atol=1e-7)
            mu = update(jnp.asarray([p[chosen]]), sp, mu)
            assert float(mu[0]) == pytest.approx(_mu(miro, version), rel=1e-5, abs=1e-5), step
            sizes.append(len(want))
    finally:
        low.llama_sampler_free(temp)
        low.llama_sampler_free(miro)
    # mirostat really truncates, and by different amounts as mu moves (greedy keeps one)
    assert min(sizes) < V
    if params.temperature > 0:
        assert len(set(sizes)) > 2, sizes


def test_sample_state_carries_mu_per_row():
    """In a batch mixing mirostat rows with other samplers, each mirostat row draws from its
    own truncated distribution and returns its next mu; other rows keep theirs untouched."""
    rng = np.random.default_rng(11)
    n = 6
    logits = jnp.asarray(rng.standard_normal((n, V)).astype(np.float32) * 3)
    ps = [SamplingParams(mirostat=1), SamplingParams(mirostat=2, mirostat_tau=3.0),
          SamplingParams(), SamplingParams.greedy(),
          SamplingParams(mirostat=2, temperature=0.0, repeat_penalty=1.5),
          SamplingParams(mirostat=1, mirostat_eta=0.5)]
    sp = BatchSampling.stack(ps)
    keys = jax.random.split(jax.random.PRNGKey(5), n)
    mu = jnp.asarray([7.0, 4.0, 1.0, 2.0, 9.0, 12.0], jnp.float32)
    hist = jnp.full((n, 8), -1, jnp.int32).at[4, 0].set(int(jnp.argmax(logits[4])))
    tok, mu2 = jax.jit(sample_state)(logits, sp, keys, hist, None, None, mu)
    tok, mu2 = np.asarray(tok), np.asarray(mu2)
    p = np.asarray(mirostat_candidates(logits, sp, mu))
    for r in (0, 1, 4, 5):
        assert p[r, tok[r]] > 0
        want = np.asarray(mirostat_update(jnp.asarray(p[:, tok[r]]), sp, mu))[r]
        assert mu2[r] == want
    # mirostat skips the penalties (llama.cpp's mirostat chain has none): row 4 is greedy on
    # the raw logits even though its best token is in the penalty window
    assert tok[4] == int(jnp.argmax(logits[4]))
    assert tok[3] == int(jnp.argmax(logits[3]))
    np.testing.assert_array_equal(mu2[[2, 3]], np.asarray(mu)[[2, 3]])


# ------------------------------------------------------------------ DRY
def _load_vocab(low, path):
    mp = low.llama_model_default_params()
    mp.vocab_only = True
    model = low.llama_model_load_from_file(str(path).encode(), mp)
    assert model, path
    return model, low.llama_model_get_vocab(model)


def _dialogue(tok) -> list[int]:
    lines = ["Alice: the cat sat on the mat and looked at the door",
             "Bob: the cat sat on the mat and looked at the window",
             "Alice: *the cat sat on the mat* and looked at the door again",
             "Bob: the cat sat on the mat, the cat sat on the mat and looked at",
             "the cat sat on the mat and looked at the door and the cat sat on the"]
    return tok.encode("\n".join(lines), add_special=False, parse_special=False)


DRY = {
    "defaults": dict(dry_multiplier=0.8),
    "allowed 1 base 2": dict(dry_multiplier=1.5, dry_base=2.0, dry_allowed_length=1),
    "short window": dict(dry_multiplier=0.8, dry_penalty_last_n=12),
    "multi-token breaker": dict(dry_multiplier=0.8,
                                dry_sequence_breakers=("looked at the", "mat and")),
    "no breakers": dict(dry_multiplier=0.8, dry_sequence_breakers=()),
    "capped exponent": dict(dry_multiplier=1.0, dry_base=30.0, dry_allowed_length=0),
}


@pytest.fixture(scope="module")
def spm_vocab():
    low = llama_cpp_module().llama_cpp
    from jllama.tokenizer import Tokenizer

    path = testdata.vocab("llama-spm")
    model, vocab = _load_vocab(low, path)
    try:
        yield low, vocab, Tokenizer.from_path(path)
    finally:
        low.llama_model_free(model)


@pytest.mark.parametrize("name", list(DRY))
def test_dry_steps_match_llamacpp(name, spm_vocab):
    """Token by token through a repetitive dialogue: after each accepted token, the logits
    llama.cpp's DRY lowers and by how much."""
    low, vocab, tok = spm_vocab
    params = SamplingParams(**DRY[name])
    brk = [b.encode() for b in params.dry_sequence_breakers]
    arr = (ctypes.c_char_p * max(len(brk), 1))(*brk)
    smpl = low.llama_sampler_init_dry(vocab, params.dry_multiplier, params.dry_base,
                                      params.dry_allowed_length, params.dry_penalty_last_n,
                                      arr, len(brk))
    n_vocab = tok.n_vocab
    breakers = dry.process_breakers(tok, tuple(params.dry_sequence_breakers))
    tokens = _dialogue(tok)
    hits = 0
    try:
        for i, t in enumerate(tokens):
            low.llama_sampler_accept(smpl, t)
            ta = _token_array(low, np.zeros(n_vocab, np.float32))
            low.llama_sampler_apply(smpl, ctypes.byref(ta))
            res = _result(ta)
            hit = res[res["logit"] != 0.0]
            want = dict(zip(hit["id"].tolist(), (-hit["logit"]).tolist()))
            row = dry.penalty_row(tokens[: i + 1], params, breakers, n_vocab)
            ours = {int(j): float(-(np.float32(0.0) - row[j])) for j in np.nonzero(row)[0]}
            assert set(ours) == set(want), (name, i, sorted(set(ours) ^ set(want)))
            for j in want:
                assert np.float32(0.0) - np.float32(ours[j]) == np.float32(-want[j]), (i, j)
            hits += bool(want)
            # image cells (negative ids in a slot's tokens) are no tokens to the sampler, and
            # the step's own token may come apart (``then``)
            with_images = [-3] + tokens[:i // 2] + [-3, -3] + tokens[i // 2 : i]
            np.testing.assert_array_equal(
                dry.penalty_row(with_images, params, breakers, n_vocab, then=tokens[i : i + 1]),
                row)
    finally:
        low.llama_sampler_free(smpl)
    assert hits > 3, hits  # the dialogue really repeats under this setting


def test_dry_after_penalties_matches_llamacpp(spm_vocab):
    """llama.cpp's chain order: the repetition penalties, then DRY, on the same logits (a
    token in both is divided first, then lowered)."""
    low, vocab, tok = spm_vocab
    params = SamplingParams(dry_multiplier=0.8, dry_allowed_length=1, repeat_penalty=1.3,
                            frequency_penalty=0.2, repeat_last_n=64)
    brk = [b.encode() for b in params.dry_sequence_breakers]
    arr = (ctypes.c_char_p * len(brk))(*brk)
    chain = [low.llama_sampler_init_penalties(tok.n_vocab, params.repeat_last_n,
                                              params.repeat_penalty, params.frequency_penalty,
                                              params.presence_penalty),
             low.llama_sampler_init_dry(vocab, params.dry_multiplier, params.dry_base,
                                        params.dry_allowed_length, params.dry_penalty_last_n,
                                        arr, len(brk))]
    breakers = dry.process_breakers(tok, tuple(params.dry_sequence_breakers))
    tokens = _dialogue(tok)
    rng = np.random.default_rng(3)
    sp = BatchSampling.stack([params])
    step = jax.jit(lambda x, h, d: apply_penalties(x, h, sp) - d)
    try:
        for i, t in enumerate(tokens):
            for s in chain:
                low.llama_sampler_accept(s, t)
            if i % 7:
                continue
            logits = (rng.standard_normal(tok.n_vocab) * 3).astype(np.float32)
            ta = _token_array(low, logits)
            for s in chain:
                low.llama_sampler_apply(s, ctypes.byref(ta))
            res = _result(ta)
            want = np.empty(tok.n_vocab, np.float32)
            want[res["id"]] = res["logit"]
            hist = np.full(params.repeat_last_n, -1, np.int32)
            tail = tokens[max(0, i + 1 - params.repeat_last_n): i + 1]
            hist[len(hist) - len(tail):] = tail
            row = dry.penalty_row(tokens[: i + 1], params, breakers, tok.n_vocab)
            got = np.asarray(step(jnp.asarray(logits[None]), jnp.asarray(hist[None]),
                                  jnp.asarray(row[None])))[0]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=str(i))
    finally:
        for s in chain:
            low.llama_sampler_free(s)
