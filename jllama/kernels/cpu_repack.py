"""Repack raw GGUF blocks into "int8 codes + per-group f32 scale (+ f32 min)".

Why: XLA:CPU cannot unpack nibbles fast (bitwise ops on u8 compile to scalar loops), but
converting int8 to f32 inside a cache-sized tile is vectorised. Every supported
ggml type is the same affine form once unpacked: ``w = code * scale[group] + min[group]`` with a
small integer code, so one dequantize-a-tile kernel serves all of them.

The functions take the array module (``numpy`` at load time, ``jax.numpy`` inside a traced kernel)
so one definition is both the load-time repacker and the in-graph fallback for unprepared
weights. The float results are exactly those of gguf-py's reference dequantize (same products in
f32; the K-quant scale ``d * sc`` and min ``dmin * m`` are precomputed in f32, as the reference
does before its multiply).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from jax import lax

from jllama.gguf.constants import QType, qtype_info


class Repacked(NamedTuple):
    """codes int8 [..., K]; scales f32 [..., K // group]; mins f32 [..., K // group] or None."""

    codes: Any
    scales: Any
    mins: Any | None


class TypeLayout(NamedTuple):
    group: int  # elements that share one scale (and min)
    has_min: bool
    unpack: Callable[[Any, Any], tuple[Any, Any, Any | None]]


def _f16(xp: Any, b: Any) -> Any:
    """f32 from little-endian f16 bytes ``b[..., 2]``."""
    if xp is np:
        return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)
    return lax.bitcast_convert_type(b, xp.float16).astype(xp.float32)


def _nibbles(xp: Any, qs: Any) -> Any:
    """[..., n] bytes -> [..., 2n]: low nibbles first, then high nibbles (ggml's order)."""
    return xp.concatenate([qs & 15, qs >> 4], axis=-1)


def _bits(xp: Any, b: Any, n: int) -> Any:
    """[..., nbytes] -> [..., 8 * nbytes] bits, little-endian (bit j of a u32 at index j)."""
    shifts = xp.arange(8, dtype=xp.uint8)
    return ((b[..., None] >> shifts) & 1).reshape(*b.shape[:-1], n)


def _k_scale_min(xp: Any, sc12: Any) -> tuple[Any, Any]:
    """Eight 6-bit scales and mins packed in 12 bytes (Q4_K/Q5_K)."""
    d, m, md = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = xp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = xp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_0(xp, b):
    d = _f16(xp, b[..., 0:2])
    q = _nibbles(xp, b[..., 2:18]).astype(xp.int8) - xp.int8(8)
    return q, d[..., None], None


def _q4_1(xp, b):
    d, m = _f16(xp, b[..., 0:2]), _f16(xp, b[..., 2:4])
    q = _nibbles(xp, b[..., 4:20]).astype(xp.int8)
    return q, d[..., None], m[..., None]


def _q5_0(xp, b):
    d = _f16(xp, b[..., 0:2])
    hi = _bits(xp, b[..., 2:6], 32)
    q = (_nibbles(xp, b[..., 6:22]) | (hi << 4)).astype(xp.int8) - xp.int8(16)
    return q, d[..., None], None


def _q5_1(xp, b):
    d, m = _f16(xp, b[..., 0:2]), _f16(xp, b[..., 2:4])
    hi = _bits(xp, b[..., 4:8], 32)
    q = (_nibbles(xp, b[..., 8:24]) | (hi << 4)).astype(xp.int8)
    return q, d[..., None], m[..., None]


def _q8_0(xp, b):
    d = _f16(xp, b[..., 0:2])
    if xp is np:
        q = np.ascontiguousarray(b[..., 2:34]).view(np.int8)
    else:
        q = lax.bitcast_convert_type(b[..., 2:34], xp.int8)
    return q, d[..., None], None


def _k_low(xp, qs):
    """Q4_K/Q5_K low nibbles: 4 chunks of 32 bytes, low nibbles then high -> 8 groups of 32."""
    qs = qs.reshape(*qs.shape[:-1], 4, 32)
    return xp.stack([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:-2], 8, 32)


