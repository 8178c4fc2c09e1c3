"""IQ3_XXS and IQ3_S quantizers, byte for byte ggml's ``quantize_row_iq3_xxs_impl`` and
``quantize_row_iq3_s_impl`` (with or without an importance matrix).

Each 32-value sub-block gets a scale from a search over 31 (IQ3_XXS) or 19 (IQ3_S) trial scales;
at each trial every group of 4 magnitudes is rounded to 3-bit codes and, when that point is not
on the type's grid, replaced by the best of its precomputed grid neighbours (ggml's
``iq3xs_init_impl`` tables, rebuilt here from gguf-py's grid). Here all sub-blocks run at once:
the trials are a Python loop, the off-grid groups of a trial a few numpy batches (bucketed by
neighbour count, coordinate-major, which measured ~2x over one ragged batch). ggml-base is
built without FMA, so plain f32 numpy operations in ggml's order reproduce its rounding; sums
that C accumulates element by element are sequential ``cumsum``s. ``nearest_int`` is ``np.rint``
here: every rounded value is small (|v| < 2^22), where the two agree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from jllama.quant.formats import QK_K, iq_grid

F32 = np.float32
_SHIFT3 = np.array([0, 3, 6, 9], np.int32)


@dataclass(frozen=True)
class _Tables:
    pos: np.ndarray  # [n_grid, 4] f32: the grid points as ggml's quantizer sees them, 2l + 1
    codes_f: np.ndarray  # [n_grid, 4] f32: l in 0..7
    kmap: np.ndarray  # [4096] int32: 12-bit code -> grid index, -1 off the grid
    nb_count: np.ndarray  # [4096] int32: neighbours of an off-grid code (0 on the grid)
    # [max count, 4096] grid indices, each list by (distance, index) as ggml's qsort leaves it,
    # padded by repeating its last entry (a repeat never wins: argmin takes the first minimum)
    nb: np.ndarray
    nb_pos: np.ndarray  # [4, max count, 4096] f32: pos of those, coordinate first


@functools.cache
def tables(name: str) -> _Tables:
    """ggml's ``iq3xs_init_impl(grid_size)`` tables for IQ3_XXS (256 points, neighbours at the
    2 nearest distances) or IQ3_S (512 points, 3 distances)."""
    import gguf.quants

    grid = iq_grid(name)
    gm = np.array(getattr(gguf.quants, name).grid_map, np.float32)  # value of each 3-bit code
    codes = np.searchsorted(gm, grid).astype(np.int32)
    if not np.array_equal(gm[codes], grid):
        raise AssertionError(f"{name} grid values outside its map")
    nwant = 2 if name == "IQ3_XXS" else 3
    n = grid.shape[0]
    u = (codes << _SHIFT3).sum(axis=1)
    kmap = np.full(4096, -1, np.int32)
    kmap[u] = np.arange(n, dtype=np.int32)
    allc = (np.arange(4096)[:, None] >> _SHIFT3) & 7
    d2 = (((allc[:, None, :] - codes[None]) * 2) ** 2).sum(axis=-1)  # [4096, n]
    counts = np.zeros(4096, np.int32)
    lists = {}
    for i in np.nonzero(kmap < 0)[0]:
        order = np.lexsort((np.arange(n), d2[i]))
        dist = np.unique(d2[i])
        lists[i] = order[d2[i][order] <= dist[min(nwant, dist.size) - 1]]
        counts[i] = lists[i].size
    nb = np.zeros((4096, counts.max()), np.int32)
    for i, keep in lists.items():
        nb[i, : keep.size] = keep
        nb[i, keep.size :] = keep[-1]
    pos = (2 * codes + 1).astype(F32)
    nb_pos = np.ascontiguousarray(pos[nb].transpose(2, 1, 0))
    return _Tables(
        pos,
        codes.astype(F32),
        kmap,
        counts,
        np.ascontiguousarray(nb.T),
        nb_pos,
    )


# Off-grid groups are searched in buckets of similar neighbour counts, each padded to its bound.
_BUCKETS = (2, 4, 6, 8, 12, 16, 24, 64)


def _best_neighbours(t: _Tables, u, xv, wa, sc):
    """``iq3_find_best_neighbour`` for G off-grid groups: codes u [G], magnitudes xv [4, G],
    weights wa [4, G], scales sc [G] -> grid index [G] (the first of the smallest errors)."""
    cnt = t.nb_count[u]
    out = np.empty(u.size, np.int32)
    lo = 0
    for hi in _BUCKETS:
        sel = np.nonzero((cnt > lo) & (cnt <= hi))[0]
        lo = hi
        if sel.size == 0:
            continue
        k = min(hi, t.nb.shape[0])
        ub, s = u[sel], sc[sel]
        d2 = None
        for i in range(4):  # [k, g]: neighbours down, groups along (contiguous) rows
            diff = np.take(t.nb_pos[i, :k], ub, axis=1)
            diff *= s
            diff -= xv[i, sel]
            e = wa[i, sel] * diff
            e *= diff
            d2 = e if d2 is None else d2 + e
        out[sel] = np.take_along_axis(
            np.take(t.nb[:k], ub, axis=1), np.argmin(d2, axis=0)[None], 0
        )[0]
    return out


def _codes_u(Lf: np.ndarray) -> np.ndarray:
    """Codes (integral f32) [m, 32] -> the 12-bit code of each group of 4 [m, 8] (exact)."""
    L4 = Lf.reshape(Lf.shape[0], 8, 4)
    u = L4[..., 3] * F32(8)
    u += L4[..., 2]
    u *= F32(8)
    u += L4[..., 1]
    u *= F32(8)
    u += L4[..., 0]
    return u.astype(np.int32)


def _project(t: _Tables, xval, waux, id_, scale, groups=None):
    """Round magnitudes [m, 32] to codes with ``id_`` [m] and snap each group of 4 to the grid
    (nearest neighbour at ``scale`` [m] where off it). Returns (L [m, 32] codes as f32,
    on [m, 8]). ``groups`` [m, 8] limits the snapping to those groups."""
    m = xval.shape[0]
    L = id_[:, None] * xval
    L -= F32(1)
    L *= F32(0.5)
    np.rint(L, out=L)
    np.clip(L, F32(0), F32(7), out=L)
    u = _codes_u(L)
    on = t.kmap[u] >= 0
    fix = ~on if groups is None else (~on & groups)
    r, g = np.nonzero(fix)
    if r.size:
        xv = xval.reshape(m, 8, 4)[r, g].T
        wa = waux.reshape(m, 8, 4)[r, g].T
        gi = _best_neighbours(t, u[r, g], xv, wa, scale[r])
        L.reshape(m, 8, 4)[r, g] = t.codes_f[gi]
    return L, on


def _sums(w, xval, L):
    q = L * F32(2)
    q += F32(1)
    a = w * xval
    a *= q
    q *= w
    q *= L * F32(2) + F32(1)
    return np.cumsum(a, axis=1, dtype=F32)[:, -1], np.cumsum(q, axis=1, dtype=F32)[:, -1]


def _subblocks(name: str, xs: np.ndarray, weight: np.ndarray):
    """The per-32 search. xs, weight [M, 32] -> (scale [M] f32, grid index [M, 8], sign bytes
    [M, 4] (7 bits + parity for IQ3_XXS), nonzero [M] (ggml skipped the sub-block otherwise))."""
    t = tables(name)
    xxs = name == "IQ3_XXS"
    M = xs.shape[0]
    waux = np.sqrt(weight)
    neg = ~(xs >= 0)
    xval = np.where(neg, -xs, xs)
    if xxs:  # an odd number of minus signs: flip the least important value of the 8
        n8 = neg.reshape(M, 4, 8)
        odd = n8.sum(axis=-1) % 2 == 1
        imp = ((weight * xs) * xs).reshape(M, 4, 8)
        flip = (np.arange(8) == np.argmin(imp, axis=-1)[..., None]) & odd[..., None]
        xval = np.where(flip, -xval.reshape(M, 4, 8), xval.reshape(M, 4, 8)).reshape(M, 32)
        n8 = n8 ^ flip
        signs = np.packbits(n8[..., :7], axis=-1, bitorder="little")[..., 0]
    else:
        signs = np.packbits(neg.reshape(M, 4, 8), axis=-1, bitorder="little")[..., 0]
    mx = xval.max(axis=1)
    nz = mx >= F32(1e-8) if xxs else mx != 0
    signs[~nz] = 0  # ggml leaves a skipped sub-block's signs unwritten
    scale_out = np.zeros(M, F32)
    gidx = np.zeros((M, 8), np.int32)
    sel = np.nonzero(nz)[0]
    if sel.size == 0:
        return scale_out, gidx, signs, nz
    xval, w, wa, mxs = xval[sel], weight[sel], waux[sel], mx[sel]
    m = sel.size
    best = np.zeros(m, F32)
    scale = mxs / F32(15)
    L = np.zeros((m, 32), F32)
    on = np.full((m, 8), xxs)
    ntry = 15 if xxs else 9
    with np.errstate(all="ignore"):
        for is_ in range(-ntry, ntry + 1):
            id_ = (F32(15) + F32(is_) * F32(0.2)) / mxs
            this_scale = F32(1) / id_
            Laux, on_aux = _project(t, xval, wa, id_, this_scale)
            sumqx, sumq2 = _sums(w, xval, Laux)
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(take, sumqx / sumq2, scale).astype(F32)
            best = np.where(take, scale * sumqx, best).astype(F32)
            L[take] = Laux[take]
            on[take] = on_aux[take]
        # Groups left off the grid: snap again at the chosen scale, then refit the scale.
        redo = (~on).any(axis=1) & (scale > 0)
        r = np.nonzero(redo)[0]
        if r.size:
            groups = ~on[r] if xxs else np.ones((r.size, 8), bool)
            sc = scale[r]
            L2, _ = _project(t, xval[r], wa[r], F32(1) / sc, sc, groups)
            L[r] = np.where(np.repeat(groups, 4, axis=1), L2, L[r])
            sumqx, sumq2 = _sums(w[r], xval[r], L[r])
            scale[r] = np.where(sumq2 > 0, sumqx / sumq2, sc)
    negs = scale < 0  # never expected (ggml flips the signs too)
    scale = np.abs(scale)
    if negs.any():
        signs[sel[negs]] = ~signs[sel[negs]] & (127 if xxs else 255)
    gidx[sel] = t.kmap[_codes_u(L)]
    scale_out[sel] = scale
    return scale_out, gidx, signs, nz


def _block_weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """ggml's per-value weights: x^2, or with an imatrix qw * sqrt(sigma2 + x^2) where sigma2
    is twice the block's mean square. x, qw [B, 256]."""
    if qw is None:
        return x * x
    sumx2 = np.cumsum(x * x, axis=1, dtype=F32)[:, -1]
    sigma2 = (F32(2) * sumx2) / F32(QK_K)
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _scale_codes(scales: np.ndarray, fudge: float):
    """Block d (f16 bytes) and 4-bit sub-block scales from the sub-block scales [B, 8]."""
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    d = max_scale / F32(31)
    with np.errstate(divide="ignore", invalid="ignore"):
        idv = F32(1) / d
        v = idv[:, None] * scales
        v -= F32(1)
        v *= F32(0.5)
        ls = np.clip(np.rint(v), 0, 15)
    ls = np.where((max_scale > 0)[:, None], ls, 0).astype(np.uint32)
    with np.errstate(over="ignore"):  # inf, as ggml's conversion gives
        dh = np.where(max_scale > 0, d * F32(fudge), F32(0)).astype(np.float16)
    return np.ascontiguousarray(dh).view(np.uint8).reshape(-1, 2), ls, max_scale > 0


