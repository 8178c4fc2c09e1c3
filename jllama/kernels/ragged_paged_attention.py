"""Ragged paged attention: decode rows and prefill chunks of many sequences in one call, over a
KV cache kept in fixed-size pages that each sequence addresses through its own block table.

Why pages: a dense cache reserves ``slots x context`` rows whatever the sequences hold; a page
pool lets memory follow the live tokens (a sequence owns ``ceil(len / page_size)`` pages, taken
from a free list as it grows and returned when its slot is reset; see engine/pages.py).

Layout (why it is what it is):

- pool ``[L, n_kv_heads, n_pages, page_size, head_dim]`` (k and v apart, v's head size may
  differ): stacked over layers like the dense stacked cache, so the decoder's ``lax.scan`` reads
  layer ``layer`` (a traced scalar) in place and compile time does not grow with depth. Head
  before page, as the dense cache puts heads before positions: one program of the kernel reads
  one head's page as a contiguous ``[page_size, head_dim]`` tile (Mosaic's (8, 128) tile rule,
  coalesced Triton loads), never a strided slice across heads.
- block table ``page_indices [n_seqs, max_pages]``: page ``j`` of sequence ``s`` holds its
  positions ``j * page_size ..``. Entries past a sequence's pages may hold anything in range
  (the engine points them at a scratch page 0): the kernel reads only pages below
  ``ceil(kv_lens[s] / page_size)``, and masks positions past ``kv_lens[s]``.
- queries ragged as tpu-inference and sglang-jax take them: ``q [T, H, D]`` with sequence ``s``
  owning tokens ``cu_q_lens[s] .. cu_q_lens[s + 1]`` (1 for a decode row, many for a prefill
  chunk), the last of them at position ``kv_lens[s] - 1`` (its keys already written), and only
  the first ``num_seqs`` sequences live (a traced count: batches pad to a fixed shape).

Kernel: the wrapper regroups the ragged tokens into blocks of ``block_q`` tokens each owned by
one sequence (an XLA gather of q, small next to the KV it reads; at most one partial block per
sequence), so every program's query and output tiles are aligned blocks and no program writes a
row of another sequence (no masked ragged stores). A program takes one (query block, kv head):
its ``block_q x G`` rows (GQA: the head's whole query group shares each K/V page read), online
softmax over the sequence's pages from the first the window can reach to the last the block's
causal horizon needs, one page per step, the page number read from the block table.

- ``"loop"`` (GPU/Triton, and interpret mode): grid (blocks, kv heads); the pool is passed whole
  (on Triton a pointer) and a ``fori_loop`` with a data-dependent trip count loads page
  ``table[s, j]`` of layer ``layer``. Tiles are powers of two (``block_q * G``, ``page_size``,
  padded head size >= 16: Triton's dot minimum).
- ``"pipelined"`` (TPU/Mosaic): grid (blocks, kv heads, max_pages) with the block descriptors,
  lengths and table scalar-prefetched; the K/V index maps pick ``table[s, j]`` (clamped into the
  needed range, so steps past it repeat the previous page and the pipeline issues no DMA) and
  ``pl.when`` skips their compute, as pallas_attention's pipelined decode kernel does.

Costs to know (not measured: no device was lent to this work): a head size that is not a power
of two pads the whole pool on every call (as pallas_attention pads its cache), so such models
want their pool stored padded; decode rows waste ``block_q - 1`` query rows each (the default
``block_q`` is the fewest tokens whose rows fill Triton's 16-row minimum, 4 for GQA 4:1); the
pipelined grid walks the table's whole width per block, skipping steps past the needed pages
(no DMA, no compute, but a grid step each), so TPU wants pages of 64+ tokens.

``ragged_paged_attention_xla`` is the reference (gather the pages, mask, softmax): what the
kernels are tested against, and what runs where no kernel fits. The CPU keeps its dense cache
and the exact C++ attention (llama.cpp's bits); paging is for the accelerators.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jllama.kernels.pallas_qmatmul import compiler_params

_SQ = pl.squeezed
_MIN = 16  # Triton dot: M, N, K >= 16


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# ----------------------------------------------------------------------------- reference
def token_layout(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, t: int):
    """Per token: its sequence, its position, and whether it is live (a sequence below
    ``num_seqs``). ``t``: the static token count."""
    n = kv_lens.shape[0]
    tok = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], tok, side="right"), 0, n - 1).astype(jnp.int32)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (tok - cu_q_lens[seq])
    live = (seq < num_seqs) & (tok < cu_q_lens[jnp.minimum(num_seqs, n)])
    return seq, pos, live


def ragged_paged_attention_xla(q, k_pages, v_pages, layer, kv_lens, page_indices, cu_q_lens,
                               num_seqs, *, scale: float, window: int | None = None,
                               softcap: float | None = None) -> jax.Array:
    """The reference: every token against its sequence's gathered pages. Shapes as
    ``ragged_paged_attention``; f32 math at HIGHEST precision."""
    t, h, d = q.shape
    _, kvh, _, ps, _ = k_pages.shape
    dv = v_pages.shape[-1]
    g = h // kvh
    mp = page_indices.shape[1]
    k = jax.lax.dynamic_index_in_dim(k_pages, layer, 0, keepdims=False)[:, page_indices]
    v = jax.lax.dynamic_index_in_dim(v_pages, layer, 0, keepdims=False)[:, page_indices]
    k = k.reshape(kvh, -1, mp * ps, d).astype(jnp.float32)  # [KVH, S, P*ps, D]
    v = v.reshape(kvh, -1, mp * ps, dv).astype(jnp.float32)
    seq, pos, live = token_layout(cu_q_lens, kv_lens, num_seqs, t)
    qg = q.astype(jnp.float32).reshape(t, kvh, g, d)
    kt = k[:, seq]  # [KVH, T, P*ps, D]: each token's own sequence (a reference: memory be damned)
    vt = v[:, seq]
    s = jnp.einsum("tkgd,ktsd->tkgs", qg, kt, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    kpos = jnp.arange(mp * ps, dtype=jnp.int32)
    mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < kv_lens[seq][:, None])
    if window is not None:
        mask = mask & (kpos[None, :] > pos[:, None] - window)
    mask = mask & live[:, None]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(mask[:, None, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("tkgs,ktsd->tkgd", p, vt, precision=jax.lax.Precision.HIGHEST)
    return o.reshape(t, h, dv).astype(q.dtype)


# ----------------------------------------------------------------------------- kernels
def _blocks(cu_q_lens, num_seqs, n_blocks: int, bq: int):
    """Query blocks of ``bq`` tokens, each inside one sequence: per block its sequence (-1:
    unused) and its first token's index within the sequence; per sequence its first block."""
    n = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = jnp.arange(n) < num_seqs
    nblk = jnp.where(live, jax.lax.div(q_lens + (bq - 1), bq), 0)
    first = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(nblk).astype(jnp.int32)])
    b = jnp.arange(n_blocks, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(first[1:], b, side="right"), 0, n - 1).astype(jnp.int32)
    used = b < first[n]
    q0 = (b - first[seq]) * bq
    return jnp.where(used, seq, -1), jnp.where(used, q0, 0), first


