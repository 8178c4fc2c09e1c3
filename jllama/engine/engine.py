"""Engine: owns the model state, the KV cache and the compiled steps.

Every front end (CLI, Python API, server, perplexity, speculative decoding) drives this class;
none re-implements a forward pass. The hot path is a pure function of (params, cache, inputs)
jitted once per shape bucket with the cache donated, so decode runs with no recompiles after
warm-up: prompt chunks are padded to a few lengths (``PREFILL_BUCKETS``) and attention reads the
cache up to a power-of-two bucket of the live length.

Slots: the cache has ``n_slots`` rows; each holds one sequence with its own length on the host.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jllama.engine.cache import KVCache
from jllama.engine.sampling import BatchSampling, SamplingParams, sample
from jllama.errors import ContextError
from jllama.models.spec import ModelSpec

PREFILL_BUCKETS = (16, 64, 128, 256, 512)
KV_MIN_BUCKET = 256
HISTORY = 64  # penalty window (llama.cpp's default repeat_last_n)


def _bucket(n: int, buckets=PREFILL_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


@dataclass
class Timings:
    """llama.cpp-style counters for the last generate call."""

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    first_token_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s else 0.0


class Engine:
    def __init__(self, spec: ModelSpec, model: nnx.Module, ctx_size: int = 2048, n_slots: int = 1,
                 cache_type: str = "f32"):
        self.spec = spec
        self.ctx_size = int(ctx_size)
        self.n_slots = int(n_slots)
        self._make_cache = getattr(model, "make_cache", None)
        self.graphdef, self.state = nnx.split(model)
        # room for the padded tail of the last prompt chunk
        self.max_len = -(-self.ctx_size // KV_MIN_BUCKET) * KV_MIN_BUCKET + PREFILL_BUCKETS[-1]
        self.cache_type = cache_type
        self.cache = self._new_cache(self.n_slots)
        self.pos = np.zeros(self.n_slots, np.int32)  # tokens held per slot
        self.history = jnp.full((self.n_slots, HISTORY), -1, jnp.int32)
        self.timings = Timings()
        gd = self.graphdef

        def forward_slot(state, tokens, pos0, cache, slot, last_idx, kv_len):
            # run one sequence (B=1) against its own rows of the batched cache, write them back
            model = nnx.merge(gd, state)
            rows = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, 0), cache)
            logits, rows = model(tokens, pos0, rows, kv_len, last_idx)
            cache = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, 0),
                                 cache, rows)
            return logits[0], cache

        def forward_all(state, tokens, pos0, cache, kv_len):
            model = nnx.merge(gd, state)
            return model(tokens, pos0, cache, kv_len, None)

        def decode_sample(state, tokens, pos0, cache, sp, keys, steps, history, bias, active,
                          kv_len):
            model = nnx.merge(gd, state)
            logits, cache = model(tokens[:, None], pos0, cache, kv_len,
                                  jnp.zeros_like(pos0))
            # the token just fed joins the penalty window (shift left, append)
            history = jnp.where(active[:, None],
                                jnp.concatenate([history[:, 1:], tokens[:, None]], axis=1),
                                history)
            nxt = _sample_rows(logits, sp, keys, steps, history, bias)
            return nxt, logits, cache, history

        self._forward_slot = jax.jit(forward_slot, static_argnames="kv_len",
                                     donate_argnames="cache")
        self._forward_all = jax.jit(forward_all, static_argnames="kv_len", donate_argnames="cache")
        self._decode_sample = jax.jit(decode_sample, static_argnames="kv_len",
                                      donate_argnames=("cache", "history"))
        self._sample = jax.jit(_sample_rows)

    # ------------------------------------------------------------------ cache / slots
    def _new_cache(self, batch: int) -> KVCache:
        s = self.spec
        if self._make_cache is not None:  # architectures with their own cache layout (MLA)
            return self._make_cache(batch, self.max_len, self.cache_type)
        return KVCache.create(s.n_layer, batch, s.n_head_kv, self.max_len, s.head_dim,
                              s.head_dim_v, self.cache_type)

    def kv_bucket(self, n: int) -> int:
        b = KV_MIN_BUCKET
        while b < n:
            b *= 2
        return min(b, self.max_len)

    def reset(self, slot: int | None = None) -> None:
        if slot is None:
            self.pos[:] = 0
            self.history = jnp.full((self.n_slots, HISTORY), -1, jnp.int32)
        else:
            self.pos[slot] = 0
            self.history = self.history.at[slot].set(-1)

    # ------------------------------------------------------------------ forward passes
    def prefill(self, tokens: list[int] | np.ndarray, slot: int = 0) -> jax.Array:
        """Append ``tokens`` to a slot's sequence; return logits [V] after the last one."""
        toks = np.asarray(tokens, np.int32)
        n = len(toks)
        if n == 0:
            raise ContextError("empty prompt: nothing to evaluate")
        if self.pos[slot] + n > self.ctx_size:
            raise ContextError(
                f"prompt of {n} tokens does not fit: {self.pos[slot]} already in context, "
                f"context size {self.ctx_size} (raise runtime.ctx_size / --ctx-size)"
            )
        logits = None
        i = 0
        while i < n:
            chunk = toks[i : i + PREFILL_BUCKETS[-1]]
            m = len(chunk)
            t = _bucket(m)
            buf = np.zeros((1, t), np.int32)
            buf[0, :m] = chunk
            pos0 = self.pos[slot : slot + 1].copy()
            kv_len = self.kv_bucket(int(pos0[0]) + t)
            logits, self.cache = self._forward_slot(
                self.state, jnp.asarray(buf), jnp.asarray(pos0), self.cache,
                jnp.int32(slot), jnp.asarray([m - 1], jnp.int32), kv_len=kv_len)
            self.pos[slot] += m
            i += m
        self._remember(slot, toks[-HISTORY:])
        return logits

    def _remember(self, slot: int, toks: np.ndarray) -> None:
        h = np.full(HISTORY, -1, np.int32)
        old = np.array(self.history[slot])
        merged = np.concatenate([old[old >= 0], toks])[-HISTORY:]
        h[: len(merged)] = merged
        self.history = self.history.at[slot].set(jnp.asarray(h))

    def logits(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """Logits at every position of one sequence, from an empty cache: [T, V] float32."""
        return self.score_batch(np.asarray(tokens, np.int32)[None, :])[0]

    def score_batch(self, tokens: np.ndarray) -> np.ndarray:
        """All-position logits for a batch of equal-length sequences [B, T] from empty caches.

        Uses its own cache, so slots are untouched. Used by perplexity and tests.
        """
        tokens = np.asarray(tokens, np.int32)
        b, t = tokens.shape
        if t > self.ctx_size:
            raise ContextError(f"{t} tokens exceed the context size {self.ctx_size}")
        cache = self._new_cache(b)
        out = []
        for i in range(0, t, PREFILL_BUCKETS[-1]):
            chunk = tokens[:, i : i + PREFILL_BUCKETS[-1]]
            m = chunk.shape[1]
            tb = _bucket(m)
            buf = np.zeros((b, tb), np.int32)
            buf[:, :m] = chunk
            pos0 = np.full(b, i, np.int32)
            logits, cache = self._forward_all(self.state, jnp.asarray(buf), jnp.asarray(pos0),
                                              cache, kv_len=self.kv_bucket(i + tb))
            out.append(np.asarray(logits[:, :m], np.float32))
        return np.concatenate(out, axis=1)

    def step(self, tokens: np.ndarray, active: np.ndarray, sp: BatchSampling, keys: jax.Array,
             steps: np.ndarray, bias: jax.Array | None = None) -> tuple[np.ndarray, jax.Array]:
        """One batched decode step over all slots: feed ``tokens[b]`` to each active slot and
        sample its next token. Inactive slots compute but do not advance."""
        pos0 = self.pos.copy()
        need = int(pos0[active].max()) + 1 if active.any() else 1
        if bias is None:
            bias = jnp.zeros((self.n_slots, self.spec.n_vocab), jnp.float32)
        nxt, logits, self.cache, self.history = self._decode_sample(
            self.state, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos0), self.cache, sp, keys,
            jnp.asarray(steps, jnp.int32), self.history, bias, jnp.asarray(active),
            kv_len=self.kv_bucket(need))
        self.pos[active] += 1
        return np.asarray(nxt), logits

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: list[int], params: SamplingParams | None = None,
                 max_tokens: int = 128, stop_ids: set[int] | frozenset[int] = frozenset(),
                 slot: int = 0) -> Iterator[int]:
        """Yield generated token ids for one sequence (stops on a stop id, which is not yielded,
        on ``max_tokens``, or at the context size)."""
        params = params or SamplingParams()
        self.reset(slot)
        t0 = time.perf_counter()
        tm = self.timings = Timings(prompt_tokens=len(prompt))
        logits = self.prefill(prompt, slot)
        sp = BatchSampling.stack([params] * self.n_slots)
        seed = params.seed if params.seed is not None else int.from_bytes(np.random.bytes(4), "little")
        keys = jnp.broadcast_to(jax.random.key_data(jax.random.PRNGKey(seed)), (self.n_slots, 2))
        bias = _bias_array(params.logit_bias, self.spec.n_vocab, self.n_slots)
        all_logits = jnp.zeros((self.n_slots, logits.shape[-1]), jnp.float32).at[slot].set(logits)
        tok = int(self._sample(all_logits, sp, keys, jnp.zeros(self.n_slots, jnp.int32),
                               self.history, bias)[slot])
        t1 = time.perf_counter()
        tm.prompt_s = t1 - t0
        tm.first_token_s = t1 - t0
        active = np.zeros(self.n_slots, bool)
        active[slot] = True
        n = 0
        while True:
            if tok in stop_ids:
                break
            yield tok
            n += 1
            tm.gen_tokens = n
            tm.gen_s = time.perf_counter() - t1
            if n >= max_tokens or self.pos[slot] + 1 > self.ctx_size:
                break
            toks = np.zeros(self.n_slots, np.int32)
            toks[slot] = tok
            steps = np.full(self.n_slots, n, np.int32)
            nxt, _ = self.step(toks, active, sp, keys, steps, bias)
            tok = int(nxt[slot])
        tm.gen_s = time.perf_counter() - t1


def _bias_array(logit_bias: dict[int, float], n_vocab: int, n_slots: int) -> jax.Array:
    b = np.zeros((n_slots, n_vocab), np.float32)
    for k, v in (logit_bias or {}).items():
        if 0 <= int(k) < n_vocab:
            b[:, int(k)] = v
    return jnp.asarray(b)


def _sample_rows(logits, sp, keys, steps, history, bias):
    """Per-row keys derived from (seed key, step) so a seeded request is reproducible whatever
    else shares the batch."""
    raw = jax.vmap(lambda k, s: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(k), s)))(keys.astype(jnp.uint32), steps)
    return sample(logits[..., : bias.shape[-1]], sp, raw, history, bias)
