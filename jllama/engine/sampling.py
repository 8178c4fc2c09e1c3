"""Sampling as pure array functions with per-sequence parameters.

Every knob is an array of shape [B], never a Python branch, so one jitted call samples a batch of
requests with different settings (the server's slots). The chain follows llama.cpp's default
order: logit bias → penalties → top-k → top-p → min-p → temperature → draw. Temperature <= 0 is
greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np


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

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)


@jax.tree_util.register_pytree_node_class
@dataclass
class BatchSampling:
    """SamplingParams of B sequences stacked into arrays (a pytree)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repeat_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array

    def tree_flatten(self):
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty,
                self.frequency_penalty, self.presence_penalty), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @classmethod
    def stack(cls, ps: list[SamplingParams]) -> BatchSampling:
        def arr(name, dt):
            return jnp.asarray(np.array([getattr(p, name) for p in ps], dtype=dt))

        return cls(arr("temperature", np.float32), arr("top_k", np.int32), arr("top_p", np.float32),
                   arr("min_p", np.float32), arr("repeat_penalty", np.float32),
                   arr("frequency_penalty", np.float32), arr("presence_penalty", np.float32))


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


def _pick(vals: jax.Array, idx: jax.Array, sp: BatchSampling, key: jax.Array) -> jax.Array:
    """Sample from candidates sorted by descending logit (vals, idx: [B, C])."""
    b, c = vals.shape
    rank = jnp.arange(c)[None, :]
    k = jnp.where(sp.top_k[:, None] > 0, sp.top_k[:, None], c)
    keep = rank < k
    # top-p on the distribution of what top-k kept (llama.cpp renormalises at each step)
    p = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
    cum_before = jnp.cumsum(p, axis=-1) - p
    keep = keep & ((cum_before < sp.top_p[:, None]) | (rank == 0))
    p = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
    keep = keep & ((p >= sp.min_p[:, None] * p[:, :1]) | (rank == 0))
    t = jnp.maximum(sp.temperature, 1e-6)[:, None]
    scaled = jnp.where(keep, vals / t, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(key, scaled)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


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


def sample(logits: jax.Array, sp: BatchSampling, key: jax.Array,
           history: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """Pick one token per row. logits [B, V] f32; key: one PRNG key per row [B, 2].

    A full sort of the vocabulary costs more than a small model's forward pass on CPU, so it is
    only done when some row really needs it (top_k disabled or above ``TOPK_CAP``); an all-greedy
    batch sorts nothing. The branches are exact, not approximations.
    """
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    if history is not None:
        logits = apply_penalties(logits, history, sp)
    greedy_tok = first_argmax(logits)
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
        small = jnp.all((sp.top_k > 0) & (sp.top_k <= cap) | (sp.temperature <= 0))
        return jax.lax.cond(small, partial_sort, full_sort)

    drawn = jax.lax.cond(jnp.all(sp.temperature <= 0), lambda: greedy_tok, sampled)
    return jnp.where(sp.temperature <= 0, greedy_tok, drawn)