def _page_range(kv_len, q_len, q0, bq: int, ps: int, window: int | None):
    """[first, end) pages that block rows q0..q0+bq of a sequence can see."""
    last_pos = jnp.minimum(kv_len - q_len + q0 + bq - 1, kv_len - 1)  # the block's last query
    end = jax.lax.div(jnp.maximum(last_pos + 1, 0) + (ps - 1), ps)
    if window is None:
        return 0, end
    first_pos = jnp.maximum(kv_len - q_len + q0 - window + 1, 0)
    return jax.lax.div(first_pos, ps), end


def _scores(q, k, qpos, kpos0, kv_len, ps: int, window, softcap):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)  # [M, ps]
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    kpos = kpos0 + jax.lax.broadcasted_iota(jnp.int32, (1, ps), 1)
    valid = (kpos <= qpos) & (kpos < kv_len)
    if window is not None:
        valid = valid & (kpos > qpos - window)
    return jnp.where(valid, s, -jnp.inf)


def _online_update(s, v, m, l, acc):
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    # rows with nothing seen yet keep m = -inf: subtract 0 there (exp(-inf) = 0, no NaN)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p, v, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc + pv


def _finish(l, acc):
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def _row_positions(kv_len, q_len, q0, bq: int, g: int):
    """[M, 1] query position of each of a block's rows (row r is token r // g)."""
    r = jax.lax.broadcasted_iota(jnp.int32, (bq * g, 1), 0)
    # g is a power of two: a shift (no vector integer division for Mosaic to lower)
    return kv_len - q_len + q0 + jax.lax.shift_right_logical(r, g.bit_length() - 1)


