"""ggml block formats: dequantizers written once for numpy and jax.numpy.

Each decoder takes ``b``, uint8 ``[N, type_size]`` (one row per block), and returns float32
``[N, block_size]``. The same code runs on numpy (the quantizers' round trips, tests, the CLI)
and on jax.numpy (model weights, jit-able: no Python loop over blocks), so the two can never
disagree. Arithmetic is written in the same order as ggml / gguf-py (``d * q``, ``d * q - m``,
scale products rounded to f32 first) because results must be bit-exact with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info

QK_K = 256

# Non-linear 4-bit grid shared by IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl).
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

Xp = Any  # numpy or jax.numpy


def _bitcast(xp: Xp, a, dtype):
    if xp is np:
        return a.view(dtype)
    import jax

    return jax.lax.bitcast_convert_type(a, dtype)


def _f16(xp: Xp, b, off: int):
    """Little-endian f16 at byte ``off`` of each block, as f32 ``[N, 1]``."""
    u = b[:, off].astype(xp.uint16) | (b[:, off + 1].astype(xp.uint16) << 8)
    return _bitcast(xp, u, xp.float16).astype(xp.float32)[:, None]


def _f32(xp: Xp, b, off: int):
    u = b[:, off].astype(xp.uint32)
    for k in range(1, 4):
        u = u | (b[:, off + k].astype(xp.uint32) << (8 * k))
    return _bitcast(xp, u, xp.float32)[:, None]


def _i8(xp: Xp, a):
    """uint8 -> int32 reinterpreting as two's complement int8."""
    a = a.astype(xp.int32)
    return a - ((a >> 7) << 8)


def _nibbles(xp: Xp, qs):
    """[N, k] bytes -> [N, 2k]: all low nibbles, then all high nibbles."""
    return xp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(xp: Xp, qh, n: int):
    """[N, n//8] bytes -> [N, n] bits, bit j of the little-endian word at position j."""
    sh = xp.arange(8, dtype=xp.uint8)
    return ((qh[:, :, None] >> sh) & 1).reshape(qh.shape[0], n)


def _crumbs_by_plane(xp: Xp, q, nb: int, width: int, group: int):
    """K-quant bit-planes: bytes ``[N, nb*group]`` -> ``[N, nb * (8//width) * group]`` where
    plane s of chunk c holds ``(q[c*group + l] >> (width*s)) & mask``."""
    n = q.shape[0]
    shifts = xp.arange(0, 8, width, dtype=xp.uint8)[:, None]
    v = (q.reshape(n, nb, 1, group) >> shifts) & ((1 << width) - 1)
    return v.reshape(n, -1)


# ----------------------------------------------------------------------------- legacy 32-blocks


def _deq_q4_0(xp: Xp, b):
    d = _f16(xp, b, 0)
    q = _nibbles(xp, b[:, 2:18]).astype(xp.int32) - 8
    return d * q.astype(xp.float32)


def _deq_q4_1(xp: Xp, b):
    d, m = _f16(xp, b, 0), _f16(xp, b, 2)
    q = _nibbles(xp, b[:, 4:20]).astype(xp.float32)
    return d * q + m


def _deq_q5_0(xp: Xp, b):
    d = _f16(xp, b, 0)
    q = _nibbles(xp, b[:, 6:22]) | (_bits(xp, b[:, 2:6], 32) << 4)
    return d * (q.astype(xp.int32) - 16).astype(xp.float32)


def _deq_q5_1(xp: Xp, b):
    d, m = _f16(xp, b, 0), _f16(xp, b, 2)
    q = _nibbles(xp, b[:, 8:24]) | (_bits(xp, b[:, 4:8], 32) << 4)
    return d * q.astype(xp.float32) + m


def _deq_q8_0(xp: Xp, b):
    return _i8(xp, b[:, 2:34]).astype(xp.float32) * _f16(xp, b, 0)


