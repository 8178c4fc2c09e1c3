"""Pallas quantized matmul (GPU via Triton, TPU via Mosaic): ``x @ W.T`` reading 1.6-8 bit blocks.

Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4 (32-element blocks), NVFP4 (64), Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K, IQ4_XS, TQ1_0, TQ2_0 (256), all at the GGUF's bits per weight; and the lattice-grid types
IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M at about 4.3-4.6 bits per weight (their
256-2048-entry grids would need an in-kernel gather, which Triton lacks: at load time every
element's grid value, sign and IQ1 delta become one 4-bit code into a 16-entry signed table,
``lut_values``; d and the small scale fields are kept, one byte each); and Q1_0 / Q2_0 as
Q4_0 blocks holding exactly their values (``_as_q4_0``: 4.5 bits per weight instead of 1.125 /
2.25, the Q4_0 kernel unchanged).

Why a load-time repack (``prepare_pallas``) instead of reading raw GGUF rows: GGUF interleaves
f16 scales and codes in 18-210 byte blocks, so one block of a row is not a rectangular tile, and
Triton needs power-of-two tiles while Mosaic needs (sublane, lane) tiles. The repack keeps the
same bytes (same bits per weight, scales still f16 / packed 6-bit) but splits them into planes:

- every plane is k-major, ``[rows_along_n_in, n_out_padded]``: n_out is the lane (last) axis, so a
  weight tile is ``[k_rows, bn]`` and ``x_tile @ w_tile`` is a plain (M, K) x (K, N) dot;
- n_in is walked in chunks (256 elements for 256-blocks, 64 for 32-blocks); 4-bit codes are
  re-nibbled per chunk: byte ``r`` holds element ``r`` in its low nibble and element
  ``chunk / 2 + r`` in its high nibble, so each 32-group is 32 whole rows of one nibble half:
  no interleave/concat in the kernel;
- everything else stays in its ggml packing and is unpacked in the kernel with integer shifts
  and masks: Q4_K/Q5_K 6-bit scales, Q5_K/Q6_K high bits, Q6_K int8 scales, Q5_0/Q5_1's 32-bit
  qh word (one int32 row per block, its bit ``l`` shifted out for row ``l``), the 2-bit planes of
  Q2_K/Q3_K/TQ2_0 and Q3_K's hmask (byte ``l`` of a 32-byte run holds element ``l``, ``32 + l``,
  ..: already k-major), Q2_K/Q3_K/IQ4_XS scales, TQ1_0's base-3 bytes (ggml's multiply-by-3^n
  trit extraction), MXFP4's E8M0 exponent byte and NVFP4's four UE4M3 bytes (the scales built
  from their bits);
- IQ4_NL/IQ4_XS/MXFP4/NVFP4 values come from a 16-entry int8 table, which the kernel reads as four
  int32 constants: two selects pick the word, two shifts the sign-extended byte (no gather);
- n_out is padded to a multiple of 128 and n_in to a multiple of the chunk (zero scales and
  codes).

The kernel: grid over (batch-row tiles, n_out tiles, n_in splits); in each program a
``fori_loop`` over its chunks of n_in, and per 32 (16 where scales are per 16) element group:
unpack codes to f32 (no int -> float convert: see ``fl``), then fold the tile into an f32
accumulator: apply the group's scale and min (``[1, bn]`` rows) and an f32 dot with the matching
slice of x, or, for <= 4 batch rows (decode), a multiply by the x column and a sum over rows
(no 16-row dot padding), the scale and min applied to the sums. A program's share of n_in
is one block: on Triton a block is just a pointer (only the slices we index are loaded), on TPU
one DMA per tile into VMEM. Small decode matmuls split n_in over programs (split-K) so a GPU has
enough programs; partial sums are added outside the kernel.

Raw GGUF QTensors are accepted too (repacked in-graph on every call: correct, slower).
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info
from jllama.quant import iqgrids as grids
from jllama.quant.formats import KVALUES_IQ4NL, KVALUES_MXFP4, UE4M3_HALF, iq_grid, mxfp4_values
from jllama.quant.qtensor import QTensor

K_CHUNK = 256  # K-quants: elements of n_in per loop step, one superblock (eight 32-groups)
# Q4_0/Q4_1/Q8_0: two 32-blocks per step, so n_in pads to 64, not 256 (576 -> 576, not 768:
# a third more bytes read for SmolLM2's 576-wide rows otherwise).
LEGACY_CHUNK = 64
LANE = 128  # n_out padding / tile unit
LAYOUT = "pallas"

# 32-element block types: chunks of 64 (see LEGACY_CHUNK)
_LEGACY = {int(t) for t in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
                            QType.IQ4_NL, QType.MXFP4, QType.NVFP4)}  # fmt: skip
# Lattice-grid types: decoded at load time to 4-bit codes into a 16-entry signed table (see
# ``_grid_fields``), plus their own scale fields: more bytes than the GGUF, no grid in the kernel.
_GRID = {int(t) for t in (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S,
                          QType.IQ1_S, QType.IQ1_M)}  # fmt: skip
_IQ1 = {int(QType.IQ1_S), int(QType.IQ1_M)}
_K256 = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS, QType.TQ1_0,
         QType.TQ2_0)  # fmt: skip
# Transcoded at load to Q4_0 blocks of the same values (``_as_q4_0``)
_AS_Q4_0 = {int(QType.Q1_0), int(QType.Q2_0)}
_SUPPORTED = _LEGACY | _GRID | {int(t) for t in _K256} | _AS_Q4_0


def _packed_lut(values: tuple[int, ...]) -> tuple[int, ...]:
    """A 16-entry int8 table, biased by +128, as four int32 words: entry ``4 i + k`` in byte
    ``k`` of word ``i`` (the kernel looks codes up with selects and a shift: no gather)."""
    words = []
    for i in range(4):
        u = sum((values[4 * i + k] + 128) << (8 * k) for k in range(4))
        words.append(u - (1 << 32) if u >= 1 << 31 else u)
    return tuple(words)


@functools.cache
def _grid_levels(qtype: int) -> np.ndarray:
    """The distinct magnitudes of an IQ2/IQ3 grid (3 or 8 of them), from gguf-py's tables."""
    name = qtype_info(qtype).name
    g = iq_grid(name) if name.startswith("IQ3") else grids.grid(name)
    levels = np.unique(np.asarray(g, np.int32))
    assert len(levels) <= 8 and levels.max() < 128, (name, levels)
    return levels


@functools.cache
def lut_values(qtype: int) -> tuple[int, ...]:
    """The 16-entry int8 value table the kernel looks 4-bit codes up in. Grid types: code
    ``level | sign << 3`` -> +-grid level; IQ1_S/IQ1_M: code ``(g + 1) + 3 * (delta < 0)`` ->
    ``8 * (g + delta)`` (g in {-1, 0, 1}, delta +-1/8: the kernel scales it by 1/8, exactly)."""
    qtype = int(qtype)
    if qtype in (QType.IQ4_NL, QType.IQ4_XS):
        return KVALUES_IQ4NL
    if qtype in (QType.MXFP4, QType.NVFP4):
        return KVALUES_MXFP4
    if qtype in _IQ1:
        v = [8 * g + (-1 if neg else 1) for neg in (0, 1) for g in (-1, 0, 1)]
        return tuple(v + [0] * 10)
    lv = [int(x) for x in _grid_levels(qtype)]
    pad = [0] * (8 - len(lv))
    return tuple(lv + pad + [-x for x in lv] + pad)


