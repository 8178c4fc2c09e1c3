"""Sampling as pure array functions with per-sequence parameters.

Every knob is an array of shape [B], never a Python branch, so one jitted call samples a batch of
requests with different settings (the server's slots). The chain follows llama.cpp's default
order (common/common.h ``samplers``): logit bias → penalties → top-n-sigma → top-k → typical-p →
top-p → min-p → XTC → temperature (with dynamic temperature) → draw. Each stage narrows a keep
mask over candidates sorted by descending logit, which is how llama.cpp's stages see them (a
stage that reorders, typical-p, only changes which are kept; the next re-sorts by logit). A row
whose temperature is <= 0 and that uses none of the stages able to drop the top token is plain
greedy.

With ``mirostat`` set a row skips that chain, as common/sampling.cpp builds it: logit bias →
temperature → mirostat (v1 or v2), whose truncation follows its state ``mu``, carried per request
(``sample_state`` takes and returns it). DRY's penalty comes from the request's tokens and is
computed on the host (jllama/engine/dry.py); it enters as a [B, V] row subtracted after the
repetition penalties.

The Engine and the server draw a random token on the host instead (jllama/engine/dist.py:
llama.cpp's chain from top-k, its MT19937 generators, so a seed gives llama.cpp's tokens) from
``chain_input``; the device's draw here serves greedy rows, the speculative decoder's acceptance
test and the inspectable ``candidates``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

DRY_BREAKERS = ("\n", ":", "\"", "*")  # common_params_sampling's default sequence breakers


@dataclass
class SamplingParams:
    """One request's sampling settings (llama.cpp's defaults)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    # llama.cpp's further samplers, off by default as in llama-server
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    min_keep: int = 0
    # mirostat (1 or 2) replaces the whole chain after the logit bias with temperature then
    # mirostat (common/sampling.cpp); its state ``mu`` lives per request (Engine.mu)
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    # DRY: a penalty computed on the host from the request's tokens (jllama/engine/dry.py)
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)

    def uses_extended(self) -> bool:
        """Whether a sampler beyond top-k/top-p/min-p/temperature is on (paths that mirror
        only that chain, such as speculative decoding's acceptance test, step aside)."""
        return (self.typical_p < 1.0 or self.top_n_sigma > 0.0 or self.xtc_probability > 0.0
                or self.dynatemp_range > 0.0 or self.min_keep > 1 or self.mirostat != 0
                or self.uses_dry())

    def uses_dry(self) -> bool:
        """llama_sampler_init_dry's test: otherwise the sampler is an empty one."""
        return (self.mirostat == 0 and self.dry_multiplier != 0.0 and self.dry_base >= 1.0
                and self.dry_penalty_last_n > 0)

    def is_random(self) -> bool:
        """Whether the draw is random at all (the Engine and the server then draw it on the
        host with llama.cpp's generators: jllama/engine/dist.py)."""
        return (self.mirostat != 0 or self.temperature > 0.0 or self.dynatemp_range > 0.0
                or self.xtc_probability > 0.0)

    def is_plain_greedy(self) -> bool:
        """The argmax of the penalised logits: no stage that could drop the top token."""
        return (self.mirostat == 0 and self.temperature <= 0.0 and self.dynatemp_range <= 0.0
                and self.typical_p >= 1.0 and self.xtc_probability <= 0.0)

    def initial_mu(self) -> float:
        """Mirostat's state when a request starts (llama_sampler_init_mirostat*)."""
        return float(np.float32(2.0) * np.float32(self.mirostat_tau))


