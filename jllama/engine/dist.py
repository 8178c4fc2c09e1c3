"""llama.cpp's sampler chain from top-k on, and its seeded final draw, run on the host.

With a fixed seed llama.cpp's sampled tokens are a function of its candidate list and of one
``std::mt19937`` per sampler (src/llama-sampler.cpp): ``dist`` draws a
``std::uniform_real_distribution<double>`` (libstdc++'s generate_canonical: two 32-bit words,
``(w1 + w2 * 2^32) / 2^64``), turns the final candidates' logits into ``expf(logit - max)``,
sums them in double in the candidates' ORDER and picks the first whose running sum reaches
``sum * u``. The order is whatever the stages left: descending logit after top-k (or after a
stage that sorts: top-p, XTC, dynamic temperature), token order when nothing sorted (top-k off
and top-p off: min-p filters in place), typical-p's own order when it ran last among the
sorting stages. Reproducing a draw therefore needs the final candidates in that order, which
this module rebuilds with llama.cpp's stages on numpy float32 (their float sums sequential, as
the C loops add), then draws with an MT19937 that lives as long as the request: llama-server
builds a request's samplers when the request starts (common_sampler_init with its ``seed``), so
each request starts its generator afresh; a seed of ``LLAMA_DEFAULT_SEED`` (0xFFFFFFFF, -1 in
JSON) means a random one. XTC has its own generator, seeded the same way.

The logit bias, the repetition penalties, DRY and top-n-sigma come before top-k and stay on the
device (``sampling.chain_input``); the host starts from their [V] row. Ties between equal
logits are ordered by token id here; llama.cpp's partial sort leaves their order unspecified
(a draw can differ only when its target falls inside such a tie).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import dataclass

import numpy as np

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed


def resolve_seed(seed: int | None) -> int:
    """A request's seed as llama.cpp's get_rng_seed takes it (uint32; unset / -1 / 0xFFFFFFFF:
    a random one)."""
    if seed is None or int(seed) % 2**32 == DEFAULT_SEED:
        return int.from_bytes(os.urandom(4), "little")
    return int(seed) % 2**32


class MT19937:
    """``std::mt19937`` seeded with one 32-bit value (init_genrand), as the C++ library runs it."""

    def __init__(self, seed: int):
        mt = [int(seed) & 0xFFFFFFFF]
        for i in range(1, 624):
            prev = mt[-1]
            mt.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
        self.mt = mt
        self.i = 624

    def _twist(self) -> None:
        mt = self.mt
        for k in range(624):
            y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
            mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        self.i = 0

    def next_u32(self) -> int:
        if self.i >= 624:
            self._twist()
        y = self.mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def uniform_double(self) -> float:
        """``std::uniform_real_distribution<double>(0, 1)``: two words, the first the low one."""
        lo = self.next_u32()
        hi = self.next_u32()
        u = (float(lo) + float(hi) * 4294967296.0) / 18446744073709551616.0
        return u if u < 1.0 else math.nextafter(1.0, 0.0)

    def uniform_float(self) -> np.float32:
        """``std::uniform_real_distribution<float>(0, 1)``: one word, rounded to float first."""
        u = np.float32(self.next_u32()) / np.float32(4294967296.0)
        return u if u < 1 else np.nextafter(np.float32(1), np.float32(0))


_F = np.float32


def _libm_expf():
    try:
        f = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").expf
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return f


_C_EXPF = _libm_expf()
C_EXPF_MAX = 1024  # candidate lists up to this long go through the C library's own expf


def _expf(x: np.ndarray) -> np.ndarray:
    """expf over float32 values. The C library's expf itself for short lists (its last bit
    is what llama.cpp's reported probabilities carry); longer ones, the double exponential
    rounded once (equal but in a rare last bit, which moves a draw only if its target falls
    within that bit of a boundary)."""
    if _C_EXPF is not None and x.size <= C_EXPF_MAX:
        return np.array([_C_EXPF(v) for v in x.tolist()], _F)
    with np.errstate(under="ignore"):
        return np.exp(x.astype(np.float64)).astype(_F)


def _fsum(x: np.ndarray) -> np.float32:
    """A float accumulator's sum, element after element (as the C loops add)."""
    return np.cumsum(x, dtype=_F)[-1] if x.size else _F(0)


