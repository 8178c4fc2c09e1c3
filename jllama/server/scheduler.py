"""Continuous batching: one thread owns the Engine and interleaves every request's tokens.

Each loop iteration (1) drops cancelled requests, (2) admits queued requests into free slots,
(3) spends a bounded prefill budget on admitted prompts (so a long prompt delays running streams
by one chunk, not by its whole length) and (4) runs ONE batched ``engine.step`` for every slot
that is decoding. A request that finishes frees its slot at once; a new one joins at the next
step. The asyncio side never touches the engine: it submits a ``GenRequest`` and reads
``Event``s that the thread hands over through the event loop (``call_soon_threadsafe``).

Per-request sampling lives in per-slot rows of ``BatchSampling``/bias/keys: the device applies
the logit bias, penalties, DRY and top-n-sigma to every row; a request whose draw is random then
takes its token from its own ``dist.HostSampler`` (llama.cpp's chain and generators, made when
the request takes its slot from its seed, as llama-server makes a request's samplers), so a
seeded request gives llama-server's tokens whoever shares the batch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jllama.engine.dist import HostSampler, resolve_seed
from jllama.engine.dry import penalty_row, process_breakers
from jllama.engine.engine import DECODE_CHUNK, PREFILL_CHUNK, chain_rows, host_draws
from jllama.engine.multimodal import prefill_image
from jllama.engine.sampling import BatchSampling, SamplingParams, sample_state, seed_key
from jllama.errors import ContextError, PagePoolError
from jllama.server.metrics import Metrics
from jllama.server.prompt_cache import PromptCache

log = logging.getLogger("jllama.server")
# llama-server's --slot-prompt-similarity default: a slot sharing no more than this share of a
# prompt is not picked for it
SLOT_SIMILARITY = 0.1



def slot_index(id_slot: int, n_slots: int) -> int:
    """llama-server's get_slot_by_id: an id wraps around the slot count, a negative one as
    the unsigned 64-bit number C++ turns it into (``int % size_t``)."""
    return (id_slot % 2**64) % n_slots


class QueueFull(Exception):
    pass


class SchedulerDead(Exception):
    """The scheduler thread stopped for good: nothing submitted would ever be served."""


# loop turns in a row that raise before the scheduler gives up (/health then answers 503): one
# bad turn fails the requests it was running; a run of them means the engine itself is broken
MAX_FAILED_TURNS = 3


@dataclass
class Event:
    kind: str  # "text" | "done" | "error" | "progress" (prompt chunks, when asked for)
    text: str = ""
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    status: int = 500
    message: str = ""
    # llama-server's per-token probabilities of the text in this event (requests with n_probs)
    probs: list[dict] | None = None
    tokens: list[int] | None = None  # "text": the ids of the tokens behind it
    processed: int = 0  # "progress": prompt tokens evaluated so far (cached ones included)
    id_slot: int = -1  # "done": the slot that served the request
    truncated: bool = False  # "done": llama-server's truncated (the context filled up)
    tokens_cached: int = 0  # "done": tokens the slot holds now (llama-server's tokens_cached)
    seconds: float = 0.0  # "progress": time spent on the prompt so far
    # "done" of a speculative request: tokens drafted and how many the target accepted
    draft_n: int = 0
    draft_accepted: int = 0


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int | None
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    sink: Callable[[Event], None] = lambda ev: None
    constraint: object | None = None  # grammar.JsonConstraint: masks tokens, ends when done
    cache_prompt: bool = True
    # per-request LoRA scales by adapter id (llama-server's "lora"; ids not named: 0); None:
    # the server's current scales (GET/POST /lora-adapters)
    lora: dict[int, float] | None = None
    n_probs: int = 0  # llama-server's n_probs / top_logprobs: top candidates per token
    post_sampling: bool = False  # probabilities after the sampling chain (post_sampling_probs)
    ignore_eos: bool = False  # end-of-generation tokens get a -inf bias (llama-server's rule)
    # a prompt with images: token ids and engine.multimodal.ImageChunks in order (then
    # prompt_ids holds its text tokens only; the prompt cache matches its images by content)
    prompt_items: list | None = None
    return_progress: bool = False  # llama-server's return_progress: an event per prompt chunk
    # llama-server's id_slot: the slot to run in (wrapping around the slot count: slot_index);
    # the request waits while that slot is busy. -1: any free slot
    id_slot: int = -1
    # llama-server's context shift (the server's --context-shift): tokens kept at the start
    # (-1: the whole prompt) and dropped per shift (0: half of what follows the kept ones)
    n_keep: int = 0
    n_discard: int = 0
    # llama-server's n_cache_reuse: min chunk of cached tokens moved into place by KV shift
    # (None: the server's --cache-reuse; 0: off)
    n_cache_reuse: int | None = None
    # llama-server's reasoning budget (reasoning_budget.ReasoningBudget): forces the end of
    # the thoughts once they spent their tokens
    reasoning_budget: object | None = None
    # the server's warmup: its slot is left empty and unused (llama-server's warmup clears
    # the memory and takes no slot), so the least-recently-used choice does not see it
    warmup: bool = False
    cancelled: bool = False
    # filled by the scheduler
    stop_word: str | None = None  # the stop string that ended the text, if one did
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish: str | None = None
    truncated: bool = False  # llama-server's: the context filled up (a shift, or the end)
    draft_n: int = 0  # speculative decoding: tokens drafted, and accepted by the target
    draft_accepted: int = 0

    @property
    def n_prompt(self) -> int:
        """Prompt tokens, an image's cells included (llama-server's prompt_n)."""
        if self.prompt_items is None:
            return len(self.prompt_ids)
        return len(expand_items(self.prompt_items))

    def cancel(self) -> None:
        """Thread-safe: the scheduler drops the request (queued or running) at its next turn."""
        self.cancelled = True


class _Active:
    """A request holding a slot."""

    def __init__(self, req: GenRequest, decoder, todo: list[int]):
        self.req = req
        self.decoder = decoder
        self.todo = todo  # prompt tokens still to prefill
        self.gen = None  # speculative generator (single-slot servers), run instead of the steps
        self.last = -1  # last sampled token, fed at the next step
        self.pending = ""  # decoded text held back (possible stop-string start)
        self.hold = max((len(s) for s in req.stop), default=0)
        self.probs: list[dict] = []  # token probabilities not yet sent with text
        self.seed = resolve_seed(req.params.seed)
        self.toks: list[int] = []  # token ids not yet sent with text
        self.rng = np.random.default_rng(self.seed)  # host-side constrained draws
        # llama.cpp's chain and dist draw with the request's generators (llama-server builds a
        # request's samplers when it starts, so they run from its seed afresh)
        self.sampler = (HostSampler(req.params, self.seed) if HostSampler.wanted(req.params)
                        else None)
        self.t_prompt: float | None = None  # when its prompt's first chunk began (progress)


class Scheduler:
    def __init__(self, llm, max_queue: int = 64, metrics: Metrics | None = None,
                 context_shift: bool = False, swa_full: bool = False,
                 prompt_cache: PromptCache | None = None, cache_idle_slots: bool = False,
                 kv_unified: bool = False, sleep_idle_s: float = -1, cache_reuse: int = 0,
                 slot_similarity: float = SLOT_SIMILARITY):
        self.llm = llm
        self.slot_similarity = slot_similarity  # llama-server's -sps (0: never by similarity)
        # when each slot last finished a task (llama-server's t_last_used; -1: never)
        self._last_used = [-1.0] * llm.engine.n_slots
        self.engine = llm.engine
        self.tok = llm.tokenizer
        self.n_slots = self.engine.n_slots
        self.n_vocab = self.llm.spec.n_vocab
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.metrics.slots_total = self.n_slots
        self.queue: deque[GenRequest] = deque()
        # slot actions (save/restore/erase) waiting for their slot to be free
        self._actions: list[tuple[int, Callable, Future]] = []
        # llama-server's --context-shift, where the cache can shift (it turns the flag off
        # otherwise, with a warning)
        self.context_shift = bool(context_shift) and _shift_allowed(llm, swa_full)
        # llama-server's --cache-reuse, off (with a warning) where its cache cannot shift;
        # a request's n_cache_reuse is ignored there too
        self.cache_reuse = int(cache_reuse)
        if self.cache_reuse > 0 and not self._can_reuse():
            log.warning("cache_reuse is not supported by this context, it will be disabled")
            self.cache_reuse = 0
        self.add_bos = bool(getattr(self.tok, "add_bos", False))
        self.slots: list[_Active | None] = [None] * self.n_slots
        self._prefill_turn = 0  # the slot whose prompt goes first in the next _prefill
        self.cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.eog = frozenset(i for i in range(self.tok.n_vocab) if self.tok.is_eog(i))
        self._greedy = SamplingParams.greedy()
        self._dirty = True
        self._sp: BatchSampling | None = None
        self._keys = np.zeros((self.n_slots, 2), np.uint32)
        self._bias_np = np.zeros((self.n_slots, self.n_vocab), np.float32)
        self._bias: jax.Array | None = None
        self._dry_np: np.ndarray | None = None  # DRY penalty rows, filled per step when used
        self._first = jax.jit(_first_token)
        self._token_bytes: list[bytes] | None = None
        self._grammar_bytes: list[bytes] | None = None
        self.steps_run = 0
        self.error: BaseException | None = None  # the last error (a request's or the loop's)
        self.dead: BaseException | None = None  # set when the loop can no longer go on
        # speculative decoding drives one sequence at a time: single-slot servers only
        # LoRA: the scales the server applies by default (POST /lora-adapters sets them) and
        # those the engine holds now; requests with other scales wait until no slot is busy,
        # as llama-server never batches requests with different adapter scales together
        lora = getattr(llm, "lora", None)
        self.lora_default: tuple[float, ...] = tuple(lora.scales) if lora is not None else ()
        self._lora_now = self.lora_default
        # llama-server's --cache-ram (server_prompt_cache) and --cache-idle-slots: idle slots
        # are copied to it when a task starts, and emptied as well with a unified KV cache
        self.prompt_cache = prompt_cache
        self.cache_idle_slots = bool(cache_idle_slots) and prompt_cache is not None
        self.kv_unified = bool(kv_unified)
        # llama-server's --sleep-idle-seconds (server_queue's sleeping state): after that long
        # with no task the loop runs ``sleep_hooks(True)`` (first to last) and waits for
        # ``wait_awake``, then runs ``sleep_hooks(False)`` (last to first)
        self.sleep_idle_s = float(sleep_idle_s)
        self.sleeping = False
        self._wake_req = False
        self._t_last_task = time.monotonic()
        self.sleep_hooks: list[Callable[[bool], None]] = [self._sleep_memory]
        self.release_weights = True
        # most decode steps one turn runs on the device when every running request draws
        # there (Engine.decode_chunk); 1: a step per turn
        self.decode_chunk = DECODE_CHUNK
        self.speculative = getattr(llm, "speculative", None)
        if self.speculative is not None and self.n_slots > 1:
            log.warning("speculative decoding is off: it needs a single-slot server (parallel: 1)")
            self.speculative = None

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jllama-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: GenRequest) -> None:
        if self.dead is not None:
            raise SchedulerDead(f"the scheduler stopped: {type(self.dead).__name__}: "
                                f"{self.dead}")
        with self.cv:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests already waiting "
                                f"(max_queue {self.max_queue})")
            self.queue.append(req)
            self.metrics.queued = len(self.queue)
            self._posted()
            self.cv.notify_all()

    def on_slot(self, slot: int, fn: Callable[[int], object]) -> Future:
        """Run ``fn(slot)`` on the scheduler thread (the engine's owner) once the slot holds no
        request: llama-server defers a slot action on a busy slot until it is released. The
        future gets fn's result or exception."""
        if self.dead is not None:
            raise SchedulerDead(f"the scheduler stopped: {type(self.dead).__name__}: "
                                f"{self.dead}")
        fut: Future = Future()
        with self.cv:
            self._actions.append((slot, fn, fut))
            self._posted()
            self.cv.notify_all()
        return fut

    def lora_scales_for(self, req: GenRequest) -> tuple[float, ...]:
        """llama-server's construct_lora_list: the request's scales by id, 0 for adapters it
        does not name; the defaults when it names none."""
        if not req.lora:
            return self.lora_default
        return tuple(req.lora.get(i, 0.0) for i in range(len(self.lora_default)))

    def set_lora_default(self, scales: dict[int, float]) -> None:
        """POST /lora-adapters: new default scales (adapters not named: 0)."""
        with self.cv:
            self.lora_default = tuple(scales.get(i, 0.0) for i in range(len(self.lora_default)))

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def _posted(self) -> None:
        """A task arrived (caller holds cv): the idle timer restarts, and a sleeping loop is
        asked to wake up (HTTP handlers wait for it first; this covers any other caller)."""
        self._t_last_task = time.monotonic()
        if self.sleeping:
            self._wake_req = True

    def wait_awake(self, timeout: float | None = None) -> bool:
        """llama-server's wait_until_no_sleep: if the loop sleeps, ask it to wake up and wait
        until it has (the model is back). True once awake."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cv:
            if not self.sleeping:
                return True
            self._wake_req = True
            self.cv.notify_all()
            while self.sleeping and self.dead is None and not self._stop:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cv.wait(1.0 if left is None else min(left, 1.0))
            return not self.sleeping

    def _should_sleep(self) -> bool:
        return (self.sleep_idle_s >= 0
                and time.monotonic() - self._t_last_task >= self.sleep_idle_s)

    def _sleep(self) -> None:
        """The sleeping state (caller holds cv and found nothing to do)."""
        log.info("entering sleeping state")
        self.sleeping = True
        self._wake_req = False
        for hook in self.sleep_hooks:
            hook(True)
        while not self._stop and not self._wake_req:
            self.cv.wait()
        if self._stop:
            return
        log.info("exiting sleeping state")
        for hook in reversed(self.sleep_hooks):
            hook(False)
        self.sleeping = False
        self._wake_req = False
        self._t_last_task = time.monotonic()
        self.cv.notify_all()

    def _sleep_memory(self, sleeping: bool) -> None:
        """The model's memory goes on sleeping and comes back on waking (llama-server
        destroys and reloads its context and model). The weights stay when another part of
        the server shares them (an embeddings runner on the same model)."""
        if sleeping:
            if self.prompt_cache is not None:
                self.prompt_cache.clear()
            release = getattr(self.llm, "release_memory", None)
            if release is not None:
                release(weights=self.release_weights)
            else:
                self.engine.release(weights=False)
            self._bias = None
            self._dirty = True
        else:
            restore = getattr(self.llm, "restore_memory", None)
            if restore is not None:
                restore()
            else:
                self.engine.restore()

    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def token_bytes(self) -> list[bytes]:
        """Every token's bytes as it appears in text (control tokens: empty), built once."""
        if self._token_bytes is None:
            self._token_bytes = self._piece_bytes(special=False)
        return self._token_bytes

    def grammar_token_bytes(self) -> list[bytes]:
        """Every token's bytes as llama.cpp's grammar sees them: its piece cache is rendered
        with special=true, so control tokens match their text (end of generation is decided
        apart: empty here)."""
        if self._grammar_bytes is None:
            self._grammar_bytes = self._piece_bytes(special=True)
        return self._grammar_bytes

    def _piece_bytes(self, special: bool) -> list[bytes]:
        out = []
        for i in range(self.tok.n_vocab):
            try:
                b = self.tok.token_to_piece(i, special=special)
            except Exception:  # a token the vocabulary cannot render: no text
                b = b""
            out.append(b"" if i in self.eog else bytes(b))
        return out

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        failed = 0
        try:
            while True:
                with self.cv:
                    while (not self._stop and not self.queue and not any(self.slots)
                           and not self._actions):
                        if self._should_sleep():
                            self._sleep()
                            continue
                        wait = 1.0
                        if self.sleep_idle_s >= 0:
                            left = self.sleep_idle_s - (time.monotonic() - self._t_last_task)
                            wait = min(wait, max(left, 0.01))
                        self.cv.wait(timeout=wait)
                    if self._stop:
                        break
                try:
                    self._iteration()
                    # the time a turn takes is not idle time
                    self._t_last_task = time.monotonic()
                    failed = 0
                except Exception as e:  # the batch itself broke: fail what it was running
                    log.exception("scheduler turn failed")
                    self.error = e
                    failed += 1
                    # mark the scheduler dead before answering: a client that saw its 500
                    # must then see /health say 503, not race the loop's exit
                    if failed >= MAX_FAILED_TURNS:
                        self.dead = e
                    for b, a in enumerate(self.slots):
                        if a is not None:
                            self._fail(b, 500, f"internal error: {type(e).__name__}: {e}")
                    if self.dead is not None:
                        break
        except BaseException as e:  # noqa: BLE001 - e.g. MemoryError: nothing can go on
            self.dead = e
            self.error = e
        reason = "server shutting down" if self.dead is None else \
            f"the scheduler stopped: {type(self.dead).__name__}: {self.dead}"
        for b, a in enumerate(self.slots):
            if a is not None:
                self._fail(b, 503, reason)
        with self.cv:
            while self.queue:
                self.queue.popleft().sink(Event("error", status=503, message=reason))
            for _, _, fut in self._actions:
                fut.set_exception(SchedulerDead(reason))
            self._actions.clear()

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._slot_actions()
        self._admit()
        if self._speculate():
            return
        self._prefill()
        self._decode()

    def _speculate(self) -> bool:
        """Next token of a speculative request (it holds the only slot); False if there is none.
        Grammar-constrained requests take the usual path (they mask each step's logits), as do
        those asking for token probabilities or ignoring end of generation (per-step logits and
        biases the speculative generator does not expose), and those using samplers its
        acceptance test does not mirror (``SamplingParams.uses_extended``: mirostat, DRY,
        typical-p, ...)."""
        a = self.slots[0] if self.speculative is not None else None
        if (a is None or a.req.constraint is not None or a.req.n_probs > 0 or a.req.ignore_eos
                or a.req.reasoning_budget is not None
                or a.req.prompt_items is not None or a.req.params.uses_extended()):
            return False
        eng = self.engine
        if a.gen is None:
            req = a.req
            a.todo = []  # the generator prefills, reusing the prefix _admit kept
            a.gen = self.speculative.generate(req.prompt_ids, req.params,
                                              req.max_tokens or eng.ctx_size, self.eog)
        t0 = time.perf_counter()
        try:
            tok = next(a.gen, None)
        except Exception as e:  # e.g. ContextError
            self._fail(0, 400, str(e))
            return True
        tm = eng.timings
        a.req.draft_n = tm.extra.get("draft_proposed", 0)
        a.req.draft_accepted = tm.extra.get("draft_accepted", 0)
        if a.req.completion_tokens == 0:  # the first token: the prompt was evaluated
            self.metrics.add_prompt(tm.prompt_tokens - tm.extra.get("cached_tokens", 0),
                                    tm.prompt_s)
        if tok is None and tm.extra.get("context_full"):
            self._finish(0, "length")
        elif tok is None:  # the generator keeps end-of-generation tokens to itself
            self._count(a.req)
            self._finish(0, "stop")
        else:
            self._accept(0, tok)
            self.metrics.observe_step(1, time.perf_counter() - t0)
        return True

    def _drop_cancelled(self) -> None:
        with self.cv:
            if any(r.cancelled for r in self.queue):
                self.queue = deque(r for r in self.queue if not r.cancelled)
                self.metrics.queued = len(self.queue)
        for b, a in enumerate(self.slots):
            if a is not None and a.req.cancelled:
                self._free(b)
                self.metrics.cancelled += 1

    def _slot_actions(self) -> None:
        with self.cv:
            ready = [x for x in self._actions if self.slots[x[0]] is None]
            self._actions = [x for x in self._actions if self.slots[x[0]] is not None]
        for slot, fn, fut in ready:
            try:
                fut.set_result(fn(slot))
            except Exception as e:  # the action's own failure (a bad file): its answer
                fut.set_exception(e)

    def _admit(self) -> None:
        free = [b for b, a in enumerate(self.slots) if a is None]
        while free:
            with self.cv:
                # first in, first served, except that a request naming a busy slot waits
                # for it (llama-server defers it) while the others go on
                req = next((r for r in self.queue if r.cancelled or r.id_slot == -1
                            or slot_index(r.id_slot, self.n_slots) in free), None)
                if req is None:
                    return
                want = self.lora_scales_for(req)
                if want != self._lora_now and not req.cancelled:
                    if self.busy_slots():
                        return  # first in, first served: it waits for the batch to drain
                    self._switch_lora(want)
                self.queue.remove(req)
                self.metrics.queued = len(self.queue)
            if req.cancelled:
                continue
            ids = req.prompt_ids
            # llama-server's get_available_slot: the slot the request names, else the free
            # slot whose cached prefix is the largest share of this prompt, above -sps (0:
            # similarity is not used), else the least recently used free one (of equals the
            # last, as its '<=' picks)
            keep = 0
            if req.id_slot != -1:
                best = slot_index(req.id_slot, self.n_slots)
                cands = [best]
            else:
                cands = free
                best = min(reversed(free), key=lambda b: self._last_used[b])
            if req.prompt_items is not None:  # images: each cell's id names its image
                ids = expand_items(req.prompt_items)
            sim = self.slot_similarity
            if req.cache_prompt and sim != 0:
                for b in cands:
                    n = self.engine.common_prefix(ids, b)
                    if n > keep and n / max(len(ids), 1) > sim:
                        best, keep = b, n
            if req.cache_prompt:  # the chosen slot's prefix is reused whichever way it came
                keep = self.engine.common_prefix(ids, best)
            if self.prompt_cache is not None and self._update_cache(req, ids, best):
                keep = self.engine.common_prefix(ids, best) if req.cache_prompt else 0
            n_reuse = self.cache_reuse if req.n_cache_reuse is None else req.n_cache_reuse
            if (req.cache_prompt and n_reuse > 0 and req.prompt_items is None
                    and self._can_reuse()):
                keep = self.engine.reuse_chunks(best, ids, keep, n_reuse)
            keep = min(keep, len(ids) - 1)
            todo: list = list(ids[keep:])
            if req.prompt_items is not None:
                keep, todo = _cut_items(req.prompt_items, keep)
            free.remove(best)
            self.engine.rewind(best, keep)
            req.cached_tokens = keep
            self.metrics.prompt_tokens_cached += keep
            from jllama.tokenizer import StreamDecoder

            self.slots[best] = _Active(req, StreamDecoder(self.tok), todo)
            self._set_row(best, req)
            self.metrics.active = self.busy_slots()
            if self.cache_idle_slots:
                self._cache_idle_slots()

    def _can_reuse(self) -> bool:
        """llama-server's cache reuse needs a cache that can shift and no projector."""
        return getattr(self.llm, "vision", None) is None and self.engine.can_shift()

    def _update_cache(self, req: GenRequest, ids: list, slot: int) -> bool:
        """llama-server's get_available_slot cache step: when the chosen slot was not picked
        for sharing enough of the prompt (similarity <= -sps; llama-server then
        takes its least recently used slot) or would lose most of what it holds, its contents
        go to the host cache and the cached entry best for this prompt comes back into it.
        A slot named by id_slot is taken as it is. True when the slot's contents changed."""
        held = self.engine.tokens[slot]
        lcp = self.engine.common_prefix(ids, slot)
        sim = self.slot_similarity
        if held and sim != 0 and lcp / max(len(ids), 1) > sim:
            update = lcp / len(held) < 0.5
        else:
            update = req.id_slot == -1
        if not update:
            return False
        log.debug("updating prompt cache")
        pc = self.prompt_cache
        pc.save(self.engine, slot)
        if req.cache_prompt and not pc.load(self.engine, slot, [int(t) for t in ids]):
            self.engine.rewind(slot, 0)
        pc.update()
        return True

    def _cache_idle_slots(self) -> None:
        """--cache-idle-slots: on a task's start every idle slot's contents go to the host
        cache, and with a unified KV cache the slot is emptied (its cells are then free for
        the busy ones; without one, emptying it would free nothing)."""
        for b, a in enumerate(self.slots):
            if a is not None:
                continue
            if self.prompt_cache.save(self.engine, b):
                log.debug("slot %d: __TEST_TAG_CACHE_IDLE_SLOT__", b)
                self.prompt_cache.update()
            if self.kv_unified and self.engine.tokens[b]:
                self.engine.rewind(b, 0)

    def _switch_lora(self, scales: tuple[float, ...]) -> None:
        """New adapter scales in the engine's state (no slot is busy): same programs, and the
        cached prompts, computed with the old scales, are forgotten."""
        self.llm.set_lora_scales(list(scales))
        self._lora_now = scales
        if self.prompt_cache is not None:  # its rows were computed with the old scales
            self.prompt_cache.clear()

    def _prefill(self) -> None:
        """At most one engine chunk of prompt tokens per iteration (running streams wait for no
        more), cut where ``Engine.prefill`` cuts a lone request's prompt: a request then gets
        the same logits, and the same greedy answer, however busy the server is (the GEMMs
        round differently per chunk shape). Slots take turns, so one long prompt does not
        starve the others."""
        n = len(self.slots)
        done = 0
        for b in [(self._prefill_turn + i) % n for i in range(n)]:
            a = self.slots[b]
            if a is None or not a.todo:
                continue
            image = a.todo[0] if not isinstance(a.todo[0], int) else None
            if image is not None:  # an image's embeddings: one batch of their own
                chunk = a.todo[:1]
                size = image.embd.shape[0]
            else:
                chunk = a.todo[:PREFILL_CHUNK]
                cut = next((i for i, t in enumerate(chunk) if not isinstance(t, int)), None)
                chunk = chunk[:cut] if cut is not None else chunk
                size = len(chunk)
            if done and done + size > PREFILL_CHUNK:
                break
            if a.req.return_progress and a.t_prompt is None:
                a.t_prompt = time.perf_counter()
                self._progress(a, 0)
            a.todo = a.todo[len(chunk):]
            done += size
            self._prefill_turn = (b + 1) % n
            t0 = time.perf_counter()
            try:
                try:
                    logits = (prefill_image(self.engine, image, b, image_id(image))
                              if image is not None else self.engine.prefill(chunk, b))
                except PagePoolError:
                    if not self._reclaim_idle_pages():
                        raise
                    logits = (prefill_image(self.engine, image, b, image_id(image))
                              if image is not None else self.engine.prefill(chunk, b))
            except Exception as e:  # e.g. ContextError
                self._fail(b, 400, str(e))
                continue
            self.metrics.add_prompt(size, time.perf_counter() - t0)
            if a.req.return_progress:
                self._progress(a, a.req.n_prompt - len(expand_items(a.todo)))
            if a.todo:
                continue
            self.metrics.n_decode += 1
            try:
                self._ensure_batch()
                sp1 = BatchSampling.stack([a.req.params], host_draws=True)
                key = jnp.asarray(self._keys[b : b + 1])
                bias = jnp.asarray(self._bias_np[b : b + 1])
                hist = self.engine.history[b : b + 1]
                dry = self._dry_rows(None, [b])
                dry = None if dry is None else jax.device_put(dry[b : b + 1])
                toks, mu, chain = self._first(logits[None, :], sp1, key, jnp.zeros(1, jnp.int32),
                                              hist, bias, dry)
                tok = int(host_draws(np.asarray(toks), chain,
                                     {0: a.sampler} if a.sampler is not None else None)[0])
                self.engine.mu[b] = float(mu[0])  # a request's mirostat starts here
            except Exception as e:  # this request's first draw broke: it alone ends
                self._fail_request(b, a, e)
                continue
            self._take(b, tok, lambda lg=logits: np.asarray(lg))

    def _decode(self) -> None:
        active = np.array([a is not None and not a.todo for a in self.slots])
        if not active.any():
            return
        # a slot whose context is full shifts it (--context-shift) or ends before it would
        # overflow (_accept ends it a token earlier, as llama-server does)
        for b in np.nonzero(active)[0]:
            if self.context_shift and self.engine.pos[b] + 1 >= self.engine.ctx_size:
                try:
                    self._shift(b)
                except Exception as e:  # noqa: BLE001 - e.g. nothing left to discard
                    self._fail(b, 500, f"context shift failed: {e}")
                    active[b] = False
            elif self.engine.pos[b] + 1 > self.engine.ctx_size:
                self._finish(b, "length")
                active[b] = False
        # the paged KV cache: each slot's next page now, so a full pool fails that request
        # alone (a no-op for the dense cache; stand-in engines have no pool)
        reserve = getattr(self.engine, "reserve", None)
        for b in np.nonzero(active)[0] if reserve is not None else ():
            try:
                try:
                    reserve(int(b), int(self.engine.pos[b]) + 1)
                except PagePoolError:
                    if not self._reclaim_idle_pages():
                        raise
                    reserve(int(b), int(self.engine.pos[b]) + 1)
            except ContextError as e:
                self._fail(b, 503, str(e))
                active[b] = False
        if not active.any():
            return
        self._ensure_batch()
        toks = np.array([a.last if (a is not None and not a.todo) else 0 for a in self.slots],
                        np.int32)
        steps = np.array([a.req.completion_tokens if a is not None else 0 for a in self.slots],
                         np.int32)
        n = self._chunk_len(active)
        if n > 1:
            self._decode_chunk(active, toks, steps, n)
            return
        t0 = time.perf_counter()
        dry = self._dry_rows(toks, np.nonzero(active)[0])
        host = {int(b): self.slots[b].sampler for b in np.nonzero(active)[0]
                if self.slots[b].sampler is not None}
        nxt, logits = self.engine.step(toks, active, self._sp, jnp.asarray(self._keys), steps,
                                       self._bias, None if dry is None else jax.device_put(dry),
                                       host)
        self.steps_run += 1
        host: list = []  # the step's logits on the host, fetched once if a request needs them

        def row(b: int) -> np.ndarray:
            if not host:
                host.append(np.asarray(logits))
            return host[0][b]

        for b in np.nonzero(active)[0]:
            self._take(int(b), int(nxt[b]), lambda b=b: row(b))
        self.metrics.observe_step(int(active.sum()), time.perf_counter() - t0)
        self.metrics.n_decode += 1
        self.metrics.n_busy_slots += int(active.sum())

    def _reclaim_idle_pages(self) -> bool:
        """The paged KV cache is full: empty the idle slots that still hold a finished
        request's tokens (their prompt cache), giving their pages back. Whether any were."""
        freed = False
        for i, a in enumerate(self.slots):
            if a is None and int(self.engine.pos[i]) > 0:
                self.engine.rewind(i, 0)
                freed = True
        return freed

    def _chunk_len(self, active: np.ndarray) -> int:
        """How many steps this turn may run in one dispatch: 1 unless every running request
        draws on the device with nothing decided on the host per token (grammar, llama.cpp's
        seeded chain, DRY, probabilities, a reasoning budget, speculative decoding) and
        nobody waits (a queued request or a prompt still being read joins at the next turn, so
        chunks never delay them), and no slot's context fills (shift or stop) inside it."""
        if (not getattr(self.engine, "loop_decode", False) or self.decode_chunk <= 1 or self.queue
                or any(a is not None and a.todo for a in self.slots)):
            return 1
        room = []
        for b in np.nonzero(active)[0]:
            a = self.slots[b]
            req = a.req
            if (a.sampler is not None or a.gen is not None or req.constraint is not None
                    or req.n_probs > 0 or req.reasoning_budget is not None
                    or req.params.uses_dry() or req.cancelled):
                return 1
            room.append(self.engine.ctx_size - 1 - int(self.engine.pos[b]))
        return max(1, min([self.decode_chunk, *room]))

    def _decode_chunk(self, active: np.ndarray, toks: np.ndarray, steps: np.ndarray,
                      n: int) -> None:
        """Up to ``n`` (``_chunk_len``) steps in one dispatch, then each step's tokens handled as the
        per-step path would, the engine showing each slot as it was after that step (a request
        that ends on the host, e.g. at a stop string, leaves its slot exactly there; the
        device's extra steps for it are past its length and never read)."""
        eng = self.engine
        act = [int(b) for b in np.nonzero(active)[0]]
        owner = {b: self.slots[b] for b in act}
        left = np.zeros(self.n_slots, np.int32)
        for b in act:
            req = owner[b].req
            left[b] = (max(1, req.max_tokens - req.completion_tokens)
                       if req.max_tokens is not None else n)
        pos0 = eng.pos.copy()
        len0 = {b: len(eng.tokens[b]) for b in act}
        t0 = time.perf_counter()
        out = eng.decode_chunk(toks, active, self._sp, jnp.asarray(self._keys), steps, left,
                               self.eog, n, self._bias)
        dt = time.perf_counter() - t0
        pos1 = eng.pos.copy()
        held = {b: list(eng.tokens[b]) for b in act}
        ran = int((out >= 0).any(axis=1).sum())

        def no_row() -> np.ndarray:  # _chunk_len admits no request that reads logits
            raise RuntimeError("logits are not kept by chunked decoding")

        for i in range(ran):
            alive = [b for b in act if out[i, b] >= 0 and self.slots[b] is owner[b]]
            for b in alive:
                eng.pos[b] = pos0[b] + i + 1
                eng.tokens[b] = held[b][: len0[b] + i + 1]
                self._take(b, int(out[i, b]), no_row)
            self.steps_run += 1
            self.metrics.observe_step(len(alive), dt / max(ran, 1))
            self.metrics.n_decode += 1
            self.metrics.n_busy_slots += len(alive)
        for b in act:  # still running: the engine as the chunk left it
            if self.slots[b] is owner[b]:
                eng.pos[b] = pos1[b]
                eng.tokens[b] = held[b]

    def _shift(self, b: int) -> None:
        """llama-server's context shift (server-context.cpp pre_decode): keep n_keep tokens
        (the request's; -1: its whole prompt; one more for a BOS the vocabulary adds; at most
        n_ctx - 4), drop n_discard of the rest (the request's, else half), clamped to leave
        one, and slide the others down."""
        a = self.slots[b]
        req = a.req
        n_ctx = self.engine.ctx_size
        n_keep = len(req.prompt_ids) if req.n_keep < 0 else req.n_keep
        if self.add_bos:
            n_keep += 1
        n_keep = min(n_ctx - 4, n_keep)
        n_left = int(self.engine.pos[b]) - n_keep
        n_discard = req.n_discard if req.n_discard else n_left // 2
        n_discard = max(0, min(n_discard, max(0, n_left - 1)))
        log.warning("slot %d: context shift, n_keep = %d, n_left = %d, n_discard = %d", b,
                    n_keep, n_left, n_discard)
        self.engine.shift_context(b, n_keep, n_discard)
        req.truncated = True

    # ------------------------------------------------------------------ per-token handling
    def _take(self, b: int, tok: int, row: Callable[[], np.ndarray]) -> None:
        """The engine's draw for slot ``b`` through the request's grammar (a redraw if it
        breaks it) and probability report, then accepted. A failure here (a grammar no token
        can continue) ends this request alone."""
        a = self.slots[b]
        p = a.req.params
        try:
            rb = a.req.reasoning_budget
            forced = rb.forced() if rb is not None else None
            if forced is not None:  # every other token is -inf for llama.cpp's budget sampler
                tok = forced
            elif a.req.constraint is not None:
                tok = a.req.constraint.pick(tok, lambda: row() + self._bias_np[b],
                                            p.temperature, p.top_p, a.rng, p.top_k, p.min_p,
                                            a.sampler)
            if a.req.n_probs > 0:
                self._probs(a, row(), tok, forced is not None)
            self._accept(b, tok)
        except Exception as e:
            self._fail_request(b, a, e)

    def _accept(self, b: int, tok: int) -> None:
        a = self.slots[b]
        req = a.req
        self._count(req)
        a.toks.append(tok)
        if tok in self.eog:
            self._finish(b, "stop")
            return
        a.last = tok
        if req.reasoning_budget is not None:
            req.reasoning_budget.accept(tok)
        if req.constraint is not None:
            req.constraint.advance(tok)
        a.pending += a.decoder.feed(tok)
        if req.stop:
            hits = [i for i in (a.pending.find(s) for s in req.stop) if i >= 0]
            if hits:
                req.stop_word = _first_stop(a.pending, req.stop)
                a.pending = a.pending[: min(hits)]
                self._finish(b, "stop", flush=False)
                return
            if len(a.pending) > a.hold:
                cut = len(a.pending) - a.hold
                self._emit(a, a.pending[:cut])
                a.pending = a.pending[cut:]
        elif a.pending:
            self._emit(a, a.pending)
            a.pending = ""
        # llama-server's rule without context shift: the slot ends once the next token would
        # fill its context (prompt.n_tokens() + 1 >= n_ctx)
        full = (not self.context_shift and a.gen is None
                and self.engine.pos[b] + 1 >= self.engine.ctx_size)
        if full:
            req.truncated = True
        if full or (req.max_tokens is not None and req.completion_tokens >= req.max_tokens):
            self._finish(b, "length")  # llama-server checks its limits before the grammar
        elif req.constraint is not None and req.constraint.done:
            # llama.cpp's grammar now allows only an end-of-generation token: the one it
            # samples there counts as generated
            self._count(req)
            self._finish(b, "stop")

    def _count(self, req: GenRequest) -> None:
        """One more generated token. llama-server counts every token it samples (n_decoded:
        tokens_predicted, timings.predicted_n, usage.completion_tokens, /metrics), the
        end-of-generation token that stops a request included."""
        req.completion_tokens += 1
        self.metrics.generated_tokens += 1

    def _probs(self, a: _Active, row: np.ndarray, tok: int, forced: bool = False) -> None:
        """llama-server's probabilities for a generated token; an end-of-generation token is
        reported too (with empty text), as llama-server adds every sampled token."""
        row = row[: self.n_vocab]
        if a.req.post_sampling:
            b = self.slots.index(a)
            # the request's own chain drew this token (not a forced one, not the speculative
            # generator's)
            final = (a.sampler.final_probs() if a.sampler is not None and not forced
                     and a.gen is None and a.sampler.last is not None else None)
            a.probs.append(post_sampling_probs(row + self._bias_np[b], a.req.params, tok,
                                               a.req.n_probs, self.token_piece, final))
        else:
            a.probs.append(token_probs(row, tok, a.req.n_probs, self.token_piece))

    def token_piece(self, tok: int) -> bytes:
        return self.token_bytes()[tok] if tok < self.tok.n_vocab else b""

    def _emit(self, a: _Active, text: str, force: bool = False) -> None:
        """Text (with the probabilities of the tokens behind it) to the client; tokens whose
        text is still held back (a possible stop string, a partial character) keep their
        probabilities for the next event, unless this is the last one."""
        if text or (force and a.probs):
            probs, a.probs = a.probs or None, []
            toks, a.toks = a.toks, []
            a.req.sink(Event("text", text=text, probs=probs, tokens=toks,
                             completion_tokens=a.req.completion_tokens))

    def _finish(self, b: int, reason: str, flush: bool = True) -> None:
        a = self.slots[b]
        req = a.req
        text = a.pending + (a.decoder.flush() if flush else "")
        if flush and req.stop:
            hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if hits:
                req.stop_word = _first_stop(text, req.stop)
                text, reason = text[: min(hits)], "stop"
        self._emit(a, text, force=True)
        req.finish = reason
        self.metrics.n_tokens_max = max(self.metrics.n_tokens_max,
                                        req.n_prompt + req.completion_tokens)
        done = Event("done", finish=reason, prompt_tokens=req.n_prompt,
                     completion_tokens=req.completion_tokens, cached_tokens=req.cached_tokens,
                     id_slot=b, truncated=req.truncated,
                     tokens_cached=int(self.engine.pos[b]), draft_n=req.draft_n,
                     draft_accepted=req.draft_accepted)
        # the slot is free (and counted so in /metrics and /slots) before the client hears
        self._free(b)
        req.sink(done)

    def _progress(self, a: _Active, processed: int) -> None:
        req = a.req
        req.sink(Event("progress", prompt_tokens=req.n_prompt,
                       cached_tokens=req.cached_tokens, processed=max(processed,
                                                                      req.cached_tokens),
                       seconds=time.perf_counter() - a.t_prompt if processed else 0.0))

    def _fail_request(self, b: int, a: _Active, e: Exception) -> None:
        """An exception while handling one request's token: that request gets a 500, the
        others in the batch go on. A ValueError is the request's own grammar or schema that no
        token can continue (its input, not a server fault: ``error`` stays as it was)."""
        if isinstance(e, ValueError):
            log.warning("request failed while sampling: %s: %s", type(e).__name__, e)
        else:
            log.exception("request failed while sampling")
            self.error = e
        if self.slots[b] is a:
            self._fail(b, 500, f"sampling failed: {type(e).__name__}: {e}")

    def _fail(self, b: int, status: int, message: str) -> None:
        a = self.slots[b]
        a.req.sink(Event("error", status=status, message=message))
        self._free(b)

    def _free(self, b: int) -> None:
        a = self.slots[b]
        if a is not None and not a.req.warmup:
            self._last_used[b] = time.monotonic()
        if a is not None and a.gen is not None:
            a.gen.close()  # leaves the slot's cache as plain decoding would
        if a is not None and a.req.warmup:
            self.engine.rewind(b, 0)
        self.slots[b] = None
        self._set_row(b, None)
        self.metrics.active = self.busy_slots()

    # ------------------------------------------------------------------ batch rows
    def _set_row(self, b: int, req: GenRequest | None) -> None:
        self._dirty = True
        self._bias_np[b] = 0.0
        if req is None:
            return
        for t, v in req.params.logit_bias.items():
            self._bias_np[b, t] = v
        if req.ignore_eos:
            for t in self.eog:
                if t < self.n_vocab:
                    self._bias_np[b, t] = -np.inf
        self._keys[b] = seed_key(self.slots[b].seed)

    def _dry_rows(self, last: np.ndarray | None, rows) -> np.ndarray | None:
        """The DRY penalties of the slots in ``rows`` whose request uses DRY, from the tokens
        their sampler has accepted: what the slot holds (the prompt, the output so far) and
        ``last[b]``, the token this step feeds. None when no row uses DRY."""
        users = [b for b in rows if self.slots[b] is not None
                 and self.slots[b].req.params.uses_dry()]
        if not users:
            return None
        if self._dry_np is None:
            self._dry_np = np.zeros((self.n_slots, self.n_vocab), np.float32)
        self._dry_np[:] = 0.0
        for b in users:
            p = self.slots[b].req.params
            penalty_row(self.engine.tokens[b], p,
                        process_breakers(self.tok, tuple(p.dry_sequence_breakers)),
                        self.n_vocab, out=self._dry_np[b],
                        then=[int(last[b])] if last is not None else [])
        return self._dry_np

    def _ensure_batch(self) -> None:
        if not self._dirty:
            return
        ps = [a.req.params if a is not None else self._greedy for a in self.slots]
        self._sp = BatchSampling.stack(ps, host_draws=True)
        self._bias = jnp.asarray(self._bias_np)
        self._dirty = False


