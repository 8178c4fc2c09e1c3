"""Ragged paged attention (kernels/ragged_paged_attention.py): the XLA reference and both Pallas
variants (interpret mode here; compiled where a GPU/TPU runs the tests) against a float64 numpy
softmax over each sequence's own dense K/V, on a ragged mix of decode rows and prefill chunks
whose pages are scattered through the pool in random order."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllama.kernels import ragged_paged_attention as rpa

BACKEND = jax.default_backend()


def interpret(variant: str) -> bool:
    """"pipelined" is the TPU variant, "loop" the GPU one: anything else runs interpreted."""
    return BACKEND == "cpu" or (variant == "pipelined") != (BACKEND == "tpu")


def softmax_reference(q, ks, vs, q_lens, kv_lens, scale, window, softcap):
    """float64: token i of sequence s (at position kv_len - q_len + i) over that sequence's
    dense keys ks[s] [kv_len, KVH, D]."""
    outs = []
    q = q[:sum(q_lens)]
    for k, v, ql, kl, qs in zip(ks, vs, q_lens, kv_lens, np.split(q, np.cumsum(q_lens)[:-1]),
                                strict=True):
        t, h, d = qs.shape
        kvh = k.shape[1]
        qg = qs.reshape(t, kvh, h // kvh, d).astype(np.float64)
        s = np.einsum("tkgd,skd->tkgs", qg, k.astype(np.float64)) * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        qpos = kl - ql + np.arange(ql)
        kpos = np.arange(kl)
        ok = kpos[None, :] <= qpos[:, None]
        if window:
            ok &= kpos[None, :] > qpos[:, None] - window
        s = np.where(ok[:, None, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append(np.einsum("tkgs,skd->tkgd", p, v.astype(np.float64)).reshape(t, h, -1))
    return np.concatenate(outs)


def make_case(seed, q_lens, kv_lens, h, kvh, d, dv, ps, n_layer=2, layer=1, spare_seqs=1,
              dtype=np.float32, poison=False, window=None):
    """Random q, a pool with each live sequence's pages at random free pages (page 0 scratch),
    block tables, and the dense K/V each sequence sees. ``spare_seqs`` dead rows (num_seqs
    below the table's rows) and 3 dead tokens pad the batch as fixed shapes do. ``poison``:
    NaN in every page no table row names, and table entries past a sequence's pages (and
    before its window) point at one (only a kernel, which reads just the pages it needs,
    survives that)."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    mp = max(-(-k // ps) for k in kv_lens) + 1
    n_pages = 1 + sum(-(-k // ps) for k in kv_lens) + 4
    kpool = rng.standard_normal((n_layer, kvh, n_pages, ps, d)).astype(dtype)
    vpool = rng.standard_normal((n_layer, kvh, n_pages, ps, dv)).astype(dtype)
    free = list(rng.permutation(np.arange(1, n_pages)))
    table = np.zeros((n + spare_seqs, mp), np.int32)
    used = {0}
    ks, vs = [], []
    for s, kl in enumerate(kv_lens):
        pages = [int(free.pop()) for _ in range(-(-kl // ps))]
        used.update(pages)
        table[s, :len(pages)] = pages
        ks.append(kpool[layer][:, pages].transpose(1, 2, 0, 3).reshape(-1, kvh, d)[:kl])
        vs.append(vpool[layer][:, pages].transpose(1, 2, 0, 3).reshape(-1, kvh, dv)[:kl])
    if poison:
        bad = [p for p in range(n_pages) if p not in used]
        kpool[:, :, bad] = np.nan
        vpool[:, :, bad] = np.nan
        for s, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
            table[s, -(-kl // ps):] = bad[0]
            if window:  # pages wholly before the first query's window
                table[s, :max(kl - ql - window + 1, 0) // ps] = bad[0]
    t = sum(q_lens) + 3
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    cu = np.zeros(n + spare_seqs + 1, np.int32)
    cu[1:n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    kvl = np.zeros(n + spare_seqs, np.int32)
    kvl[:n] = kv_lens
    return q, kpool, vpool, table, cu, kvl, ks, vs


# (q_lens, kv_lens, H, KVH, D, Dv, page_size, window, softcap)
CASES = {
    # decode rows and prefill chunks in one batch (a chunk after a cached prefix, a whole
    # prompt, single tokens at page edges), GQA 4:1
    "mix_gqa4": ([1, 7, 1, 20, 1], [1, 30, 16, 20, 45], 8, 2, 32, 32, 16, None, None),
    # Gemma 3's sliding-window layer: one kv head, window shorter than the contexts; softcap
    "window_softcap": ([1, 9, 1], [50, 40, 17], 4, 1, 32, 32, 16, 12, 30.0),
    # head sizes not powers of two, v's apart from k's (padded), MHA, page size 8
    "odd_heads": ([3, 1], [3, 26], 4, 4, 24, 40, 8, None, None),
}


def run(case, impl, poison=False, dtype=np.float32):
    q_lens, kv_lens, h, kvh, d, dv, ps, window, softcap = case
    q, kp, vp, table, cu, kvl, ks, vs = make_case(7, q_lens, kv_lens, h, kvh, d, dv, ps,
                                                  dtype=dtype, poison=poison, window=window)
    args = (jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.int32(1), jnp.asarray(kvl),
            jnp.asarray(table), jnp.asarray(cu), jnp.int32(len(q_lens)))
    scale = d**-0.5
    if impl == "xla":
        # under jit, as the model runs it (eagerly each of its steps compiled alone)
        got = jax.jit(functools.partial(rpa.ragged_paged_attention_xla, scale=scale,
                                        window=window, softcap=softcap))(*args)
    else:
        got = rpa.ragged_paged_attention(*args, scale=scale, window=window, softcap=softcap,
                                         variant=impl, interpret=interpret(impl))
    want = softmax_reference(q, ks, vs, q_lens, kv_lens, scale, window, softcap)
    got = np.asarray(got)
    assert got.shape == (len(q), h, dv)
    n = sum(q_lens)
    np.testing.assert_array_equal(got[n:], 0.0)  # dead tokens: zeros
    return got[:n], want


@pytest.mark.parametrize("impl", ["xla", "loop", "pipelined"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_softmax(name, impl):
    got, want = run(CASES[name], impl)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "pipelined"])
@pytest.mark.parametrize("name", ["mix_gqa4", "window_softcap"])
def test_kernels_read_only_needed_pages(name, impl):
    """NaN in every page outside the sequences' live ranges: the kernels never load them."""
    got, want = run(CASES[name], impl, poison=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "pipelined"])
def test_half_pool(impl):
    got, want = run(CASES["mix_gqa4"], impl, dtype=np.float16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_block_q_sizes_agree():
    """Another query block size regroups the same tokens: same results (to rounding)."""
    q_lens, kv_lens, h, kvh, d, dv, ps, window, softcap = CASES["mix_gqa4"]
    q, kp, vp, table, cu, kvl, _, _ = make_case(3, q_lens, kv_lens, h, kvh, d, dv, ps)
    args = tuple(map(jnp.asarray, (q, kp, vp, np.int32(0), kvl, table, cu, np.int32(5))))
    a = rpa.ragged_paged_attention(*args, scale=0.2, block_q=4, interpret=True)
    b = rpa.ragged_paged_attention(*args, scale=0.2, block_q=16, interpret=True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def lower_for(platform: str, f, *avals) -> str:
    return jax.jit(f).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,variant", [("cuda", "loop"), ("tpu", "pipelined")])
def test_lowers_for_device(platform, variant):
    """The real (non-interpret) kernels through the Pallas -> Triton / Mosaic TPU lowerings
    from this CPU host (tile rules, supported primitives; not the device compilers after)."""
    def f(q, kp, vp, kvl, table, cu):
        return rpa.ragged_paged_attention(q, kp, vp, jnp.int32(3), kvl, table, cu, jnp.int32(4),
                                          scale=0.125, window=64, softcap=30.0, variant=variant,
                                          backend=platform)

    pool = jax.ShapeDtypeStruct((4, 2, 64, 16, 128), jnp.bfloat16)
    i32 = jnp.int32
    text = lower_for(platform, f, jax.ShapeDtypeStruct((40, 8, 128), jnp.float32), pool, pool,
                     jax.ShapeDtypeStruct((4,), i32), jax.ShapeDtypeStruct((4, 16), i32),
                     jax.ShapeDtypeStruct((5,), i32))
    assert ("triton" if platform == "cuda" else "tpu_custom_call") in text