@dataclass
class Cands:
    """llama_token_data_array: ids and logits in the stages' order, and its ``sorted`` flag."""

    ids: np.ndarray
    logit: np.ndarray
    sorted: bool = False

    def take(self, order: np.ndarray, sorted_: bool) -> Cands:
        return Cands(self.ids[order], self.logit[order], sorted_)

    def sort(self) -> Cands:
        """Descending logit (ties by token id)."""
        return self.take(np.lexsort((self.ids, -self.logit)), True)

    def softmax(self) -> np.ndarray:
        """llama_sampler_softmax_impl's probabilities in the current order (float: its sum runs
        in that order)."""
        mx = self.logit[0] if self.sorted else self.logit.max()
        e = _expf(self.logit - mx)
        return e / _fsum(e)


def top_k(c: Cands, k: int) -> Cands:
    if k <= 0:
        return c
    k = min(k, c.ids.size)
    if c.sorted:
        return Cands(c.ids[:k], c.logit[:k], True)
    if k < c.ids.size:
        part = np.argpartition(-c.logit, k - 1)[:k]
        c = c.take(part, False)
    return c.sort()


def typical(c: Cands, p: float, min_keep: int) -> Cands:
    if p >= 1.0:
        return c
    if not c.sorted:
        c = c.sort()
    prob = c.softmax()
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(prob)
        ent = _fsum(-prob * logp)
        shifted = np.abs(-logp - ent)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(prob[order], dtype=_F)
    i = np.arange(order.size)
    hit = np.nonzero((cum > _F(p)) & ((min_keep == 0) | (i >= min_keep - 1)))[0]
    last = int(hit[0]) + 1 if hit.size else order.size
    return c.take(order[:last], False)


def top_p(c: Cands, p: float, min_keep: int) -> Cands:
    if p >= 1.0:
        return c
    prob = c.softmax()
    n = c.ids.size
    if c.sorted:
        order = np.arange(n)
    else:
        # as llama.cpp: the best 256 sorted first, the whole list only if they do not reach p
        k = min(256, n)
        order = np.argpartition(-c.logit, k - 1)[:k] if k < n else np.arange(n)
        order = order[np.lexsort((c.ids[order], -c.logit[order]))]
    while True:
        cum = np.cumsum(prob[order], dtype=_F)
        i = np.arange(cum.size)
        hit = np.nonzero((cum >= _F(p)) & (i + 1 >= min_keep))[0]
        if hit.size or order.size == n:
            break
        order = np.lexsort((c.ids, -c.logit))
    last = int(hit[0]) + 1 if hit.size else n
    return c.take(order[:last], True)


def min_p(c: Cands, p: float, min_keep: int) -> Cands:
    if p <= 0.0 or not c.ids.size:
        return c
    logp = np.log(_F(p))
    if not c.sorted:
        keep = c.logit >= c.logit.max() + logp
        n = int(keep.sum())
        if n and n >= min_keep:
            return c.take(np.nonzero(keep)[0], False)
        c = c.sort()
    floor = c.logit[0] + logp
    i = np.arange(c.ids.size)
    stop = np.nonzero((c.logit < floor) & (i >= min_keep) & (i >= 1))[0]
    n = int(stop[0]) if stop.size else c.ids.size
    return Cands(c.ids[:n], c.logit[:n], True)


def xtc(c: Cands, prob: float, threshold: float, min_keep: int, rng: MT19937) -> Cands:
    if prob <= 0.0 or threshold > 0.5 or c.ids.size < 2:
        return c
    if rng.uniform_float() > _F(prob):
        return c
    c = c.sort() if not c.sorted else c
    p = c.softmax()
    lead = np.nonzero(p < _F(threshold))[0]
    pos_last = (int(lead[0]) if lead.size else p.size) - 1
    pos_last = max(pos_last, 0)
    if c.ids.size - pos_last >= min_keep and pos_last > 0:
        return Cands(c.ids[pos_last:], c.logit[pos_last:], True)
    return c


