"""IQ2_XXS / IQ2_XS / IQ2_S / IQ1_S / IQ1_M quantizers, byte-identical with ggml's.

ggml snaps each group of 8 values to a point of an E8-style lattice codebook: it rounds every
value to a level, and when the rounded point is not in the codebook it searches that point's
precomputed neighbours (``iq2xs_init_impl``: the codebook points at the ``nwant`` smallest
squared distances) for the one with the least weighted error. Here the neighbour lists are built
once per type and padded to a rectangle, so every group of every block is searched at once; the
weighted sums keep ggml's element order (sequential f32 adds, ``(w * x) * q`` products) because
a different rounding would pick a different point. ggml's ``nearest_int`` is round-half-even,
equal to ``np.rint`` for the small magnitudes these searches produce.

All of these take whole rows and the importance matrix, as ``ggml_quantize_chunk`` does.
"""

from __future__ import annotations

import functools

import numpy as np

from jllama.quant.iqgrids import grid

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
QK_K = 256


# ----------------------------------------------------------------------------- search tables


@functools.cache
def tables(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(points, kmap, nb_row, neighbours)`` of ``iq2xs_init_impl`` for ggml type ``name``.

    points: ``[n, 8]`` f32 lattice coordinates ``2*l + 1`` of each codebook entry.
    kmap: ``[65536]`` codebook index of the packed levels ``sum(l_i << 2i)``, or -1.
    nb_row: ``[65536]`` row of ``neighbours`` for an off-codebook packed point (-1 if none).
    neighbours: ``[rows, K]`` codebook indices sorted by (distance, index), padded with -1.
    """
    g = grid(name).astype(np.int32)
    if name in ("IQ1_S", "IQ1_M"):
        lv, nwant = g + 1, 3  # -1/0/1 -> levels 0/1/2
    else:
        lv = (g == 0x19) + 2 * (g == 0x2B)  # 0x08/0x19/0x2b -> levels 0/1/2
        nwant = 1 if name == "IQ2_S" else 2
    lv = lv.astype(np.int32)
    packed = (lv << (2 * np.arange(8))).sum(axis=1)
    kmap = np.full(1 << 16, -1, np.int32)
    kmap[packed] = np.arange(len(g), dtype=np.int32)
    # Only levels 0..2 are ever looked up (the searches clamp to kMaxQ - 1 = 2).
    allp = np.array(np.meshgrid(*[np.arange(3)] * 8, indexing="ij")).reshape(8, -1).T[:, ::-1]
    allp = np.ascontiguousarray(allp).astype(np.int32)
    codes = (allp << (2 * np.arange(8))).sum(axis=1)
    off = kmap[codes] < 0
    allp, codes = allp[off], codes[off]
    pos = 2 * lv + 1
    lists = []
    for s in range(0, len(codes), 512):
        p = 2 * allp[s : s + 512] + 1
        d2 = ((pos[None, :, :] - p[:, None, :]) ** 2).sum(axis=2)
        order = np.argsort(d2, axis=1, kind="stable")  # ties by index, as qsort on (d2, j)
        ds = np.take_along_axis(d2, order, axis=1)
        for r in range(len(p)):
            distinct = np.flatnonzero(np.diff(ds[r])) + 1  # where a new distance starts
            end = distinct[nwant - 1] if len(distinct) >= nwant else len(ds[r])
            lists.append(order[r, :end])
    width = max(len(x) for x in lists)
    neighbours = np.full((len(lists), width), -1, np.int32)
    for r, x in enumerate(lists):
        neighbours[r, : len(x)] = x
    nb_row = np.full(1 << 16, -1, np.int32)
    nb_row[codes] = np.arange(len(codes), dtype=np.int32)
    points = pos.astype(F32)
    for a in (points, kmap, nb_row, neighbours):
        a.setflags(write=False)
    return points, kmap, nb_row, neighbours


def _seqsum(a: np.ndarray) -> np.ndarray:
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1]


def _rint(v) -> np.ndarray:
    return np.rint(np.asarray(v, F32)).astype(np.int32)


def _pack_levels(lv: np.ndarray) -> np.ndarray:
    """``[..., 8]`` levels 0..3 -> packed ``sum(l_i << 2i)``."""
    return (lv.astype(np.int32) << (2 * np.arange(8, dtype=np.int32))).sum(axis=-1)


@functools.cache
def _neighbour_levels(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per neighbour-list row: its length, and ``3*i + level`` of coordinate i of each entry
    ``[rows, 8, K]`` (an offset into a group's ``[8, 3]`` table of per-level errors)."""
    points, _, _, neighbours = tables(name)
    lev = ((points[np.maximum(neighbours, 0)] - 1) / 2).astype(np.int32)
    lev = lev + 3 * np.arange(8, dtype=np.int32)
    n = (neighbours >= 0).sum(axis=1)
    return n, np.ascontiguousarray(lev.transpose(0, 2, 1))


def _best_neighbour(name, u, xval, waux, scale, qv=None) -> np.ndarray:
    """iq2_find_best_neighbour (iq1_find_best_neighbour2) for groups of 8 whose packed point
    ``u`` is off the codebook: the neighbour with the least ``sum w*(scale*q - x)^2`` (first
    one on ties), ``q`` the value of each level: 1, 3, 5 or, for IQ1, ``qv`` ``[M, 3]``."""
    _, _, nb_row, neighbours = tables(name)
    lens, lev = _neighbour_levels(name)
    rows = nb_row[u]
    # The error of each coordinate at each of the three levels, f32 as ggml rounds it.
    q = np.array([1, 3, 5], F32) if qv is None else qv[:, None, :]
    diff = scale[:, None, None] * q - xval[:, :, None]  # [M, 8, 3]
    term = (waux[:, :, None] * diff) * diff
    out = np.empty(len(u), np.int32)
    n = lens[rows]
    lo = 0
    for hi in (
        4,
        8,
        12,
        16,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        1 << 30,
    ):  # similar lengths: less padding
        sel = np.flatnonzero((n > lo) & (n <= hi))
        lo = hi
        if not len(sel):
            continue
        r = rows[sel]
        k = min(hi, neighbours.shape[1])
        lv = lev[r, :, :k]  # [S, 8, k]
        t = term[sel].reshape(-1)  # [S * 24]
        base = (np.arange(len(sel), dtype=np.int32) * 24)[:, None]
        d2 = t.take(base + lv[:, 0])
        for i in range(1, 8):  # in order, f32, as ggml's loop (0 + a == a exactly)
            d2 += t.take(base + lv[:, i])
        cand = neighbours[r, :k]
        d2[cand < 0] = np.inf
        out[sel] = np.take_along_axis(cand, np.argmin(d2, axis=1)[:, None], axis=1)[:, 0]
    return out


def _snap(name, lv, xval, waux, scale) -> tuple[np.ndarray, np.ndarray]:
    """Levels ``[M, 8]`` -> (codebook index, on-codebook?) with the neighbour search applied
    where needed (``scale`` per group of 8)."""
    _, kmap, _, _ = tables(name)
    u = _pack_levels(lv)
    gi = kmap[u]
    off = gi < 0
    if off.any():
        gi = gi.copy()
        gi[off] = _best_neighbour(name, u[off], xval[off], waux[off], scale[off])
    return gi, ~off


def _levels_of(name, gi) -> np.ndarray:
    points = tables(name)[0]
    return ((points[gi] - 1) / 2).astype(np.int32)


# ----------------------------------------------------------------------------- common steps


def _weights_and_signs(x: np.ndarray, qw: np.ndarray | None, gs: int, name: str):
    """Per block of 256: the importance of each value, ``|x|`` and the stored signs.

    IQ2_XXS/IQ2_XS: ``weight = qw * sqrt(sigma2 + x^2)``, an even number of sign flips per 8
    (the least important value keeps the wrong sign) and 7 stored sign bits. IQ2_S: sigma2
    doubled, all 8 signs stored, and without an imatrix ``weight = sigma2/4 + x^2``.
    x, qw: ``[B, 256]``; returns weight, waux, xval ``[G, gs]`` and signs ``[G, gs//8]``."""
    b = x.shape[0]
    sumx2 = _seqsum(x * x)
    if name == "IQ2_S":
        sigma2 = (F32(2) * sumx2) / F32(QK_K)
    else:
        sigma2 = sumx2 / F32(QK_K)
    if qw is None:
        weight = F32(0.25) * sigma2[:, None] + x * x
    else:
        weight = qw * np.sqrt(sigma2[:, None] + x * x)
    waux = np.sqrt(weight)
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    neg8 = neg.reshape(b, -1, 8)
    if name == "IQ2_S":
        signs = (neg8.astype(np.int32) << np.arange(8)).sum(axis=-1)
    else:
        w8 = ((weight * x) * x).reshape(b, -1, 8)
        odd = neg8.sum(axis=-1) % 2 == 1
        imin = np.argmin(w8, axis=-1)  # first minimum, as the strict '<' scan
        flip = odd[..., None] & (np.arange(8) == imin[..., None])
        xval = np.where(flip.reshape(b, QK_K), -xval, xval)
        signs = ((neg8 ^ flip).astype(np.int32) << np.arange(8)).sum(axis=-1) & 127
    n = b * QK_K // gs
    return (
        weight.reshape(n, gs),
        waux.reshape(n, gs),
        xval.reshape(n, gs),
        signs.reshape(n, gs // 8),
    )


def _sums(weight, xval, lv) -> tuple[np.ndarray, np.ndarray]:
    q = (2 * lv + 1).astype(F32)
    return _seqsum((weight * xval) * q), _seqsum((weight * q) * q)


def _trial_levels(name, xval, waux, id_, this_scale):
    """One scale trial: levels ``nearest((id*x - 1)/2)`` clamped to 0..2, snapped to the
    codebook. Returns levels ``[G, gs]`` and per-8 on-codebook flags ``[G, gs//8]``."""
    n, gs = xval.shape
    lv = np.clip(_rint(F32(0.5) * (id_[:, None] * xval - F32(1))), 0, 2)
    lv8 = lv.reshape(-1, 8)
    rep = np.repeat(this_scale, gs // 8)
    gi, on = _snap(name, lv8, xval.reshape(-1, 8), waux.reshape(-1, 8), rep)
    return _levels_of(name, gi).reshape(n, gs), on.reshape(n, gs // 8)


def make_qp_quants(nmax: int, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ggml's make_qp_quants over rows ``[G, n]``: the scale only. Its levels live in a uint8
    array, so a negative level (x may hold one negated value per 8) reads back wrapped; that
    is reproduced because it changes the search."""
    g, n = x.shape
    mx = np.maximum.accumulate(np.maximum(x, F32(0)), axis=1)[:, -1]
    zero = mx < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    nm = F32(nmax)
    iscale = nm / mxs
    L = _rint(iscale[:, None] * x) & 255
    scale = F32(1) / iscale
    diff = x - scale[:, None] * L.astype(F32)
    best = _seqsum((w * diff) * diff)
    for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (F32(0.1) * F32(is_) + nm) / mxs
        sc = F32(1) / isc
        lv = np.minimum(nmax, _rint(isc[:, None] * x)).astype(F32)
        diff = x - sc[:, None] * lv
        mse = _seqsum((w * diff) * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, isc, iscale)
    lint = np.minimum(nmax, _rint(iscale[:, None] * x))
    lf = lint.astype(F32)
    sumlx = _seqsum((w * x) * lf)
    suml2 = _seqsum((w * lf) * lf)
    L = lint & 255
    active = np.ones(g, bool)
    for _ in range(5):
        changed = np.zeros(g, bool)
        for i in range(n):
            wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
            slx = sumlx - (wi * xi) * li
            sl2 = suml2 - (wi * li) * li
            ok = active & (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                q = np.where(ok, (xi * sl2) / np.where(ok, slx, F32(1)), F32(0))
            nl = np.minimum(nmax, _rint(q))
            ok &= nl != L[:, i]
            nlf = nl.astype(F32)
            slx2 = slx + (wi * xi) * nlf
            sl22 = sl2 + (wi * nlf) * nlf
            ok &= (slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22
            L[:, i] = np.where(ok, nl & 255, L[:, i])
            sumlx = np.where(ok, slx2, sumlx)
            suml2 = np.where(ok, sl22, suml2)
            changed |= ok
        active &= changed
        if not active.any():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, F32(0), out)


def _block_scales(scales: np.ndarray, shrink: float = 1.0):
    """Sub-block scales ``[B, nsub]`` -> (f16 d bytes ``[B, 2]``, 4-bit codes ``[B, nsub]``,
    all-zero blocks). IQ2_S stores ``d * 0.9875`` but codes the scales against ``d``."""
    max_scale = np.maximum.accumulate(scales, axis=1)[:, -1]
    zero = ~(max_scale != 0)
    d = max_scale / F32(31)
    with np.errstate(divide="ignore"):
        id_ = np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), d))
    codes = np.clip(_rint(F32(0.5) * (id_[:, None] * scales - F32(1))), 0, 15)
    d16 = np.where(zero, F32(0), d * F32(shrink) if shrink != 1.0 else d).astype(np.float16)
    return np.ascontiguousarray(d16).view(np.uint8).reshape(-1, 2), codes, zero


# ----------------------------------------------------------------------------- IQ2_XXS, IQ2_XS


def _iq2_x(name: str, x: np.ndarray, qw: np.ndarray | None):
    """quantize_row_iq2_{xxs (gs=32), xs, s (gs=16)}_impl over blocks ``[B, 256]``."""
    xxs = name == "IQ2_XXS"
    gs = 32 if xxs else 16
    kmaxq = 3
    weight, waux, xval, signs = _weights_and_signs(x, qw, gs, name)
    n = xval.shape[0]
    mx = np.maximum.accumulate(xval, axis=1)[:, -1]
    live = ~(mx < (F32(1e-8) if name == "IQ2_S" else GROUP_MAX_EPS))
    if xxs:
        scale = make_qp_quants(kmaxq + 1, xval, weight)
        eff_max = scale * F32(kmaxq)
        live &= ~(eff_max <= 0)
        denom, trials = eff_max, range(-6, 7)
    else:
        scale = mx / F32(2 * kmaxq - 1)
        denom, trials = mx, range(-9, 10)
    denom = np.where(live, denom, F32(1))
    best = np.zeros(n, F32)
    L = np.zeros((n, gs), np.int32)
    on_grid = np.ones((n, gs // 8), bool)
    for is_ in trials:
        id_ = (F32(2 * kmaxq - 1) + F32(is_) * F32(0.1)) / denom
        this_scale = F32(1) / id_
        la, on = _trial_levels(name, xval, waux, id_, this_scale)
        sumqx, sumq2 = _sums(weight, xval, la)
        take = live & (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = sumqx / sumq2
        scale = np.where(take, sc, scale)
        best = np.where(take, sc * sumqx, best)
        L = np.where(take[:, None], la, L)
        on_grid = np.where(take[:, None], on, on_grid)
    # Requantize at the chosen scale (IQ2_XS: only the groups of 8 that were off the codebook).
    redo = live & (scale > 0)
    if not xxs:
        redo &= ~on_grid.all(axis=1)
    if redo.any():
        s = scale[redo]
        xv, wa = xval[redo], waux[redo]
        lv = np.clip(_rint(F32(0.5) * ((F32(1) / s)[:, None] * xv - F32(1))), 0, 2)
        gi, _ = _snap(name, lv.reshape(-1, 8), xv.reshape(-1, 8), wa.reshape(-1, 8),
                      np.repeat(s, gs // 8))  # fmt: skip
        new = _levels_of(name, gi).reshape(-1, gs)
        if not xxs:  # groups already on the codebook keep their trial levels
            keep = np.repeat(on_grid[redo], 8, axis=1)
            new = np.where(keep, L[redo], new)
        L[redo] = new
        sumqx, sumq2 = _sums(weight[redo], xv, new)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale[redo] = np.where(sumq2 > 0, sumqx / sumq2, s)
    negs = scale < 0
    scale = np.where(negs, -scale, scale)
    signs = np.where(negs[:, None], (~signs) & (255 if name == "IQ2_S" else 127), signs)
    scale = np.where(live, scale, F32(0))
    gi = tables(name)[1][_pack_levels(L.reshape(-1, 8))].reshape(n, gs // 8)
    if (gi[live] < 0).any():
        raise AssertionError(f"{name}: a level pattern fell off the codebook")
    gi = np.where(live[:, None], gi, 0)
    signs = np.where(live[:, None], signs, 0)
    return scale, gi, signs


def _iq2_xxs_blocks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    b = x.shape[0]
    scale, gi, signs = _iq2_x("IQ2_XXS", x, w)
    d, codes, zero = _block_scales(scale.reshape(b, 8))
    lo = gi.reshape(b, 8, 4).astype(np.uint32)
    words0 = lo[..., 0] | (lo[..., 1] << 8) | (lo[..., 2] << 16) | (lo[..., 3] << 24)
    sg = signs.reshape(b, 8, 4).astype(np.uint32)
    words1 = sg[..., 0] | (sg[..., 1] << 7) | (sg[..., 2] << 14) | (sg[..., 3] << 21)
    words1 = words1 | (codes.astype(np.uint32) << 28)
    words1 = np.where(zero[:, None], 0, words1)
    words0 = np.where(zero[:, None], 0, words0)
    qs = np.stack([words0, words1], axis=-1).astype("<u4").view(np.uint8).reshape(b, 64)
    return np.concatenate([d, qs], axis=1)


def _iq2_xs_blocks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    b = x.shape[0]
    scale, gi, signs = _iq2_x("IQ2_XS", x, w)
    d, codes, zero = _block_scales(scale.reshape(b, 16))
    q2 = (gi | (signs << 9)).reshape(b, 32).astype("<u2")
    q2 = np.where(zero[:, None], 0, q2).astype("<u2")
    sc = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    sc = np.where(zero[:, None], 0, sc).astype(np.uint8)
    return np.concatenate([d, q2.view(np.uint8).reshape(b, 64), sc], axis=1)


def _iq2_s_blocks(x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    b = x.shape[0]
    scale, gi, signs = _iq2_x("IQ2_S", x, w)
    d, codes, zero = _block_scales(scale.reshape(b, 16), 0.9875)
    gi = gi.reshape(b, 32)
    qs = (gi & 255).astype(np.uint8)
    hi = (gi >> 8).reshape(b, 8, 4) << (2 * np.arange(4))
    qh = hi.sum(axis=-1).astype(np.uint8)
    sg = signs.reshape(b, 32).astype(np.uint8)
    sc = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    sc = np.where(zero[:, None], 0, sc).astype(np.uint8)
    return np.concatenate([d, qs, sg, qh, sc], axis=1)


# ----------------------------------------------------------------------------- IQ1_S, IQ1_M

_X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], F32)  # levels shifted by +IQ1S_DELTA
_X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], F32)  # ... and by -IQ1S_DELTA


def _sequential_best(sqx: np.ndarray, sq2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's scan ``if (sq2 > 0 && sqx*sqx > best*sq2) {scale = sqx/sq2; best = scale*sqx}``
    over candidates ``[G, C]`` in order -> (winner or -1, its scale).

    Only candidates whose score sqx^2/sq2 is within 1e-3 of the group's maximum can be the
    last one taken, and the first of those is taken whatever came before (best is then far
    below), so the scan runs over those alone: the same winner, without a 1000-step loop."""
    g = sqx.shape[0]
    with np.errstate(all="ignore"):
        key = np.where(sq2 > 0, (sqx * sqx) / sq2, -np.inf)
    top = key.max(axis=1, keepdims=True)
    near = (sq2 > 0) & (key >= top - np.abs(top) * F32(1e-3))
    cnt = near.sum(axis=1)
    k = int(cnt.max()) if g else 0
    order = np.argsort(~near, axis=1, kind="stable")[:, :k]
    best = np.full(g, -np.finfo(F32).max, F32)
    scale = np.zeros(g, F32)
    win = np.full(g, -1, np.int64)
    rows = np.arange(g)
    for j in range(k):
        c = order[:, j]
        qx, q2 = sqx[rows, c], sq2[rows, c]
        with np.errstate(all="ignore"):
            take = (j < cnt) & (q2 > 0) & (qx * qx > best * q2)
            sc = qx / q2
            scale = np.where(take, sc, scale)
            best = np.where(take, sc * qx, best)
        win = np.where(take, c, win)
    return win, scale


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    i1, i2 = np.triu_indices(n + 1)  # row-major: for i1, for i2 >= i1, as ggml's loops
    return i1, i2


def _split_levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Levels 0/1/2 of each value from its rank in ascending order and the two split points."""
    g, n = order.shape
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[None, :], axis=1)
    return (rank >= i1[:, None]).astype(np.int32) + (rank >= i2[:, None])


def _snap_iq1(lv, x, w, scale, xx):
    """Levels ``[G, n]`` -> codebook indices ``[G, n/8]`` and any-off-codebook per group,
    searching neighbours with level values ``xx`` ``[G, n//8, 3]`` (x_p or x_m)."""
    g, n = lv.shape
    _, kmap, _, _ = tables("IQ1_S")
    u = _pack_levels(lv.reshape(-1, 8))
    gi = kmap[u]
    off = gi < 0
    if off.any():
        sc = np.repeat(scale, n // 8)[off]
        gi = gi.copy()
        gi[off] = _best_neighbour(
            "IQ1_S", u[off], x.reshape(-1, 8)[off], w.reshape(-1, 8)[off], sc,
            xx.reshape(-1, 3)[off],
        )  # fmt: skip
    return gi.reshape(g, n // 8), off.reshape(g, n // 8).any(axis=1)


def _refit(gi, x, w, xx, scale, redo):
    """After a neighbour search: ``scale = sum(w q x) / sum(w q q)`` when both are positive."""
    if not redo.any():
        return scale
    g, n = x.shape
    points = tables("IQ1_S")[0]
    lv = ((points[gi[redo]] - 1) / 2).astype(np.int32).reshape(-1, n // 8, 8)
    q = np.take_along_axis(xx[redo], lv, axis=2).reshape(-1, n)
    wr = w[redo]
    sqx = _seqsum((wr * q) * x[redo])
    sq2 = _seqsum((wr * q) * q)
    ok = (sqx > 0) & (sq2 > 0)
    with np.errstate(all="ignore"):
        scale = scale.copy()
        scale[redo] = np.where(ok, sqx / sq2, scale[redo])
    return scale


def _iq1_weights(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    sigma2 = (F32(2) * _seqsum(x * x)) / F32(QK_K)
    if qw is None:  # IQ1_M only (IQ1_S requires an imatrix)
        return x * x
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _iq1_s_blocks(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_row_iq1_s_impl over blocks ``[B, 256]``."""
    b, bs = x.shape[0], 32
    w = _iq1_weights(x, qw).reshape(-1, bs)
    xg = x.reshape(-1, bs)
    g = xg.shape[0]
    live = ~(np.maximum.accumulate(np.abs(xg), axis=1)[:, -1] < F32(1e-12))
    order = np.argsort(xg, axis=1, kind="stable")  # glibc's qsort here is a stable merge sort
    ws = np.take_along_axis(w, order, axis=1)
    xs = np.take_along_axis(xg, order, axis=1)
    z = np.zeros((g, 1), F32)
    sumx = np.concatenate([z, np.cumsum(ws * xs, axis=1, dtype=F32)], axis=1)
    sumw = np.concatenate([z, np.cumsum(ws, axis=1, dtype=F32)], axis=1)
    i1, i2 = _pairs(bs)
    a, bb, c = sumx[:, i1], sumx[:, i2] - sumx[:, i1], sumx[:, bs : bs + 1] - sumx[:, i2]
    wa, wb, wc = sumw[:, i1], sumw[:, i2] - sumw[:, i1], sumw[:, bs : bs + 1] - sumw[:, i2]
    cands = []
    for v in (_X_P, _X_M):
        sqx = (a * v[0] + bb * v[1]) + c * v[2]
        sq2 = ((wa * v[0]) * v[0] + (wb * v[1]) * v[1]) + (wc * v[2]) * v[2]
        cands.append((sqx, sq2))
    sqx = np.stack([cands[0][0], cands[1][0]], axis=2).reshape(g, -1)  # pair-major, + then -
    sq2 = np.stack([cands[0][1], cands[1][1]], axis=2).reshape(g, -1)
    win, scale = _sequential_best(sqx, sq2)
    live &= win >= 0
    p = np.maximum(win, 0) // 2
    shift = np.where(win % 2 == 0, 1, -1)
    lv = _split_levels(order, i1[p], i2[p])
    neg = scale < 0
    lv = np.where(neg[:, None], 2 - lv, lv)
    scale = np.where(neg, -scale, scale)
    shift = np.where(neg, -shift, shift)
    xx = np.where((shift == 1)[:, None, None], _X_P, _X_M)
    xx = np.broadcast_to(xx, (g, bs // 8, 3))
    gi, redo = _snap_iq1(lv, xg, w, scale, xx)
    scale = _refit(gi, xg, w, xx, scale, redo & live)
    scale = np.where(live, scale, F32(0))
    shift = np.where(live, shift, 1)
    gi = np.where(live[:, None], gi, 0)
    # block scale: d = max/15, stored as d * 1.125; 3-bit sub-scales + the shift sign bit
    scale, shift, gi = scale.reshape(b, 8), shift.reshape(b, 8), gi.reshape(b, 8, 4)
    max_scale = np.maximum.accumulate(scale, axis=1)[:, -1]
    zero = ~(max_scale != 0)
    d = max_scale / F32(15)
    with np.errstate(divide="ignore"):
        id_ = np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), d))
    lsc = np.clip(_rint(F32(0.5) * (id_[:, None] * scale - F32(1))), 0, 7)
    lsc = np.where(shift == -1, lsc | 8, lsc)
    qh = ((gi >> 8) << (3 * np.arange(4))).sum(axis=-1)
    qh = np.where(zero[:, None], qh, qh | (lsc << 12)).astype("<u2")
    d16 = np.where(zero, F32(0), d * F32(1.125)).astype(np.float16)
    return np.concatenate(
        [
            np.ascontiguousarray(d16).view(np.uint8).reshape(b, 2),
            (gi & 255).astype(np.uint8).reshape(b, 32),
            qh.view(np.uint8).reshape(b, 16),
        ],
        axis=1,
    )


def _iq1_m_blocks(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_iq1_m_impl over blocks ``[B, 256]``."""
    b, bs = x.shape[0], 16
    w = _iq1_weights(x, qw).reshape(-1, bs)
    xg = x.reshape(-1, bs)
    g = xg.shape[0]
    live = ~(np.maximum.accumulate(np.abs(xg), axis=1)[:, -1] < F32(1e-7))
    order = np.argsort(xg, axis=1, kind="stable")
    ws = np.take_along_axis(w, order, axis=1)
    xs = np.take_along_axis(xg, order, axis=1)
    half = order >= bs // 2
    z = np.zeros((g, 1), F32)
    px, pw = [], []
    for h in (False, True):  # prefix sums per half: each half of 8 has its own shift sign
        m = half == h
        px.append(np.concatenate([z, np.cumsum(np.where(m, ws * xs, 0), 1, dtype=F32)], 1))
        pw.append(np.concatenate([z, np.cumsum(np.where(m, ws, 0), 1, dtype=F32)], 1))
    i1, i2 = _pairs(bs)
    p2, m2 = _X_P[2], _X_M[2]
    cp1, cp2 = _X_P[0] * _X_P[0] - _X_P[1] * _X_P[1], _X_P[1] * _X_P[1] - _X_P[2] * _X_P[2]
    cm1, cm2 = _X_M[0] * _X_M[0] - _X_M[1] * _X_M[1], _X_M[1] * _X_M[1] - _X_M[2] * _X_M[2]
    qxp, qxm, q2p, q2m = [], [], [], []
    for h in range(2):
        txs, tws = px[h][:, bs : bs + 1], pw[h][:, bs : bs + 1]
        sx = px[h][:, i1] + px[h][:, i2]
        qxp.append(txs * p2 - sx)
        qxm.append(txs * m2 - sx)
        q2p.append(((tws * p2) * p2 + pw[h][:, i1] * cp1) + pw[h][:, i2] * cp2)
        q2m.append(((tws * m2) * m2 + pw[h][:, i1] * cm1) + pw[h][:, i2] * cm2)
    sqx = np.stack([qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]], 2)
    sq2 = np.stack([q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]], 2)
    win, scale = _sequential_best(sqx.reshape(g, -1), sq2.reshape(g, -1))
    live &= win >= 0
    p = np.maximum(win, 0) // 4
    kk = np.maximum(win, 0) % 4
    lv = _split_levels(order, i1[p], i2[p])
    neg = scale < 0
    lv = np.where(neg[:, None], 2 - lv, lv)
    scale = np.where(neg, -scale, scale)
    kk = np.where(neg, 3 - kk, kk)
    kk = np.where(live, kk, 0)
    first_p, second_p = kk < 2, kk % 2 == 0
    xx = np.stack(
        [np.where(first_p[:, None], _X_P, _X_M), np.where(second_p[:, None], _X_P, _X_M)], 1
    )  # [G, 2, 3]
    gi, redo = _snap_iq1(lv, xg, w, scale, xx)
    scale = _refit(gi, xg, w, xx, scale, redo & live)
    scale = np.where(live, scale, F32(0))
    gi = np.where(live[:, None], gi, 0)
    # block: 3-bit sub-scales against max/15, then d refit over the whole block
    scale, kk, gi = scale.reshape(b, 16), kk.reshape(b, 16), gi.reshape(b, 16, 2)
    max_scale = np.maximum.accumulate(scale, axis=1)[:, -1]
    zero = ~(max_scale != 0)
    d = max_scale / F32(15)
    with np.errstate(divide="ignore"):
        id_ = np.where(zero, F32(0), F32(1) / np.where(zero, F32(1), d))
    lsc = np.clip(_rint(F32(0.5) * (id_[:, None] * scale - F32(1))), 0, 7)
    points = tables("IQ1_S")[0]
    lvl = ((points[gi] - 1) / 2).astype(np.int32)  # [b, 16, 2, 8]
    q = np.take_along_axis(xx.reshape(b, 16, 2, 3), lvl, axis=3)
    q = q * (2 * lsc + 1).astype(F32)[:, :, None, None]
    wb, xb = w.reshape(b, 16, 2, 8), x.reshape(b, 16, 2, 8)
    sqx = _seqsum(((wb * q) * xb).reshape(b, QK_K))
    sq2 = _seqsum(((wb * q) * q).reshape(b, QK_K))
    with np.errstate(all="ignore"):
        d = np.where(sq2 > 0, sqx / sq2, d).astype(F32)
    dbits = np.ascontiguousarray((d * F32(1.1125)).astype(np.float16)).view(np.uint16)
    dbits = dbits.astype(np.int32)
    sc = (lsc.reshape(b, 4, 4) << (3 * np.arange(4))).sum(axis=-1)
    sc = sc | (((dbits[:, None] >> (4 * np.arange(4))) & 0xF) << 12)
    sc = np.where(zero[:, None], 0, sc).astype("<u2")
    masks = np.array([0x00, 0x80, 0x08, 0x88], np.int32)
    qh = (gi[..., 0] >> 8) | ((gi[..., 1] >> 8) << 4)
    qh = np.where(zero[:, None], qh, qh | masks[kk])
    return np.concatenate(
        [
            (gi & 255).astype(np.uint8).reshape(b, 32),
            qh.astype(np.uint8),
            sc.view(np.uint8).reshape(b, 8),
        ],
        axis=1,
    )


def _per_row(blocks_fn, rows: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Rows ``[R, n]`` and column weights ``[n]`` -> blocks of 256 with their weights, run in
    chunks that keep the search's temporaries small (a few MiB)."""
    r, ncol = rows.shape
    x = rows.reshape(-1, QK_K)
    w = None
    if qw is not None:
        w = np.broadcast_to(qw.reshape(1, -1, QK_K), (r, ncol // QK_K, QK_K)).reshape(-1, QK_K)
    out = [
        blocks_fn(x[s : s + 256], None if w is None else w[s : s + 256])
        for s in range(0, x.shape[0], 256)
    ]
    return np.concatenate(out).reshape(r, -1)


def quantize_iq2_xxs(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """ggml's quantize_iq2_xxs (imatrix required): ``[R, n]`` -> ``[R, n/256*66]``."""
    return _per_row(_iq2_xxs_blocks, rows, qw)


def quantize_iq2_xs(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """ggml's quantize_iq2_xs (imatrix required): ``[R, n]`` -> ``[R, n/256*74]``."""
    return _per_row(_iq2_xs_blocks, rows, qw)


def quantize_iq2_s(rows: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """ggml's quantize_iq2_s (imatrix optional): ``[R, n]`` -> ``[R, n/256*82]``."""
    return _per_row(_iq2_s_blocks, rows, qw)


def quantize_iq2_s_rows(blocks: np.ndarray) -> np.ndarray:
    """Unweighted IQ2_S over blocks ``[B, 256]`` (the QUANTIZERS form: quantize_row_iq2_s_ref)."""
    return _iq2_s_blocks(blocks, None)


def quantize_iq1_s(rows: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """ggml's quantize_iq1_s (imatrix required): ``[R, n]`` -> ``[R, n/256*50]``."""
    return _per_row(_iq1_s_blocks, rows, qw)


def quantize_iq1_m(rows: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """ggml's quantize_iq1_m (imatrix optional): ``[R, n]`` -> ``[R, n/256*56]``."""
    return _per_row(_iq1_m_blocks, rows, qw)


def quantize_iq1_m_rows(blocks: np.ndarray) -> np.ndarray:
    """Unweighted IQ1_M over blocks ``[B, 256]`` (the QUANTIZERS form)."""
    return _iq1_m_blocks(blocks, None)