def image_id(chunk) -> int:
    """The id a slot's token list records for each cell of an image: negative (no token has
    it) and the same for the same embeddings, so the prompt cache reuses an image's cells for
    the same image only (llama-server keys its images by content too)."""
    key = getattr(chunk, "_cache_id", None)
    if key is None:
        h = hashlib.blake2b(np.ascontiguousarray(chunk.embd).tobytes(), digest_size=4)
        key = -2 - (int.from_bytes(h.digest(), "little") & 0x3FFFFFFF)
        chunk._cache_id = key
    return key


def expand_items(items: list) -> list[int]:
    """A prompt's token ids with each image's cells as its ``image_id``."""
    out: list[int] = []
    for it in items:
        if isinstance(it, int):
            out.append(it)
        else:
            out += [image_id(it)] * it.embd.shape[0]
    return out


def _cut_items(items: list, keep: int) -> tuple[int, list]:
    """The items left after ``keep`` reused cells, ``keep`` moved back to an image's start when
    it falls inside one (an image is decoded whole: its cells attend to each other)."""
    pos = 0
    for i, it in enumerate(items):
        n = 1 if isinstance(it, int) else it.embd.shape[0]
        if pos + n > keep:
            if isinstance(it, int):
                return keep, list(items[i:])
            return pos, list(items[i:])
        pos += n
    return pos, []


