"""The sampler chain against llama.cpp's own samplers (llama-cpp-python 0.3.36's
``llama_sampler_init_*`` applied to the same candidates): which tokens survive each combination
of top-n-sigma, top-k, typical-p, top-p, min-p, XTC and (dynamic) temperature, with min_keep,
and the logits the draw then sees. The chain order is llama-server's default
(common/common.h ``samplers``)."""

from __future__ import annotations

import ctypes
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llamacpp_oracle import llama_cpp_module

from jllama.engine.sampling import BatchSampling, SamplingParams, candidates, sample

V = 300


def _llamacpp(logits: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """Finite candidates after llama.cpp's chain (no final draw): token -> logit."""
    low = llama_cpp_module().llama_cpp
    stages = [low.llama_sampler_init_top_n_sigma(p.top_n_sigma),
              low.llama_sampler_init_top_k(p.top_k),
              low.llama_sampler_init_typical(p.typical_p, p.min_keep),
              low.llama_sampler_init_top_p(p.top_p, p.min_keep),
              low.llama_sampler_init_min_p(p.min_p, p.min_keep),
              low.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, p.min_keep, 1234),
              low.llama_sampler_init_temp_ext(p.temperature, p.dynatemp_range,
                                              p.dynatemp_exponent)]
    arr = (low.llama_token_data * V)(*[low.llama_token_data(i, float(x), 0.0)
                                       for i, x in enumerate(logits)])
    ta = low.llama_token_data_array(arr, V, -1, False)
    try:
        for s in stages:
            low.llama_sampler_apply(s, ctypes.byref(ta))
    finally:
        for s in stages:
            low.llama_sampler_free(s)
    out = {}
    for i in range(ta.size):
        d = ta.data[i]
        if d.logit != float("-inf"):
            out[d.id] = d.logit
    return out


CASES = {
    "llama-server defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "typical alone": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=0.5),
    "typical then top-p": dict(temperature=0.7, top_k=60, top_p=0.8, min_p=0.0, typical_p=0.9),
    "typical min_keep": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=0.05,
                             min_keep=7),
    "top-n-sigma": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, top_n_sigma=1.0),
    "top-n-sigma + defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                                   top_n_sigma=2.0),
    "xtc": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, xtc_probability=1.0,
                xtc_threshold=0.02),
    "xtc after top-k": dict(temperature=1.0, top_k=20, top_p=1.0, min_p=0.0,
                            xtc_probability=1.0, xtc_threshold=0.05),
    "dynatemp": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, dynatemp_range=0.5),
    "dynatemp exponent": dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0,
                              dynatemp_range=0.7, dynatemp_exponent=2.0),
    "min_keep over top-p and min-p": dict(temperature=1.0, top_k=0, top_p=0.05, min_p=0.9,
                                          min_keep=5),
    "greedy after typical": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                 typical_p=0.3),
    "greedy after xtc": dict(temperature=0.0, top_k=10, top_p=1.0, min_p=0.0,
                             xtc_probability=1.0, xtc_threshold=0.01),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chain_matches_llamacpp(name):
    params = SamplingParams(**CASES[name])
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # not hash(): salted per process
    rows = [rng.standard_normal(V).astype(np.float32) * s for s in (1.0, 3.0, 6.0)]
    sp = BatchSampling.stack([params] * len(rows))
    keys = jax.random.split(jax.random.PRNGKey(0), len(rows))
    got = np.asarray(jax.jit(candidates)(jnp.asarray(np.stack(rows)), sp, keys))
    sizes = []
    for r, logits in enumerate(rows):
        want = _llamacpp(logits, params)
        ours = {int(i): float(got[r, i]) for i in np.nonzero(np.isfinite(got[r]))[0]}
        assert set(ours) == set(want), (name, r, sorted(set(ours) ^ set(want))[:10])
        np.testing.assert_allclose([ours[i] for i in sorted(want)],
                                   [want[i] for i in sorted(want)], rtol=2e-6, atol=0)
        sizes.append(len(want))
    # the combination really cuts (on a flat row XTC, say, may rightly leave everything)
    assert min(sizes) >= 1 and min(sizes) < V, (name, sizes)


@pytest.mark.parametrize("top_k", [40, 0])  # the partial-sort path and the full sort
def test_draws_stay_in_the_chain(top_k):
    """``sample`` draws only what ``candidates`` keeps (same keys, so the same XTC coin), and in
    a batch mixing rows, plain greedy rows still take the argmax."""
    rng = np.random.default_rng(7)
    n = 48
    logits = rng.standard_normal((n, V)).astype(np.float32) * 3
    ps = [SamplingParams(temperature=1.0, top_k=top_k, top_p=0.9, min_p=0.0, typical_p=0.6),
          SamplingParams(temperature=1.0, top_k=top_k, xtc_probability=0.5,
                         xtc_threshold=0.05),
          SamplingParams(temperature=0.8, top_k=top_k, top_n_sigma=1.0, dynatemp_range=0.4),
          SamplingParams.greedy()]
    ps = [ps[i % len(ps)] for i in range(n)]
    sp = BatchSampling.stack(ps)
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    x = jnp.asarray(logits)
    drawn = np.asarray(jax.jit(sample)(x, sp, keys))
    kept = np.isfinite(np.asarray(jax.jit(candidates)(x, sp, keys)))
    assert all(kept[r, drawn[r]] for r in range(n))
    greedy = [r for r in range(n) if ps[r].temperature == 0]
    np.testing.assert_array_equal(drawn[greedy], logits[greedy].argmax(-1))
    # the typical rows really cut: fewer candidates than top-k alone would leave
    assert kept[0].sum() < (top_k or V)
