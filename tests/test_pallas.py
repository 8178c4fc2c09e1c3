"""Pallas kernels (interpret mode on CPU, compiled on a GPU/TPU) against gguf-py's numpy dequantize and a numpy softmax.

Weights are random GGUF blocks: random bytes with finite f16 scale fields (every code, scale and
bit position is exercised), and, for the types gguf-py can quantize, ``gguf.quants.quantize`` of
random floats (what real files hold). Shapes are odd on purpose: n_out not a multiple of the
128-column tile, n_in = 576 (not a multiple of the 256-element chunk), batch 1 / 3 / 17.
"""

from __future__ import annotations

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llamacpp_oracle import ggml_to_float

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info
from jllama.kernels import pallas_attention as pa
from jllama.kernels import pallas_qmatmul as pq
from jllama.quant.qtensor import QTensor
from jllama.quant.testing import random_blocks

OLD_TYPES = [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]
# added later: plain bit fields, 16-entry value tables, ternary
NEW_TYPES = [QType.Q5_0, QType.Q5_1, QType.Q3_K, QType.Q2_K, QType.IQ4_NL, QType.IQ4_XS,
             QType.MXFP4, QType.NVFP4, QType.TQ2_0, QType.TQ1_0,
             QType.Q1_0, QType.Q2_0]  # fmt: skip  (these two as Q4_0 blocks of their values)
# lattice-grid types (decoded at load time to 4-bit codes)
GRID_TYPES = [QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S, QType.IQ1_S,
              QType.IQ1_M]  # fmt: skip
NEW_TYPES += GRID_TYPES
TYPES = OLD_TYPES + NEW_TYPES
# gguf-py has quantize_blocks for these (32-blocks; and TQ1_0/TQ2_0 with 256-blocks)
QUANTIZABLE = [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.MXFP4]

# Where a device exists, the same tests run the compiled kernels.
BACKEND = jax.default_backend()
INTERPRET = BACKEND == "cpu"


def attn_interpret(variant: str) -> bool:
    """The "pipelined" attention is the TPU variant, "loop" the GPU one: else interpret."""
    return INTERPRET or (variant == "pipelined") != (BACKEND == "tpu")


def quantized_blocks(qtype: QType, rows: int, row_len: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, row_len)).astype(np.float32)
    return gguf.quants.quantize(w, qtype)