def _shift_allowed(llm, swa_full: bool) -> bool:
    """llama-server turns --context-shift off, with a warning, where its cache cannot shift:
    with a projector loaded, for M-RoPE positions or caches without rope (llama_memory_can_shift),
    and for sliding-window models unless --swa-full (its SWA cache is then as large as the
    other one). jllama's sliding-window caches are full-size, so it could shift them; it
    follows llama-server's rule."""
    eng = llm.engine
    why = None
    if getattr(llm, "vision", None) is not None:
        why = "ctx_shift is not supported by multimodal, it will be disabled"
    elif not eng.can_shift() or (any(llm.spec.extra.get("swa_layers", ()))
                                 and not swa_full):
        why = "ctx_shift is not supported by this context, it will be disabled"
    if why:
        log.warning("%s", why)
    return why is None


def _first_token(logits, sp, keys, steps, history, bias, dry=None):
    """The engine's per-row sampling for the token after a prompt (step 0 of the request):
    the tokens, the rows' mirostat mu after them, and the rows the host's llama.cpp chain
    starts from."""
    raw = jax.vmap(lambda k, s: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(k), s)))(keys.astype(jnp.uint32), steps)
    x = logits[..., : bias.shape[-1]]
    toks, mu = sample_state(x, sp, raw, history, bias, dry)
    return toks, mu, chain_rows(x, sp, history, bias, dry)