def _loop_call(qb, k_pages, v_pages, meta, table, *, scale, bq, g, window, softcap, interpret,
               backend):
    nb, kvh, m, d = qb.shape
    n_layer, _, n_pages, ps, _ = k_pages.shape
    dv = v_pages.shape[-1]

    def kernel(meta_ref, tbl_ref, q_ref, k_ref, v_ref, o_ref):
        b = pl.program_id(0)
        seq = meta_ref[0, b]
        q0 = meta_ref[1, b]
        layer = meta_ref[2, 0]
        sc = jnp.maximum(seq, 0)
        kv_len = meta_ref[3, sc]
        q_len = meta_ref[4, sc]
        qs = q_ref[...].astype(jnp.float32) * scale
        qpos = _row_positions(kv_len, q_len, q0, bq, g)
        first, end = _page_range(kv_len, q_len, q0, bq, ps, window)
        end = jnp.where(seq >= 0, end, 0)

        def step(j, carry):
            page = tbl_ref[sc, j]
            kb = k_ref[layer, page].astype(jnp.float32)
            vb = v_ref[layer, page].astype(jnp.float32)
            s = _scores(qs, kb, qpos, j * ps, kv_len, ps, window, softcap)
            return _online_update(s, vb, *carry)

        init = (jnp.full((m, 1), -jnp.inf, jnp.float32), jnp.zeros((m, 1), jnp.float32),
                jnp.zeros((m, dv), jnp.float32))
        _, l, acc = jax.lax.fori_loop(first, end, step, init)
        o_ref[...] = _finish(l, acc).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid=(nb, kvh),
        in_specs=[
            pl.BlockSpec(meta.shape, lambda b, h: (0, 0)),
            pl.BlockSpec(table.shape, lambda b, h: (0, 0)),
            pl.BlockSpec((_SQ, _SQ, m, d), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((n_layer, _SQ, n_pages, ps, d), lambda b, h: (0, h, 0, 0, 0)),
            pl.BlockSpec((n_layer, _SQ, n_pages, ps, dv), lambda b, h: (0, h, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((_SQ, _SQ, m, dv), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((nb, kvh, m, dv), qb.dtype),
        interpret=interpret,
        compiler_params=compiler_params(backend, interpret, ("parallel", "parallel")),
        name="ragged_paged_attention",
    )(meta, table, qb, k_pages, v_pages)


def _pipelined_call(qb, k_pages, v_pages, meta, table, *, scale, bq, g, window, softcap,
                    interpret, backend):
    from jax.experimental.pallas import tpu as pltpu

    nb, kvh, m, d = qb.shape
    _, _, _, ps, _ = k_pages.shape
    dv = v_pages.shape[-1]
    mp = table.shape[1]

    def page_of(b, h, j, meta_ref, tbl_ref):
        seq = meta_ref[0, b]
        sc = jnp.maximum(seq, 0)
        kv_len, q_len = meta_ref[3, sc], meta_ref[4, sc]
        first, end = _page_range(kv_len, q_len, meta_ref[1, b], bq, ps, window)
        jj = jnp.minimum(jnp.maximum(j, first), jnp.maximum(end - 1, first))
        return (meta_ref[2, 0], h, tbl_ref[sc, jj], 0, 0)

    def kernel(meta_ref, tbl_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc):
        b, j = pl.program_id(0), pl.program_id(2)
        seq = meta_ref[0, b]
        sc = jnp.maximum(seq, 0)
        q0 = meta_ref[1, b]
        kv_len, q_len = meta_ref[3, sc], meta_ref[4, sc]
        first, end = _page_range(kv_len, q_len, q0, bq, ps, window)

        @pl.when(j == 0)
        def _init():
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when((seq >= 0) & (j >= first) & (j < end))
        def _step():
            qs = q_ref[...].astype(jnp.float32) * scale
            qpos = _row_positions(kv_len, q_len, q0, bq, g)
            s = _scores(qs, k_ref[...].astype(jnp.float32), qpos, j * ps, kv_len, ps, window,
                        softcap)
            mm, ll, aa = _online_update(s, v_ref[...].astype(jnp.float32), m_sc[...], l_sc[...],
                                        acc_sc[...])
            m_sc[...], l_sc[...], acc_sc[...] = mm, ll, aa

        @pl.when(j == mp - 1)
        def _done():
            o_ref[...] = _finish(l_sc[...], acc_sc[...]).astype(o_ref.dtype)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(nb, kvh, mp),
        in_specs=[
            pl.BlockSpec((_SQ, _SQ, m, d), lambda b, h, j, mr, tr: (b, h, 0, 0)),
            pl.BlockSpec((_SQ, _SQ, _SQ, ps, d), page_of),
            pl.BlockSpec((_SQ, _SQ, _SQ, ps, dv), page_of),
        ],
        out_specs=pl.BlockSpec((_SQ, _SQ, m, dv), lambda b, h, j, mr, tr: (b, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((m, 1), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                        pltpu.VMEM((m, dv), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((nb, kvh, m, dv), qb.dtype),
        interpret=interpret,
        compiler_params=compiler_params(backend, interpret, ("parallel", "parallel", "arbitrary")),
        name="ragged_paged_attention_pipelined",
    )(meta, table, qb, k_pages, v_pages)


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "block_q", "variant",
                                             "interpret", "backend"))
def ragged_paged_attention(q, k_pages, v_pages, layer, kv_lens, page_indices, cu_q_lens,
                           num_seqs, *, scale: float, window: int | None = None,
                           softcap: float | None = None, block_q: int | None = None,
                           variant: str | None = None, interpret: bool = False,
                           backend: str | None = None) -> jax.Array:
    """Causal GQA attention of ragged query spans over paged K/V.

    q ``[T, H, D]``; pools ``[L, KVH, n_pages, page_size, D]`` / ``[..., Dv]`` already holding
    the new tokens' keys/values; ``layer`` the pool's layer (int scalar, may be traced);
    ``kv_lens [S]``, ``page_indices [S, max_pages]``, ``cu_q_lens [S + 1]`` int32;
    ``num_seqs``: live sequences (tokens past ``cu_q_lens[num_seqs]`` give zeros). Returns
    ``[T, H, Dv]`` in q's dtype. ``block_q``: query tokens per program (default: the fewest
    whose ``block_q * G`` rows reach 16). ``variant``: ``"loop"`` (GPU) or ``"pipelined"``
    (TPU, its default). ``backend``: the platform to lower for.
    """
    t, h, d = q.shape
    n_layer, kvh, n_pages, ps, _ = k_pages.shape
    dv = v_pages.shape[-1]
    if h % kvh:
        raise ValueError(f"{h} query heads is not a multiple of {kvh} kv heads")
    if variant is None:
        variant = "pipelined" if (backend or jax.default_backend()) == "tpu" else "loop"
    g = h // kvh
    gp = _next_pow2(g)
    bq = block_q or max(1, _MIN // gp)
    n = kv_lens.shape[0]
    nb = -(-t // bq) + n  # at most one partial block per sequence
    cu = cu_q_lens.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    blk_seq, blk_q0, first = _blocks(cu, num_seqs, nb, bq)
    # queries into blocks: [NB, KVH, bq * Gp, Dp] (zero rows for padding: they see nothing)
    dp, dvp = max(_MIN, _next_pow2(d)), max(_MIN, _next_pow2(dv))
    tok = cu[jnp.maximum(blk_seq, 0)][:, None] + blk_q0[:, None] + jnp.arange(bq)[None, :]
    q_lens = cu[1:] - cu[:-1]
    ok = (blk_seq[:, None] >= 0) & (blk_q0[:, None] + jnp.arange(bq)[None, :]
                                    < q_lens[jnp.maximum(blk_seq, 0)][:, None])
    qg = q.reshape(t, kvh, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, dp - d)))
    qb = jnp.where(ok[:, :, None, None, None], qg[jnp.clip(tok, 0, t - 1)], 0)  # [NB,bq,KVH,Gp,Dp]
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(nb, kvh, bq * gp, dp)
    kp, vp = k_pages, v_pages
    if dp != d:  # Triton tensors are powers of two; zero features change nothing
        kp = jnp.pad(kp, ((0, 0),) * 4 + ((0, dp - d),))
    if dvp != dv:
        vp = jnp.pad(vp, ((0, 0),) * 4 + ((0, dvp - dv),))
    # scalars: block seq / first query; layer; per-sequence kv length and query count
    width = max(nb, n)
    meta = jnp.zeros((5, width), jnp.int32)
    meta = meta.at[0, :nb].set(blk_seq).at[1, :nb].set(blk_q0)
    meta = meta.at[2, 0].set(jnp.asarray(layer, jnp.int32))
    meta = meta.at[3, :n].set(kv_lens).at[4, :n].set(q_lens)
    call = {"loop": _loop_call, "pipelined": _pipelined_call}[variant]
    ob = call(qb, kp, vp, meta, page_indices.astype(jnp.int32), scale=scale, bq=bq, g=gp,
              window=window, softcap=softcap, interpret=interpret, backend=backend)
    # back to tokens: token i of sequence s is row (i % bq) of block first[s] + i // bq
    ob = ob.reshape(nb, kvh, bq, gp, dvp)[:, :, :, :g, :dv]
    seq, _, live = token_layout(cu, kv_lens, num_seqs, t)
    i = jnp.arange(t, dtype=jnp.int32) - cu[seq]
    blk = jnp.clip(first[seq] + i // bq, 0, nb - 1)
    out = ob[blk, :, i % bq]  # [T, KVH, G, Dv]
    out = jnp.where(live[:, None, None, None], out, 0)
    return out.reshape(t, h, dv).astype(q.dtype)