def _deq_iq4_nl(xp: Xp, b):
    d = _f16(xp, b, 0)
    q = _nibbles(xp, b[:, 2:18]).astype(xp.int32)
    return d * xp.asarray(np.array(KVALUES_IQ4NL, np.float32))[q]


# ----------------------------------------------------------------------------- K-quants (256)


def k_scale_min(xp: Xp, s):
    """Q4_K/Q5_K 12-byte packed 6-bit (scale, min) pairs -> two ``[N, 8]`` int arrays."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = xp.concatenate([d & 63, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = xp.concatenate([m & 63, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def q3_k_scales(xp: Xp, s):
    """Q3_K 12-byte packed 6-bit scales -> ``[N, 16]`` int32 in [-32, 31]."""
    lo = _nibbles(xp, s[:, 0:8])
    hi = _crumbs_by_plane(xp, s[:, 8:12], 1, 2, 4)
    return (lo | (hi << 4)).astype(xp.int32) - 32


def _deq_q2_k(xp: Xp, b):
    n = b.shape[0]
    sc = b[:, 0:16]
    d, dmin = _f16(xp, b, 80), _f16(xp, b, 82)
    dl = (d * (sc & 0x0F).astype(xp.float32))[:, :, None]
    ml = (dmin * (sc >> 4).astype(xp.float32))[:, :, None]
    q = _crumbs_by_plane(xp, b[:, 16:80], 2, 2, 32).reshape(n, 16, 16).astype(xp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q3_k(xp: Xp, b):
    n = b.shape[0]
    d = _f16(xp, b, 108)
    dl = (d * q3_k_scales(xp, b[:, 96:108]).astype(xp.float32))[:, :, None]
    ql = _crumbs_by_plane(xp, b[:, 32:96], 2, 2, 32).astype(xp.int32)
    hm = _crumbs_by_plane(xp, b[:, 0:32], 1, 1, 32).astype(xp.int32)
    q = (ql - ((hm ^ 1) << 2)).reshape(n, 16, 16).astype(xp.float32)
    return (dl * q).reshape(n, QK_K)


def _deq_q4_k(xp: Xp, b):
    n = b.shape[0]
    d, dmin = _f16(xp, b, 0), _f16(xp, b, 2)
    sc, mn = k_scale_min(xp, b[:, 4:16])
    dl = (d * sc.astype(xp.float32))[:, :, None]
    ml = (dmin * mn.astype(xp.float32))[:, :, None]
    q = _crumbs_by_plane(xp, b[:, 16:144], 4, 4, 32).reshape(n, 8, 32).astype(xp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q5_k(xp: Xp, b):
    n = b.shape[0]
    d, dmin = _f16(xp, b, 0), _f16(xp, b, 2)
    sc, mn = k_scale_min(xp, b[:, 4:16])
    dl = (d * sc.astype(xp.float32))[:, :, None]
    ml = (dmin * mn.astype(xp.float32))[:, :, None]
    ql = _crumbs_by_plane(xp, b[:, 48:176], 4, 4, 32)
    qh = _crumbs_by_plane(xp, b[:, 16:48], 1, 1, 32)
    q = (ql | (qh << 4)).reshape(n, 8, 32).astype(xp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q6_k(xp: Xp, b):
    n = b.shape[0]
    d = _f16(xp, b, 208)
    dl = (d * _i8(xp, b[:, 192:208]).astype(xp.float32))[:, :, None]
    ql = _crumbs_by_plane(xp, b[:, 0:128], 2, 4, 64)
    qh = _crumbs_by_plane(xp, b[:, 128:192], 2, 2, 32)
    q = (ql | (qh << 4)).astype(xp.int32) - 32
    return (dl * q.reshape(n, 16, 16).astype(xp.float32)).reshape(n, QK_K)


def _deq_iq4_xs(xp: Xp, b):
    n = b.shape[0]
    d = _f16(xp, b, 0)
    sh = b[:, 2].astype(xp.int32) | (b[:, 3].astype(xp.int32) << 8)
    sl = b[:, 4:8]
    lo = xp.stack([sl & 0x0F, sl >> 4], axis=-1).reshape(n, 8).astype(xp.int32)
    hi = (sh[:, None] >> (2 * xp.arange(8, dtype=xp.int32))) & 3
    dl = (d * ((lo | (hi << 4)) - 32).astype(xp.float32))[:, :, None]
    qs = b[:, 8:136].reshape(n, 8, 16)
    q = xp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(xp.int32)
    vals = xp.asarray(np.array(KVALUES_IQ4NL, np.float32))[q]
    return (dl * vals).reshape(n, QK_K)


def _deq_q8_k(xp: Xp, b):
    return _i8(xp, b[:, 4:260]).astype(xp.float32) * _f32(xp, b, 0)


# ----------------------------------------------------------------------------- ternary, MXFP4, IQ3


def _deq_tq1_0(xp: Xp, b):
    # 48 bytes of five trits each (32 bytes then 16), 4 bytes of four trits, f16 d. Trit n of a
    # byte is the top "digit" of byte * 3^n (mod 256): ((uint8)(q * 3^n) * 3) >> 8.
    n = b.shape[0]
    d = _f16(xp, b, 52)
    pow3 = xp.asarray(np.array([1, 3, 9, 27, 81], np.uint8))

    def trits(q, k):  # [N, m] -> [N, k*m], trit-major
        t = (q[:, None, :].astype(xp.uint16) * pow3[:k, None]) & 0xFF
        return ((t * 3) >> 8).reshape(n, -1)

    q = xp.concatenate([trits(b[:, 0:32], 5), trits(b[:, 32:48], 5), trits(b[:, 48:52], 4)], -1)
    return (q.astype(xp.int32) - 1).astype(xp.float32) * d


def _deq_tq2_0(xp: Xp, b):
    d = _f16(xp, b, 64)
    q = _crumbs_by_plane(xp, b[:, 0:64], 2, 2, 32).astype(xp.int32)
    return (q - 1).astype(xp.float32) * d


def _deq_q1_0(xp: Xp, b):
    # 128 sign bits (bit j of the little-endian qs[16]: +d if set, else -d), f16 d first
    return (2 * _bits(xp, b[:, 2:18], 128).astype(xp.int32) - 1).astype(xp.float32) * _f16(xp, b, 0)


def _deq_q2_0(xp: Xp, b):
    # 64 two-bit codes, four per byte from the low bits up (not K-quant planes); code - 1 in
    # {-1, 0, 1, 2} times d, f16 d first
    sh = xp.arange(0, 8, 2, dtype=xp.uint8)
    q = ((b[:, 2:18, None] >> sh) & 3).reshape(b.shape[0], 64).astype(xp.int32)
    return (q - 1).astype(xp.float32) * _f16(xp, b, 0)


# e2m1 values, doubled (ggml's kvalues_mxfp4): the block's E8M0 exponent is read as half its value.
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_to_f32_half(xp: Xp, e):
    """ggml_e8m0_to_fp32_half: 2^(e-128) as f32 bits (denormal for e < 2)."""
    e = e.astype(xp.uint32)
    bits = xp.where(e < 2, xp.uint32(0x00200000) << e, (e - 1) << 23)
    return _bitcast(xp, bits.astype(xp.uint32), xp.float32)


def _deq_mxfp4(xp: Xp, b):
    q = _nibbles(xp, b[:, 1:17]).astype(xp.int32)
    return mxfp4_values(xp, q, b[:, 0].astype(xp.int32)[:, None])


def mxfp4_values(xp: Xp, q, e):
    """f32 ``kvalue[q] * 2^(e-128)`` for int32 codes ``q`` and E8M0 exponents ``e``
    (broadcastable), bit-exact with ggml/gguf-py.

    The product is exact, but e < 2 makes ggml's scale an f32 denormal, and XLA:CPU flushes
    denormals (inputs and results). So it is built on the bits: kvalue's exponent moved by
    e-128, shifted into a denormal below 2^-126, infinity above the range."""
    kv = np.array(KVALUES_MXFP4, np.float32)
    kbits = kv.view(np.uint32)
    kexp = ((kbits >> 23) & 0xFF).astype(np.int32)
    kmant = np.where(kv != 0, (kbits & 0x7FFFFF) | 0x800000, 0).astype(np.int32)
    ex = xp.asarray(kexp)[q] + e - 128
    mant = xp.asarray(kmant)[q]
    sign = xp.asarray((kbits & 0x80000000).astype(np.uint32))[q]
    sub = mant >> xp.clip(1 - ex, 0, 31)  # exact: at most 2 significant bits
    mag = xp.where(ex >= 1, (ex << 23) | (mant & 0x7FFFFF), sub)
    mag = xp.where(ex >= 255, 0x7F800000, xp.where(mant == 0, 0, mag))
    return _bitcast(xp, sign | mag.astype(xp.uint32), xp.float32)


def _ue4m3_half_table() -> np.ndarray:
    """ggml_ue4m3_to_fp32 for every byte: the UE4M3 value (4 exponent bits, bias 7, 3 mantissa
    bits; exponent 0 subnormal) halved, as the doubled e2m1 values want. 0x00 and 0x7F (NaN)
    read as 0; the top bit is otherwise ignored (0x80 | b reads as b, but 0xFF as 240)."""
    b = np.arange(256)
    e, m = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    v = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7)) * 0.5
    return np.where((b == 0) | (b == 0x7F), 0.0, v).astype(np.float32)  # exact in f32


UE4M3_HALF = _ue4m3_half_table()


def _deq_nvfp4(xp: Xp, b):
    # d[4] (UE4M3, one per 16 values), qs[32]: sub-block s in bytes 8s..8s+7, low nibbles its
    # values 0..7, high nibbles 8..15. Every product kvalue * d is exact in f32 (no denormals).
    n = b.shape[0]
    d = xp.asarray(UE4M3_HALF)[b[:, 0:4].astype(xp.int32)]
    qs = b[:, 4:36].reshape(n, 4, 8)
    q = xp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(xp.int32)
    kv = xp.asarray(np.array(KVALUES_MXFP4, np.float32))
    return (kv[q] * d[:, :, None]).reshape(n, 64)


def iq_grid(name: str) -> np.ndarray:
    """An IQ type's grid (``[n_points, points]`` f32 small integers), from gguf-py's tables."""
    return _IQ_GRIDS[name]()


def _gguf_grid(name: str) -> Callable[[], np.ndarray]:
    import functools

    @functools.cache
    def grid() -> np.ndarray:
        import gguf.quants

        cls = getattr(gguf.quants, name)
        cls.init_grid()
        g = np.asarray(cls.grid, np.float32)
        return g.reshape(cls.grid_shape)

    return grid


_IQ_GRIDS = {n: _gguf_grid(n) for n in ("IQ3_XXS", "IQ3_S")}


def _sign_bits7(xp: Xp, s7):
    """ggml's ksigns_iq2xs: 7 sign bits [..] -> [.., 8] bits, the 8th making the parity even."""
    bits = (s7[..., None] >> xp.arange(7, dtype=s7.dtype)) & 1
    par = bits.sum(axis=-1, keepdims=True) & 1
    return xp.concatenate([bits, par], axis=-1)