def ref_dequantize(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """gguf-py's decoder (not ours), or ggml's own for types newer than this gguf-py."""
    try:
        return gguf.quants.dequantize(raw, qtype)
    except (ValueError, NotImplementedError):
        info = qtype_info(int(qtype))
        return ggml_to_float(raw, int(qtype), raw.shape[-1] // info.type_size * info.block_size)


def qmatmul(x: np.ndarray, qt: QTensor, **kw) -> jax.Array:
    """``pallas_qmatmul`` under one jit, as the model runs it. Eagerly, each jnp step around the
    kernel (padding, the in-graph repack of a raw GGUF weight, the split-K sum) was a compile of
    its own: most of this file's ~1100 compiles."""
    return jax.jit(functools.partial(pq.pallas_qmatmul, interpret=INTERPRET, **kw))(
        jnp.asarray(x), qt)


def check_matmul(x: np.ndarray, raw: np.ndarray, qtype: QType, got) -> None:
    """|got - x @ W.T| within f32 rounding of the |x| @ |W| magnitude (W from gguf-py)."""
    w = ref_dequantize(raw, qtype).astype(np.float64)
    x64 = x.astype(np.float64)
    want, scale = x64 @ w.T, np.abs(x64) @ np.abs(w).T
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * scale + 1e-6)


def test_supported():
    assert all(pq.supported(int(t)) for t in TYPES)
    assert not pq.supported(int(QType.Q8_K))  # an activation type, never a weight
    assert not pq.supported(int(QType.F32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_planes_roundtrip_gguf_dequantize(qtype):
    """The load-time repack loses nothing: the planes dequantize to gguf-py's values exactly,
    and the in-graph (jnp) repack builds the same planes as the numpy one."""
    shape = (130, 768)
    raw = random_blocks(qtype, *shape, seed=1)
    planes = pq.repack(np, raw, qtype, shape)
    # jitted (as the model runs them): eagerly each jnp step was a compile of its own
    got = jax.jit(pq.dequantize_planes, static_argnums=(1, 2))(
        tuple(jnp.asarray(p) for p in planes), qtype, shape)
    np.testing.assert_array_equal(np.asarray(got), ref_dequantize(raw, qtype))
    jplanes = jax.jit(lambda r: pq.repack(jnp, r, qtype, shape))(jnp.asarray(raw))
    assert len(jplanes) == len(planes)
    for a, b in zip(planes, jplanes, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("qtype", [QType.Q6_K, *NEW_TYPES], ids=lambda q: q.name)
def test_take_rows_planes_matches_gguf_rows(qtype):
    shape = (300, 512)
    raw = random_blocks(qtype, *shape, seed=4)
    planes = tuple(jnp.asarray(p) for p in pq.repack(np, raw, qtype, shape))
    ids = np.array([[0, 299], [137, 137]])
    got = jax.jit(pq.take_rows_planes, static_argnums=(1, 2))(planes, qtype, shape,
                                                              jnp.asarray(ids))
    want = ref_dequantize(raw[ids.reshape(-1)], qtype).reshape(2, 2, 512)
    np.testing.assert_array_equal(np.asarray(got), want)


# (n_out, n_in, batch rows, k_splits): odd n_out, n_in 256 / 768 / 2816 (11 superblocks),
# split-K forced on and off.
CASES = [(200, 256, 1, None), (130, 768, 3, 3), (72, 2816, 17, None)]


# The added types at the decode row counts (1, 4: the multiply-reduce path; 16: one dot tile),
# split-K forced at 4 rows: all three for one plain and one grid type; the others share those
# paths and differ only in their block decoding, which one case (4 rows, split-K) exercises.
NEW_CASES = [(200, 512, 1, None), (130, 768, 4, 3), (72, 512, 16, None)]
ALL_CASES_TYPES = (QType.Q5_0, QType.IQ2_XXS)


@pytest.mark.parametrize(
    "qtype,case",
    [(t, c) for t in OLD_TYPES for c in CASES]
    + [(t, c) for t in NEW_TYPES for c in NEW_CASES
       if t in ALL_CASES_TYPES or c == NEW_CASES[1]],
    ids=lambda v: v.name if isinstance(v, QType) else f"{v[0]}x{v[1]}-m{v[2]}-s{v[3]}",
)
def test_qmatmul_matches_gguf_reference(qtype, case):
    n_out, n_in, m, k_splits = case
    raw = random_blocks(qtype, n_out, n_in, seed=n_in + m)
    qt = pq.prepare_pallas(QTensor(jnp.asarray(raw), int(qtype), (n_out, n_in)))
    assert qt.layout == pq.LAYOUT
    x = np.random.default_rng(m).standard_normal((m, n_in)).astype(np.float32)
    got = qmatmul(x, qt, k_splits=k_splits)
    check_matmul(x, raw, qtype, got)


@pytest.mark.parametrize("qtype", [QType.Q5_0], ids=lambda q: q.name)
def test_qmatmul_multiply_reduce_up_to_16_rows(qtype):
    """``vector_rows=16``: 8 and 16 rows through the multiply-reduce path (the knob the GPU
    benchmark uses to compare it with the dot), and it lowers for both devices."""
    shape = (130, 512)
    raw = random_blocks(qtype, *shape, seed=9)
    planes = tuple(jnp.asarray(p) for p in pq.repack(np, raw, qtype, shape))
    for m in (8, 16):
        x = np.random.default_rng(m).standard_normal((m, shape[1])).astype(np.float32)
        got = jax.jit(lambda x, planes: pq.matmul_planes(
            x, planes, qtype, shape, interpret=INTERPRET, vector_rows=16))(jnp.asarray(x), planes)
        check_matmul(x, raw, qtype, got)
    for platform in ("cuda", "tpu"):

        def f(x, planes, platform=platform):
            return pq.matmul_planes(x, planes, qtype, shape, backend=platform, vector_rows=16)

        text = lower_for(platform, f, jax.ShapeDtypeStruct((16, shape[1]), jnp.float32), planes)
        assert ("triton" if platform == "cuda" else "tpu_custom_call") in text


@pytest.mark.parametrize(
    "qtype,n_in",
    [(t, n) for t in QUANTIZABLE for n in (576, 96)] + [(QType.TQ1_0, 768), (QType.TQ2_0, 768)],
    ids=lambda v: v.name if isinstance(v, QType) else str(v),
)
def test_qmatmul_quantized_weights_odd_n_in(qtype, n_in):
    """gguf-py-quantized weights, n_in = 576 (SmolLM2's width: 9 chunks of 64) and 96 (padded
    to 128), raw GGUF layout (repacked in-graph) and leading batch axes on x."""
    n_out = 100
    raw = quantized_blocks(qtype, n_out, n_in, seed=5)
    qt = QTensor(jnp.asarray(raw), int(qtype), (n_out, n_in))
    x = np.random.default_rng(6).standard_normal((2, 3, n_in)).astype(np.float32)
    got = qmatmul(x, qt)
    assert got.shape == (2, 3, n_out)
    check_matmul(x.reshape(6, n_in), raw, qtype, np.asarray(got).reshape(6, n_out))


def test_qmatmul_refuses_unsupported():
    raw = np.zeros((4, 292), np.uint8)  # Q8_K: 292 bytes per 256
    with pytest.raises(QuantError):
        qt = QTensor(jnp.asarray(raw), int(QType.Q8_K), (4, 256))
        pq.pallas_qmatmul(jnp.zeros((1, 256)), qt)
    with pytest.raises(QuantError):
        qt = QTensor(jnp.asarray(random_blocks(QType.Q8_0, 4, 64, 0)), int(QType.Q8_0), (4, 64))
        pq.pallas_qmatmul(jnp.zeros((1, 32)), qt)


# ----------------------------------------------------------------------------- attention


def attention_reference(q, k, v, lengths, scale, window=None, softcap=None):
    """Plain softmax attention in float64 over positions < length (and >= length - window)."""
    b, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d).astype(np.float64)
    s = np.einsum("bkgd,bksd->bkgs", qg, k.astype(np.float64)) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    pos = np.arange(k.shape[2])[None, :]
    valid = pos < lengths[:, None]
    if window:
        valid &= pos >= lengths[:, None] - window
    s = np.where(valid[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgs,bksd->bkgd", p, v.astype(np.float64)).reshape(b, h, -1)


def poison_unread_blocks(a: np.ndarray, lengths, bl: int, window: int | None) -> np.ndarray:
    """NaN in every cache block the kernel must not read (wholly past the length, or wholly
    before the window): reading one would turn the output into NaN (0 * NaN in p @ v)."""
    a = a.copy()
    for i, n in enumerate(lengths):
        end = -(-int(n) // bl) * bl
        a[i, :, end:] = np.nan
        if window:
            a[i, :, : max(int(n) - window, 0) // bl * bl] = np.nan
    return a


ATTN_CASES = [
    # (batch, heads, kv heads, max_len, head_dim, window, softcap, cache dtype)
    (3, 9, 3, 96, 64, None, None, np.float32),  # SmolLM2-like GQA group of 3
    (2, 4, 1, 128, 32, 40, None, np.float32),  # Gemma-3-like: one kv head, sliding window
    (2, 8, 8, 64, 16, None, 30.0, np.float32),  # MHA + softcap
    (2, 6, 2, 200, 32, None, None, np.float16),  # max_len not a multiple of 16: padded
    (1, 4, 2, 64, 40, None, None, np.float32),  # head_dim not a power of two: padded
]


@pytest.mark.parametrize("variant", ["loop", "pipelined"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}L{c[3]}")
def test_decode_attention_matches_softmax(case, variant):
    b, h, kvh, max_len, d, window, softcap, dt = case
    rng = np.random.default_rng(max_len + h)
    q = rng.standard_normal((b, h, d)).astype(np.float32)
    k = rng.standard_normal((b, kvh, max_len, d)).astype(dt)
    v = rng.standard_normal((b, kvh, max_len, d)).astype(dt)
    lengths = rng.integers(1, max_len + 1, b).astype(np.int32)
    lengths[0] = max_len  # the full cache
    want = attention_reference(q, k, v, lengths, d**-0.5, window, softcap)
    bl = 32
    if max_len % 16 == 0:  # (the padded case would pad NaN blocks too) the kernel must skip them
        k = poison_unread_blocks(k, lengths, bl, window)
        v = poison_unread_blocks(v, lengths, bl, window)
    got = pa.pallas_decode_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
        scale=d**-0.5, window=window, softcap=softcap, block_l=bl, variant=variant,
        interpret=attn_interpret(variant),
    )  # fmt: skip
    assert got.shape == (b, h, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["loop", "pipelined"])
def test_decode_attention_empty_sequence_is_zero(variant):
    q = jnp.ones((2, 2, 16))
    kv = jnp.ones((2, 1, 32, 16))
    got = pa.pallas_decode_attention(
        q, kv, kv, jnp.array([0, 5]), scale=0.25, variant=variant, interpret=attn_interpret(variant)
    )
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)
    np.testing.assert_allclose(np.asarray(got[1]), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- lowering
# No GPU/TPU here: lower the real (non-interpret) kernels for those platforms from the CPU host.
# This runs the Pallas -> Triton and Pallas -> Mosaic TPU lowerings (tile shape rules, supported
# primitives, power-of-two Triton tensors), not the device compilers that come after them.


def lower_for(platform: str, f, *avals) -> str:
    return jax.jit(f).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_qmatmul_lowers_for_device(qtype, platform):
    shape = (200, 768)
    planes = tuple(
        jnp.asarray(p) for p in pq.repack(np, random_blocks(qtype, *shape, 0), qtype, shape)
    )
    # split-K is the grid's shape logic, the same for every type: lowered for the first six
    cases = [(1, None), (3, 3), (40, 1)] if qtype in OLD_TYPES else [(1, None), (40, 1)]
    for m, k_splits in cases:

        def f(x, planes, k_splits=k_splits):
            return pq.matmul_planes(x, planes, qtype, shape, k_splits=k_splits, backend=platform)

        text = lower_for(platform, f, jax.ShapeDtypeStruct((m, shape[1]), jnp.float32), planes)
        assert ("triton" if platform == "cuda" else "tpu_custom_call") in text


@pytest.mark.parametrize("platform,variant", [("cuda", "loop"), ("tpu", "pipelined")])
def test_decode_attention_lowers_for_device(platform, variant):
    def f(q, k, v, n):
        return pa.pallas_decode_attention(
            q, k, v, n, scale=0.125, window=64, softcap=30.0, variant=variant, backend=platform
        )

    cache = jax.ShapeDtypeStruct((2, 3, 256, 64), jnp.float16)
    q = jax.ShapeDtypeStruct((2, 9, 64), jnp.float32)
    text = lower_for(platform, f, q, cache, cache, jax.ShapeDtypeStruct((2,), jnp.int32))
    assert ("triton" if platform == "cuda" else "tpu_custom_call") in text


@pytest.mark.parametrize(
    "model,tensor",
    [
        ("smollm2_path", "blk.0.ffn_down.weight"),  # Q4_1
        ("smollm2_path", "token_embd.weight"),  # Q8_0 (tied output)
        ("gemma3_path", "blk.0.attn_output.weight"),  # Q4_K
        ("gemma3_path", "blk.0.ffn_down.weight"),  # Q6_K
    ],
)
def test_qmatmul_real_model_weights(model, tensor, request):
    """Blocks as llama.cpp's quantizer wrote them (first 96 rows of a real tensor)."""
    from jllama.gguf.reader import read_gguf

    info = read_gguf(request.getfixturevalue(model)).tensors[tensor]
    qtype = QType(info.qtype)
    assert pq.supported(int(qtype))
    raw = np.asarray(info.data).reshape(info.shape[0], -1)[:96].copy()
    shape = (96, info.shape[1])
    qt = pq.prepare_pallas(QTensor(jnp.asarray(raw), int(qtype), shape))
    x = np.random.default_rng(7).standard_normal((2, shape[1])).astype(np.float32)
    check_matmul(x, raw, qtype, qmatmul(x, qt))