def quantize_iq3_xxs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [B, 256] (and imatrix weights qw [B, 256] or None) -> uint8 [B, 98]."""
    B = x.shape[0]
    w = _block_weights(x, qw).reshape(B * 8, 32)
    scales, gidx, signs, _ = _subblocks("IQ3_XXS", x.reshape(B * 8, 32), w)
    dh, ls, live = _scale_codes(scales.reshape(B, 8), 1.0125)
    s = signs.astype(np.uint32).reshape(B, 8, 4) << (7 * np.arange(4, dtype=np.uint32))
    aux = s.sum(axis=-1, dtype=np.uint32) | (ls << 28)
    out = np.concatenate(
        [dh, gidx.astype(np.uint8).reshape(B, 64), aux.astype("<u4").view(np.uint8)], axis=1
    )
    out[~live, 2:] = 0
    return out


def quantize_iq3_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Blocks x [B, 256] (and imatrix weights qw [B, 256] or None) -> uint8 [B, 110]."""
    B = x.shape[0]
    w = _block_weights(x, qw).reshape(B * 8, 32)
    scales, gidx, signs, nz = _subblocks("IQ3_S", x.reshape(B * 8, 32), w)
    dh, ls, _ = _scale_codes(scales.reshape(B, 8), 1.033)
    qs = (gidx & 255).astype(np.uint8).reshape(B, 8, 8)
    sg = signs.reshape(B, 8, 4)
    # ggml advances its qs/signs pointers only past sub-blocks it quantized: an all-zero
    # sub-block's place goes to the next one, and the block's tail stays zero.
    nzb = nz.reshape(B, 8)
    order = np.argsort(~nzb, axis=1, kind="stable")
    keep = np.take_along_axis(nzb, order, axis=1)[..., None]
    qs = np.where(keep, np.take_along_axis(qs, order[..., None], axis=1), 0)
    sg = np.where(keep, np.take_along_axis(sg, order[..., None], axis=1), 0)
    hb = ((gidx >> 8) & 1).astype(np.uint8).reshape(B, 8, 8)
    qh = np.packbits(hb, axis=-1, bitorder="little")[..., 0]
    ls = ls.astype(np.uint8)
    sc = ls[:, 0::2] | (ls[:, 1::2] << 4)
    return np.concatenate([dh, qs.reshape(B, 64), qh, sg.reshape(B, 32), sc], axis=1)