def _temp(c: Cands, t: float) -> Cands:
    if not c.ids.size:
        return c
    if t <= 0.0:
        # the first maximum keeps its logit, every other candidate becomes -inf (none dropped)
        best = int(np.argmax(c.logit))
        lg = np.full_like(c.logit, -np.inf)
        lg[best] = c.logit[best]
        return Cands(c.ids, lg, c.sorted)
    return Cands(c.ids, c.logit / _F(t), c.sorted)


def temperature(c: Cands, temp: float, delta: float, exponent: float) -> Cands:
    if delta <= 0.0:
        return _temp(c, temp)
    if c.ids.size <= 1:
        return c
    lo = max(_F(0.0), _F(temp) - _F(delta))
    hi = _F(temp) + _F(delta)
    max_ent = -np.log(_F(1.0) / _F(c.ids.size))
    c = c.sort() if not c.sorted else c
    p = c.softmax()
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -_fsum(np.where(p > 0, p * np.log(np.where(p > 0, p, _F(1))), _F(0)))
    norm = ent / max_ent
    dyn = lo + (hi - lo) * np.power(norm, _F(exponent))
    return _temp(c, float(dyn))


def draw(c: Cands, rng: MT19937) -> tuple[int, np.ndarray]:
    """llama_sampler_dist_apply: the index of the drawn candidate (-1 when there is none) and
    the candidates' probabilities as it leaves them (float, normalised by the double sum)."""
    n = c.ids.size
    if n == 0:
        return -1, np.zeros(0, _F)
    u = rng.uniform_double()  # drawn even for one candidate (the C code keeps it aligned)
    if n == 1:
        return 0, np.ones(1, _F)
    mx = c.logit[0] if c.sorted else c.logit.max()
    e = _expf(c.logit - mx).astype(np.float64)
    run = np.cumsum(e)
    hit = np.nonzero(run >= run[-1] * u)[0]
    p = (e / run[-1]).astype(_F)
    return (int(hit[0]) if hit.size else n - 1), p


def discrete(p: np.ndarray, rng: MT19937) -> int:
    """``std::discrete_distribution<int>`` over float weights (llama_sample_dist, mirostat's
    draw): libstdc++ normalises by their double sum, takes the partial sums with the last set
    to one, and finds the first at or above one canonical double; under two weights it returns
    0 without drawing."""
    if p.size < 2:
        return 0
    w = p.astype(np.float64)
    cp = np.cumsum(w / np.cumsum(w)[-1])
    cp[-1] = 1.0
    u = rng.uniform_double()
    return min(int(np.searchsorted(cp[:-1], u, side="left")), p.size - 1)


def _int_k(k: np.float32) -> int:
    """max(int(k), 1) as x86 converts a float: NaN or out of range gives INT_MIN."""
    if not np.isfinite(k) or not -(2.0**31) < float(k) < 2.0**31:
        return 1
    return max(int(k), 1)