def _signed(xp: Xp, v, neg):
    return xp.where(neg != 0, -v, v)


def _deq_iq3_xxs(xp: Xp, b):
    n = b.shape[0]
    d = _f16(xp, b, 0)
    grid = xp.asarray(iq_grid("IQ3_XXS"))
    g = grid[b[:, 2:66].astype(xp.int32)].reshape(n, 8, 32)  # 8 sub-blocks of 32
    a = b[:, 66:98].reshape(n, 8, 4).astype(xp.uint32)
    aux = a[..., 0] | (a[..., 1] << 8) | (a[..., 2] << 16) | (a[..., 3] << 24)
    db = d * ((aux >> 28).astype(xp.float32) + xp.float32(0.5)) * xp.float32(0.5)
    s7 = (aux[..., None] >> (7 * xp.arange(4, dtype=xp.uint32))) & 127  # [n, 8, 4]
    neg = _sign_bits7(xp, s7).reshape(n, 8, 32)
    return _signed(xp, db[..., None] * g, neg).reshape(n, QK_K)


def _deq_iq3_s(xp: Xp, b):
    n = b.shape[0]
    d = _f16(xp, b, 0)
    qh = _bits(xp, b[:, 66:74], 64).astype(xp.int32)  # bit k of qh[ib] tops grid index 8*ib + k
    idx = b[:, 2:66].astype(xp.int32) | (qh << 8)
    g = xp.asarray(iq_grid("IQ3_S"))[idx].reshape(n, 8, 32)
    neg = _bits(xp, b[:, 74:106], 256).reshape(n, 8, 32)
    sc = _nibbles(xp, b[:, 106:110])  # low nibbles scale even sub-blocks, high nibbles odd ones
    sc = xp.stack([sc[:, :4], sc[:, 4:]], axis=-1).reshape(n, 8).astype(xp.int32)
    db = d * (1 + 2 * sc).astype(xp.float32)
    return _signed(xp, db[:, :, None] * g, neg).reshape(n, QK_K)