@jax.tree_util.register_pytree_node_class
@dataclass
class BatchSampling:
    """SamplingParams of B sequences stacked into arrays (a pytree).

    Two flags travel as the pytree's static part, so each jitted program is built for what its
    batch needs: ``device_draws``, whether some row is drawn by the device's chain or mirostat
    (else every row takes the argmax of its penalised logits; the full chain is most of a
    sampling program's XLA compile, ~6 s of a cold SmolLM2 start); ``host_chain``, whether the
    host draws some row and so needs ``chain_input``'s rows."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repeat_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    typical_p: jax.Array
    top_n_sigma: jax.Array
    xtc_probability: jax.Array
    xtc_threshold: jax.Array
    dynatemp_range: jax.Array
    dynatemp_exponent: jax.Array
    min_keep: jax.Array
    mirostat: jax.Array
    mirostat_tau: jax.Array
    mirostat_eta: jax.Array
    device_draws: bool = True
    host_chain: bool = False

    def tree_flatten(self):
        return (tuple(getattr(self, n) for n, _ in _FIELDS),
                (self.device_draws, self.host_chain))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @classmethod
    def stack(cls, ps: list[SamplingParams], host_draws: bool = False) -> BatchSampling:
        """``host_draws``: the caller draws every random row on the host (``is_random``; the
        Engine's and the server's policy), so the device only needs their chain input."""
        on_device = [p for p in ps if not (host_draws and p.is_random())]
        # one device_put of numpy arrays: jnp.asarray compiles a copy program per dtype in
        # every new process (~60 ms each of a warm start's first token)
        return cls(*jax.device_put([np.array([getattr(p, n) for p in ps], dtype=dt)
                                    for n, dt in _FIELDS]),
                   device_draws=any(not p.is_plain_greedy() for p in on_device),
                   host_chain=host_draws and any(p.is_random() for p in ps))


_FIELDS = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
           ("min_p", np.float32), ("repeat_penalty", np.float32),
           ("frequency_penalty", np.float32), ("presence_penalty", np.float32),
           ("typical_p", np.float32), ("top_n_sigma", np.float32),
           ("xtc_probability", np.float32), ("xtc_threshold", np.float32),
           ("dynatemp_range", np.float32), ("dynatemp_exponent", np.float32),
           ("min_keep", np.int32), ("mirostat", np.int32), ("mirostat_tau", np.float32),
           ("mirostat_eta", np.float32))


def seed_key(seed: int) -> np.ndarray:
    """``jax.random.PRNGKey(seed)``'s data for a request's uint32 seed, built on the host:
    threefry's key is (high word, low word), and ``PRNGKey`` compiles a program per process
    (a tenth of a warm start's first token)."""
    return np.array([0, int(seed) % 2**32], np.uint32)


def apply_penalties(logits: jax.Array, history: jax.Array, sp: BatchSampling) -> jax.Array:
    """llama.cpp's repetition / frequency / presence penalties over the recent tokens.

    history: [B, N] token ids, -1 for empty slots (the ring buffer of the last N tokens).
    """
    b, v = logits.shape
    valid = history >= 0
    counts = jnp.zeros((b, v), jnp.float32).at[
        jnp.arange(b)[:, None], jnp.where(valid, history, 0)
    ].add(valid.astype(jnp.float32))
    seen = counts > 0
    rp = sp.repeat_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - counts * sp.frequency_penalty[:, None]
    logits = logits - seen.astype(jnp.float32) * sp.presence_penalty[:, None]
    return logits


TOPK_CAP = 256  # rows whose top_k is in 1..TOPK_CAP only need a partial sort


def _masked_softmax(vals: jax.Array, keep: jax.Array) -> jax.Array:
    return jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)


def _first(cond: jax.Array, c: int) -> jax.Array:
    """Index of the first True along the last axis, ``c - 1`` where there is none: [B, 1]."""
    r = jnp.arange(c)[None, :]
    return jnp.min(jnp.where(cond, r, c - 1), axis=-1, keepdims=True)