class Mirostat:
    """llama_sampler_mirostat(_v2) after llama_sampler_temp, on the logit-biased row: its
    truncation follows ``mu``, which every draw moves; its own generator draws through
    ``discrete``."""

    def __init__(self, params, seed: int, n_vocab: int | None = None):
        self.p = params
        self.mu = _F(2.0) * _F(params.mirostat_tau)
        self.rng = MT19937(seed)
        self.n_vocab = n_vocab

    def step(self, row: np.ndarray) -> tuple[Cands, np.ndarray, int]:
        p = self.p
        c = _temp(Cands(np.arange(row.size), np.asarray(row, _F), False), p.temperature)
        c = c.sort()
        with np.errstate(all="ignore"):
            prob = c.softmax()
            if p.mirostat == 1:
                m = min(MIROSTAT_M - 1, c.ids.size - 1)
                i = np.arange(m, dtype=_F)
                t = np.log((i + _F(2)) / (i + _F(1)))
                b = np.log(prob[:m] / prob[1 : m + 1])
                s_hat = _fsum(t * b) / _fsum(t * t)
                eps = s_hat - _F(1)
                nv = _F(self.n_vocab or row.size)
                k = np.power((eps * np.power(_F(2), self.mu)) / (_F(1) - np.power(nv, -eps)),
                             _F(1) / s_hat)
                n = min(_int_k(k), c.ids.size)
            else:
                over = np.nonzero(-np.log2(prob) > self.mu)[0]
                n = max(int(over[0]) if over.size else c.ids.size, 1)
            c = Cands(c.ids[:n], c.logit[:n], True)
            prob = c.softmax()
            idx = discrete(prob, self.rng)
            surprise = -np.log2(prob[idx])
            self.mu = _F(self.mu - _F(p.mirostat_eta) * (surprise - _F(p.mirostat_tau)))
        return c, prob, idx


MIROSTAT_M = 100  # the m common/sampling.cpp gives llama_sampler_init_mirostat


class HostSampler:
    """One request's llama.cpp chain from top-k to the dist draw, with its generators (dist's
    and XTC's), which persist across the request's tokens."""

    def __init__(self, params, seed: int | None = None):
        self.params = params
        s = resolve_seed(params.seed if seed is None else seed)
        self.seed = s
        self.rng = MT19937(s)
        self.xtc_rng = MT19937(s)  # llama_sampler_init_xtc gets the same seed (its own copy)
        self.last: tuple[Cands, np.ndarray] | None = None  # the last draw's candidates
        # mirostat replaces the chain after the logit bias (common_sampler_init), with its own
        # generator seeded the same way
        self.mirostat = Mirostat(params, s) if params.mirostat else None
        self.row: np.ndarray | None = None  # ...and the chain input it came from

    @staticmethod
    def wanted(params) -> bool:
        """Whether a request's draw is random at all."""
        return params.is_random()

    def chain(self, row: np.ndarray, allowed: np.ndarray | None = None) -> Cands:
        """The candidates the draw sees for a [V] row of the chain's input (logit bias,
        penalties, DRY, top-n-sigma applied), in llama.cpp's order; ``allowed``: a grammar's
        token mask, applied first (llama.cpp's resampling after a rejected token)."""
        p = self.params
        row = np.asarray(row, _F)
        if allowed is not None:
            row = np.where(allowed[: row.size], row, _F(-np.inf))
        c = Cands(np.arange(row.size), row, False)
        c = top_k(c, int(p.top_k))
        c = typical(c, p.typical_p, int(p.min_keep))
        c = top_p(c, p.top_p, int(p.min_keep))
        c = min_p(c, p.min_p, int(p.min_keep))
        c = xtc(c, p.xtc_probability, p.xtc_threshold, int(p.min_keep), self.xtc_rng)
        return temperature(c, p.temperature, p.dynatemp_range, p.dynatemp_exponent)

    def sample(self, row: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """The next token from a [V] row of the chain's input (``sampling.chain_input``:
        for mirostat the logit-biased row alone)."""
        self.row = row  # kept for a grammar's redraw from the same logits
        if self.mirostat is not None:
            x = np.asarray(row, _F)
            if allowed is not None:
                x = np.where(allowed[: x.size], x, _F(-np.inf))
            c, p, i = self.mirostat.step(x)
            self.last = (c, p)
            return int(c.ids[i])
        c = self.chain(row, allowed)
        i, p = draw(c, self.rng)
        if i < 0:
            raise ValueError("no candidate left to sample")
        self.last = (c, p)
        return int(c.ids[i])

    def final_probs(self) -> tuple[np.ndarray, np.ndarray]:
        """The last draw's candidates and probabilities as llama-server reports them
        (post_sampling_probs: common_sampler_get_candidates sorts by probability what no stage
        left sorted)."""
        c, p = self.last
        if c.sorted:
            return c.ids, p
        order = np.lexsort((c.ids, -p))
        return c.ids[order], p[order]