def _q4_k(xp, b):
    d, dmin = _f16(xp, b[..., 0:2]), _f16(xp, b[..., 2:4])
    sc, mn = _k_scale_min(xp, b[..., 4:16])
    q = _k_low(xp, b[..., 16:144]).astype(xp.int8)
    scale = d[..., None] * sc.astype(xp.float32)
    mins = -(dmin[..., None] * mn.astype(xp.float32))
    return q.reshape(*q.shape[:-2], 256), scale, mins


def _q5_k(xp, b):
    d, dmin = _f16(xp, b[..., 0:2]), _f16(xp, b[..., 2:4])
    sc, mn = _k_scale_min(xp, b[..., 4:16])
    qh = b[..., 16:48]  # bit g of qh[l] is the high bit of element l of group g
    hi = (qh[..., None, :] >> xp.arange(8, dtype=xp.uint8)[:, None]) & 1
    q = (_k_low(xp, b[..., 48:176]) | (hi << 4)).astype(xp.int8)
    scale = d[..., None] * sc.astype(xp.float32)
    mins = -(dmin[..., None] * mn.astype(xp.float32))
    return q.reshape(*q.shape[:-2], 256), scale, mins


def _q6_k(xp, b):
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 1, 64)
    ql = xp.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32)
    qh = ((qh >> xp.asarray([0, 2, 4, 6], dtype=xp.uint8)[:, None]) & 3).reshape(
        *b.shape[:-1], 8, 32
    )
    q = (ql | (qh << 4)).astype(xp.int8) - xp.int8(32)
    if xp is np:
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)
    else:
        sc = lax.bitcast_convert_type(b[..., 192:208], xp.int8)
    d = _f16(xp, b[..., 208:210])
    return q.reshape(*q.shape[:-2], 256), d[..., None] * sc.astype(xp.float32), None


LAYOUTS: dict[int, TypeLayout] = {
    int(QType.Q4_0): TypeLayout(32, False, _q4_0),
    int(QType.Q4_1): TypeLayout(32, True, _q4_1),
    int(QType.Q5_0): TypeLayout(32, False, _q5_0),
    int(QType.Q5_1): TypeLayout(32, True, _q5_1),
    int(QType.Q8_0): TypeLayout(32, False, _q8_0),
    int(QType.Q4_K): TypeLayout(32, True, _q4_k),
    int(QType.Q5_K): TypeLayout(32, True, _q5_k),
    int(QType.Q6_K): TypeLayout(16, False, _q6_k),
}


def supported(qtype: int) -> bool:
    return int(qtype) in LAYOUTS


def repack(xp: Any, raw: Any, qtype: int, row_len: int) -> Repacked:
    """Raw GGUF rows ``uint8[..., row_bytes]`` -> ``Repacked`` with ``row_len`` codes per row."""
    info = qtype_info(qtype)
    lay = LAYOUTS[int(qtype)]
    lead = raw.shape[:-1]
    nb = row_len // info.block_size
    blocks = raw.reshape(*lead, nb, info.type_size)
    q, s, m = lay.unpack(xp, blocks)
    ng = row_len // lay.group
    codes = q.reshape(*lead, row_len)
    scales = s.reshape(*lead, ng).astype(xp.float32)
    mins = None if m is None else m.reshape(*lead, ng).astype(xp.float32)
    return Repacked(codes, scales, mins)


def dequantize_repacked(xp: Any, r: Repacked, group: int) -> Any:
    """f32 weights from a ``Repacked`` (used for tiles, ``dequantize`` and ``take_rows``)."""
    lead, k = r.codes.shape[:-1], r.codes.shape[-1]
    w = r.codes.astype(xp.float32).reshape(*lead, k // group, group) * r.scales[..., None]
    if r.mins is not None:
        w = w + r.mins[..., None]
    return w.reshape(*lead, k)