DEQUANTIZERS: dict[int, Callable[[Xp, Any], Any]] = {
    int(QType.Q4_0): _deq_q4_0,
    int(QType.Q4_1): _deq_q4_1,
    int(QType.Q5_0): _deq_q5_0,
    int(QType.Q5_1): _deq_q5_1,
    int(QType.Q8_0): _deq_q8_0,
    int(QType.IQ4_NL): _deq_iq4_nl,
    int(QType.Q2_K): _deq_q2_k,
    int(QType.Q3_K): _deq_q3_k,
    int(QType.Q4_K): _deq_q4_k,
    int(QType.Q5_K): _deq_q5_k,
    int(QType.Q6_K): _deq_q6_k,
    int(QType.IQ4_XS): _deq_iq4_xs,
    int(QType.Q8_K): _deq_q8_k,
    int(QType.TQ1_0): _deq_tq1_0,
    int(QType.TQ2_0): _deq_tq2_0,
    int(QType.Q1_0): _deq_q1_0,
    int(QType.Q2_0): _deq_q2_0,
    int(QType.MXFP4): _deq_mxfp4,
    int(QType.NVFP4): _deq_nvfp4,
    int(QType.IQ3_XXS): _deq_iq3_xxs,
    int(QType.IQ3_S): _deq_iq3_s,
}