def token_probs(row: np.ndarray, tok: int, n: int, piece) -> dict:
    """One token's entry in llama-server's probability output (get_token_probabilities: a
    softmax over the raw logits; logprob as completion_token_output::logarithm writes it)."""
    row = np.asarray(row, np.float32)
    e = np.exp(row - row.max())
    p = e / e.sum(dtype=np.float32)
    n = min(n, row.shape[0])
    top = np.argpartition(-row, n - 1)[:n]
    top = top[np.lexsort((top, -row[top]))]

    def entry(t: int) -> dict:
        raw = piece(t)
        return {"id": t, "token": _valid_utf8_prefix(raw), "bytes": list(raw),
                "logprob": _log(float(p[t]))}

    out = entry(tok)
    out["top_logprobs"] = [entry(int(t)) for t in top]
    return out


def post_sampling_probs(row: np.ndarray, p, tok: int, n: int, piece,
                        final: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """llama-server's post_sampling_probs entry: the candidates left after the sampling chain
    with the probabilities the final draw used; zero-probability tokens are not listed.
    ``final``: those candidates and probabilities as the request's llama.cpp chain left them
    (``HostSampler.final_probs``: the whole chain, its order); without it (greedy and mirostat
    requests) they are rebuilt here from logit bias, top-k, top-p, min-p and temperature (the
    penalties are not replayed)."""
    if final is not None:
        order, probs = final
    else:
        order, probs = _plain_chain_probs(row, p)

    def entry(t: int, pr: float) -> dict:
        raw = piece(t)
        return {"id": t, "token": _valid_utf8_prefix(raw), "bytes": list(raw), "prob": pr}

    hit = np.nonzero(order == tok)[0]
    out = entry(tok, float(probs[hit[0]]) if hit.size else 0.0)
    out["top_probs"] = [entry(int(t), float(pr)) for t, pr in zip(order[:n], probs[:n],
                                                                  strict=True) if pr > 0]
    return out


def _plain_chain_probs(row: np.ndarray, p) -> tuple[np.ndarray, np.ndarray]:
    row = np.asarray(row, np.float32)
    order = np.argsort(-row, kind="stable")
    if p.top_k > 0:
        order = order[: p.top_k]
    z = row[order].astype(np.float64)
    q = np.exp(z - z[0])
    q /= q.sum()
    keep = ((np.cumsum(q) - q) < p.top_p) & (q >= p.min_p * q[0])
    keep[0] = True
    order, z = order[keep], z[keep]
    if p.temperature <= 0:
        return order[:1], np.ones(1)
    probs = np.exp((z - z[0]) / p.temperature)
    return order, probs / probs.sum()


def _log(x: float) -> float:
    return float(np.log(np.float32(x))) if x > 0 else float(np.finfo(np.float32).min)


def _valid_utf8_prefix(b: bytes) -> str:
    """llama-server's validate_utf8: the text up to an incomplete trailing UTF-8 sequence."""
    for cut in range(len(b), max(len(b) - 4, -1), -1):
        try:
            return b[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return b.decode("utf-8", "replace")


def _first_stop(text: str, stops: list[str]) -> str:
    """The stop string found earliest in ``text`` (the first listed on a tie)."""
    return min((s for s in stops if s in text), key=lambda s: (text.find(s), stops.index(s)))
