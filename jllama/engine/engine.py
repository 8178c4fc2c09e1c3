"""Engine: owns the model state, the KV cache and the compiled steps.

Every front end (CLI, Python API, server, perplexity, speculative decoding) drives this class;
none re-implements a forward pass. The hot path is a pure function of (params, cache, inputs)
jitted once per shape bucket with the cache donated, so decode runs with no recompiles after
warm-up: prompt chunks are padded to a few lengths (``PREFILL_BUCKETS``) and attention reads the
cache up to a power-of-two bucket of the live length.

Slots: the cache has ``n_slots`` rows; each holds one sequence with its own length on the host.

Paged KV cache (``paged``, default on GPU/TPU): the slots' rows become block tables over one page
pool (models/cache.py ``PagedKVCache``, kernels/ragged_paged_attention.py), pages taken from a
host free list (engine/pages.py) before each step writes them and given back when a slot
rewinds or resets, so cache memory follows the live tokens (``kv_pages`` sizes the pool) rather
than slots x context. The CPU keeps the dense cache and its exact C++ attention by default.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jllama.engine import heap
from jllama.engine.dist import HostSampler, resolve_seed
from jllama.engine.dry import penalty_row
from jllama.engine.pages import PageAllocator
from jllama.engine.sampling import (
    BatchSampling,
    SamplingParams,
    chain_input,
    sample_state,
    seed_key,
)
from jllama.errors import ConfigError, ContextError
from jllama.models import kvquant
from jllama.models.cache import KVCache, PagedKVCache
from jllama.models.common import fwht, kv_rotation, rope
from jllama.models.spec import ModelSpec
from jllama.numerics import DEFAULT, Numerics
from jllama.numerics import use as use_numerics

# 7 and 63, not 8 and 64: from 8 rows ggml multiplies K-quants with its tiled GEMM and from 64
# query rows its flash attention takes its tiled path, each another summation order, so a
# prompt shorter than that must not be padded into it (numerics as llama.cpp's)
PREFILL_BUCKETS = (7, 16, 63, 128, 256, 512)
# A prompt is evaluated in chunks of this many tokens. The server cuts prompts at the same
# places: a GEMM's rounding depends on its shape, so other cuts could change a near-tie.
PREFILL_CHUNK = PREFILL_BUCKETS[-1]
KV_MIN_BUCKET = 256
# Rows a padded prompt chunk can write past its real tokens: a chunk of m tokens runs as its
# bucket (``_bucket(m)``), so at most the largest gap between a bucket and the one below it
# (512 - 257 = 255), rounded up to a multiple of 64 rows.
KV_ROOM = -(-max(b - a - 1 for a, b in zip((0,) + PREFILL_BUCKETS, PREFILL_BUCKETS)) // 64) * 64
HISTORY = 64  # penalty window (llama.cpp's default repeat_last_n)
# Most decode steps one dispatch runs (``Engine.decode_chunk``); generate() starts a stream with
# shorter chunks (``_CHUNKS``) so the first tokens still arrive one dispatch apart.
DECODE_CHUNK = 16
_CHUNKS = (2, 4, 8, DECODE_CHUNK)


def _jit(fn, static: tuple[str, ...], donate: tuple[str, ...], host=None):
    """jax.jit with these static and donated argument names (``host`` matters to a sharding
    plan's ``jit`` only)."""
    return jax.jit(fn, static_argnames=static or None, donate_argnames=donate or None)


def _committed_jit(fn, static: tuple[str, ...], donate: tuple[str, ...], host=None):
    """``_jit`` for a model with weights in host memory (a partial offload, models/offload.py):
    those arrays are committed to their device, which commits every output of a step, so an
    input the engine made itself (the first cache, a history row) would select another program
    than the same input fed back from a step (XLA compiled each step twice). Every array
    argument is committed here first (no copy for one already on the device)."""
    jf = _jit(fn, static, donate, host)
    dev = jax.devices()[0]

    def put(a):
        if isinstance(a, jax.Array) and a.committed:  # the weights among them
            return a
        return jax.device_put(a, dev) if isinstance(a, (jax.Array, np.ndarray)) else a

    def call(*args, **kwargs):
        args = jax.tree.map(put, args)
        kwargs = {k: v if k in static else jax.tree.map(put, v) for k, v in kwargs.items()}
        return jf(*args, **kwargs)

    call.jitted = jf
    return call


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
                 numerics: Numerics | None = None, plan=None, aot=None,
                 paged: bool | None = None, page_size: int = 16, kv_pages: int | None = None,
                 paged_impl: str | None = None):
        """``numerics``: how the model computes, default the one it was loaded with (a load-time
        field, ``cpu_kernels``, must match: it decided the weights' layout). It is static data
        of every program this Engine compiles. ``plan``: a sharding plan (``jllama.parallel``)
        that places weights and caches and constrains the outputs read on the host; None runs
        on the default device. ``aot``: an ``aot.AotCache`` for this model (its key covers the
        model file and how it was loaded): the programs of a generation (prompt, first sample,
        decode step and loop) then come ready-compiled from it in a warm process, untraced.

        ``paged``: keep the slots' KV in a page pool (None: off, the dense cache: the paged
        path and its Pallas kernel have run in interpret mode and lowering only, never on a
        GPU/TPU, so they are opt-in until a device run has measured them); ``page_size`` tokens a page, ``kv_pages`` pages in the pool
        (default: every slot's whole context, plus the scratch page); ``paged_impl``: "pallas"
        (default off the CPU), "interpret" or "xla" (the CPU's default: the dense attention
        over gathered pages)."""
        self.spec = spec
        self.ctx_size = int(ctx_size)
        self.n_slots = int(n_slots)
        loaded = getattr(model, "numerics", DEFAULT)
        num = loaded if numerics is None else numerics
        if num.cpu_kernels != loaded.cpu_kernels:
            raise ConfigError("numerics.cpu_kernels differs from the one the model was loaded "
                              "with (it decides the weights' layout): load the model again")
        self.numerics = num
        self.plan = plan
        self._make_cache = getattr(model, "make_cache", None)
        # M-RoPE (qwen2vl): rope positions run behind the cells after an image; the cache holds
        # each slot's offset, the host each slot's (cell after the image, offset) marks
        self.mrope = bool(getattr(model, "uses_mrope", False))
        self._delta_marks: list[list[tuple[int, int]]] = [[] for _ in range(int(n_slots))]
        self._model_type = type(model)
        # per-layer (rope base, dims, neox, scale[, yarn]) of cached keys, for context shift
        self._kv_rope = ([model.kv_rope(i) for i in range(spec.n_layer)]
                         if hasattr(model, "kv_rope") else None)
        self.graphdef, self.state = nnx.split(model)
        if plan is not None:
            self.state = plan.shard_state(self.state)
        # room for the padded tail of the last prompt chunk (KV_ROOM rows, not a whole chunk:
        # the cache is the largest allocation after the weights, 128 KiB a row at 8B)
        self.max_len = -(-self.ctx_size // KV_MIN_BUCKET) * KV_MIN_BUCKET + KV_ROOM
        self.pages: PageAllocator | None = None
        heap.install()
        self._split = getattr(model, "host_layers", None) is not None  # -ngl (models/offload)
        self._paged = self._paged_config(paged, int(page_size), kv_pages, paged_impl)
        self.cache = self._new_cache(self.n_slots, slots=True)
        self.pos = np.zeros(self.n_slots, np.int32)  # tokens held per slot
        self.tokens: list[list[int]] = [[] for _ in range(self.n_slots)]  # ...and which ones
        hist = np.full((self.n_slots, HISTORY), -1, np.int32)
        self.history = plan.replicate(hist) if plan is not None else jax.device_put(hist)
        # each slot's mirostat state (llama.cpp keeps it in the request's sampler): set by the
        # first token's draw, carried by every step after it
        self.mu = np.zeros(self.n_slots, np.float32)
        self.timings = Timings()
        self._zero_bias: jax.Array | None = None
        # generate() runs device-drawn decoding in chunks (decode_chunk) rather than step by step
        self.loop_decode = True
        gd = self.graphdef

        def run(state, *args):
            # the model as traced by this Engine: its numerics are the current ones
            with use_numerics(num):
                return nnx.merge(gd, state)(*args)

        def forward_slot(state, tokens, pos0, cache, slot, last_idx, kv_len):
            # run one sequence (B=1) against its own rows of the batched cache, write them back
            rows = cache.slot_rows(slot)
            logits, rows = run(state, tokens, pos0, rows, kv_len, last_idx)
            return logits[0], cache.put_slot_rows(slot, rows)

        def forward_embd(state, embd, pos0, cache, slot, last_idx, kv_len, bidir, mpos):
            # input embeddings (an image's) instead of tokens, for one slot (``mpos``: their
            # M-RoPE positions)
            rows = cache.slot_rows(slot)
            extra = {} if mpos is None else {"mpos": mpos}
            with use_numerics(num):
                logits, rows = nnx.merge(gd, state)(None, pos0, rows, kv_len, last_idx,
                                                    embd=embd, bidir=bidir, **extra)
            return logits[0], cache.put_slot_rows(slot, rows)

        def forward_all(state, tokens, pos0, cache, kv_len):
            return run(state, tokens, pos0, cache, kv_len, None)

        def decode_sample(state, tokens, pos0, cache, sp, keys, steps, history, bias, dry, mu,
                          active, kv_len):
            logits, cache = run(state, tokens[:, None], pos0, cache, kv_len, jnp.zeros_like(pos0))
            # the token just fed joins the penalty window (shift left, append)
            history = jnp.where(active[:, None],
                                jnp.concatenate([history[:, 1:], tokens[:, None]], axis=1),
                                history)
            nxt, mu = _sample_rows(logits, sp, keys, steps, history, bias, dry, mu)
            return nxt, logits, cache, history, mu, chain_rows(logits, sp, history, bias, dry)

        def decode_loop(state, tokens, pos0, cache, sp, keys, steps, history, bias, dry, mu,
                        active, left, stops, limit, p_min, kv_len, chunk):
            # up to ``limit`` (<= chunk) decode steps in one dispatch, each the body of
            # decode_sample: a slot leaves the loop on a stop id (not fed back), when ``left``
            # (tokens it may still emit) reaches 0, at ``limit``, or (a draft model's rule,
            # p_min > 0) when the top-10 candidates' largest softmax probability is below
            # p_min, drawing nothing; the loop ends when no slot is left. out[i, b]: the token
            # slot b drew at step i, -1 once it had left.
            out = jnp.full((chunk, tokens.shape[0]), -1, jnp.int32)

            def cond(c):
                return (c[0] < limit) & jnp.any(c[6])

            def body(c):
                i, tok, pos, cache, history, mu, active, left, steps, out = c
                logits, cache = run(state, tok[:, None], pos, cache, kv_len, jnp.zeros_like(pos))
                history = jnp.where(active[:, None],
                                    jnp.concatenate([history[:, 1:], tok[:, None]], axis=1),
                                    history)
                nxt, mu2 = _sample_rows(logits, sp, keys, steps, history, bias, dry, mu)
                mu = jnp.where(active, mu2, mu)
                pos = pos + active
                steps = steps + active
                def confident():
                    top = jax.lax.top_k(logits[..., : bias.shape[-1]].astype(jnp.float32),
                                        10)[0]
                    return jax.nn.softmax(top, axis=-1)[:, 0] >= p_min

                drew = active & jax.lax.cond(p_min > 0, confident,
                                             lambda: jnp.ones_like(active))
                out = out.at[i].set(jnp.where(drew, nxt, -1))
                emitted = drew & ~jnp.any(nxt[:, None] == stops, axis=1)
                left = left - emitted
                tok = jnp.where(emitted, nxt, tok)
                return (i + 1, tok, pos, cache, history, mu, emitted & (left > 0), left, steps,
                        out)

            c = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens, pos0, cache, history, mu,
                                                active, left, steps, out))
            return c[9], c[3], c[4], c[5], c[2]

        def forward_logprobs(state, tokens, targets, pos0, cache, kv_len):
            # log-probabilities of the given next tokens, reduced in-graph: the [B, T, V]
            # logits of a perplexity batch never leave the device (or get materialised twice)
            logits, cache = run(state, tokens, pos0, cache, kv_len, None)
            lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
            tgt = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
            return tgt - lse, jnp.argmax(logits, axis=-1), cache

        def forward_reduce(state, tokens, pos0, cache, args, kv_len, lo, n, fn):
            # a caller's reduction (KL-divergence) of the logits at positions lo..lo+n-1, run
            # in-graph: whole [B, n, V] distributions then never travel to the host as f32
            logits, cache = run(state, tokens, pos0, cache, kv_len, None)
            sel = jax.lax.slice_in_dim(logits, lo, lo + n, axis=1).astype(jnp.float32)
            return fn(sel, *args), cache

        n_slots = self.n_slots

        def first_sample(logits, slot, sp, keys, history, bias, dry):
            # the first token of a generation: the prefill's row placed among the slots and
            # sampled in one executable (as eager ops, the placement compiled 4 small programs
            # in every process, on the time-to-first-token path)
            rows = jnp.zeros((n_slots, logits.shape[-1]), jnp.float32).at[slot].set(logits)
            toks, mu = _sample_rows(rows, sp, keys, jnp.zeros(n_slots, jnp.int32), history,
                                    bias, dry)
            return toks, mu, chain_rows(rows, sp, history, bias, dry)

        if aot is not None and plan is None:
            # programs of the ahead-of-time cache are named apart (see engine/aot.py)
            for f in (forward_slot, first_sample, decode_sample, decode_loop):
                f.__name__ = f.__qualname__ = f"aot_{f.__name__}"
        # host: which outputs the host reads (a plan keeps those replicated); None: the only one
        jit = (plan.jit if plan is not None
               else _committed_jit if getattr(model, "host_layers", None) is not None else _jit)
        kv = ("kv_len",)
        self._forward_slot = jit(forward_slot, kv, ("cache",), host=(0,))
        self._forward_all = jit(forward_all, kv, ("cache",), host=(0,))
        self._forward_embd = jit(forward_embd, ("kv_len", "bidir"), ("cache",), host=(0,))
        self._forward_logprobs = jit(forward_logprobs, kv, ("cache",), host=(0, 1))
        self._forward_reduce = jit(forward_reduce, ("kv_len", "lo", "n", "fn"), ("cache",),
                                   host=(0,))
        self._decode_sample = jit(decode_sample, kv, ("cache", "history"),
                                  host=(0, 1, 3, 4, 5))
        self._first_sample = jit(first_sample, (), (), host=(0, 1, 2))
        self._decode_loop = jit(decode_loop, ("kv_len", "chunk"), ("cache", "history"),
                                host=(0, 3, 4))
        self._move = self._build_move() if self._kv_rope is not None else None
        if aot is not None and plan is None:
            # what the closures above hold that no argument shows
            mine = aot.extend(repr((num, self.n_slots, self.ctx_size, self.max_len,
                                    self._model_type.__qualname__, self._paged)))
            self._forward_slot = mine.wrap("forward_slot", self._forward_slot, kv)
            self._first_sample = mine.wrap("first_sample", self._first_sample)
            self._decode_sample = mine.wrap("decode_sample", self._decode_sample, kv)
            self._decode_loop = mine.wrap("decode_loop", self._decode_loop, ("kv_len", "chunk"))

        def export(cache, slot, length):
            if cache.paged:  # the slot's pages in order: the dense stacked cache's rows
                return [_slot_pages(a, cache.block_table[slot], length) for a in (*cache.k,
                                                                                  *cache.v)]
            return [jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False)[..., :length, :]
                    for a in _seq_leaves(cache)]

        def import_(cache, slot, rows):
            if cache.paged:
                pools = [_put_slot_pages(a, cache.block_table[slot], r)
                         for a, r in zip((*cache.k, *cache.v), rows, strict=True)]
                return cache.replace(pools[:1], pools[1:])
            leaves, tree = jax.tree.flatten(cache)
            it = iter(rows)
            out = []
            for a in leaves:
                if a.ndim >= 4:
                    r = next(it).astype(a.dtype)[None]
                    a = jax.lax.dynamic_update_slice(a, r, (slot,) + (0,) * (a.ndim - 1))
                out.append(a)
            return jax.tree.unflatten(tree, out)

        self._export = jax.jit(export, static_argnames="length")
        self._import = jax.jit(import_, donate_argnums=0)

    # ------------------------------------------------------------------ cache / slots
    def update_params(self, model: nnx.Module) -> None:
        """Take the model's current parameter values (new LoRA scales, say). The structure must
        be the one this Engine compiled for, so the programs are reused as they are; a cached
        prefix computed with the old values is dropped."""
        gd, state = nnx.split(model)
        if gd != self.graphdef:
            raise ValueError("update_params: the model's structure changed; build a new Engine")
        self.state = self.plan.shard_state(state) if self.plan is not None else state
        self.reset()

    def release(self, weights: bool = True) -> None:
        """Let go of the KV cache (and the weights, unless ``weights`` is False): llama-server's
        sleeping state. Every slot is emptied; the compiled programs stay, so ``restore``
        (with the same model structure) runs them again without compiling."""
        self.cache = None
        if weights:
            self.state = None
        self._zero_bias = None
        self.pos[:] = 0
        self.tokens = [[] for _ in range(self.n_slots)]
        self._delta_marks = [[] for _ in range(self.n_slots)]

    def restore(self, model: nnx.Module | None = None) -> None:
        """Undo ``release``: a fresh empty cache, and the parameters of ``model`` (built the
        way the released one was) when the weights were let go."""
        if model is not None:
            gd, state = nnx.split(model)
            if gd != self.graphdef:
                raise ValueError("restore: the model's structure changed; build a new Engine")
            self.state = self.plan.shard_state(state) if self.plan is not None else state
        self.cache = self._new_cache(self.n_slots, slots=True)
        if self.mrope:
            self._put_pos_delta()
        self.reset()

    def _paged_config(self, paged: bool | None, page_size: int, kv_pages: int | None,
                      impl: str | None) -> dict | None:
        """The paged cache's settings, or None for the dense cache. Not (yet) for an
        architecture whose own cache layout has no paged form (``make_cache`` without the
        model's ``paged_cache``; DeepSeek2's latent cache has one) nor over a sharding plan:
        asked for there, a ConfigError; by default, the dense cache."""
        on_cpu = jax.default_backend() == "cpu"
        own = self._make_cache is not None and not getattr(self._model_type, "paged_cache",
                                                            False)
        if not paged:
            return None
        if self._split:
            raise ConfigError("the paged KV cache does not support partial offload "
                              "(--n-gpu-layers) yet")
        if own:
            raise ConfigError(f"the paged KV cache does not support the {self.spec.arch} "
                              f"cache layout yet")
        if self.plan is not None:
            raise ConfigError("the paged KV cache does not support a sharding plan yet")
        if page_size < 1 or page_size & (page_size - 1):
            raise ConfigError(f"KV page size must be a power of two, got {page_size}")
        impl = impl or ("xla" if on_cpu else "pallas")
        if impl == "pallas" and page_size < 16:  # a page is one tile of the kernel's dots
            raise ConfigError(f"KV page size {page_size} is below the kernel's 16")
        max_pages = -(-self.max_len // page_size)
        n_pages = int(kv_pages) if kv_pages is not None else self.n_slots * max_pages + 1
        if n_pages < 2:
            raise ConfigError(f"a KV page pool needs at least 2 pages, got {n_pages}")
        return {"page_size": page_size, "n_pages": n_pages, "impl": impl,
                "max_pages": max_pages}

    @property
    def paged(self) -> bool:
        return self._paged is not None

    def _need_pages(self, slot: int, n_tokens: int) -> None:
        """Pages for a slot's positions below ``n_tokens`` before a step writes them."""
        if self.pages is not None:
            self.pages.ensure(slot, n_tokens)

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Make sure a slot can hold ``n_tokens`` (the paged cache: take its pages now, or
        raise ContextError if the pool cannot give them); a no-op for the dense cache. The
        server calls it per slot before a batched step, so a full pool fails one request, not
        the batch."""
        self._need_pages(slot, n_tokens)

    def _sync_table(self) -> None:
        """The host's block table into the cache, when it changed (before each step)."""
        pg = self.pages
        if pg is not None and pg.dirty and self.cache is not None:
            self.cache = self.cache.with_table(jax.device_put(pg.table))
            pg.dirty = False

    def _new_cache(self, batch: int, slots: bool = False) -> KVCache:
        """A cache of ``batch`` rows; ``slots``: the Engine's own (paged where configured,
        with a fresh page allocator; the scoring paths' own caches stay dense)."""
        s, num = self.spec, self.numerics
        if slots and self._paged is not None:
            cfg = self._paged
            self.pages = PageAllocator(batch, cfg["max_pages"], cfg["n_pages"],
                                       cfg["page_size"])
            kw = {k: cfg[k] for k in ("page_size", "n_pages", "impl")}
            if self._make_cache is not None:
                return self._make_cache(batch, self.max_len, num.cache_type_k, stacked=True,
                                        paged=kw)
            return PagedKVCache.create(s.n_layer, batch, s.n_head_kv, self.max_len,
                                       s.head_dim, s.head_dim_v, num.cache_type_k,
                                       num.cache_type_v, page_size=cfg["page_size"],
                                       n_pages=cfg["n_pages"], impl=cfg["impl"],
                                       pos_delta=self.mrope)
        # stacked (one array per half) where the model scans its layers: a loop cannot index a
        # tuple of per-layer buffers
        stacked = (num.scan_layers and self.plan is None
                   and getattr(self._model_type, "scans_layers", False))
        if self._make_cache is not None:  # architectures with their own cache layout (MLA)
            cache = self._make_cache(batch, self.max_len, num.cache_type_k, stacked=stacked)
        else:
            cache = KVCache.create(s.n_layer, batch, s.n_head_kv, self.max_len, s.head_dim,
                                   s.head_dim_v, num.cache_type_k, num.cache_type_v,
                                   stacked=stacked, pos_delta=self.mrope)
        return cache if self.plan is None else self.plan.shard_cache(cache)

    def kv_bucket(self, n: int) -> int:
        b = KV_MIN_BUCKET
        while b < n:
            b *= 2
        return min(b, self.max_len)

    def reset(self, slot: int | None = None) -> None:
        for sl in range(self.n_slots) if slot is None else [slot]:
            self.rewind(sl, 0)

    def rewind(self, slot: int, n_keep: int) -> None:
        """Forget all but the first ``n_keep`` tokens of a slot. Cache entries past that are
        left in place: attention never reads past a query's position, and the next tokens
        overwrite them."""
        n_keep = max(0, min(int(n_keep), int(self.pos[slot])))
        self.pos[slot] = n_keep
        if self.pages is not None:
            self.pages.trim(slot, n_keep)
        del self.tokens[slot][n_keep:]
        if self.mrope:
            marks = self._delta_marks[slot]
            before = self.pos_delta(slot)
            while marks and marks[-1][0] > n_keep:
                marks.pop()
            if self.pos_delta(slot) != before:
                self._put_pos_delta()
        h = np.full(HISTORY, -1, np.int32)
        tail = self.tokens[slot][-HISTORY:]
        if tail:
            h[-len(tail):] = tail
        if self.plan is not None and self.plan.mesh.size > 1:  # over a mesh: update it there
            self.history = self.history.at[slot].set(jnp.asarray(h))
            return
        # one device: on the host, since an eager ``.at[].set`` compiles a scatter (and three
        # helpers) in every process, which time to first token pays for
        hist = np.array(self.history)
        hist[slot] = h
        self.history = jax.device_put(hist, may_alias=False)

    def pos_delta(self, slot: int) -> int:
        """How far a slot's next rope position is behind its next cell (M-RoPE, after
        images); 0 for every other model."""
        marks = self._delta_marks[slot]
        return marks[-1][1] if marks else 0

    def next_position(self, slot: int) -> int:
        """The position the slot's next token takes (llama.cpp's n_past)."""
        return int(self.pos[slot]) + self.pos_delta(slot)

    def _put_pos_delta(self) -> None:
        d = np.asarray([self.pos_delta(s) for s in range(self.n_slots)], np.int32)
        # host values moved in (an eager .at[].set would compile programs per process)
        dev = self.plan.replicate(d) if self.plan is not None else jax.device_put(d)
        self.cache = self.cache.with_pos_delta(dev)

    def common_prefix(self, tokens: list[int] | np.ndarray, slot: int) -> int:
        held = self.tokens[slot]
        n = 0
        for a, b in zip(held, tokens):
            if a != int(b):
                break
            n += 1
        return n

    def prefill_cached(self, tokens: list[int] | np.ndarray, slot: int = 0) -> tuple[jax.Array, int]:
        """Prefill reusing the longest prefix the slot already holds (prompt cache).

        Returns (logits after the last token, number of prompt tokens reused). At least the last
        token is always evaluated, since its logits are needed."""
        toks = [int(t) for t in tokens]
        keep = min(self.common_prefix(toks, slot), len(toks) - 1)
        self.rewind(slot, keep)
        return self.prefill(toks[keep:], slot), keep

    # ------------------------------------------------------------------ forward passes
    def prefill(self, tokens: list[int] | np.ndarray, slot: int = 0,
                all_logits: bool = False) -> jax.Array:
        """Append ``tokens`` to a slot's sequence; return logits [V] after the last one, or
        with ``all_logits`` [n, V] after each (speculative verification)."""
        toks = np.asarray(tokens, np.int32)
        n = len(toks)
        if n == 0:
            raise ContextError("empty prompt: nothing to evaluate")
        if self.pos[slot] + n > self.ctx_size:
            raise ContextError(
                f"prompt of {n} tokens does not fit: {self.pos[slot]} already in context, "
                f"context size {self.ctx_size} (raise runtime.ctx_size / --ctx-size)"
            )
        self._need_pages(slot, int(self.pos[slot]) + n)  # all of them first: fail before work
        logits = None
        outs = []
        i = 0
        while i < n:
            chunk = toks[i : i + PREFILL_CHUNK]
            m = len(chunk)
            t = _bucket(m)
            buf = np.zeros((1, t), np.int32)
            buf[0, :m] = chunk
            pos0 = self.pos[slot : slot + 1].copy()
            kv_len = self.kv_bucket(int(pos0[0]) + t)
            # numpy arguments: jit transfers them itself, where jnp.asarray compiles a copy
            last = None if all_logits else np.asarray([m - 1], np.int32)
            self._need_pages(slot, int(pos0[0]) + m)
            self._sync_table()
            logits, self.cache = self._forward_slot(
                self.state, buf, pos0, self.cache, np.int32(slot), last, kv_len=kv_len)
            if all_logits:
                outs.append(logits[:m])
            self.pos[slot] += m
            i += m
        self.tokens[slot].extend(int(t) for t in toks)
        self.rewind(slot, int(self.pos[slot]))  # refresh the penalty window
        heap.trim_after_compile()
        return jnp.concatenate(outs, axis=0) if all_logits else logits

    def prefill_embeddings(self, embd: np.ndarray, slot: int = 0, bidir: bool = False,
                           placeholder: int = -1, positions: np.ndarray | None = None,
                           n_pos: int | None = None) -> jax.Array:
        """Append input embeddings [n, n_embd] (an image's, from the mmproj) to a slot's
        sequence in one batch (``bidir``: attending to each other non-causally, which needs
        the whole image in one batch, as llama.cpp's); returns the logits [V] after the last.
        The slot's token list records ``placeholder`` for each, so no cached prompt prefix
        extends past an image. M-RoPE models take the embeddings' ``positions`` [n, 4] and
        the ``n_pos`` positions they use up (the text after them continues from there)."""
        embd = np.asarray(embd, np.float32)
        n = embd.shape[0]
        if embd.ndim != 2 or embd.shape[1] != self.spec.n_embd:
            raise ContextError(f"image embeddings of shape {embd.shape} do not fit the model's "
                               f"width {self.spec.n_embd}")
        if self.pos[slot] + n > self.ctx_size:
            raise ContextError(
                f"an image of {n} tokens does not fit: {self.pos[slot]} already in context, "
                f"context size {self.ctx_size} (raise runtime.ctx_size / --ctx-size)")
        if self.mrope != (positions is not None):
            raise ContextError("image positions are M-RoPE's: given exactly for an M-RoPE "
                               "model")
        mpos = None
        if positions is not None:
            mpos = np.asarray(positions, np.int32).reshape(1, n, 4)
        pos0 = self.pos[slot : slot + 1].copy()
        kv_len = self.kv_bucket(int(pos0[0]) + n)
        self._need_pages(slot, int(pos0[0]) + n)
        self._sync_table()
        logits, self.cache = self._forward_embd(
            self.state, embd[None], pos0, self.cache, np.int32(slot),
            np.asarray([n - 1], np.int32), kv_len=kv_len, bidir=bool(bidir), mpos=mpos)
        if positions is not None:
            delta = self.pos_delta(slot) + int(n if n_pos is None else n_pos) - n
            self.pos[slot] += n
            self._delta_marks[slot].append((int(self.pos[slot]), delta))
            self._put_pos_delta()
        else:
            self.pos[slot] += n
        self.tokens[slot].extend([placeholder] * n)
        return logits

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
        for i in range(0, t, PREFILL_CHUNK):
            chunk = tokens[:, i : i + PREFILL_CHUNK]
            m = chunk.shape[1]
            tb = _bucket(m)
            buf = np.zeros((b, tb), np.int32)
            buf[:, :m] = chunk
            pos0 = np.full(b, i, np.int32)
            logits, cache = self._forward_all(self.state, jnp.asarray(buf), jnp.asarray(pos0),
                                              cache, kv_len=self.kv_bucket(i + tb))
            out.append(np.asarray(logits[:, :m], np.float32))
        return np.concatenate(out, axis=1)

    def token_logprobs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sequences [B, T] from empty caches: log p(tokens[:, t+1] | tokens[:, :t+1]) and
        the argmax token at each position t < T-1, both [B, T-1]. Used by perplexity."""
        tokens = np.asarray(tokens, np.int32)
        b, t = tokens.shape
        if t > self.ctx_size:
            raise ContextError(f"{t} tokens exceed the context size {self.ctx_size}")
        targets = np.full((b, t), -1, np.int32)
        targets[:, :-1] = tokens[:, 1:]
        cache = self._new_cache(b)
        lps, tops = [], []
        step = PREFILL_CHUNK
        for i in range(0, t, step):
            m = min(step, t - i)
            tb = _bucket(m)
            buf = np.zeros((b, tb), np.int32)
            buf[:, :m] = tokens[:, i : i + m]
            tg = np.full((b, tb), -1, np.int32)
            tg[:, :m] = targets[:, i : i + m]
            lp, top, cache = self._forward_logprobs(
                self.state, jnp.asarray(buf), jnp.asarray(tg), jnp.full(b, i, jnp.int32), cache,
                kv_len=self.kv_bucket(i + tb))
            lps.append(np.asarray(lp[:, :m]))
            tops.append(np.asarray(top[:, :m]))
        return np.concatenate(lps, 1)[:, :-1], np.concatenate(tops, 1)[:, :-1]

    def reduce_scored(self, tokens: np.ndarray, first: int, fn, *args: np.ndarray):
        """Run sequences [B, T] from empty caches and return ``fn(logits, *args)`` evaluated
        in-graph on the f32 logits [B, n, V] at positions ``first .. T-2`` (n = T-1-first: the
        positions predicting tokens first+1 .. T-1, llama-perplexity's scored half).

        ``args`` are arrays [B, n, ...] aligned with those positions (sliced per compiled piece);
        ``fn`` (a module-level function: it keys the compile cache) returns a pytree of arrays
        [B, m, ...], which come back to the host concatenated along axis 1."""
        tokens = np.asarray(tokens, np.int32)
        b, t = tokens.shape
        if t > self.ctx_size:
            raise ContextError(f"{t} tokens exceed the context size {self.ctx_size}")
        if not 0 <= first < t - 1:
            raise ContextError(f"no positions to score: first={first}, {t} tokens")
        cache = self._new_cache(b)
        outs = []
        step = PREFILL_CHUNK
        for i in range(0, t - 1, step):
            m = min(step, t - i)
            tb = _bucket(m)
            buf = np.zeros((b, tb), np.int32)
            buf[:, :m] = tokens[:, i : i + m]
            pos0, kv_len = jnp.full(b, i, jnp.int32), self.kv_bucket(i + tb)
            lo, hi = max(first, i), min(t - 1, i + m)
            if hi <= lo:  # nothing scored in this piece: it only fills the cache
                _, cache = self._forward_all(self.state, jnp.asarray(buf), pos0, cache,
                                             kv_len=kv_len)
                continue
            piece = tuple(jnp.asarray(a[:, lo - first : hi - first]) for a in args)
            out, cache = self._forward_reduce(self.state, jnp.asarray(buf), pos0, cache, piece,
                                              kv_len=kv_len, lo=lo - i, n=hi - lo, fn=fn)
            outs.append(jax.tree.map(np.asarray, out))
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *outs)

    def zero_rows(self) -> jax.Array:
        """[slots, vocab] zeros on the device (no logit bias, no DRY penalty), made once: not
        a host copy every step."""
        if self._zero_bias is None:
            self._zero_bias = jax.device_put(
                np.zeros((self.n_slots, self.spec.n_vocab), np.float32))
        return self._zero_bias

    def step(self, tokens: np.ndarray, active: np.ndarray, sp: BatchSampling, keys: jax.Array,
             steps: np.ndarray, bias: jax.Array | None = None,
             dry: jax.Array | None = None,
             host: dict[int, HostSampler] | None = None) -> tuple[np.ndarray, jax.Array]:
        """One batched decode step over all slots: feed ``tokens[b]`` to each active slot and
        sample its next token (``dry``: per-slot DRY penalties, ``dry.penalty_row``; the
        slots' mirostat state moves in ``self.mu``; ``host``: slots whose draw is llama.cpp's,
        made on the host by the request's sampler). Inactive slots compute but do not
        advance."""
        pos0 = self.pos.copy()
        need = int(pos0[active].max()) + 1 if active.any() else 1
        bias = self.zero_rows() if bias is None else bias
        dry = self.zero_rows() if dry is None else dry
        for b in np.nonzero(active)[0]:
            self._need_pages(int(b), int(pos0[b]) + 1)
        self._sync_table()
        nxt, logits, self.cache, self.history, mu, chain = self._decode_sample(
            self.state, np.asarray(tokens, np.int32), pos0, self.cache, sp, keys,
            np.asarray(steps, np.int32), self.history, bias, dry, self.mu, np.asarray(active),
            kv_len=self.kv_bucket(need))
        self.mu[active] = np.asarray(mu)[active]
        self.pos[active] += 1
        for b in np.nonzero(active)[0]:
            self.tokens[b].append(int(tokens[b]))
        heap.trim_after_compile()
        return host_draws(np.asarray(nxt), chain, host, active), logits

    def decode_chunk(self, tokens: np.ndarray, active: np.ndarray, sp: BatchSampling,
                     keys: jax.Array, steps: np.ndarray, left: np.ndarray, stop_ids,
                     limit: int, bias: jax.Array | None = None,
                     dry: jax.Array | None = None, p_min: float = 0.0) -> np.ndarray:
        """Up to ``limit`` decode steps for the active slots in one dispatch, on the device
        (step() ``limit`` times, without a host round trip per token). Each active slot feeds
        ``tokens[b]`` and then each token it draws, until it draws a stop id (``stop_ids``,
        not fed), has drawn ``left[b]`` tokens, or ``limit`` steps ran. Returns [limit, B]:
        the token slot b drew at each step, -1 after it left. Device draws only: a request
        whose draw is llama.cpp's (``HostSampler``) or whose penalties are computed on the host
        (DRY) steps token by token. ``p_min`` > 0: a slot also leaves, drawing nothing, once
        its top-10 candidates' largest probability is below it (a draft model's confidence
        rule). The caller keeps ``pos + limit <= ctx_size``."""
        limit = max(1, min(int(limit), DECODE_CHUNK))
        pos0 = self.pos.copy()
        need = int(pos0[active].max()) + limit if active.any() else 1
        ids = sorted({int(t) for t in stop_ids})
        stops = np.full((self.n_slots, -(-max(len(ids), 1) // 16) * 16), -1, np.int32)
        stops[:, : len(ids)] = ids
        bias = self.zero_rows() if bias is None else bias
        dry = self.zero_rows() if dry is None else dry
        try:  # room for every step; what goes unused is trimmed after
            for b in np.nonzero(active)[0]:
                self._need_pages(int(b), min(int(pos0[b]) + limit, self.max_len))
        except ContextError:  # a pool nearly full: one step, if each slot has its next page
            limit = 1
            for b in np.nonzero(active)[0]:
                self._need_pages(int(b), int(pos0[b]) + 1)
        self._sync_table()
        out, self.cache, self.history, mu, pos = self._decode_loop(
            self.state, np.asarray(tokens, np.int32), pos0, self.cache, sp, keys,
            np.asarray(steps, np.int32), self.history, bias, dry, self.mu, np.asarray(active),
            np.asarray(left, np.int32), stops, np.int32(limit), np.float32(p_min),
            kv_len=self.kv_bucket(need),
            chunk=DECODE_CHUNK)
        out = np.asarray(out)[:limit]
        self.mu[active] = np.asarray(mu)[active]
        pos = np.asarray(pos)
        for b in np.nonzero(active)[0]:
            fed = int(pos[b] - pos0[b])
            self.tokens[b] += ([int(tokens[b])] + [int(t) for t in out[:, b]])[:fed]
            self.pos[b] = pos[b]
            if self.pages is not None:
                self.pages.trim(int(b), int(pos[b]))
        heap.trim_after_compile()
        return out

    # ------------------------------------------------------------------ slot state
    def export_slot(self, slot: int) -> tuple[list[int], list[tuple[int, int]], list[np.ndarray]]:
        """What a slot holds: its tokens, its M-RoPE marks and, per cache array, the slot's
        rows for those tokens ([..., n, row], the cache's own dtype: quantized blocks as
        stored). ``import_slot`` puts them back bit for bit."""
        n = int(self.pos[slot])
        self._sync_table()
        rows = self._export(self.cache, np.int32(slot), length=self.kv_bucket(max(n, 1)))
        return (list(self.tokens[slot]), list(self._delta_marks[slot]),
                [np.asarray(r)[..., :n, :] for r in rows])

    def slot_layout(self) -> list[tuple[tuple[int, ...], str]]:
        """Per cache array: a slot's row shape without the sequence axis, and the dtype: what
        ``export_slot``'s arrays must match to be imported."""
        if self.cache is not None and self.cache.paged:  # as the dense stacked cache's rows
            return [((a.shape[0], a.shape[1], a.shape[-1]), str(a.dtype))
                    for a in (*self.cache.k, *self.cache.v)]
        return [((*a.shape[1:-2], a.shape[-1]), str(a.dtype)) for a in _seq_leaves(self.cache)]

    def import_slot(self, slot: int, tokens: list[int], marks: list[tuple[int, int]],
                    rows: list[np.ndarray]) -> None:
        """Replace a slot's contents with ``export_slot``'s output (of this model and cache
        layout: checked by the caller against ``slot_layout``)."""
        n = len(tokens)
        if n > self.ctx_size:
            raise ContextError(f"{n} tokens do not fit the context size {self.ctx_size}")
        length = self.kv_bucket(max(n, 1))
        padded = []
        for r in rows:
            buf = np.zeros((*r.shape[:-2], length, r.shape[-1]), r.dtype)
            buf[..., :n, :] = r
            padded.append(buf)
        if self.pages is not None:
            self.rewind(slot, 0)
            self._need_pages(slot, n)
            self._sync_table()
        self.cache = self._import(self.cache, np.int32(slot), padded)
        self.pos[slot] = n
        self.tokens[slot] = [int(t) for t in tokens]
        if self.mrope:
            self._delta_marks[slot] = [(int(a), int(b)) for a, b in marks]
            self._put_pos_delta()
        self.rewind(slot, n)  # the penalty window from the restored tokens

    # ------------------------------------------------------------------ context shift
    def can_shift(self) -> bool:
        # M-RoPE: llama.cpp refuses to shift positions of 4 per token (seq_add asserts); the
        # paged cache has no move program yet
        return self._kv_rope is not None and not self.mrope and not self.paged

    def shift_context(self, slot: int, n_keep: int, n_discard: int | None = None) -> int:
        """llama.cpp's context shift: keep the first ``n_keep`` tokens, drop the next
        ``n_discard`` (default: half of the rest), slide the remainder down and re-rotate its
        keys by the distance moved (llama.cpp's seq_rm + seq_add and K-shift). Returns the
        number of tokens dropped."""
        if not self.can_shift():
            raise ContextError(f"context shift is not supported for the {self.spec.arch} cache")
        if n_discard is None:
            n_keep = max(0, min(int(n_keep), int(self.pos[slot]) - 2))
            n_discard = (int(self.pos[slot]) - n_keep) // 2
        n_keep, n_discard = int(n_keep), int(n_discard)
        if n_keep < 0 or n_keep + n_discard > int(self.pos[slot]):
            raise ContextError(f"cannot discard {n_discard} tokens after {n_keep} of "
                               f"{int(self.pos[slot])}")
        if n_discard <= 0:
            if n_discard == 0 and n_keep < int(self.pos[slot]):
                return 0  # llama-server may clamp to nothing dropped
            raise ContextError("context is full and nothing can be discarded")
        p = np.arange(self.max_len, dtype=np.int32)
        src = np.where(p < n_keep, p, np.minimum(p + n_discard, self.max_len - 1))
        self.cache = self._move(self.cache, np.int32(slot), src.astype(np.int32),
                                np.where(p < n_keep, 0, -n_discard).astype(np.int32))
        toks = self.tokens[slot]
        self.tokens[slot] = toks[:n_keep] + toks[n_keep + n_discard :]
        self.pos[slot] -= n_discard
        return n_discard

    def reuse_chunks(self, slot: int, tokens: list[int], n_past: int, n_min: int) -> int:
        """llama-server's --cache-reuse (server-context.cpp, n_cache_reuse): past the ``n_past``
        tokens the slot shares with ``tokens``, every run of at least ``n_min`` tokens of
        ``tokens`` found further along in the slot's cache is moved into place (its keys
        re-rotated by the distance moved: seq_rm + seq_add and the K-shift), skipping the
        cached tokens between. The slot then holds the reused tokens only; returns their
        number (the new n_past)."""
        held = self.tokens[slot]
        if n_min <= 0 or not self.can_shift():
            self.rewind(slot, n_past)
            return n_past
        src = np.arange(self.max_len, dtype=np.int32)
        delta = np.zeros(self.max_len, np.int32)
        out = held[:n_past]
        head_c = head_p = n_past
        while head_c < len(held) and head_p < len(tokens):
            n = 0
            while (head_c + n < len(held) and head_p + n < len(tokens)
                   and held[head_c + n] == int(tokens[head_p + n])):
                n += 1
            if n >= n_min:
                # chunks only ever move down (head_p <= head_c) and never overlap, so each
                # cell moves once and the moves can be done in one gather
                src[head_p: head_p + n] = np.arange(head_c, head_c + n)
                delta[head_p: head_p + n] = head_p - head_c
                out += held[head_c: head_c + n]
                head_c += n
                head_p += n
            else:
                head_c += 1
        if head_p > n_past:
            self.cache = self._move(self.cache, np.int32(slot), src, delta)
            self.tokens[slot] = out
            self.pos[slot] = head_p
        self.rewind(slot, head_p)  # and the penalty window from the slot's new tokens
        return head_p

    def _build_move(self):
        """One slot's cells gathered from ``src`` (per position), the keys of those moved
        re-rotated by their ``delta`` (llama.cpp's K-shift: rope of the dequantized keys by
        the position change, quantized back); cells with delta 0 are left as they are."""
        ropes = self._kv_rope
        head_dim = self.spec.head_dim
        num = self.numerics
        # a rotated quantized K (models/common.kv_rotation): llama.cpp's shift rotates the
        # dequantized keys back, ropes every cell (unmoved ones by 0), rotates forward again
        rk = kv_rotation((self.cache.k_type, "f32"), head_dim, head_dim)[0]

        def move(cache, slot, src, delta):
            with use_numerics(num):
                return _move(cache, slot, src, delta)

        def _move(cache, slot, src, delta):
            moved = (delta != 0)[:, None, None]
            ks, vs = [], []
            for i, (kl, vl) in enumerate(zip(*cache.layers())):
                base, dim, neox, scale, *yarn = ropes[i]
                krow = kvquant.dequantize(kl[slot][:, src], cache.k_type, head_dim)  # [KVH,S,D]
                x = krow.transpose(1, 0, 2)[None]  # [1, S, KVH, D]
                if rk:
                    x = fwht(x, rk)
                    krow = fwht(rope(x, delta[None], base, dim, neox, scale,
                                     yarn=yarn[0] if yarn else None)[0], rk).transpose(1, 0, 2)
                elif yarn and yarn[0] is not None:
                    # llama.cpp's K-shift is a rope with the context's YaRN parameters over
                    # every cell (the unmoved ones by 0): its magnitude factor scales them all
                    # once more
                    krow = rope(x, delta[None], base, dim, neox, scale,
                                yarn=yarn[0])[0].transpose(1, 0, 2)
                else:
                    rot = rope(x, delta[None], base, dim, neox, scale)[0]
                    krow = jnp.where(moved, rot, x[0]).transpose(1, 0, 2)
                ks.append(kl.at[slot].set(kvquant.quantize(krow, cache.k_type).astype(kl.dtype)))
                vs.append(vl.at[slot].set(vl[slot][:, src]))
            if cache.stacked:
                return cache.replace((jnp.stack(ks, 1),), (jnp.stack(vs, 1),))
            return cache.replace(ks, vs)

        return jax.jit(move, donate_argnums=0)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: list[int], params: SamplingParams | None = None,
                 max_tokens: int = 128, stop_ids: set[int] | frozenset[int] = frozenset(),
                 slot: int = 0, on_full: str = "stop", n_keep: int = 0,
                 append: bool = False, dry_breakers: dict | None = None) -> Iterator[int]:
        """Yield generated token ids for one sequence.

        Stops on a stop id (not yielded) or ``max_tokens``. When the context fills up,
        ``on_full="stop"`` ends generation and ``"shift"`` applies a context shift keeping the
        first ``n_keep`` tokens. A prompt sharing a prefix with what the slot holds reuses it
        (``timings.extra["cached_tokens"]``). ``append``: the prompt continues what the slot
        holds (after an image's embeddings) instead of replacing it. ``dry_breakers``: the
        request's DRY restart sequences (``dry.process_breakers``), when it uses DRY.
        """
        params = params or SamplingParams()
        t0 = time.perf_counter()
        tm = self.timings = Timings(prompt_tokens=len(prompt))
        if append:
            logits, cached = self.prefill(prompt, slot), 0
        else:
            logits, cached = self.prefill_cached(prompt, slot)
        tm.extra["cached_tokens"] = cached
        sp = BatchSampling.stack([params] * self.n_slots, host_draws=True)
        seed = resolve_seed(params.seed)
        keys = np.broadcast_to(seed_key(seed), (self.n_slots, 2))
        # llama.cpp's draw, from a generator that lives as long as this generation
        host = {slot: HostSampler(params, seed)} if HostSampler.wanted(params) else None
        bias = _bias_array(params.logit_bias, self.spec.n_vocab, self.n_slots)
        use_dry = params.uses_dry()
        dry_np = np.zeros((self.n_slots, self.spec.n_vocab), np.float32) if use_dry else None

        def dry_rows(last: list[int]) -> jax.Array:
            if not use_dry:
                return self.zero_rows()
            penalty_row(self.tokens[slot], params, dry_breakers or {}, self.spec.n_vocab,
                        out=dry_np[slot], then=last)
            return jax.device_put(dry_np)

        toks, mu, chain = self._first_sample(logits, np.int32(slot), sp, keys, self.history,
                                             bias, dry_rows([]))
        tok = int(host_draws(np.asarray(toks), chain, host)[slot])
        self.mu[slot] = np.asarray(mu)[slot]
        t1 = time.perf_counter()
        tm.prompt_s = t1 - t0
        tm.first_token_s = t1 - t0
        active = np.zeros(self.n_slots, bool)
        active[slot] = True
        n = 0
        tm.extra["shifts"] = 0
        # device draws with no host-side penalties: several steps per dispatch
        on_device = host is None and not use_dry and self.loop_decode
        drawn: list[int] = []  # drawn (and all but the last fed) by the last chunk, not yielded
        chunks = 0
        while True:
            if tok in stop_ids:
                break
            yield tok
            n += 1
            tm.gen_tokens = n
            tm.gen_s = time.perf_counter() - t1
            if n >= max_tokens:
                break
            if drawn:
                tok = drawn.pop(0)
                continue
            if self.pos[slot] + 1 > self.ctx_size:
                if on_full != "shift":
                    tm.extra["context_full"] = True
                    break
                self.shift_context(slot, n_keep)
                tm.extra["shifts"] += 1
            toks = np.zeros(self.n_slots, np.int32)
            toks[slot] = tok
            steps = np.full(self.n_slots, n, np.int32)
            if on_device:
                limit = min(_CHUNKS[min(chunks, len(_CHUNKS) - 1)], max_tokens - n,
                            self.ctx_size - int(self.pos[slot]))
                chunks += 1
                left = np.zeros(self.n_slots, np.int32)
                left[slot] = max_tokens - n
                out = self.decode_chunk(toks, active, sp, keys, steps, left, stop_ids, limit,
                                        bias)
                drawn = [int(t) for t in out[:, slot] if t >= 0]
                tok = drawn.pop(0)
                continue
            nxt, _ = self.step(toks, active, sp, keys, steps, bias, dry_rows([tok]), host)
            tok = int(nxt[slot])
        tm.gen_s = time.perf_counter() - t1


def _slot_pages(pool: jax.Array, table_row: jax.Array, length: int) -> jax.Array:
    """A slot's first ``length`` positions of a pool [L, KVH, P, ps, row] in order:
    [L, KVH, length, row]."""
    ps = pool.shape[3]
    n = -(-length // ps)
    x = pool[:, :, table_row[:n]]  # [L, KVH, n, ps, row]
    return x.reshape(*x.shape[:2], n * ps, x.shape[-1])[:, :, :length]


def _put_slot_pages(pool: jax.Array, table_row: jax.Array, rows: jax.Array) -> jax.Array:
    """``_slot_pages`` inverted: rows [L, KVH, length, row] into the slot's pages (columns
    past its pages point at the scratch page)."""
    ps = pool.shape[3]
    length = rows.shape[2]
    n = -(-length // ps)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, n * ps - length), (0, 0)))
    rows = rows.reshape(*rows.shape[:2], n, ps, rows.shape[-1]).astype(pool.dtype)
    return pool.at[:, :, table_row[:n]].set(rows)


def _seq_leaves(cache) -> list[jax.Array]:
    """The cache's K/V arrays ([B, ..., S, row]; not M-RoPE's per-slot offsets), in tree
    order."""
    return [a for a in jax.tree.leaves(cache) if a.ndim >= 4]


def _bias_array(logit_bias: dict[int, float], n_vocab: int, n_slots: int) -> jax.Array:
    b = np.zeros((n_slots, n_vocab), np.float32)
    for k, v in (logit_bias or {}).items():
        if 0 <= int(k) < n_vocab:
            b[:, int(k)] = v
    return jax.device_put(b)  # not jnp.asarray: that compiles a copy program per process


def chain_rows(logits, sp, history, bias, dry=None):
    """The rows the host's llama.cpp chain starts from (``sampling.chain_input``); [B, 0] when
    no row is drawn on the host (``BatchSampling.host_chain``)."""
    if not sp.host_chain:
        return jnp.zeros((logits.shape[0], 0), jnp.float32)
    return chain_input(logits[..., : bias.shape[-1]], sp, history, bias,
                       None if dry is None else dry[..., : bias.shape[-1]])


def host_draws(nxt: np.ndarray, chain: jax.Array, host: dict[int, HostSampler] | None,
               active: np.ndarray | None = None) -> np.ndarray:
    """``nxt`` with the rows in ``host`` drawn by their request's llama.cpp sampler from
    ``chain`` (the device's [B, V] chain input); the device's draw stays for the others."""
    if not host:
        return nxt
    nxt = np.array(nxt)
    rows = np.asarray(chain)
    if rows.shape[-1] == 0:
        raise RuntimeError("host draws need BatchSampling.stack(..., host_draws=True)")
    for b, smpl in host.items():
        if active is None or active[b]:
            nxt[b] = smpl.sample(rows[b])
    return nxt


def _sample_rows(logits, sp, keys, steps, history, bias, dry=None, mu=None):
    """Per-row keys derived from (seed key, step) so a seeded request is reproducible whatever
    else shares the batch. Returns the tokens and the rows' next mirostat mu."""
    raw = jax.vmap(lambda k, s: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(k), s)))(keys.astype(jnp.uint32), steps)
    return sample_state(logits[..., : bias.shape[-1]], sp, raw, history, bias,
                        None if dry is None else dry[..., : bias.shape[-1]], mu)