# ----------------------------------------------------------------------------- IQ2 / IQ1 (256)
# Lattice codebooks (8 values per index, iqgrids.py) with 7 stored sign bits (+ parity) or a
# +-1/8 shift. ggml computes ``db * grid[j]`` then applies the sign, so a product is rounded
# once and negated exactly; the scale products below keep its operand order.


def _words(xp: Xp, b, lo: int, hi: int, width: int):
    """Little-endian ``width``-byte words of bytes ``[lo, hi)`` of each block, as uint32."""
    n = b.shape[0]
    v = b[:, lo:hi].reshape(n, -1, width).astype(xp.uint32)
    out = v[..., 0]
    for k in range(1, width):
        out = out | (v[..., k] << (8 * k))
    return out


def _iq_table(xp: Xp, name: str):
    from jllama.quant.iqgrids import grid

    return xp.asarray(grid(name).astype(np.float32))


def _sign_bits(xp: Xp, s):
    """Sign bytes ``[...]`` -> ``[..., 8]`` factors +-1 (bit j set: element j negative)."""
    bits = (s[..., None] >> xp.arange(8, dtype=s.dtype)) & 1
    return (1 - 2 * bits.astype(xp.int32)).astype(xp.float32)


def _ksigns(xp: Xp, idx):
    from jllama.quant.iqgrids import ksigns

    return _sign_bits(xp, xp.asarray(ksigns())[idx])


