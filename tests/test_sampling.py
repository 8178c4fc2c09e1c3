"""Sampling: each stage against a direct numpy statement of llama.cpp's semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllama.engine.sampling import (
    BatchSampling,
    SamplingParams,
    apply_penalties,
    first_argmax,
    sample,
    seed_key,
)


def _keys(n, seed=0):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 100)), jnp.float32)
    sp = BatchSampling.stack([SamplingParams.greedy()] * 3)
    out = sample(logits, sp, _keys(3))
    assert np.array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


def test_top_k_1_is_greedy_even_hot():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    sp = BatchSampling.stack([SamplingParams(temperature=5.0, top_k=1)] * 4)
    for s in range(5):
        out = sample(logits, sp, _keys(4, s))
        assert np.array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


def test_temperature_distribution_matches_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]], jnp.float32)
    t = 0.7
    sp = BatchSampling.stack([SamplingParams(temperature=t, top_k=0, top_p=1.0, min_p=0.0)])
    n = 4000
    f = jax.jit(lambda k: sample(jnp.broadcast_to(logits, (n, 4)),
                                 jax.tree.map(lambda a: jnp.broadcast_to(a, (n,)), sp),
                                 jax.random.split(k, n)))
    out = np.asarray(f(jax.random.PRNGKey(0)))
    freq = np.bincount(out, minlength=4) / n
    p = np.exp(np.array([2.0, 1.0, 0.0, -1.0]) / t)
    p /= p.sum()
    assert np.abs(freq - p).max() < 0.03


def test_top_p_and_min_p_cut_the_tail():
    # probs 0.5, 0.3, 0.15, 0.05
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)
    n = 2000

    def draws(p: SamplingParams):
        sp = BatchSampling.stack([p] * n)
        return np.asarray(sample(jnp.broadcast_to(logits, (n, 4)), sp, _keys(n, 3)))

    # top_p=0.7: keep 0.5 (cum before 0) and 0.3 (cum before 0.5 < 0.7); drop the rest
    assert set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0))) == {0, 1}
    # min_p=0.25: keep p >= 0.125 -> tokens 0, 1, 2
    assert set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25))) == {0, 1, 2}


def test_penalties_follow_llamacpp_formula():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], np.float32)
    hist = np.array([[0, 1, 1, -1]], np.int32)
    sp = BatchSampling.stack([SamplingParams(repeat_penalty=1.5, frequency_penalty=0.1,
                                             presence_penalty=0.2)])
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(hist), sp))
    want = logits.copy()
    counts = {0: 1, 1: 2}
    for tok, c in counts.items():
        want[0, tok] = want[0, tok] / 1.5 if want[0, tok] > 0 else want[0, tok] * 1.5
        want[0, tok] -= c * 0.1 + 0.2
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_seed_reproducible():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((1, 1000)), jnp.float32)
    sp = BatchSampling.stack([SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)])
    # jitted, as the engine runs it: run eagerly, each call compiled its lax.conds anew (40
    # calls, ~120 compiles, ~45 s of a 2-core CI run)
    draw = jax.jit(sample)
    a = [int(draw(logits, sp, _keys(1, s))[0]) for s in range(20)]
    b = [int(draw(logits, sp, _keys(1, s))[0]) for s in range(20)]
    assert a == b and len(set(a)) > 3


@pytest.mark.parametrize("rows", [1, 3, 65])  # 65: above the two-pass form's row limit
def test_first_argmax_is_numpys_argmax(rows: int) -> None:
    """Ties go to the first maximum, a NaN wins (the first one), an all -inf row gives 0: the
    definition numpy's argmax (and llama.cpp's greedy sampler, first maximum) follows."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 1000)).astype(np.float32)
    x[0, [17, 400]] = x[0].max() + 1.0  # a tie
    if rows > 1:
        x[1, :] = -np.inf
    if rows > 2:
        x[2, [50, 900]] = np.nan
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**31, 2**32 - 1])
def test_seed_key_is_jax_prngkey(seed):
    """The host-built key must be the one ``jax.random.PRNGKey`` makes, or seeded device draws
    would change with the way the key was built."""
    want = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(seed_key(seed), want)
    assert seed_key(seed).dtype == want.dtype


def test_stack_makes_no_program(caplog):
    """Stacking a batch's parameters is a transfer, not a compiled copy per dtype (each compile
    cost a warm start ~60 ms)."""
    jax.clear_caches()
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        BatchSampling.stack([SamplingParams.greedy(), SamplingParams(temperature=0.5)])
        jnp.asarray(np.zeros(3, np.float32) + 1)  # a copy program: shows the log is seen
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert len(compiles) == 1 and "stage" in compiles[0], compiles