def _typical(vals: jax.Array, keep: jax.Array, sp: BatchSampling) -> jax.Array:
    """llama.cpp's locally typical sampling: candidates ordered by how far their surprise is
    from the entropy, kept until their probability mass exceeds ``typical_p``."""
    b, c = vals.shape
    p = _masked_softmax(vals, keep)
    logp = jnp.log(jnp.where(p > 0, p, 1.0))
    ent = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1, keepdims=True)
    shifted = jnp.where(keep, jnp.abs(-logp - ent), jnp.inf)
    order = jnp.argsort(shifted, axis=-1, stable=True)
    cum = jnp.cumsum(jnp.take_along_axis(p, order, axis=-1), axis=-1)
    r = jnp.arange(c)[None, :]
    mk = sp.min_keep[:, None]
    stop = _first((cum > sp.typical_p[:, None]) & ((mk == 0) | (r >= mk - 1)), c)
    kept_sorted = r <= stop
    in_set = jnp.zeros_like(keep).at[jnp.arange(b)[:, None], order].set(kept_sorted)
    return jnp.where((sp.typical_p < 1.0)[:, None], keep & in_set, keep)


def _chain(vals: jax.Array, sp: BatchSampling, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Candidates sorted by descending logit (vals: [B, C]) through llama.cpp's chain from top-k
    on. Returns the logits to draw from (-inf where dropped, already divided by the temperature)
    and, per row, whether the temperature stage turned greedy (draw the best kept candidate)."""
    b, c = vals.shape
    rank = jnp.arange(c)[None, :]
    mk = sp.min_keep[:, None]
    k = jnp.where(sp.top_k[:, None] > 0, sp.top_k[:, None], c)
    keep = rank < k
    keep = jax.lax.cond(jnp.any(sp.typical_p < 1.0), _typical, lambda v, kp, _: kp,
                        vals, keep, sp)
    # top-p on the distribution of what is kept (llama.cpp renormalises at each stage): keep up
    # to the first candidate whose cumulative mass reaches p, and at least min_keep
    p = _masked_softmax(vals, keep)
    kc = jnp.cumsum(keep, axis=-1)  # 1-based index among the kept
    cut = _first(keep & (jnp.cumsum(p, axis=-1) >= sp.top_p[:, None]) & (kc >= mk), c)
    keep = jnp.where((sp.top_p < 1.0)[:, None], keep & (rank <= cut), keep)
    # min-p as llama.cpp states it on logits: logit >= max + log(min_p), at least min_keep
    top = jnp.max(jnp.where(keep, vals, -jnp.inf), axis=-1, keepdims=True)
    kc = jnp.cumsum(keep, axis=-1)
    floor = top + jnp.log(jnp.maximum(sp.min_p, 1e-30))[:, None]
    keep = jnp.where((sp.min_p > 0.0)[:, None],
                     keep & ((vals >= floor) | (kc <= jnp.maximum(mk, 1))), keep)
    # XTC: with probability xtc_probability, drop every leading candidate at or above the
    # threshold except the last of them
    n_kept = jnp.sum(keep, axis=-1, keepdims=True)
    p = _masked_softmax(vals, keep)
    lead = jnp.cumprod(jnp.where(keep, p >= sp.xtc_threshold[:, None], True), axis=-1)
    pos_last = jnp.maximum(jnp.sum(lead & keep, axis=-1, keepdims=True) - 1, 0)
    chance = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 0x78746300)))(key)
    xtc = ((sp.xtc_probability > 0.0) & (sp.xtc_threshold <= 0.5) & (n_kept[:, 0] >= 2)
           & (chance <= sp.xtc_probability))[:, None]
    xtc = xtc & (n_kept - pos_last >= mk) & (pos_last > 0)
    keep = jnp.where(xtc, keep & (jnp.cumsum(keep, axis=-1) > pos_last), keep)
    # temperature; with dynatemp_range > 0 it follows the normalised entropy of what is kept
    n_kept = jnp.sum(keep, axis=-1)
    p = _masked_softmax(vals, keep)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    norm = ent / jnp.log(jnp.maximum(n_kept, 2).astype(jnp.float32))
    lo = jnp.maximum(0.0, sp.temperature - sp.dynatemp_range)
    hi = sp.temperature + sp.dynatemp_range
    dyn = lo + (hi - lo) * jnp.power(norm, sp.dynatemp_exponent)
    use_dyn = sp.dynatemp_range > 0.0
    t = jnp.where(use_dyn, jnp.where(n_kept <= 1, 1.0, dyn), sp.temperature)
    greedy = t <= 0.0
    scaled = jnp.where(keep, vals / jnp.where(greedy, 1.0, t)[:, None], -jnp.inf)
    return scaled, greedy


def _pick(vals: jax.Array, idx: jax.Array, sp: BatchSampling, key: jax.Array) -> jax.Array:
    """Sample from candidates sorted by descending logit (vals, idx: [B, C])."""
    scaled, greedy = _chain(vals, sp, key)
    best = first_argmax(scaled)  # the first kept candidate: the highest logit among the kept
    choice = jnp.where(greedy, best, jax.vmap(jax.random.categorical)(key, scaled))
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


def _top_n_sigma(logits: jax.Array, sp: BatchSampling) -> jax.Array:
    """llama.cpp's top-n-sigma over the whole vocabulary: drop logits below max - n * std of the
    finite ones."""
    fin = logits != -jnp.inf
    cnt = jnp.maximum(jnp.sum(fin, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(fin, logits, 0.0), axis=-1, keepdims=True) / cnt
    std = jnp.sqrt(jnp.sum(jnp.where(fin, (logits - mean) ** 2, 0.0), axis=-1, keepdims=True)
                   / cnt)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    on = (sp.top_n_sigma > 0.0)[:, None]
    return jnp.where(on & (logits < mx - sp.top_n_sigma[:, None] * std), -jnp.inf, logits)


def candidates(logits: jax.Array, sp: BatchSampling, key: jax.Array) -> jax.Array:
    """What the draw sees: [B, V] logits after the whole chain from top-n-sigma on, -inf where a
    stage dropped the token, divided by the (dynamic) temperature; a row whose temperature stage
    turned greedy keeps only its best candidate, undivided (llama.cpp's ``temp <= 0``). The
    inspectable form of ``sample``'s stages (logit bias and penalties already applied)."""
    x = _top_n_sigma(logits.astype(jnp.float32), sp)
    b, v = x.shape
    neg, idx = jax.lax.sort_key_val(-x, jnp.broadcast_to(jnp.arange(v), (b, v)), dimension=-1)
    scaled, greedy = _chain(-neg, sp, key)
    best = first_argmax(scaled)
    one = jnp.arange(v)[None, :] == best[:, None]
    scaled = jnp.where(greedy[:, None], jnp.where(one, -neg, -jnp.inf), scaled)
    return jnp.full((b, v), -jnp.inf).at[jnp.arange(b)[:, None], idx].set(scaled)


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first maximum, the first NaN if any) as int32.

    For a few rows (a decode step's sampler) it is a max and then a min over the matching
    indices: XLA:CPU runs argmax's (value, index) reduction as a scalar loop, where a max and a
    min vectorise. Many rows keep argmax, which XLA parallelises across rows. Timings:
    experiments/results/design_measurements.md."""
    if math.prod(x.shape[:-1]) > 64:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    v = x.shape[-1]
    hit = (x == jnp.max(x, axis=-1, keepdims=True)) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


MIROSTAT_M = 100  # the m common/sampling.cpp gives llama_sampler_init_mirostat


def _sorted_desc(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits sorted descending, ties in token order (llama.cpp's sort keeps them there for
    the cases that matter: the first maximum comes first), and the token ids."""
    b, v = x.shape
    neg, idx = jax.lax.sort((-x, jnp.broadcast_to(jnp.arange(v), (b, v))), dimension=-1,
                            is_stable=True, num_keys=1)
    return -neg, idx


def _mirostat_sorted(vals: jax.Array, sp: BatchSampling, mu: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """llama.cpp's temperature (llama_sampler_init_temp) then mirostat's truncation over the
    whole vocabulary sorted by descending logit (vals: [B, V]). Returns the kept mask and the
    renormalised probabilities (0 where dropped)."""
    b, v = vals.shape
    rank = jnp.arange(v)[None, :]
    t = sp.temperature[:, None]
    # temp <= 0 keeps only the first maximum, at its logit
    vals = jnp.where(t <= 0.0, jnp.where(rank == 0, vals, -jnp.inf),
                     vals / jnp.where(t <= 0.0, 1.0, t))
    p = _masked_softmax(vals, jnp.ones_like(vals, bool))
    # v1: estimate the Zipf exponent s_hat from the m most probable tokens, then the k whose
    # expected surprise is mu
    i = jnp.arange(v - 1, dtype=jnp.float32)
    ti = jnp.log((i + 2.0) / (i + 1.0))[None, :]
    used = (jnp.arange(v - 1) < min(MIROSTAT_M - 1, v - 1))[None, :]
    bi = jnp.log(p[:, :-1] / p[:, 1:])
    s_hat = (jnp.sum(jnp.where(used, ti * bi, 0.0), axis=-1)
             / jnp.sum(jnp.where(used, ti * ti, 0.0), axis=-1))
    eps = s_hat - 1.0
    kf = jnp.power((eps * jnp.power(2.0, mu)) / (1.0 - jnp.power(jnp.float32(v), -eps)),
                   1.0 / s_hat)
    # int(k) as x86 converts: out of range or NaN gives INT_MIN, so max(int(k), 1) is then 1
    fits = jnp.isfinite(kf) & (kf < 2.0**31) & (kf > -(2.0**31))
    k1 = jnp.maximum(jnp.where(fits, jnp.trunc(jnp.where(fits, kf, 0.0)), 1.0), 1.0)
    keep1 = rank < k1[:, None]
    # v2: drop from the first token whose surprise -log2(p) exceeds mu, keep at least one
    over = -jnp.log2(p) > mu[:, None]
    cut = jnp.min(jnp.where(over, rank, v), axis=-1, keepdims=True)
    keep2 = rank < jnp.maximum(cut, 1)
    keep = jnp.where((sp.mirostat == 1)[:, None], keep1, keep2)
    return keep, _masked_softmax(vals, keep)


def mirostat_update(p_tok: jax.Array, sp: BatchSampling, mu: jax.Array) -> jax.Array:
    """mu after drawing a token of (renormalised) probability ``p_tok``: it moves by the
    learning rate times the observed surprise's distance from the target."""
    return mu - sp.mirostat_eta * (-jnp.log2(p_tok) - sp.mirostat_tau)


def mirostat_candidates(logits: jax.Array, sp: BatchSampling, mu: jax.Array) -> jax.Array:
    """Mirostat's draw distribution [B, V] (0 where truncated) for logits with the logit bias
    applied: the inspectable form of ``sample_state``'s mirostat rows."""
    vals, idx = _sorted_desc(logits.astype(jnp.float32))
    _, p = _mirostat_sorted(vals, sp, mu)
    b, v = vals.shape
    return jnp.zeros((b, v), jnp.float32).at[jnp.arange(b)[:, None], idx].set(p)


def _mirostat_draw(x: jax.Array, sp: BatchSampling, key: jax.Array, mu: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    vals, idx = _sorted_desc(x)
    keep, p = _mirostat_sorted(vals, sp, mu)
    choice = jax.vmap(jax.random.categorical)(key, jnp.where(keep, jnp.log(p), -jnp.inf))
    p_tok = jnp.take_along_axis(p, choice[:, None], axis=-1)[:, 0]
    tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return tok, mirostat_update(p_tok, sp, mu)


def _penalised(logits, sp, history, bias, dry):
    """The logits with the logit bias, then also with the repetition penalties and DRY."""
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    biased = logits
    if history is not None:
        logits = apply_penalties(logits, history, sp)
    if dry is not None:
        logits = logits - dry
    return biased, logits


def chain_input(logits: jax.Array, sp: BatchSampling, history: jax.Array | None = None,
                bias: jax.Array | None = None, dry: jax.Array | None = None) -> jax.Array:
    """[B, V] logits after the stages before top-k (logit bias, penalties, DRY, top-n-sigma):
    what the host's copy of the rest of llama.cpp's chain starts from (jllama/engine/dist.py).
    Mirostat rows get the logit-biased logits alone (its chain has no other stage before)."""
    biased, x = _penalised(logits, sp, history, bias, dry)
    x = jax.lax.cond(jnp.any(sp.top_n_sigma > 0.0), _top_n_sigma, lambda y, _: y, x, sp)
    return jnp.where((sp.mirostat > 0)[:, None], biased, x)


def sample(logits: jax.Array, sp: BatchSampling, key: jax.Array,
           history: jax.Array | None = None, bias: jax.Array | None = None,
           dry: jax.Array | None = None) -> jax.Array:
    """``sample_state``'s tokens, for a request's first step (mirostat at its initial mu)."""
    return sample_state(logits, sp, key, history, bias, dry)[0]


def sample_state(logits: jax.Array, sp: BatchSampling, key: jax.Array,
                 history: jax.Array | None = None, bias: jax.Array | None = None,
                 dry: jax.Array | None = None, mu: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row and return it with each row's next mirostat mu (unchanged for
    rows without mirostat). logits [B, V] f32; key: one PRNG key per row [B, 2]; ``dry``:
    [B, V] DRY penalties (subtracted after the repetition penalties); ``mu``: [B] mirostat
    state, None for a request's first step (2 * tau).

    A full sort of the vocabulary costs more than a small model's forward pass on CPU, so it is
    only done when some row really needs it (top_k disabled or above ``TOPK_CAP``, or
    mirostat); an all-greedy batch sorts nothing. The branches are exact, not approximations.
    """
    if mu is None:
        mu = 2.0 * sp.mirostat_tau
    biased, logits = _penalised(logits, sp, history, bias, dry)
    greedy_tok = first_argmax(logits)
    if not sp.device_draws:  # every row plain greedy, or drawn on the host (token unused)
        return greedy_tok, jnp.asarray(mu, jnp.float32)
    miro = sp.mirostat > 0
    # plain greedy: no stage that could drop the top token before the temperature's argmax
    # (mirostat rows are drawn apart, from the biased logits alone, as llama.cpp's chain does)
    plain = ((sp.temperature <= 0) & (sp.dynatemp_range <= 0) & (sp.typical_p >= 1.0)
             & (sp.xtc_probability <= 0)) | miro
    logits = jax.lax.cond(jnp.any(sp.top_n_sigma > 0.0), _top_n_sigma, lambda x, _: x,
                          logits, sp)
    b, v = logits.shape
    cap = min(TOPK_CAP, v)

    def partial_sort():
        vals, idx = jax.lax.top_k(logits, cap)
        return _pick(vals, idx, sp, key).astype(jnp.int32)

    def full_sort():
        neg, idx = jax.lax.sort_key_val(-logits, jnp.broadcast_to(jnp.arange(v), (b, v)),
                                        dimension=-1)
        return _pick(-neg, idx, sp, key).astype(jnp.int32)

    def sampled():
        small = jnp.all((sp.top_k > 0) & (sp.top_k <= cap) | plain)
        return jax.lax.cond(small, partial_sort, full_sort)

    drawn = jax.lax.cond(jnp.all(plain), lambda: greedy_tok, sampled)
    tok = jnp.where(plain, greedy_tok, drawn)
    mtok, mmu = jax.lax.cond(jnp.any(miro), _mirostat_draw, lambda x, s_, k, m: (tok, m),
                             biased, sp, key, mu)
    return jnp.where(miro, mtok, tok), jnp.where(miro, mmu, mu).astype(jnp.float32)