def _deq_iq2_xxs(xp: Xp, b):
    n = b.shape[0]
    d = _f16(xp, b, 0)
    w = _words(xp, b, 2, 66, 4).reshape(n, 8, 2)
    db = (d * (0.5 + (w[..., 1] >> 28).astype(xp.float32))) * 0.25  # [n, 8]
    idx = b[:, 2:66].reshape(n, 8, 8)[:, :, 0:4].astype(xp.int32)  # [n, 8, 4]
    sidx = (w[..., 1][..., None] >> (7 * xp.arange(4, dtype=xp.uint32))) & 127
    g = _iq_table(xp, "IQ2_XXS")[idx]  # [n, 8, 4, 8]
    return ((db[..., None, None] * g) * _ksigns(xp, sidx.astype(xp.int32))).reshape(n, QK_K)


def _scale_pairs(xp: Xp, d, sc):
    """IQ2_XS/IQ2_S: two 4-bit scales per 32 -> ``[n, 8, 4]`` (one per group of 8)."""
    lo = (d * (0.5 + (sc & 0x0F).astype(xp.float32))) * 0.25
    hi = (d * (0.5 + (sc >> 4).astype(xp.float32))) * 0.25
    return xp.stack([lo, lo, hi, hi], axis=-1)


def _deq_iq2_xs(xp: Xp, b):
    n = b.shape[0]
    q = _words(xp, b, 2, 66, 2).reshape(n, 8, 4)
    db = _scale_pairs(xp, _f16(xp, b, 0), b[:, 66:74])
    g = _iq_table(xp, "IQ2_XS")[(q & 511).astype(xp.int32)]
    s = _ksigns(xp, (q >> 9).astype(xp.int32))
    return ((db[..., None] * g) * s).reshape(n, QK_K)


def _deq_iq2_s(xp: Xp, b):
    n = b.shape[0]
    qs = b[:, 2:34].reshape(n, 8, 4).astype(xp.int32)
    qh = b[:, 66:74].astype(xp.int32)
    idx = qs | ((qh[:, :, None] << (8 - 2 * xp.arange(4, dtype=xp.int32))) & 0x300)
    db = _scale_pairs(xp, _f16(xp, b, 0), b[:, 74:82])
    g = _iq_table(xp, "IQ2_S")[idx]
    s = _sign_bits(xp, b[:, 34:66].reshape(n, 8, 4))
    return ((db[..., None] * g) * s).reshape(n, QK_K)


IQ1_DELTA = 0.125  # ggml's IQ1S_DELTA (= IQ1M_DELTA)


def _deq_iq1_s(xp: Xp, b):
    n = b.shape[0]
    qs = b[:, 2:34].reshape(n, 8, 4).astype(xp.int32)
    qh = _words(xp, b, 34, 50, 2).astype(xp.int32)  # [n, 8]
    dl = _f16(xp, b, 0) * (2 * ((qh >> 12) & 7) + 1).astype(xp.float32)
    delta = xp.where((qh & 0x8000) != 0, -IQ1_DELTA, IQ1_DELTA).astype(xp.float32)
    idx = qs | (((qh[:, :, None] >> (3 * xp.arange(4, dtype=xp.int32))) & 7) << 8)
    g = _iq_table(xp, "IQ1_S")[idx] + delta[:, :, None, None]
    return (dl[:, :, None, None] * g).reshape(n, QK_K)


