"""Reference quantizers (float32 -> ggml blocks), byte-for-byte those of ggml without imatrix.

llama-quantize with no importance matrix calls ggml's ``quantize_row_*_ref`` (and
``quantize_iq4_nl``/``quantize_iq4_xs`` with ``ntry = 7``). Those run one block at a time with
float32 arithmetic whose rounding we must reproduce, so here every block is processed at once
(numpy over a ``[blocks, elements]`` array) while each reduction that ggml accumulates element by
element is a sequential ``cumsum`` and each product keeps ggml's operand order. ``nearest_int``
is ggml's float trick (round half to even) reproduced bit for bit, including its wrap-around.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jllama.errors import QuantError
from jllama.gguf.constants import QType, qtype_info
from jllama.quant import iq2
from jllama.quant.formats import KVALUES_IQ4NL, KVALUES_MXFP4, UE4M3_HALF, e8m0_to_f32_half
from jllama.quant.iq3 import quantize_iq3_s, quantize_iq3_xxs

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
# Blocks per chunk: bounds the temporaries to a few tens of MiB whatever the tensor size.
_CHUNK_ELEMS = 1 << 20


def _f(v) -> np.float32:
    return F32(v)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5*2^23 in f32 and read the mantissa (int32)."""
    i = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    i &= 0x007FFFFF
    i -= 0x00400000
    return i


def _rint_clip(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip(nearest_int(v), lo, hi)`` as f32, in place. Equal to ggml's for |v| < 2^22, which
    the scale searches guarantee (their products are bounded by about nmax + 2)."""
    np.rint(v, out=v)
    return np.clip(v, F32(lo), F32(hi), out=v)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum along the last axis in order, in f32 (as a C ``for`` loop does)."""
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1]


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(v, F32).astype(np.float16)).view(np.uint8)


def _fp16_round(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, F32).astype(np.float16).astype(F32)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, the signed value where |x| first reaches it) along the last axis."""
    i = np.argmax(np.abs(x), axis=-1)
    mx = np.take_along_axis(x, i[..., None], axis=-1)[..., 0]
    return np.abs(mx), mx


def _safe_inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _div(a, b) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (np.asarray(a, F32) / np.asarray(b, F32)).astype(F32)


def _c_trunc_int(v: np.ndarray) -> np.ndarray:
    """C's float -> int conversion (toward zero) for in-range values."""
    with np.errstate(invalid="ignore"):
        return np.trunc(v).astype(np.int32)


# ----------------------------------------------------------------------------- 32-element blocks


def _q4_0(x: np.ndarray) -> np.ndarray:
    _, mx = _first_absmax(x)
    d = _div(mx, F32(-8))
    idv = _safe_inv(d)[:, None]
    q = np.minimum(15, _c_trunc_int(x * idv + F32(8.5))).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), qs], axis=1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    mn, mx = x.min(axis=1), x.max(axis=1)
    d = _div(mx - mn, F32(15))
    idv = _safe_inv(d)[:, None]
    q = np.minimum(15, _c_trunc_int((x - mn[:, None]) * idv + F32(0.5))).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate(
        [_fp16_bytes(d).reshape(-1, 2), _fp16_bytes(mn).reshape(-1, 2), qs], axis=1
    )


def _pack_q5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    hb = ((q >> 4) & 1).astype(np.uint8)  # bit j of the 32-bit qh
    qh = np.packbits(hb, axis=1, bitorder="little")
    return qh, qs.astype(np.uint8)


def _q5_0(x: np.ndarray) -> np.ndarray:
    _, mx = _first_absmax(x)
    d = _div(mx, F32(-16))
    idv = _safe_inv(d)[:, None]
    q = np.minimum(31, _c_trunc_int(x * idv + F32(16.5))).astype(np.uint8)
    qh, qs = _pack_q5(q)
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), qh, qs], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    mn, mx = x.min(axis=1), x.max(axis=1)
    d = _div(mx - mn, F32(31))
    idv = _safe_inv(d)[:, None]
    q = (_c_trunc_int((x - mn[:, None]) * idv + F32(0.5)) & 0xFF).astype(np.uint8)
    qh, qs = _pack_q5(q)
    return np.concatenate(
        [_fp16_bytes(d).reshape(-1, 2), _fp16_bytes(mn).reshape(-1, 2), qh, qs], axis=1
    )


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: half away from zero. ``a - floor(a)`` and its double are exact in f32, so
    the half test is too (``floor(a + 0.5)`` is not: the sum rounds)."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + np.floor(F32(2) * (a - fl)), v)


def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = _div(amax, F32(127))
    idv = _safe_inv(d)[:, None]
    q = _roundf(x * idv).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), q], axis=1)


def _q1_0(x: np.ndarray) -> np.ndarray:
    # d = mean |x| (an f32 sum in order, then / 128: exact), a bit per value for x >= 0
    d = _seqsum(np.abs(x)) / F32(128)
    qs = np.packbits(x.reshape(-1, 16, 8) >= 0, axis=-1, bitorder="little")[..., 0]
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), qs], axis=1)