def supported(qtype: int) -> bool:
    return int(qtype) in _SUPPORTED


def chunk_of(qtype: int) -> int:
    """Elements of n_in per loop step (and the unit n_in is padded to)."""
    return LEGACY_CHUNK if _kernel_qtype(qtype) in _LEGACY else K_CHUNK


def _kernel_qtype(qtype: int) -> int:
    """The type whose planes and kernel a weight of ``qtype`` uses."""
    return int(QType.Q4_0) if int(qtype) in _AS_Q4_0 else int(qtype)


def _as_q4_0(xp: ModuleType, raw: object, qtype: int, shape: tuple[int, int]) -> object:
    """Q1_0 / Q2_0 rows ``uint8 [n_out, row_bytes]`` -> Q4_0 rows of exactly the same values:
    Q4_0 decodes (code - 8) d, so Q1_0's +-d is code 8 +- 1 and Q2_0's (c - 1) d is c + 7, each
    32-block with its block's f16 d bytes unchanged."""
    n_out, n_in = shape
    info = qtype_info(qtype)
    b = raw.reshape(n_out, n_in // info.block_size, info.type_size)
    u8 = xp.uint8
    if int(qtype) == QType.Q1_0:  # bit j of qs[16] (little-endian) is element j
        bits = (b[..., 2:, None] >> xp.arange(8, dtype=u8)) & u8(1)
        codes = u8(7) + u8(2) * bits.reshape(n_out, -1, 4, 32)
    else:  # Q2_0: four 2-bit codes a byte, from the low bits up
        c = (b[..., 2:, None] >> xp.arange(0, 8, 2, dtype=u8)) & u8(3)
        codes = u8(7) + c.reshape(n_out, -1, 2, 32)
    qs = codes[..., :16] | (codes[..., 16:] << u8(4))  # Q4_0: j low, j + 16 high nibble
    d = xp.broadcast_to(b[..., None, 0:2], (*codes.shape[:3], 2))
    return xp.concatenate([d, qs], axis=-1).reshape(n_out, n_in // 32 * 18)


# ----------------------------------------------------------------------------- load-time repack


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _f16(xp: ModuleType, b: object) -> object:
    """Two little-endian bytes on the last axis -> float16 (numpy view, or a bitcast in XLA)."""
    if xp is np:
        return np.ascontiguousarray(b).view(np.float16)[..., 0]
    u = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u, jnp.float16)


def _i32(xp: ModuleType, b: object) -> object:
    """Four little-endian bytes on the last axis -> int32 (the same 32 bits)."""
    if xp is np:
        return np.ascontiguousarray(b).view(np.int32)[..., 0]
    u = b[..., 0].astype(jnp.uint32)
    for k in range(1, 4):
        u = u | (b[..., k].astype(jnp.uint32) << (8 * k))
    return jax.lax.bitcast_convert_type(u, jnp.int32)


def _nib_natural(xp: ModuleType, qs: object, pairs_of: int) -> object:
    """4-bit codes in natural element order from ggml nibble bytes ``[..., nb, nbytes]``.

    ``pairs_of``: how many consecutive bytes share the low/high split (16 for Q4_0/Q4_1: low
    nibbles are elements 0-15 of a 32-block; 32 for Q4_K: groups 2j/2j+1; 64 for Q6_K halves).
    """
    *lead, nbytes = qs.shape
    q = qs.reshape(*lead, nbytes // pairs_of, 1, pairs_of)
    lo, hi = q & 15, q >> 4
    return xp.concatenate([lo, hi], axis=-2).reshape(*lead, nbytes * 2)


def _renibble(xp: ModuleType, codes: object, chunk: int) -> object:
    """Natural-order 4-bit codes ``[N, K]`` -> bytes ``[N, K // 2]``, chunk-halves paired."""
    n, k = codes.shape
    c = codes.reshape(n, k // chunk, 2, chunk // 2).astype(xp.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def _plane(xp: ModuleType, a: object, n_pad: int, rows_pad: int) -> object:
    """``[N, R]`` -> k-major ``[rows_pad, n_pad]`` with zero padding."""
    n, r = a.shape
    a = xp.pad(a, ((0, n_pad - n), (0, rows_pad - r)))
    return xp.ascontiguousarray(a.T) if xp is np else a.T


# Scale-field rows per 256 of each grid type's plane (one byte each: 4-bit or 3-bit scales
# widened, or IQ2_XS/IQ2_S/IQ3_S's nibble bytes as stored).
_GRID_SCALE_ROWS = {int(QType.IQ2_XXS): 8, int(QType.IQ2_XS): 8, int(QType.IQ2_S): 8,
                    int(QType.IQ3_XXS): 8, int(QType.IQ3_S): 4, int(QType.IQ1_S): 8,
                    int(QType.IQ1_M): 16}  # fmt: skip
# Grid types with a scale per 16 elements (else per 32)
_GRID_PER16 = {int(QType.IQ2_XS), int(QType.IQ2_S), int(QType.IQ1_M)}


def _grid_fields(xp: ModuleType, bb: object, qtype: int) -> tuple:
    """Grid-type blocks ``uint8 [M, type_size]`` -> (natural-order 4-bit codes ``[M, 256]`` into
    ``lut_values(qtype)``, f16 ``d [M]``, scale bytes ``[M, _GRID_SCALE_ROWS]``): the grid
    lookup and the sign / delta bits are resolved here, once, at load time (formats.py decodes
    the same fields to floats)."""
    m = bb.shape[0]
    u32, i32 = xp.uint32, xp.int32

    def ar(n: int, step: int = 1) -> object:
        return xp.arange(0, n * step, step, dtype=u32)

    def words(lo: int, hi: int, width: int) -> object:
        v = bb[:, lo:hi].reshape(m, -1, width).astype(u32)
        out = v[..., 0]
        for k in range(1, width):
            out = out | (v[..., k] << u32(8 * k))
        return out

    def bits(a: object, n: int) -> object:  # [...] -> [..., n]: bit j at j
        return (a.astype(u32)[..., None] >> ar(n)) & u32(1)

    def ksign_bits(idx: object) -> object:
        return bits(xp.asarray(grids.ksigns())[idx.astype(i32)], 8)

    def level_codes(g: object, neg: object) -> object:
        lv = _grid_levels(qtype)
        inv = np.zeros(256, np.int32)
        inv[lv] = np.arange(len(lv))
        return xp.asarray(inv)[g.astype(i32)] | (neg.astype(i32) << 3)

    def table(name: str) -> object:
        return xp.asarray(grids.grid(name).astype(np.int32))

    d = _f16(xp, bb[:, 0:2])
    if qtype == QType.IQ2_XXS:
        w = words(2, 66, 4).reshape(m, 8, 2)
        idx = bb[:, 2:66].reshape(m, 8, 8)[:, :, 0:4].astype(i32)
        sidx = (w[..., 1][..., None] >> ar(4, 7)) & u32(127)
        codes = level_codes(table("IQ2_XXS")[idx], ksign_bits(sidx))
        sc = w[..., 1] >> u32(28)
    elif qtype == QType.IQ2_XS:
        q = words(2, 66, 2).reshape(m, 8, 4)
        codes = level_codes(table("IQ2_XS")[(q & u32(511)).astype(i32)], ksign_bits(q >> u32(9)))
        sc = bb[:, 66:74]
    elif qtype == QType.IQ2_S:
        qs = bb[:, 2:34].reshape(m, 8, 4).astype(i32)
        qh = bb[:, 66:74].astype(i32)
        idx = qs | ((qh[:, :, None] << (8 - 2 * xp.arange(4, dtype=i32))) & 0x300)
        codes = level_codes(table("IQ2_S")[idx], bits(bb[:, 34:66].reshape(m, 8, 4), 8))
        sc = bb[:, 74:82]
    elif qtype == QType.IQ3_XXS:
        g = xp.asarray(iq_grid("IQ3_XXS"))[bb[:, 2:66].astype(i32)].reshape(m, 8, 32)
        aux = words(66, 98, 4)  # [m, 8]
        b7 = bits((aux[..., None] >> ar(4, 7)) & u32(127), 7)  # [m, 8, 4, 7]
        par = b7.sum(axis=-1, keepdims=True).astype(u32) & u32(1)  # 8th sign: even parity
        codes = level_codes(g, xp.concatenate([b7, par], axis=-1).reshape(m, 8, 32))
        sc = aux >> u32(28)
    elif qtype == QType.IQ3_S:
        qh = bits(bb[:, 66:74], 8).reshape(m, 64).astype(i32)
        idx = bb[:, 2:66].astype(i32) | (qh << 8)
        g = xp.asarray(iq_grid("IQ3_S"))[idx].reshape(m, 8, 32)
        codes = level_codes(g, bits(bb[:, 74:106], 8).reshape(m, 8, 32))
        sc = bb[:, 106:110]
    elif qtype == QType.IQ1_S:
        qs = bb[:, 2:34].reshape(m, 8, 4).astype(i32)
        qh = words(34, 50, 2).astype(i32)  # [m, 8]
        idx = qs | (((qh[:, :, None] >> (3 * xp.arange(4, dtype=i32))) & 7) << 8)
        dneg = ((qh & 0x8000) != 0).astype(i32)[:, :, None, None]
        codes = (table("IQ1_S")[idx] + 1) + 3 * dneg
        sc = (qh >> 12) & 7
    elif qtype == QType.IQ1_M:
        scw = words(48, 56, 2).astype(i32)  # [m, 4]; d's f16 bits in their top nibbles
        u = (scw[:, 0] >> 12) | ((scw[:, 1] >> 8) & 0xF0) | ((scw[:, 2] >> 4) & 0xF00)
        u = (u | (scw[:, 3] & 0xF000)).astype(xp.uint16)
        d = u.view(np.float16) if xp is np else jax.lax.bitcast_convert_type(u, jnp.float16)
        sc = ((scw[:, :, None] >> (3 * xp.arange(4, dtype=i32))) & 7).reshape(m, 16)
        qs = bb[:, 0:32].reshape(m, 16, 2).astype(i32)
        qh = bb[:, 32:48].astype(i32)
        idx = qs | xp.stack([(qh << 8) & 0x700, (qh << 4) & 0x700], axis=-1)
        dneg = (xp.stack([qh & 8, qh & 0x80], axis=-1) != 0).astype(i32)
        codes = (table("IQ1_M")[idx] + 1) + 3 * dneg[..., None]
    else:
        raise QuantError(f"not a grid type: {qtype_info(qtype).name}")
    return codes.reshape(m, 256), d, sc.astype(xp.uint8)


def repack(xp: ModuleType, raw: object, qtype: int, shape: tuple[int, int]) -> tuple:
    """Raw GGUF rows ``uint8 [n_out, row_bytes]`` -> the kernel's planes (see module doc)."""
    qtype = int(qtype)
    if not supported(qtype):
        raise QuantError(f"Pallas qmatmul does not support {qtype_info(qtype).name}")
    if qtype in _AS_Q4_0:
        raw, qtype = _as_q4_0(xp, raw, qtype, shape), int(QType.Q4_0)
    n_out, n_in = shape
    info = qtype_info(qtype)
    nb = n_in // info.block_size
    b = raw.reshape(n_out, nb, info.type_size)
    n_pad = _round_up(n_out, LANE)
    chunk = chunk_of(qtype)
    k_pad = _round_up(n_in, chunk)
    gpc = chunk // 32  # 32-blocks per chunk (legacy types)

    def codes4(codes: object) -> object:  # natural 4-bit codes [N, n_in] -> padded plane
        codes = xp.pad(codes.reshape(n_out, n_in), ((0, 0), (0, k_pad - n_in)))
        return _plane(xp, _renibble(xp, codes, chunk), n_pad, k_pad // 2)

    def per_block(a: object, per_chunk: int) -> object:  # [N, nb(, w)] -> [rows, n_pad]
        a = a.reshape(n_out, -1)
        return _plane(xp, a, n_pad, k_pad // chunk * per_chunk)

    if qtype == QType.Q4_0:
        return codes4(_nib_natural(xp, b[..., 2:], 16)), per_block(_f16(xp, b[..., 0:2]), gpc)
    if qtype == QType.Q4_1:
        return (
            codes4(_nib_natural(xp, b[..., 4:], 16)),
            per_block(_f16(xp, b[..., 0:2]), gpc),
            per_block(_f16(xp, b[..., 2:4]), gpc),
        )
    if qtype in (QType.Q5_0, QType.Q5_1):  # low nibbles as Q4_0/Q4_1, qh as ggml's int32 word
        o = 2 if qtype == QType.Q5_0 else 4
        head = (per_block(_f16(xp, b[..., 0:2]), gpc),)
        if qtype == QType.Q5_1:
            head += (per_block(_f16(xp, b[..., 2:4]), gpc),)
        qh = per_block(_i32(xp, b[..., o : o + 4]), gpc)
        return (codes4(_nib_natural(xp, b[..., o + 4 :], 16)), *head, qh)
    if qtype == QType.IQ4_NL:
        return codes4(_nib_natural(xp, b[..., 2:], 16)), per_block(_f16(xp, b[..., 0:2]), gpc)
    if qtype == QType.MXFP4:  # E8M0 exponent byte kept as is
        return codes4(_nib_natural(xp, b[..., 1:], 16)), per_block(b[..., 0], gpc)
    if qtype == QType.NVFP4:  # 16-value sub-blocks of 8 bytes; the UE4M3 bytes kept as is
        return codes4(_nib_natural(xp, b[..., 4:], 8)), per_block(b[..., 0:4], 4)
    if qtype == QType.Q8_0:
        qs = b[..., 2:].reshape(n_out, n_in)
        qs = qs.view(np.int8) if xp is np else jax.lax.bitcast_convert_type(qs, jnp.int8)
        return _plane(xp, qs, n_pad, k_pad), per_block(_f16(xp, b[..., 0:2]), gpc)
    # K-quant bit planes (Q2_K, Q3_K, TQ2_0 codes, Q3_K's hmask) keep ggml's byte order: byte l
    # of a 32-byte run holds 2-bit (1-bit) fields of elements l, 32 + l, ..: k-major rows already.
    if qtype in _GRID:
        codes, d, sc = _grid_fields(xp, b.reshape(n_out * nb, info.type_size), qtype)
        k = _GRID_SCALE_ROWS[qtype]
        return codes4(codes.reshape(n_out, n_in)), per_block(d, 1), per_block(sc, k)
    if qtype == QType.Q2_K:  # scales 16 | qs 64 | d | dmin
        return (
            per_block(b[..., 16:80], 64),
            per_block(b[..., 0:16], 16),
            per_block(_f16(xp, b[..., 80:82]), 1),
            per_block(_f16(xp, b[..., 82:84]), 1),
        )
    if qtype == QType.Q3_K:  # hmask 32 | qs 64 | scales 12 | d
        return (
            per_block(b[..., 0:32], 32),
            per_block(b[..., 32:96], 64),
            per_block(b[..., 96:108], 12),
            per_block(_f16(xp, b[..., 108:110]), 1),
        )
    if qtype == QType.IQ4_XS:  # d | scales_h 2 | scales_l 4 | qs 128 (16-byte runs per 32)
        return (
            codes4(_nib_natural(xp, b[..., 8:], 16)),
            per_block(_f16(xp, b[..., 0:2]), 1),
            per_block(b[..., 2:4], 2),
            per_block(b[..., 4:8], 4),
        )
    if qtype == QType.TQ2_0:  # qs 64 | d
        return per_block(b[..., 0:64], 64), per_block(_f16(xp, b[..., 64:66]), 1)
    if qtype == QType.TQ1_0:  # qs 48 (five trits a byte) | qh 4 (four trits a byte) | d
        return (
            per_block(b[..., 0:48], 48),
            per_block(b[..., 48:52], 4),
            per_block(_f16(xp, b[..., 52:54]), 1),
        )
    d, dmin = per_block(_f16(xp, b[..., 0:2]), 1), None
    if qtype in (QType.Q4_K, QType.Q5_K):
        dmin = per_block(_f16(xp, b[..., 2:4]), 1)
        scales = per_block(b[..., 4:16], 12)
        if qtype == QType.Q4_K:
            return codes4(_nib_natural(xp, b[..., 16:], 32)), d, dmin, scales
        qh = per_block(b[..., 16:48], 32)
        return codes4(_nib_natural(xp, b[..., 48:], 32)), d, dmin, scales, qh
    # Q6_K: ql 128 | qh 64 | scales 16 int8 | d f16
    sc = b[..., 192:208]
    sc = sc.view(np.int8) if xp is np else jax.lax.bitcast_convert_type(sc, jnp.int8)
    return (
        codes4(_nib_natural(xp, b[..., :128], 64)),
        per_block(b[..., 128:192], 64),
        per_block(sc, 16),
        per_block(_f16(xp, b[..., 208:210]), 1),
    )


def prepare_pallas(qt: QTensor) -> QTensor:
    """Repack a 2-D GGUF QTensor once at load time into layout ``"pallas"`` (same bit budget,
    plus padding of n_out to 128 and n_in to 256). Others are returned unchanged."""
    if qt.layout != "gguf" or qt.is_float or len(qt.shape) != 2 or not supported(qt.qtype):
        return qt
    planes = repack(np, np.asarray(qt.data), qt.qtype, qt.shape)
    return QTensor(tuple(jnp.asarray(p) for p in planes), qt.qtype, qt.shape, LAYOUT)


def dequantize_planes(planes: tuple, qtype: int, shape: tuple[int, int]) -> jax.Array:
    """f32 ``[n_out, n_in]`` from the planes, in plain jnp (the non-kernel path for this layout:
    embedding rows, reference checks)."""
    qtype = _kernel_qtype(qtype)
    n_out, n_in = shape
    p0 = planes[0]
    n_pad = p0.shape[-1]
    chunk = chunk_of(qtype)
    k_pad = _round_up(n_in, chunk)
    nch = k_pad // chunk
    gpc = chunk // 32
    f32 = jnp.float32

    def nibbles(qs: jax.Array) -> jax.Array:  # [k_pad/2, N] -> natural codes [nch, 256, N]
        q = qs.astype(jnp.int32).reshape(nch, 1, chunk // 2, n_pad)
        return jnp.concatenate([q & 15, q >> 4], axis=1).reshape(nch, chunk, n_pad)

    def rep(a: jax.Array, per_chunk: int) -> jax.Array:  # [nch*per_chunk, N] -> [nch, 256, N]
        a = a.astype(f32).reshape(nch, per_chunk, 1, n_pad)
        return jnp.broadcast_to(a, (nch, per_chunk, chunk // per_chunk, n_pad)).reshape(
            nch, chunk, n_pad
        )

    def crumbs(qs: jax.Array) -> jax.Array:  # ggml 2-bit planes [nch*64, N] -> [nch, 256, N]
        q = qs.astype(jnp.int32).reshape(nch, 2, 1, 32, n_pad)
        return ((q >> (2 * jnp.arange(4)).reshape(1, 1, 4, 1, 1)) & 3).reshape(nch, chunk, n_pad)

    def lut(q: jax.Array, values: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(np.array(values, np.float32))[q]

    def high_bits(qh: jax.Array) -> jax.Array:  # int32 words [nch*gpc, N] -> [nch, chunk, N]
        b = (qh.reshape(nch, gpc, 1, n_pad) >> jnp.arange(32).reshape(1, 1, 32, 1)) & 1
        return b.reshape(nch, chunk, n_pad)

    if qtype == QType.Q4_0:
        w = rep(planes[1], gpc) * (nibbles(p0) - 8).astype(f32)
    elif qtype == QType.Q5_0:
        q = nibbles(p0) | (high_bits(planes[2]) << 4)
        w = rep(planes[1], gpc) * (q - 16).astype(f32)
    elif qtype == QType.Q5_1:
        q = nibbles(p0) | (high_bits(planes[3]) << 4)
        w = rep(planes[1], gpc) * q.astype(f32) + rep(planes[2], gpc)
    elif qtype == QType.IQ4_NL:
        w = rep(planes[1], gpc) * lut(nibbles(p0), KVALUES_IQ4NL)
    elif qtype == QType.MXFP4:
        e = planes[1].astype(jnp.int32).reshape(nch, gpc, 1, n_pad)
        e = jnp.broadcast_to(e, (nch, gpc, 32, n_pad)).reshape(nch, chunk, n_pad)
        w = mxfp4_values(jnp, nibbles(p0), e)
    elif qtype == QType.NVFP4:
        d = jnp.asarray(UE4M3_HALF)[planes[1].astype(jnp.int32)]
        w = rep(d, 4) * lut(nibbles(p0), KVALUES_MXFP4)
    elif qtype == QType.Q2_K:
        _, sc, d, dmin = planes
        sc = sc.astype(jnp.int32).reshape(nch, 16, n_pad)
        dl = d.astype(f32).reshape(nch, 1, n_pad) * (sc & 15).astype(f32)
        ml = dmin.astype(f32).reshape(nch, 1, n_pad) * (sc >> 4).astype(f32)
        w = rep(dl.reshape(-1, n_pad), 16) * crumbs(p0).astype(f32) - rep(ml.reshape(-1, n_pad), 16)
    elif qtype == QType.Q3_K:
        _, qs, sc, d = planes
        hm = p0.astype(jnp.int32).reshape(nch, 1, 32, n_pad)
        hm = ((hm >> jnp.arange(8).reshape(1, 8, 1, 1)) & 1).reshape(nch, chunk, n_pad)
        q = crumbs(qs) - ((hm ^ 1) << 2)
        s = sc.astype(jnp.int32).reshape(nch, 12, n_pad)
        lo = jnp.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=1)
        hi = (s[:, None, 8:12] >> (2 * jnp.arange(4)).reshape(1, 4, 1, 1)) & 3
        scale = (lo | (hi.reshape(nch, 16, n_pad) << 4)) - 32
        dl = d.astype(f32).reshape(nch, 1, n_pad) * scale.astype(f32)
        w = rep(dl.reshape(-1, n_pad), 16) * q.astype(f32)
    elif qtype == QType.IQ4_XS:
        _, d, sh, sl = planes
        sh = sh.astype(jnp.int32).reshape(nch, 2, 1, n_pad)
        shw = sh[:, 0] | (sh[:, 1] << 8)
        hi = (shw >> (2 * jnp.arange(8)).reshape(1, 8, 1)) & 3
        sl = sl.astype(jnp.int32).reshape(nch, 4, 1, n_pad)
        lo = jnp.concatenate([sl & 15, sl >> 4], axis=2).reshape(nch, 8, n_pad)
        dl = d.astype(f32).reshape(nch, 1, n_pad) * ((lo | (hi << 4)) - 32).astype(f32)
        w = rep(dl.reshape(-1, n_pad), 8) * lut(nibbles(p0), KVALUES_IQ4NL)
    elif qtype == QType.TQ2_0:
        w = (crumbs(p0) - 1).astype(f32) * rep(planes[1], 1)
    elif qtype in _GRID:
        d = planes[1].astype(f32).reshape(nch, 1, n_pad)
        s = planes[2].astype(jnp.int32).reshape(nch, _GRID_SCALE_ROWS[qtype], n_pad)
        if qtype in (QType.IQ2_XS, QType.IQ2_S, QType.IQ3_S):  # two nibbles a byte
            s = jnp.stack([s & 15, s >> 4], axis=2).reshape(nch, -1, n_pad)
        if qtype in (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S):
            db = (d * (s.astype(f32) + 0.5)) * 0.25
        elif qtype == QType.IQ3_XXS:
            db = (d * (s.astype(f32) + 0.5)) * 0.5
        else:  # IQ3_S, IQ1_S, IQ1_M
            db = d * (2 * s + 1).astype(f32)
        v = lut(nibbles(p0), lut_values(qtype))
        if qtype in _IQ1:
            v = v * 0.125
        w = rep(db.reshape(-1, n_pad), db.shape[1]) * v
    elif qtype == QType.TQ1_0:
        qa = p0.astype(jnp.int32).reshape(nch, 1, 48, n_pad)
        qb = planes[1].astype(jnp.int32).reshape(nch, 1, 4, n_pad)
        p5 = jnp.array([1, 3, 9, 27, 81], jnp.int32).reshape(1, 5, 1, 1)

        def trits(q: jax.Array, k: int) -> jax.Array:
            return ((((q * p5[:, :k]) & 255) * 3) >> 8).reshape(nch, -1, n_pad)

        q = jnp.concatenate([trits(qa[:, :, :32], 5), trits(qa[:, :, 32:], 5), trits(qb, 4)], 1)
        w = (q - 1).astype(f32) * rep(planes[2], 1)
    elif qtype == QType.Q4_1:
        w = rep(planes[1], gpc) * nibbles(p0).astype(f32) + rep(planes[2], gpc)
    elif qtype == QType.Q8_0:
        w = rep(planes[1], gpc) * p0.astype(f32).reshape(nch, chunk, n_pad)
    elif qtype in (QType.Q4_K, QType.Q5_K):
        _, d, dmin, s = planes[:4]
        s = s.astype(jnp.int32).reshape(nch, 12, n_pad)
        a, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        sc = jnp.concatenate([a & 63, (md & 15) | ((a >> 6) << 4)], axis=1)
        mn = jnp.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=1)
        q = nibbles(p0)
        if qtype == QType.Q5_K:
            qh = planes[4].astype(jnp.int32).reshape(nch, 1, 32, n_pad)
            bits = (qh >> jnp.arange(8).reshape(1, 8, 1, 1)) & 1
            q = q | (bits.reshape(nch, chunk, n_pad) << 4)
        d = d.astype(f32).reshape(nch, 1, n_pad)
        dmin = dmin.astype(f32).reshape(nch, 1, n_pad)
        w = rep(sc * d, 8) * q.astype(f32) - rep(mn * dmin, 8)
    elif qtype == QType.Q6_K:
        _, qh, sc, d = planes
        qh = qh.astype(jnp.int32).reshape(nch, 2, 1, 32, n_pad)
        hi2 = (qh >> (2 * jnp.arange(4)).reshape(1, 1, 4, 1, 1)) & 3
        q = nibbles(p0) | (hi2.reshape(nch, chunk, n_pad) << 4)
        scale = sc.astype(f32).reshape(nch, 16, n_pad) * d.astype(f32).reshape(nch, 1, n_pad)
        w = rep(scale.reshape(nch * 16, n_pad), 16) * (q - 32).astype(f32)
    else:
        raise QuantError(f"Pallas layout does not support {qtype_info(qtype).name}")
    return w.reshape(k_pad, n_pad).T[:n_out, :n_in]


def take_rows_planes(
    planes: tuple, qtype: int, shape: tuple[int, int], ids: jax.Array
) -> jax.Array:
    """Rows ``ids`` of W (an embedding lookup) in f32 ``[*ids.shape, n_in]``: rows of W are
    columns of the k-major planes, so gather those first and dequantize only them."""
    flat = ids.reshape(-1)
    cols = tuple(jnp.take(p, flat, axis=1) for p in planes)
    rows = dequantize_planes(cols, qtype, (flat.shape[0], shape[1]))
    return rows.reshape(*ids.shape, shape[1])


# ----------------------------------------------------------------------------- the kernel


def _at(c, rows_per_chunk: int):
    """Start row of chunk ``c`` in a plane, marked aligned (Mosaic needs it for tiled loads)."""
    return pl.multiple_of(c * rows_per_chunk, rows_per_chunk)


def _unpack_group_fns(qtype: int):
    """Per-type chunk body ``body(refs, c, acc, fold) -> acc`` for chunk ``c``: it dequantizes
    each group to ``(q, s, b)``: f32 codes ``[size, bn]``, the group's scale ``[1, bn]`` and
    min (``[1, bn]`` or None), the weights being ``s * q + b``, and folds them into the
    accumulator with ``fold(acc, c, start, size, (q, s, b))`` (a dot, or the multiply-reduce of
    the matvec path)."""
    f32 = jnp.float32
    chunk = chunk_of(qtype)
    gpc = chunk // 32  # 32-groups per chunk
    half = gpc // 2  # groups in each nibble half

    def row(ref, i) -> jax.Array:  # one row of a per-group plane as [1, bn]
        return ref[pl.ds(i, 1), :]

    def nib_pair(qs_ref, c, j: int, rows: int = 32, off: int = 0):
        """(low, high) nibbles of chunk rows ``32 j + off ..``: groups ``j`` and ``j + half``."""
        p = qs_ref[pl.ds(_at(c, chunk // 2) + 32 * j + off, rows), :].astype(jnp.int32)
        return p & 15, p >> 4

    def rows_of(ref, c, per_chunk: int, off: int, n: int) -> jax.Array:
        """Rows ``off .. off + n`` of chunk ``c`` of a plane with ``per_chunk`` rows a chunk."""
        return ref[pl.ds(_at(c, per_chunk) + off, n), :].astype(jnp.int32)

    def fl(q: jax.Array, sub: int = 0) -> jax.Array:
        """f32 ``q - sub`` for int32 ``0 <= q < 2^22``, exactly, without an int->float convert
        (16 a clock per SM on Hopper, an eighth of the FMA rate: one a weight would cap decode
        below the HBM roofline): ``q`` OR-ed into the mantissa of 2^23, then one f32 subtract."""
        return jax.lax.bitcast_convert_type(q | 0x4B000000, f32) - (8388608.0 + sub)

    def lut(q: jax.Array) -> jax.Array:
        """f32 ``table[q]`` for 4-bit codes: ``q >> 2`` picks the int32 word (three compares and
        selects), bits 1-0 the biased byte (a shift and a mask): no gather, which Triton lacks."""
        w0, w1, w2, w3 = _packed_lut(lut_values(qtype))
        word = jnp.where(q >= 8, jnp.where(q >= 12, w3, w2), jnp.where(q >= 4, w1, w0))
        return fl((word >> ((q & 3) << 3)) & 255, 128)

    def bit_rows(word: jax.Array, n: int = 32) -> jax.Array:
        """``[1, bn]`` int32 words -> ``[n, bn]``: row ``l`` holds bit ``l``."""
        sh = jax.lax.broadcasted_iota(jnp.int32, (n, word.shape[-1]), 0)
        return (word >> sh) & 1

    if qtype in (QType.Q5_0, QType.Q5_1, QType.IQ4_NL, QType.MXFP4):

        def body(refs, c, acc, fold):
            qs_ref, d_ref = refs[0], refs[1]
            for j in range(half):
                for g, q in zip((j, j + half), nib_pair(qs_ref, c, j), strict=True):
                    blk = c * gpc + g
                    if qtype == QType.MXFP4:  # 2^(e-128) from the exponent bits (as ggml)
                        e = row(d_ref, blk).astype(jnp.int32)
                        bits = jnp.where(e < 2, jnp.int32(0x00200000) << e, (e - 1) << 23)
                        w = (lut(q), jax.lax.bitcast_convert_type(bits, f32), None)
                    elif qtype == QType.IQ4_NL:
                        w = (lut(q), row(d_ref, blk).astype(f32), None)
                    else:
                        q = q | (bit_rows(row(refs[-1], blk)) << 4)
                        d = row(d_ref, blk).astype(f32)
                        if qtype == QType.Q5_0:
                            w = (fl(q, 16), d, None)
                        else:
                            w = (fl(q), d, row(refs[2], blk).astype(f32))
                    acc = fold(acc, c, 32 * g, 32, w)
            return acc

    elif qtype == QType.NVFP4:

        def ue4m3_half(b: jax.Array) -> jax.Array:
            """ggml_ue4m3_to_fp32 from the bits (exact): normal (1 + m/8) 2^(e-8), subnormal
            m 2^-10, 0x7F (NaN) 0; bit 7 ignored (0xFF is 240)."""
            e, m = (b >> 3) & 15, b & 7
            normal = jax.lax.bitcast_convert_type(((e + 119) << 23) | (m << 20), f32)
            v = jnp.where(e == 0, fl(m) * (2.0**-10), normal)
            return jnp.where(b == 0x7F, 0.0, v)

        def body(refs, c, acc, fold):
            qs_ref, d_ref = refs
            for t in range(2):  # chunk rows 16t..: sub-block t (low nibbles), 2 + t (high)
                for sb, q in zip((t, 2 + t), nib_pair(qs_ref, c, 0, rows=16, off=16 * t),
                                 strict=True):  # fmt: skip
                    d = ue4m3_half(row(d_ref, c * 4 + sb).astype(jnp.int32))
                    acc = fold(acc, c, 16 * sb, 16, (lut(q), d, None))
            return acc

    elif qtype in (QType.Q2_K, QType.Q3_K):

        def body(refs, c, acc, fold):
            if qtype == QType.Q2_K:
                qs_ref, sc_ref, d_ref, dmin_ref = refs
                dmin = row(dmin_ref, c).astype(f32)
            else:
                hm_ref, qs_ref, sc_ref, d_ref = refs
                s = [row(sc_ref, c * 12 + i).astype(jnp.int32) for i in range(12)]
            d = row(d_ref, c).astype(f32)
            for t in range(2):  # 16-element sub-groups: each has its own scale
                if qtype == QType.Q3_K:
                    hm = rows_of(hm_ref, c, 32, 16 * t, 16)
                for h in range(2):
                    p = rows_of(qs_ref, c, 64, 32 * h + 16 * t, 16)
                    for sh in range(4):
                        q = (p >> (2 * sh)) & 3
                        g = 4 * h + sh  # 32-group
                        k = 2 * g + t  # 16-group: its scale
                        if qtype == QType.Q2_K:
                            sc = row(sc_ref, c * 16 + k).astype(jnp.int32)
                            w = (fl(q), d * (sc & 15).astype(f32), -(dmin * (sc >> 4).astype(f32)))
                        else:
                            q = q | (((hm >> g) & 1) << 2)  # ql - 4 (1 - hbit), plus 4
                            lo = s[k] & 15 if k < 8 else s[k - 8] >> 4
                            hi = (s[8 + k % 4] >> (2 * (k // 4))) & 3
                            w = (fl(q, 4), d * ((lo | (hi << 4)) - 32).astype(f32), None)
                        acc = fold(acc, c, 32 * g + 16 * t, 16, w)
            return acc

    elif qtype == QType.IQ4_XS:

        def body(refs, c, acc, fold):
            qs_ref, d_ref, sh_ref, sl_ref = refs
            d = row(d_ref, c).astype(f32)
            sh = row(sh_ref, c * 2).astype(jnp.int32) | (
                row(sh_ref, c * 2 + 1).astype(jnp.int32) << 8
            )
            sl = [row(sl_ref, c * 4 + i).astype(jnp.int32) for i in range(4)]
            for j in range(4):
                for g, q in zip((j, j + 4), nib_pair(qs_ref, c, j), strict=True):
                    ls = ((sl[g // 2] >> (4 * (g % 2))) & 15) | (((sh >> (2 * g)) & 3) << 4)
                    w = (lut(q), d * (ls - 32).astype(f32), None)
                    acc = fold(acc, c, 32 * g, 32, w)
            return acc

    elif qtype in _GRID:
        k_rows = _GRID_SCALE_ROWS[qtype]
        per16 = qtype in _GRID_PER16
        size = 16 if per16 else 32

        def scale(d, sc, g: int, t: int) -> jax.Array:  # group g (32), half t: ggml's db
            if qtype == QType.IQ2_XXS:
                return (d * (sc[g].astype(f32) + 0.5)) * 0.25
            if qtype in (QType.IQ2_XS, QType.IQ2_S):
                return (d * (((sc[g] >> (4 * t)) & 15).astype(f32) + 0.5)) * 0.25
            if qtype == QType.IQ3_XXS:
                return (d * (sc[g].astype(f32) + 0.5)) * 0.5
            if qtype == QType.IQ3_S:
                return d * (2 * ((sc[g // 2] >> (4 * (g % 2))) & 15) + 1).astype(f32)
            return d * (2 * sc[2 * g + t if per16 else g] + 1).astype(f32)  # IQ1_S, IQ1_M

        def body(refs, c, acc, fold):
            qs_ref, d_ref, sc_ref = refs
            d = row(d_ref, c).astype(f32)
            sc = [row(sc_ref, c * k_rows + i).astype(jnp.int32) for i in range(k_rows)]
            for j in range(4):
                for t in range(32 // size):
                    pair = nib_pair(qs_ref, c, j, rows=size, off=size * t)
                    for g, q in zip((j, j + 4), pair, strict=True):
                        db = scale(d, sc, g, t)
                        if qtype in _IQ1:  # codes are 8 (g + delta): (db / 8) * 8 (g + delta)
                            db = db * 0.125  # rounds as db * (g + delta) does (both exact / 8)
                        acc = fold(acc, c, 32 * g + size * t, size, (lut(q), db, None))
            return acc

    elif qtype == QType.TQ2_0:

        def body(refs, c, acc, fold):
            qs_ref, d_ref = refs
            d = row(d_ref, c).astype(f32)
            for h in range(2):
                p = rows_of(qs_ref, c, 64, 32 * h, 32)
                for sh in range(4):
                    w = (fl((p >> (2 * sh)) & 3, 1), d, None)
                    acc = fold(acc, c, 128 * h + 32 * sh, 32, w)
            return acc

    elif qtype == QType.TQ1_0:

        def trit(q: jax.Array, n: int) -> jax.Array:  # ggml: ((uint8)(q * 3^n) * 3) >> 8
            return (((q * 3**n) & 255) * 3) >> 8

        def body(refs, c, acc, fold):
            qa_ref, qb_ref, d_ref = refs
            d = row(d_ref, c).astype(f32)
            for off, rows, base in ((0, 32, 0), (32, 16, 160)):  # five trits a byte
                p = rows_of(qa_ref, c, 48, off, rows)
                for n in range(5):
                    w = (fl(trit(p, n), 1), d, None)
                    acc = fold(acc, c, base + rows * n, rows, w)
            # qh: four trits in each of 4 bytes, element 240 + 4 n + l: single rows (a 4-row
            # tile is below Triton's dot minimum; 16 rows would need an in-kernel interleave).
            for ln in range(4):
                p = row(qb_ref, c * 4 + ln).astype(jnp.int32)
                for n in range(4):
                    w = (fl(trit(p, n), 1), d, None)
                    acc = fold(acc, c, 240 + 4 * n + ln, 1, w)
            return acc

    elif qtype in (QType.Q4_0, QType.Q4_1):

        def body(refs, c, acc, fold):
            qs_ref, d_ref = refs[0], refs[1]
            for j in range(half):
                for g, q in zip((j, j + half), nib_pair(qs_ref, c, j), strict=True):
                    d = row(d_ref, c * gpc + g).astype(f32)
                    if qtype == QType.Q4_0:
                        w = (fl(q, 8), d, None)
                    else:
                        w = (fl(q), d, row(refs[2], c * gpc + g).astype(f32))
                    acc = fold(acc, c, 32 * g, 32, w)
            return acc

    elif qtype == QType.Q8_0:

        def body(refs, c, acc, fold):
            qs_ref, d_ref = refs
            for g in range(gpc):
                q = fl(qs_ref[pl.ds(_at(c, chunk) + 32 * g, 32), :].astype(jnp.int32) + 128, 128)
                w = (q, row(d_ref, c * gpc + g).astype(f32), None)
                acc = fold(acc, c, 32 * g, 32, w)
            return acc

    elif qtype in (QType.Q4_K, QType.Q5_K):

        def body(refs, c, acc, fold):
            qs_ref, d_ref, dmin_ref, s_ref = refs[:4]
            d = row(d_ref, c).astype(f32)
            dmin = row(dmin_ref, c).astype(f32)
            s = [row(s_ref, c * 12 + i).astype(jnp.int32) for i in range(12)]
            qh = None
            if qtype == QType.Q5_K:
                qh = refs[4][pl.ds(_at(c, 32), 32), :].astype(jnp.int32)
            for j in range(4):
                for g, q in zip((j, j + 4), nib_pair(qs_ref, c, j), strict=True):
                    if g < 4:
                        sc, mn = s[g] & 63, s[g + 4] & 63
                    else:
                        sc = (s[g + 4] & 15) | ((s[g - 4] >> 6) << 4)
                        mn = (s[g + 4] >> 4) | ((s[g] >> 6) << 4)
                    if qh is not None:
                        q = q | (((qh >> g) & 1) << 4)
                    w = (fl(q), d * sc.astype(f32), -(dmin * mn.astype(f32)))
                    acc = fold(acc, c, 32 * g, 32, w)
            return acc

    elif qtype == QType.Q6_K:

        def body(refs, c, acc, fold):
            qs_ref, qh_ref, sc_ref, d_ref = refs
            d = row(d_ref, c).astype(f32)
            for j in range(4):
                for t in range(2):  # 16-element sub-groups: each has its own int8 scale
                    lo, hi = nib_pair(qs_ref, c, j, rows=16, off=16 * t)
                    for g, q4 in ((j, lo), (j + 4, hi)):
                        h, i = divmod(g, 4)
                        qh = qh_ref[pl.ds(_at(c, 64) + 32 * h + 16 * t, 16), :].astype(jnp.int32)
                        q = q4 | (((qh >> (2 * i)) & 3) << 4)
                        scale = d * row(sc_ref, c * 16 + 2 * g + t).astype(f32)
                        w = (fl(q, 32), scale, None)
                        acc = fold(acc, c, 32 * g + 16 * t, 16, w)
            return acc

    else:
        raise QuantError(f"Pallas qmatmul does not support {qtype_info(qtype).name}")
    return body


# Up to this many batch rows (decode), a program multiplies and reduces instead of calling dot:
# the dot would pad the rows to 16 (Triton's minimum) and, with f32 operands (no tensor cores),
# turn a bandwidth-bound matvec into a compute-bound one.
_VECTOR_ROWS = 4


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _row_tile(m: int) -> int:
    """Batch rows per program: >= 16 (Triton's dot minimum), a power of two, at most 64."""
    t = 16
    while t < m and t < 64:
        t *= 2
    return t


def _col_tile(n_pad: int, m_tile: int) -> int:
    """n_out per program: 256 when it divides (fewer, fatter programs for decode), else 128."""
    return 256 if n_pad % 256 == 0 and m_tile <= 32 else LANE


# Programs a GPU wants in flight (H100: 132 SMs, a couple of programs each). Below this, n_in is
# split across programs (split-K) and the partial sums are added in XLA: a decode matvec of a
# 576-wide weight is only 5 column tiles otherwise.
_GPU_TARGET_PROGRAMS = 256


def _chunks_per_split(
    n_chunks: int, programs: int, k_splits: int | None, backend: str | None
) -> int:
    """Chunks of n_in per program: a divisor of ``n_chunks`` (so every split is a whole block)."""
    if (backend or jax.default_backend()) == "tpu":
        # One sequential core: no split (each tile's DMA covers all of n_in), which also keeps
        # the per-superblock planes' blocks whole arrays along n_in, as Mosaic's tiling needs.
        return n_chunks
    if k_splits is None:
        k_splits = -(-_GPU_TARGET_PROGRAMS // programs)
    want = -(-n_chunks // max(1, min(k_splits, n_chunks)))
    return min(c for c in range(want, n_chunks + 1) if n_chunks % c == 0)


def compiler_params(backend: str | None, interpret: bool, semantics: tuple[str, ...]):
    """Per-backend Pallas compiler params. On GPU this picks the Triton lowering explicitly (jax
    0.10 defaults ``pallas_call`` to Mosaic GPU, which wants warpgroup-shaped kernels)."""
    if interpret:
        return None
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    return None


def matmul_planes(
    x: jax.Array,
    planes: tuple,
    qtype: int,
    shape: tuple[int, int],
    *,
    interpret: bool = False,
    k_splits: int | None = None,
    backend: str | None = None,
    vector_rows: int = _VECTOR_ROWS,
) -> jax.Array:
    """``x[..., n_in] @ W.T`` with W given as the kernel's planes; returns f32 ``[..., n_out]``.

    ``k_splits``: how many programs share n_in (default: enough for a GPU to be busy; always 1
    on TPU).
    ``vector_rows``: up to this many rows take the multiply-reduce path instead of the dot
    (a knob for measuring the two at 5-16 rows on a device; at most 16).
    ``backend``: the platform to lower for (default: JAX's default backend), e.g. to export a
    GPU kernel from a CPU host.
    """
    qtype = _kernel_qtype(qtype)
    n_out, n_in = shape
    lead = x.shape[:-1]
    if x.shape[-1] != n_in:
        raise QuantError(f"qmatmul: x has {x.shape[-1]} features, weight expects {n_in}")
    x2 = x.reshape(-1, n_in).astype(jnp.float32)
    m = x2.shape[0]
    chunk = chunk_of(qtype)
    k_pad = _round_up(n_in, chunk)
    n_pad = planes[0].shape[-1]
    vector = m <= min(vector_rows, 16)
    bm = _next_pow2(m) if vector else _row_tile(m)
    bn = _col_tile(n_pad, bm)
    m_pad = _round_up(max(m, 1), bm)
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, k_pad - n_in)))
    body = _unpack_group_fns(qtype)
    n_chunks = k_pad // chunk
    cps = _chunks_per_split(n_chunks, (m_pad // bm) * (n_pad // bn), k_splits, backend)
    splits = n_chunks // cps
    hp = jax.lax.Precision.HIGHEST

    if vector:
        # x is passed transposed ([n_in, m]): a group's x values are a column that broadcasts
        # over the tile's bn lanes; each batch row keeps its own [1, bn] accumulator.
        # The group's scale (and min) are applied after the reduction: a [1, bn] multiply per
        # group instead of one per weight (the decode kernel is ALU-bound otherwise).
        def fold(x_ref, acc, c, start, size, w):
            q, s, b = w
            out = []
            for r, a in enumerate(acc):
                xc = x_ref[pl.ds(_at(c, chunk) + start, size), pl.ds(r, 1)]
                a = a + s * jnp.sum(xc * q, axis=0, keepdims=True)
                if b is not None:
                    a = a + b * jnp.sum(xc, axis=0, keepdims=True)
                out.append(a)
            return tuple(out)

        def init():
            return tuple(jnp.zeros((1, bn), jnp.float32) for _ in range(bm))

        x_in = x2.T
        x_spec = pl.BlockSpec((cps * chunk, bm), lambda i, j, s: (s, i))
    else:

        def fold(x_ref, acc, c, start, size, w):
            q, s, b = w
            w = s * q if b is None else s * q + b
            xs = x_ref[:, pl.ds(_at(c, chunk) + start, size)]
            if size == 1:  # an outer product (TQ1_0's last 16 elements)
                return acc + xs * w
            return acc + jnp.dot(xs, w, precision=hp, preferred_element_type=jnp.float32)

        def init():
            return jnp.zeros((bm, bn), jnp.float32)

        x_in = x2
        x_spec = pl.BlockSpec((bm, cps * chunk), lambda i, j, s: (i, s))

    def kernel(x_ref, *refs):
        *w_refs, o_ref = refs

        def step(c, acc):
            return body(w_refs, c, acc, functools.partial(fold, x_ref))

        acc = jax.lax.fori_loop(0, cps, step, init())
        if vector:
            for r, a in enumerate(acc):
                o_ref[pl.ds(r, 1), :] = a
        else:
            o_ref[...] = acc

    in_specs = [x_spec]
    in_specs += [pl.BlockSpec((p.shape[0] // splits, bn), lambda i, j, s: (s, j)) for p in planes]
    y = pl.pallas_call(
        kernel,
        grid=(m_pad // bm, n_pad // bn, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((pl.squeezed, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, m_pad, n_pad), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params(backend, interpret, ("parallel",) * 3),
        name=f"qmatmul_{qtype_info(qtype).name.lower()}",
    )(x_in, *planes)
    y = y[0] if splits == 1 else jnp.sum(y, axis=0)
    return y[:m, :n_out].reshape(*lead, n_out)


def pallas_qmatmul(
    x: jax.Array,
    qt,
    interpret: bool = False,
    *,
    k_splits: int | None = None,
    backend: str | None = None,
    vector_rows: int = _VECTOR_ROWS,
) -> jax.Array:
    """``x[..., n_in] @ W.T -> [..., n_out]`` (f32) for a 2-D QTensor W in layout ``"pallas"``
    (from ``prepare_pallas``) or raw ``"gguf"`` (repacked in-graph on each call)."""
    if len(qt.shape) != 2 or not supported(qt.qtype):
        raise QuantError(f"Pallas qmatmul needs a 2-D {sorted(_SUPPORTED)} weight, got {qt}")
    qt = qt.natural()
    if qt.layout == LAYOUT:
        planes = tuple(qt.data)
    elif qt.layout == "gguf":
        planes = repack(jnp, qt.data, qt.qtype, qt.shape)
    else:
        raise QuantError(f"Pallas qmatmul cannot read layout {qt.layout!r}")
    return matmul_planes(
        x, planes, qt.qtype, qt.shape, interpret=interpret, k_splits=k_splits, backend=backend,
        vector_rows=vector_rows,
    )  # fmt: skip