def _deq_iq1_m(xp: Xp, b):
    n = b.shape[0]
    sc = _words(xp, b, 48, 56, 2).astype(xp.int32)  # [n, 4]
    u = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00)
    u = u | (sc[:, 3] & 0xF000)
    d = _bitcast(xp, u.astype(xp.uint16), xp.float16).astype(xp.float32)[:, None]
    # two 3-bit scales per 32 (one per 16), sc[ib/2] >> 6*(ib%2) and +3
    sh = xp.asarray(np.array([0, 3, 6, 9], np.int32))
    s3 = ((sc[:, :, None] >> sh) & 7).reshape(n, 16)
    dl = d * (2 * s3 + 1).astype(xp.float32)  # [n, 16]: one per 16 values
    qs = b[:, 0:32].reshape(n, 16, 2).astype(xp.int32)
    qh = b[:, 32:48].astype(xp.int32)  # one byte per two groups of 8
    hi = xp.stack([(qh << 8) & 0x700, (qh << 4) & 0x700], axis=-1)
    idx = qs | hi
    dm = xp.stack([qh & 0x08, qh & 0x80], axis=-1)
    delta = xp.where(dm != 0, -IQ1_DELTA, IQ1_DELTA).astype(xp.float32)
    g = _iq_table(xp, "IQ1_M")[idx] + delta[..., None]  # [n, 16, 2, 8]
    return (dl[:, :, None, None] * g).reshape(n, QK_K)


DEQUANTIZERS.update({
    int(QType.IQ2_XXS): _deq_iq2_xxs,
    int(QType.IQ2_XS): _deq_iq2_xs,
    int(QType.IQ2_S): _deq_iq2_s,
    int(QType.IQ1_S): _deq_iq1_s,
    int(QType.IQ1_M): _deq_iq1_m,
})  # fmt: skip

FLOAT_QTYPES = (int(QType.F32), int(QType.F16), int(QType.BF16))
SUPPORTED_QTYPES = FLOAT_QTYPES + tuple(DEQUANTIZERS)


def _float_passthrough(xp: Xp, data, qtype: int, row_len: int):
    lead = data.shape[:-1]
    u = data.reshape(-1, data.shape[-1])
    if qtype == int(QType.F32):
        w = u.reshape(-1, row_len, 4).astype(xp.uint32)
        v = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)
        out = _bitcast(xp, v, xp.float32)
    else:
        w = u.reshape(-1, row_len, 2).astype(xp.uint32)
        v = w[..., 0] | (w[..., 1] << 8)
        if qtype == int(QType.F16):
            out = _bitcast(xp, v.astype(xp.uint16), xp.float16).astype(xp.float32)
        else:  # BF16: the top half of an f32
            out = _bitcast(xp, v << 16, xp.float32)
    return out.reshape(*lead, row_len)


def _dequantize(xp: Xp, data, qtype: int, row_len: int):
    qtype = int(qtype)
    if qtype in FLOAT_QTYPES:
        if data.dtype != xp.uint8:
            return data.astype(xp.float32)
        return _float_passthrough(xp, data, qtype, row_len)
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        raise QuantError(f"dequantizing {qtype_info(qtype).name} is not supported")
    info = qtype_info(qtype)
    if row_len % info.block_size:
        raise QuantError(f"row of {row_len} is not a multiple of {info.name}'s {info.block_size}")
    row_bytes = row_len // info.block_size * info.type_size
    if data.shape[-1] != row_bytes:
        raise QuantError(
            f"{info.name} row of {row_len} needs {row_bytes} bytes, got {data.shape[-1]}"
        )
    lead = data.shape[:-1]
    blocks = data.reshape(-1, info.type_size)
    return fn(xp, blocks).reshape(*lead, row_len)


def dequantize_np(data: np.ndarray, qtype: int, row_len: int) -> np.ndarray:
    """Raw GGUF rows uint8 ``[..., row_bytes]`` -> float32 ``[..., row_len]`` (numpy)."""
    return _dequantize(np, np.asarray(data), qtype, row_len)


def dequantize_jax(data, qtype: int, row_len: int):
    """Raw GGUF rows uint8 ``[..., row_bytes]`` -> float32 ``[..., row_len]`` (jax, jit-able).

    ``qtype`` and ``row_len`` must be static. Float tensors already in a float dtype are just
    cast, so QTensor's float layout passes through.
    """
    import jax.numpy as jnp

    return _dequantize(jnp, jnp.asarray(data), qtype, row_len)