def _q2_0(x: np.ndarray) -> np.ndarray:
    # d = max |x|, codes clamp(roundf(x / d) + 1, 0, 3) with ggml's float -> int conversion
    # (x86's INT_MIN for NaN and out-of-range values: d subnormal makes 1/d infinite)
    d = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):  # ggml: d > 0 ? 1/d : 0 (so NaN gives 0, not NaN)
        idv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0)).astype(F32)
    r = _roundf(x * idv[:, None])
    with np.errstate(invalid="ignore"):
        q = np.where(np.abs(r) < F32(2**31), r, F32(-(2**31))).astype(np.int64) + 1
    q = np.clip(q, 0, 3).astype(np.uint8).reshape(-1, 16, 4)
    qs = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), qs], axis=1)


# ----------------------------------------------------------------------------- K-quant helpers


def _colsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order, in f32 (a C loop over the block's elements), for ``[n, M]``."""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def _first_absmax0(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i = np.argmax(np.abs(xt), axis=0)
    mx = np.take_along_axis(xt, i[None, :], axis=0)[0]
    return np.abs(mx), mx


# The searches below work on transposed sub-blocks ``[n, M]`` (element index first) so that each
# of ggml's per-element accumulations is one contiguous vector add over all M sub-blocks.


def make_qkx2_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's asymmetric (scale, min) search over sub-blocks ``x [M, n]``.

    Returns (scale [M], the_min [M] (= -min, >= 0), L uint8 [M, n]).
    """
    x = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(w.T)
    nmf = F32(nmax)
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w = _colsum(w)
    sum_x = _colsum(w * x)
    flat = mx == mn
    iscale = _div(nmf, np.where(flat, F32(1), mx - mn))
    scale = _div(F32(1), iscale)
    L = _rint_clip(iscale * (x - mn), 0, nmax)
    diff = scale * L + mn - x
    diff = np.abs(diff) if use_mad else diff * diff
    best = _colsum(w * diff)
    for step in range(nstep + 1):
        # ggml updates ``min`` in place, so later steps search around the best fit so far.
        rng = np.where(flat, F32(1), mx - mn)
        isc = _div(F32(rmin) + F32(rdelta) * F32(step) + nmf, rng)
        lf = x - mn
        lf *= isc
        lf = _rint_clip(lf, 0, nmax)
        wl = w * lf
        sum_l = _colsum(wl)
        wl *= lf
        sum_l2 = _colsum(wl)
        wl = w * lf
        wl *= x
        sum_xl = _colsum(wl)
        with np.errstate(all="ignore"):
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = lf * this_scale
            diff += this_min
            diff -= x
            if use_mad:
                np.abs(diff, out=diff)
            else:
                diff *= diff
            diff *= w
            cur = _colsum(diff)
        take = (D > 0) & (cur < best) & ~flat
        L = np.where(take, lf, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-mn).astype(F32), np.ascontiguousarray(L.T.astype(np.uint8))


def make_qx_quants_rmse1(
    x: np.ndarray, nmax: int, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale search with
    weights ``qw [M, n]`` (x^2 when None). Returns (scale [M], L uint8 [M, n] in [0, 2*nmax))."""
    x = np.ascontiguousarray(x.T)
    amax, mx = _first_absmax0(x)
    zero = amax < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    w = x * x if qw is None else np.ascontiguousarray(qw.T, dtype=F32)
    wx = w * x

    def attempt(iscale):
        li = _rint_clip(iscale * x, -nmax, nmax - 1)
        t = w * li
        t *= li
        return li, _colsum(wx * li), _colsum(t)

    iscale = _div(F32(-nmax), mxs)
    li, sumlx, suml2 = attempt(iscale)
    scale = np.where(suml2 != 0, _div(sumlx, np.where(suml2 != 0, suml2, F32(1))), F32(0))
    best = scale * sumlx
    L = li + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = _div(-(F32(nmax) + F32(0.1) * F32(step)), mxs)
        li, sumlx, suml2 = attempt(isc)
        with np.errstate(all="ignore"):
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            new_scale = sumlx / suml2
        L = np.where(take, li + nmax, L)
        scale = np.where(take, new_scale, scale)
        best = np.where(take, scale * sumlx, best)
    L = np.where(zero, 0, L)
    scale = np.where(zero, F32(0), scale)
    return scale.astype(F32), np.ascontiguousarray(L.T.astype(np.uint8))


def make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)``: greedy per-element refinement
    (5 sweeps) of a symmetric scale. Returns (scale [M], L uint8 [M, n] in [0, 2*nmax))."""
    x = np.ascontiguousarray(x.T)
    amax, mx = _first_absmax0(x)
    zero = amax < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    iscale = _div(F32(-nmax), mxs)
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.astype(F32)
    sumlx = _colsum(wx * lf)
    suml2 = _colsum(w * lf * lf)
    n = x.shape[0]
    with np.errstate(all="ignore"):
        for _ in range(5):  # a sweep that changes nothing leaves the state as it is
            for i in range(n):
                xi, wi, wxi = x[i], w[i], wx[i]
                li = L[i].astype(F32)
                slx = sumlx - wxi * li
                pos = slx > 0
                sl2 = suml2 - wi * li * li
                new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nl = new_l.astype(F32)
                changed = pos & (new_l != L[i])
                slx2 = slx + wxi * nl
                sl22 = sl2 + wi * nl * nl
                better = changed & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = np.where(better, new_l, L[i])
                sumlx = np.where(better, slx2, sumlx)
                suml2 = np.where(better, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(zero, 0, L + nmax)
    scale = np.where(zero, F32(0), scale)
    return scale, np.ascontiguousarray(L.T.astype(np.uint8))


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit (scale, min) pairs [B, 8] -> 12 bytes."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _pack_2bit_planes(L: np.ndarray) -> np.ndarray:
    """[B, 256] values 0..3 -> 64 bytes: byte (h*32 + l) holds L[h*128 + s*32 + l] at bits 2s."""
    B = L.shape[0]
    v = L.reshape(B, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(B, 64)


def _q2_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    q4 = F32(15)
    has_s, has_m = max_scale > 0, max_min > 0
    isc = _div(q4, np.where(has_s, max_scale, F32(1)))
    ism = _div(q4, np.where(has_m, max_min, F32(1)))
    sc = np.where(has_s[:, None], nearest_int(isc[:, None] * scales) & 0xFF, 0)
    sc = sc | np.where(has_m[:, None], (nearest_int(ism[:, None] * mins) << 4) & 0xFF, 0)
    sc = sc.astype(np.uint8)
    d = np.where(has_s, _div(max_scale, q4), F32(0))
    dmin = np.where(has_m, _div(max_min, q4), F32(0))
    dl = _fp16_round(d)[:, None] * (sc & 0x0F).astype(F32)
    ml = _fp16_round(dmin)[:, None] * (sc >> 4).astype(F32)
    with np.errstate(all="ignore"):
        lq = np.clip(nearest_int((x.reshape(B, 16, 16) + ml[:, :, None]) / dl[:, :, None]), 0, 3)
    L = np.where((dl != 0)[:, :, None], lq, L).reshape(B, 256)
    return np.concatenate(
        [sc, _pack_2bit_planes(L), _fp16_bytes(d).reshape(B, 2), _fp16_bytes(dmin).reshape(B, 2)],
        axis=1,
    )


def _q3_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    scales, L = make_q3_quants_rmse(x.reshape(B * 16, 16), 4)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    _, max_scale = _first_absmax(scales)
    amax = np.abs(scales).max(axis=1)
    has = (amax > 0) & (max_scale != 0)
    iscale = _div(F32(-32), np.where(has, max_scale, F32(1)))
    l8 = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # (int8_t) cast
    ls = np.where(has[:, None], np.clip(l8, -32, 31) + 32, 0).astype(np.uint8)
    d = np.where(has, _div(F32(1), iscale), F32(0))
    return _q3_k_encode(x, L, ls, d)


def _q3_k_encode(x: np.ndarray, L: np.ndarray, ls: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q3_K's second half: 6-bit scales ``ls [B, 16]`` (offset 32) and super-scale ``d`` given,
    requantize where the sub-block scale is nonzero (else keep ``L [B, 16, 16]``) and pack."""
    B = x.shape[0]
    packed = np.zeros((B, 12), np.uint8)
    packed[:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    hi = ls >> 4  # [B, 16], 2 bits each; scale j goes to byte 8 + j%4 at bits 2*(j//4)
    packed[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    sc = ls.astype(np.int32) - 32
    dl = _fp16_round(d)[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        lq = np.clip(nearest_int(x.reshape(B, 16, 16) / dl[:, :, None]), -4, 3) + 4
    L = np.where((dl != 0)[:, :, None], lq, L).reshape(B, 256)
    high = L > 3
    L = np.where(high, L - 4, L)
    # hmask: element j sets bit j//32 of byte j%32.
    hm = (high.reshape(B, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]).sum(
        axis=1, dtype=np.uint8
    )
    return np.concatenate([hm, _pack_2bit_planes(L), packed, _fp16_bytes(d).reshape(B, 2)], axis=1)


def _q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K front half: returns (scales bytes [B,12], d, dmin, L [B,256])."""
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    av_x = np.sqrt(_div(_seqsum(xs * xs), F32(32)))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.reshape(B, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_s = np.where(max_scale > 0, _div(F32(63), max_scale), F32(0))
    inv_m = np.where(max_min > 0, _div(F32(63), max_min), F32(0))
    ls = np.minimum(63, nearest_int(inv_s[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, nearest_int(inv_m[:, None] * mins) & 0xFF).astype(np.uint8)
    d = _div(max_scale, F32(63))
    dmin = _div(max_min, F32(63))
    return _q45_k_requant(x, L, ls, lm, d, dmin, nmax)


def _q45_k_requant(x, L, ls, lm, d, dmin, nmax) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K: with the 6-bit (scale, min) pairs and super-scales fixed, requantize where the
    sub-block scale is nonzero (else keep ``L [B, 8, 32]``)."""
    B = x.shape[0]
    dl = _fp16_round(d)[:, None] * ls.astype(F32)
    ml = _fp16_round(dmin)[:, None] * lm.astype(F32)
    with np.errstate(all="ignore"):
        lq = nearest_int((x.reshape(B, 8, 32) + ml[:, :, None]) / dl[:, :, None])
    lq = np.clip(lq, 0, nmax)
    L = np.where((dl != 0)[:, :, None], lq, L).reshape(B, 256).astype(np.uint8)
    return _pack_k_scales(ls, lm), d, dmin, L


def _q4_k(x: np.ndarray) -> np.ndarray:
    return _q4_k_pack(*_q45_k(x, 15, -1.0, 20))


def _q4_k_pack(sc, d, dmin, L) -> np.ndarray:
    B = L.shape[0]
    v = L.reshape(B, 4, 2, 32)
    qs = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(B, 128)
    return np.concatenate(
        [_fp16_bytes(d).reshape(B, 2), _fp16_bytes(dmin).reshape(B, 2), sc, qs], axis=1
    )


def _q5_k(x: np.ndarray) -> np.ndarray:
    return _q5_k_pack(*_q45_k(x, 31, -0.5, 15))


def _q5_k_pack(sc, d, dmin, L) -> np.ndarray:
    B = L.shape[0]
    v = L.reshape(B, 4, 2, 32)
    lo = v & 0x0F
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(B, 128)
    hb = (L >> 4).reshape(B, 8, 32)  # sub-block j -> bit j of qh[l]
    qh = (hb << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate(
        [_fp16_bytes(d).reshape(B, 2), _fp16_bytes(dmin).reshape(B, 2), sc, qh, qs], axis=1
    )


def _q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """``qw [B, 256]``: the imatrix weights (quantize_row_q6_K_impl), used as they are."""
    B = x.shape[0]
    qw16 = None if qw is None else qw.reshape(B * 16, 16)
    scales, L = make_qx_quants_rmse1(x.reshape(B * 16, 16), 32, qw16)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16).astype(np.int32)
    max_abs, max_scale = _first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = _div(F32(-128), np.where(zero, F32(1), max_scale))
    d = _div(F32(1), iscale)
    sc = ((np.minimum(127, nearest_int(iscale[:, None] * scales)) + 128) & 0xFF) - 128
    dl = _fp16_round(d)[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        lq = np.clip(nearest_int(x.reshape(B, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where((dl != 0)[:, :, None], lq, L).reshape(B, 256)
    v = L.reshape(B, 2, 4, 32).astype(np.uint8)  # [half, quarter, l]
    lo = v & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
    hi = v >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate(
        [
            ql.reshape(B, 128),
            qh.reshape(B, 64),
            sc.astype(np.int8).view(np.uint8),
            _fp16_bytes(d).reshape(B, 2),
        ],
        axis=1,
    )
    out[zero] = 0
    return out


def _q8_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    amax, mx = _first_absmax(x)
    zero = amax == 0
    iscale = _div(F32(-127), np.where(zero, F32(1), mx))
    q = np.where(zero[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * x)))
    bsums = q.reshape(B, 16, 16).sum(axis=2).astype(np.int16)
    d = np.where(zero, F32(0), _div(F32(1), iscale)).astype(F32)
    return np.concatenate(
        [
            d.reshape(B, 1).view(np.uint8),
            q.astype(np.int8).view(np.uint8),
            bsums.view(np.uint8).reshape(B, 32),
        ],
        axis=1,
    )


# ----------------------------------------------------------------------------- IQ4 (non-linear)

_IQ4 = np.array(KVALUES_IQ4NL, np.int32)
_IQ4F = _IQ4.astype(F32)
_IQ4_MID2 = (_IQ4[:-1] + _IQ4[1:]).astype(F32)  # 2 * midpoints


# The doubled midpoints are integers, so "2x >= m" is "floor(2x) >= m": a table over floor(2x).
_MID_LO, _MID_HI = int(_IQ4_MID2[0]) - 1, int(_IQ4_MID2[-1])
_IQ4_LUT = np.searchsorted(_IQ4_MID2, np.arange(_MID_LO, _MID_HI + 1, dtype=F32), side="right")


def _best_index_iq4(v: np.ndarray) -> np.ndarray:
    """Nearest grid index (ties upwards), as ggml's ``best_index_int8``."""
    t = np.asarray(v + v, F32)
    np.floor(t, out=t)
    np.clip(t, F32(_MID_LO), F32(_MID_HI), out=t)
    t -= F32(_MID_LO)
    np.nan_to_num(t, copy=False, nan=0.0)  # NaN compares false everywhere: index 0, as ggml
    return _IQ4_LUT[t.astype(np.intp)]


def _iq4_block_scales(x: np.ndarray, ntry: int, w: np.ndarray | None = None) -> np.ndarray:
    """Per-32 scale search of ``quantize_row_iq4_nl_impl``: x [M, 32] -> d [M]; ``w [M, 32]``
    the weights (x^2 without imatrix)."""
    x = np.ascontiguousarray(x.T)
    amax, mx = _first_absmax0(x)
    zero = amax < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    w = x * x if w is None else np.ascontiguousarray(w.T, dtype=F32)

    def sums(idv):
        q = _IQ4F[_best_index_iq4(idv * x)]
        wq = w * q
        return _colsum(wq * x), _colsum(wq * q)

    with np.errstate(all="ignore"):
        d = _div(-mxs, F32(_IQ4[0])) if ntry > 0 else _div(mxs, F32(_IQ4[0]))
        sumqx, sumq2 = sums(F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(_div(F32(itry + int(_IQ4[0])), mxs))
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(take, sumqx / sumq2, d).astype(F32)
            best = np.where(take, d * sumqx, best)
    return np.where(zero, F32(0), d).astype(F32)


def _pack_nibbles32(L: np.ndarray) -> np.ndarray:
    """[M, 32] -> [M, 16]: low nibble element j, high nibble element 16 + j."""
    return (L[:, :16] | (L[:, 16:] << 4)).astype(np.uint8)


def _iq4_nl(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    d = _iq4_block_scales(x, 7, w)
    idv = _safe_inv(d)
    L = _best_index_iq4(idv[:, None] * x)
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), _pack_nibbles32(L)], axis=1)


def _iq4_xs(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    ws = None if w is None else w.reshape(B * 8, 32)
    scales = _iq4_block_scales(xs, 7, ws).reshape(B, 8)
    _, max_scale = _first_absmax(scales)
    d = _div(-max_scale, F32(32))
    idv = _safe_inv(d)
    lint = np.clip(nearest_int(idv[:, None] * scales), -32, 31)
    dl = d[:, None] * lint.astype(F32)
    idl = _safe_inv(dl)
    L = _best_index_iq4(idl.reshape(B * 8, 1) * xs)
    lu = (lint + 32).astype(np.uint16)
    sl = ((lu[:, 0::2] & 0x0F) | ((lu[:, 1::2] & 0x0F) << 4)).astype(np.uint8)
    sh = ((lu >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    return np.concatenate(
        [
            _fp16_bytes(d).reshape(B, 2),
            sh.astype("<u2").view(np.uint8).reshape(B, 2),
            sl,
            _pack_nibbles32(L).reshape(B, 128),
        ],
        axis=1,
    )


# ----------------------------------------------------------------------------- ternary, MXFP4


def _ternary(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0/TQ2_0's shared front: (f16 d bytes [B, 2], trits 0..2 [B, 256]): d = amax and
    each value lroundf(x / amax) + 1."""
    amax = np.abs(x).max(axis=1)
    idv = _safe_inv(amax)
    return _fp16_bytes(amax).reshape(-1, 2), (_roundf(x * idv[:, None]) + 1).astype(np.int32)


def _pack_trits(t: np.ndarray, nvals: int) -> np.ndarray:
    """[B, nvals, m] trits -> [B, m] bytes: base-3 digits, the first value most significant,
    scaled by 256/243 rounding up so a byte's top digit is ``(byte * 3) >> 8``."""
    w = 3 ** np.arange(4, 4 - nvals, -1)
    q = (t * w[:, None]).sum(axis=1)
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _tq1_0(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    d, t = _ternary(x)
    qs0 = _pack_trits(t[:, :160].reshape(B, 5, 32), 5)
    qs1 = _pack_trits(t[:, 160:240].reshape(B, 5, 16), 5)
    qh = _pack_trits(t[:, 240:].reshape(B, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, d], axis=1)


def _tq2_0(x: np.ndarray) -> np.ndarray:
    d, t = _ternary(x)
    return np.concatenate([_pack_2bit_planes(t & 3), d], axis=1)


_MXFP4F = np.array(KVALUES_MXFP4, F32)


def _mxfp4(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        lg = np.floor(np.log2(np.where(amax > 0, amax, F32(1)))).astype(F32)
    # (uint8)(float) of ggml: a C conversion through int (wraps below 2^-125)
    e = np.where(amax > 0, (_c_trunc_int(lg - F32(2) + F32(127)) & 0xFF), 0).astype(np.uint8)
    d = e8m0_to_f32_half(np, e)
    q = _fp4_codes(x, d)
    return np.concatenate([e[:, None], _pack_nibbles32(q)], axis=1)


def _fp4_codes(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """best_index_mxfp4 of every x (``[..., n]``) against its scale d (``[...]``)."""
    # Only the 8 values of x's sign can be nearest (and +0 at index 0 wins the tie with the
    # zero at 8): the errors of those equal ggml's exactly, negation being exact.
    err = np.abs(_MXFP4F[:8] * d[..., None, None] - np.abs(x)[..., None])
    j = np.argmin(err, axis=-1)  # the first of equal errors, as ggml
    return np.where((x < 0) & (j > 0), j + 8, j).astype(np.uint8)


def fp32_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_ue4m3 (f32 in): the exponent and top 3 mantissa bits, rounded up on the 4th
    bit alone; saturating at 0x7E (448) from 2^8 up; below 2^-6 a subnormal code 1..7 from
    (int)(x * 512 + 0.5) in f32; 0 for x <= 0 or NaN."""
    x = np.minimum(np.asarray(x, F32), F32(448))
    bits = x.view(np.uint32)
    e = ((bits >> 23) & 0xFF).astype(np.int32) - 127 + 7
    m = ((bits >> 20) & 7).astype(np.int32) + ((bits >> 19) & 1).astype(np.int32)
    e, m = np.where(m > 7, e + 1, e), np.where(m > 7, 0, m)
    sub = _c_trunc_int(x * F32(512) + F32(0.5))  # x <= 448: in range (NaN masked below)
    out = np.where(e >= 15, 0x7E, (np.clip(e, 0, 15) << 3) | m)
    # the subnormal test is on the exponent before the mantissa's carry (ggml tests it first)
    e0 = ((bits >> 23) & 0xFF).astype(np.int32) - 120
    out = np.where(e0 <= 0, np.where(sub < 1, 0, np.minimum(sub, 7)), out)
    return np.where(x > 0, out, 0).astype(np.uint8)


def _nvfp4(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B, 4, 16)
    ue = fp32_to_ue4m3(np.abs(xs).max(axis=-1) / F32(6))
    q = _fp4_codes(xs, UE4M3_HALF[ue])
    qs = (q[..., :8] | (q[..., 8:] << 4)).astype(np.uint8)
    return np.concatenate([ue, qs.reshape(B, 32)], axis=1)


def _row_chunks(rows: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """fn over chunks of whole rows (bounded temporaries), concatenated."""
    step = max(1, _CHUNK_ELEMS // rows.shape[1])
    return np.concatenate([fn(rows[s : s + step]) for s in range(0, rows.shape[0], step)])


def _blockwise(fn: Callable[[np.ndarray], np.ndarray], block: int):
    """The weighted entry of a type whose ggml quantizer ignores the importance matrix."""

    def wfn(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
        return _row_chunks(rows, lambda r: fn(r.reshape(-1, block)).reshape(r.shape[0], -1))

    return wfn


def _iq3_weighted(fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray]):
    """IQ3 with an imatrix: each 256-block weighs its values by the imatrix columns it covers."""

    def wfn(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
        def chunk(r: np.ndarray) -> np.ndarray:
            w = np.broadcast_to(qw.reshape(1, -1), r.shape).reshape(-1, 256)
            return fn(r.reshape(-1, 256), w).reshape(r.shape[0], -1)

        return _row_chunks(rows, chunk)

    return wfn


QUANTIZERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    int(QType.Q4_0): _q4_0,
    int(QType.Q4_1): _q4_1,
    int(QType.Q5_0): _q5_0,
    int(QType.Q5_1): _q5_1,
    int(QType.Q8_0): _q8_0,
    int(QType.IQ4_NL): _iq4_nl,
    int(QType.Q2_K): _q2_k,
    int(QType.Q3_K): _q3_k,
    int(QType.Q4_K): _q4_k,
    int(QType.Q5_K): _q5_k,
    int(QType.Q6_K): _q6_k,
    int(QType.IQ4_XS): _iq4_xs,
    int(QType.Q8_K): _q8_k,
    int(QType.TQ1_0): _tq1_0,
    int(QType.TQ2_0): _tq2_0,
    int(QType.Q1_0): _q1_0,
    int(QType.Q2_0): _q2_0,
    int(QType.MXFP4): _mxfp4,
    int(QType.NVFP4): _nvfp4,
    int(QType.IQ3_XXS): quantize_iq3_xxs,
    int(QType.IQ3_S): quantize_iq3_s,
}


def _float_bytes(x: np.ndarray, qtype: int) -> np.ndarray:
    if qtype == int(QType.F32):
        out = x.astype("<f4")
    elif qtype == int(QType.F16):
        out = x.astype("<f2")
    else:  # BF16, round to nearest even, NaN kept quiet (ggml_compute_fp32_to_bf16)
        u = x.astype("<f4").view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = np.where(nan, (u >> 16) | 64, r)
        out = r.astype("<u2")
    return np.ascontiguousarray(out).view(np.uint8).reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- with an imatrix


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants``: a positive scale for ``x [M, n]`` (>= 0: the sub-block scales
    or mins of a K-quant), weighted by ``qw [M, n]``, then 5 greedy sweeps. Returns
    (scale [M], L uint8 [M, n] in [0, nmax])."""
    x = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(qw.T, dtype=F32)
    mx = np.maximum(x.max(axis=0), F32(0))
    zero = mx < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    wx = w * x
    with np.errstate(all="ignore"):
        iscale = _div(F32(nmax), mxs)
        l0 = (nearest_int(iscale * x) & 0xFF).astype(F32)  # stored in uint8 L unclamped
        diff = x - _div(F32(1), iscale) * l0
        best = _colsum(w * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = _div(F32(0.1) * F32(step) + F32(nmax), mxs)
            li = np.minimum(nmax, nearest_int(isc * x)).astype(F32)
            diff = x - _div(F32(1), isc) * li
            mse = _colsum(w * diff * diff)
            take = mse < best
            best = np.where(take, mse, best)
            iscale = np.where(take, isc, iscale)
        li = np.minimum(nmax, nearest_int(iscale * x))
        lf = li.astype(F32)
        sumlx = _colsum(wx * lf)
        suml2 = _colsum(w * lf * lf)
        L = li & 0xFF
        for _ in range(5):  # a sweep that changes nothing leaves the state as it is
            for i in range(x.shape[0]):
                xi, wi, wxi = x[i], w[i], wx[i]
                lc = L[i].astype(F32)
                slx = sumlx - wxi * lc
                sl2 = suml2 - wi * lc * lc
                new_l = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                nl = new_l.astype(F32)
                slx2 = slx + wxi * nl
                sl22 = sl2 + wi * nl * nl
                better = (slx > 0) & (sl2 > 0) & (new_l != L[i])
                better &= slx2 * slx2 * suml2 > sumlx * sumlx * sl22
                L[i] = np.where(better, new_l & 0xFF, L[i])
                sumlx = np.where(better, slx2, sumlx)
                suml2 = np.where(better, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(zero, 0, L)
    scale = np.where(zero, F32(0), scale)
    return scale, np.ascontiguousarray(L.T.astype(np.uint8))


def _imatrix_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """ggml's ``qw[j] * sqrtf(sigma2 + x[j]*x[j])`` for blocks ``x [B, k]``, ``qw [B, k]``."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _per_block(rows: np.ndarray, qw: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """rows [R, n] -> blocks [R*n/bs, bs] and the matching imatrix slices."""
    R, n = rows.shape
    return rows.reshape(-1, bs), np.broadcast_to(qw.reshape(1, n), (R, n)).reshape(-1, bs)


def _row_sigma2(rows: np.ndarray, bs: int) -> np.ndarray:
    """The 32-element types weigh by the whole row's mean square, repeated for each block."""
    s = _div(_seqsum(rows * rows), F32(rows.shape[1]))
    return np.repeat(s, rows.shape[1] // bs)


def _wq4_0(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    x, q = _per_block(rows, qw, 32)
    d, L = make_qx_quants_rmse1(x, 8, _imatrix_weights(x, q, _row_sigma2(rows, 32)))
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), _pack_nibbles32(L)], axis=1)


def _wq5_0(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    x, q = _per_block(rows, qw, 32)
    d, L = make_qx_quants_rmse1(x, 16, _imatrix_weights(x, q, _row_sigma2(rows, 32)))
    qh, qs = _pack_q5(L)
    return np.concatenate([_fp16_bytes(d).reshape(-1, 2), qh, qs], axis=1)


def _wq_1(rows: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    x, q = _per_block(rows, qw, 32)
    w = _imatrix_weights(x, q, _row_sigma2(rows, 32))
    d, the_min, L = make_qkx2_quants(x, w, nmax, -0.9, 0.05, 36, False)  # = make_qkx3_quants
    return _fp16_bytes(d).reshape(-1, 2), _fp16_bytes(-the_min).reshape(-1, 2), L


def _wq4_1(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, m, L = _wq_1(rows, qw, 15)
    return np.concatenate([d, m, _pack_nibbles32(L)], axis=1)


def _wq5_1(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    d, m, L = _wq_1(rows, qw, 31)
    qh, qs = _pack_q5(L)
    return np.concatenate([d, m, qh, qs], axis=1)


def _wq8_0(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _q8_0(rows.reshape(-1, 32))  # ggml's quantize_q8_0 ignores the imatrix


def _k_blocks(rows: np.ndarray, qw: np.ndarray, sigma_mul: float):
    """256-blocks, their imatrix slices, and sigma2 = sigma_mul * (sum x^2) / 256 per block."""
    x, q = _per_block(rows, qw, 256)
    s = _seqsum(x * x)
    if sigma_mul != 1:
        s = F32(sigma_mul) * s
    return x, q, _div(s, F32(256))


def _wq2_k(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    x, q, sigma2 = _k_blocks(rows, qw, 1)
    B = x.shape[0]
    w = _imatrix_weights(x, q, sigma2).reshape(B * 16, 16)
    sw = _seqsum(w).reshape(B, 16)
    scales, mins, L = make_qkx2_quants(x.reshape(B * 16, 16), w, 3, -0.9, 0.05, 36, False)
    dm, ls = make_qp_quants(scales.reshape(B, 16), 15, sw)
    mm, lm = make_qp_quants(mins.reshape(B, 16), 15, sw)
    sc = (ls | (lm << 4)).astype(np.uint8)
    dl = _fp16_round(dm)[:, None] * (sc & 0x0F).astype(F32)
    ml = _fp16_round(mm)[:, None] * (sc >> 4).astype(F32)
    with np.errstate(all="ignore"):
        lq = np.clip(nearest_int((x.reshape(B, 16, 16) + ml[:, :, None]) / dl[:, :, None]), 0, 3)
    L = np.where((dl != 0)[:, :, None], lq, L.reshape(B, 16, 16)).reshape(B, 256)
    return np.concatenate(
        [sc, _pack_2bit_planes(L), _fp16_bytes(dm).reshape(B, 2), _fp16_bytes(mm).reshape(B, 2)],
        axis=1,
    )


def _wq3_k(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    x, q, sigma2 = _k_blocks(rows, qw, 2)
    B = x.shape[0]
    w = _imatrix_weights(x, q, sigma2).reshape(B * 16, 16)
    sw = _seqsum(w).reshape(B, 16)
    scales, L = make_qx_quants_rmse1(x.reshape(B * 16, 16), 4, w)
    d, ls = make_qx_quants_rmse1(scales.reshape(B, 16), 32, sw)
    return _q3_k_encode(x, L.reshape(B, 16, 16).astype(np.int32), ls, d)


def _wq45_k(rows: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    x, q, sigma2 = _k_blocks(rows, qw, 2)
    B = x.shape[0]
    w = _imatrix_weights(x, q, sigma2).reshape(B * 8, 32)
    sw = _seqsum(w).reshape(B, 8)
    scales, mins, L = make_qkx2_quants(x.reshape(B * 8, 32), w, nmax, -0.9, 0.05, 36, False)
    d, ls = make_qp_quants(scales.reshape(B, 8), 63, sw)
    dmin, lm = make_qp_quants(mins.reshape(B, 8), 63, sw)
    if nmax == 31:  # only quantize_row_q5_K_impl clamps (the searches keep both <= 63 anyway)
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return _q45_k_requant(x, L.reshape(B, 8, 32), ls, lm, d, dmin, nmax)


def _wq4_k(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _q4_k_pack(*_wq45_k(rows, qw, 15))


def _wq5_k(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _q5_k_pack(*_wq45_k(rows, qw, 31))


def _wq6_k(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    x, q = _per_block(rows, qw, 256)
    return _q6_k(x, q)


def _wiq4(rows: np.ndarray, qw: np.ndarray, sbs: int) -> np.ndarray:
    x, q = _per_block(rows, qw, sbs)
    sigma2 = _seqsum(x * x) * F32(2.0 / sbs)
    w = _imatrix_weights(x, q, sigma2)
    return (_iq4_nl if sbs == 32 else _iq4_xs)(x, w)


def _by_rows(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """Run a weighted quantizer over slices of whole rows (bounded temporaries)."""

    def run(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
        R, n = rows.shape
        step = max(1, _CHUNK_ELEMS // max(n, 1))
        parts = [
            fn(rows[s : s + step], qw).reshape(min(step, R - s), -1) for s in range(0, R, step)
        ]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), np.uint8)

    return run


# With an importance matrix ggml's quantizers look at whole rows (some weigh each value by the
# row's mean square as well as by the imatrix), so these take float32 rows ``[R, n_per_row]`` and
# the imatrix column weights ``[n_per_row]`` and return uint8 ``[R, row_bytes]``, as
# ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` does.
WEIGHTED_QUANTIZERS: dict[int, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    int(QType.Q4_0): _by_rows(_wq4_0),
    int(QType.Q4_1): _by_rows(_wq4_1),
    int(QType.Q5_0): _by_rows(_wq5_0),
    int(QType.Q5_1): _by_rows(_wq5_1),
    int(QType.Q8_0): _by_rows(_wq8_0),
    int(QType.Q2_K): _by_rows(_wq2_k),
    int(QType.Q3_K): _by_rows(_wq3_k),
    int(QType.Q4_K): _by_rows(_wq4_k),
    int(QType.Q5_K): _by_rows(_wq5_k),
    int(QType.Q6_K): _by_rows(_wq6_k),
    int(QType.IQ4_NL): _by_rows(lambda r, q: _wiq4(r, q, 32)),
    int(QType.IQ4_XS): _by_rows(lambda r, q: _wiq4(r, q, 256)),
}

# The lattice i-quants (iq2.py). IQ2_XXS/IQ2_XS/IQ1_S have no unweighted form: ggml refuses them
# without an imatrix (ggml_quantize_requires_imatrix).
WEIGHTED_QUANTIZERS.update({
    int(QType.IQ2_XXS): iq2.quantize_iq2_xxs,
    int(QType.IQ2_XS): iq2.quantize_iq2_xs,
    int(QType.IQ2_S): iq2.quantize_iq2_s,
    int(QType.IQ1_S): iq2.quantize_iq1_s,
    int(QType.IQ1_M): iq2.quantize_iq1_m,
})  # fmt: skip
QUANTIZERS.update({
    int(QType.IQ2_S): iq2.quantize_iq2_s_rows,
    int(QType.IQ1_M): iq2.quantize_iq1_m_rows,
})  # fmt: skip
# ggml ignores the weights for the ternary types, Q1_0, Q2_0, MXFP4 and NVFP4; IQ3 has its own
# weighted search.
WEIGHTED_QUANTIZERS[int(QType.TQ1_0)] = _blockwise(_tq1_0, 256)
WEIGHTED_QUANTIZERS[int(QType.TQ2_0)] = _blockwise(_tq2_0, 256)
WEIGHTED_QUANTIZERS[int(QType.MXFP4)] = _blockwise(_mxfp4, 32)
WEIGHTED_QUANTIZERS[int(QType.NVFP4)] = _blockwise(_nvfp4, 64)
WEIGHTED_QUANTIZERS[int(QType.Q1_0)] = _blockwise(_q1_0, 128)
WEIGHTED_QUANTIZERS[int(QType.Q2_0)] = _blockwise(_q2_0, 64)
WEIGHTED_QUANTIZERS[int(QType.IQ3_XXS)] = _iq3_weighted(quantize_iq3_xxs)
WEIGHTED_QUANTIZERS[int(QType.IQ3_S)] = _iq3_weighted(quantize_iq3_s)


def quantize_np(x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., row_len]`` -> raw GGUF rows uint8 ``[..., row_bytes]``, as ggml does it.

    ``imatrix``: float32 ``[row_len]`` importance weights (llama-imatrix's per-column mean of
    squared activations), or None for ggml's unweighted path (``quant_weights == NULL``)."""
    qtype = int(qtype)
    x = np.ascontiguousarray(x, dtype=F32)
    if qtype in (int(QType.F32), int(QType.F16), int(QType.BF16)):
        return _float_bytes(x, qtype)
    info = qtype_info(qtype)
    row = x.shape[-1]
    if row % info.block_size:
        raise QuantError(f"row of {row} is not a multiple of {info.name}'s {info.block_size}")
    if imatrix is not None:
        wfn = WEIGHTED_QUANTIZERS.get(qtype)
        if wfn is None:
            raise QuantError(
                f"quantizing to {info.name} with an importance matrix is not supported"
            )
        qw = np.ascontiguousarray(imatrix, dtype=F32).reshape(-1)
        if qw.shape[0] != row:
            raise QuantError(f"importance matrix has {qw.shape[0]} values for rows of {row}")
        rows = x.reshape(-1, row)
        return wfn(rows, qw).reshape(*x.shape[:-1], row // info.block_size * info.type_size)
    fn = QUANTIZERS.get(qtype)
    if fn is None:
        raise QuantError(f"quantizing to {info.name} is not supported")
    blocks = x.reshape(-1, info.block_size)
    out = np.empty((blocks.shape[0], info.type_size), np.uint8)
    step = max(1, _CHUNK_ELEMS // info.block_size)
    for s in range(0, blocks.shape[0], step):
        out[s : s + step] = fn(blocks[s : s + step])
    return out.reshape(*x.shape[:-1], row // info.block_size * info.type_size)
