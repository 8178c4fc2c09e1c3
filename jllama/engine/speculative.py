"""Speculative decoding: a cheap proposer drafts tokens, the target checks them in one forward.

Two proposers, as in llama.cpp: a small draft model sharing the target's vocabulary
(``--model-draft``), or prompt lookup (``--draft-ngram``: the continuation of the last n-gram's
previous occurrence in prompt + output). Each round the target evaluates ``[last, d1..dk]`` with
one ``prefill(all_logits=True)`` and rewinds its cache past the first rejected draft, so a round
emits between 1 and k+1 tokens for one target forward.

Acceptance keeps the output distribution exactly the target's:

* greedy (temperature <= 0): a draft token is kept while it equals the target's argmax, then the
  target's own token follows. Same tokens as plain greedy decoding.
* sampling: Leviathan et al. / Chen et al. rejection sampling. A draft x ~ q is kept with
  probability min(1, p(x)/q(x)); on rejection the token is drawn from norm(max(p - q, 0)); if all
  k drafts survive, one more is drawn from p. A deterministic proposal (prompt lookup, greedy
  draft) is the special case q = one-hot(x). ``p`` and ``q`` come from ``probs``, a float64 numpy
  restatement of jllama.engine.sampling's chain, so p is the distribution plain sampling draws
  from. This runs on the host: correctness first, and the few rows a round needs are cheap.

Seeded runs are reproducible, but draw from a numpy generator, so their tokens differ from plain
seeded sampling (the distribution does not).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from jllama.engine.draft import DraftConfig
from jllama.engine.engine import HISTORY, PREFILL_BUCKETS, Engine, Timings, _bucket
from jllama.engine.sampling import TOPK_CAP, BatchSampling, SamplingParams
from jllama.errors import ConfigError, JllamaError

# Verify forwards are padded to these lengths. A forward's cost grows with its rows, so a short
# draft padded to the engine's smallest prefill chunk (16) would waste most of its gain; short
# drafts get their own small shapes (experiments/results/speculative.md has the costs).
VERIFY_BUCKETS = tuple(sorted({2, 4, 8, *PREFILL_BUCKETS}))
# up to this many new tokens are fed to the draft by decode steps rather than a prefill chunk
# (a 16-row forward costs more than a few one-row steps on CPU)
FEED_STEPS = 3
DRAFT_TOPK = 10  # llama.cpp's draft sampler: p_min is tested on the top-10 renormalised


# ---------------------------------------------------------------------------- distributions
def transformed_logits(logits: np.ndarray, params: SamplingParams,
                       history: Sequence[int] = (), bias: np.ndarray | None = None) -> np.ndarray:
    """Logit bias and penalties, as ``sampling.sample`` applies them before choosing (float32,
    like the device sampler, so argmax ties and cut-offs fall the same way)."""
    x = np.asarray(logits, np.float32)
    if bias is not None:
        x = x + bias
    p = params
    if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        h = np.asarray([t for t in list(history)[-HISTORY:] if 0 <= t < x.shape[-1]], np.int64)
        counts = np.bincount(h, minlength=x.shape[-1]).astype(np.float32)
        seen = counts > 0
        rp = np.float32(p.repeat_penalty)
        x = np.where(seen, np.where(x > 0, x / rp, x * rp), x)
        x = x - counts * np.float32(p.frequency_penalty)
        x = x - seen.astype(np.float32) * np.float32(p.presence_penalty)
    return x.astype(np.float32)


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def probs(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = (),
          bias: np.ndarray | None = None) -> np.ndarray:
    """The distribution ``sampling.sample`` draws from for these logits: float64 [V].

    Same chain as ``sampling._chain`` without its further samplers (callers route requests that
    use them elsewhere: ``SamplingParams.uses_extended``): top-k, top-p on what top-k kept,
    min-p relative to the top token (on logits, as llama.cpp states it), then temperature on
    the survivors. Temperature <= 0 is a one-hot argmax.
    """
    x = transformed_logits(logits, params, history, bias)
    v = x.shape[-1]
    out = np.zeros(v, np.float64)
    if params.temperature <= 0:
        out[int(np.argmax(x))] = 1.0
        return out
    k = params.top_k if 0 < params.top_k <= v else v
    if k <= TOPK_CAP and k < v:
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.lexsort((idx, -x[idx]))]  # descending, ties by index
    else:
        idx = np.lexsort((np.arange(v), -x))
    vals = x[idx][:k].astype(np.float32)
    idx = idx[:k]
    p = _softmax(vals)
    keep = (np.cumsum(p) - p < params.top_p)
    keep[0] = True
    if params.min_p > 0:
        keep &= vals >= vals[0] + np.float32(np.log(np.float32(params.min_p)))
    keep[0] = True
    t = max(float(params.temperature), 1e-6)
    scaled = np.where(keep, vals.astype(np.float64) / t, -np.inf)
    out[idx] = _softmax(scaled)
    return out


def _draw(w: np.ndarray, rng: np.random.Generator) -> int:
    """One index with probability proportional to the non-negative weights ``w``."""
    c = np.cumsum(w)
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    while w[min(i, len(w) - 1)] <= 0:  # u*total landing exactly on an edge; walk back
        i -= 1
    return min(i, len(w) - 1)


def accept(p: np.ndarray, q: np.ndarray | None, x: int, rng: np.random.Generator) -> tuple[bool, int]:
    """One verification: keep the draft ``x`` (drawn from q; ``q=None``: proposed with certainty)
    or return the replacement token. The emitted token is distributed as p whatever q is."""
    qx = 1.0 if q is None else float(q[x])
    if qx > 0 and rng.random() * qx < p[x]:  # u < p(x)/q(x) without dividing
        return True, x
    if q is None:
        resid = p.copy()
        resid[x] = 0.0
    else:
        resid = np.maximum(p - q, 0.0)
    if resid.sum() <= 0:  # only reachable when q(x) = 0, i.e. x was not drawn from q
        resid = p
    return False, _draw(resid, rng)


def speculative_sample(ps: Sequence[np.ndarray], qs: Sequence[np.ndarray] | None,
                       drafts: Sequence[int], rng: np.random.Generator) -> list[int]:
    """The tokens a round emits: the accepted prefix of ``drafts`` and one token from the target.

    ``ps[i]`` is the target's distribution after the i-th draft (``len(drafts) + 1`` rows, read
    lazily: rows past the first rejection are never touched), ``qs[i]`` the distribution drafts[i]
    was drawn from (None: deterministic proposals)."""
    out = []
    for i, x in enumerate(drafts):
        ok, tok = accept(ps[i], None if qs is None else qs[i], int(x), rng)
        out.append(tok)
        if not ok:
            return out
    out.append(_draw(ps[len(drafts)], rng))
    return out


class _Rows:
    """``probs`` of each row of a verify forward, computed on first use. Row i follows
    ``ctx[:n0 + i]`` (the sequence, then i drafts), whose tail is that row's penalty window."""

    def __init__(self, logits: np.ndarray, params: SamplingParams, ctx: list[int], n0: int,
                 bias: np.ndarray | None):
        self.logits, self.params, self.ctx, self.n0, self.bias = logits, params, ctx, n0, bias
        self._done: dict[int, np.ndarray] = {}

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._done:
            end = self.n0 + i
            hist = self.ctx[max(0, end - HISTORY) : end]
            self._done[i] = probs(self.logits[i], self.params, hist, self.bias)
        return self._done[i]


# ---------------------------------------------------------------------------- proposers
def ngram_lookup(seq: Sequence[int], ngram: int, n: int) -> list[int]:
    """Prompt lookup: the ``n`` tokens that followed the most recent earlier occurrence of the
    last ``ngram`` tokens of ``seq`` (empty when the n-gram never occurred before)."""
    if n <= 0 or len(seq) <= ngram:
        return []
    a = np.asarray(seq, np.int64)
    key = a[-ngram:]
    win = np.lib.stride_tricks.sliding_window_view(a[:-1], ngram)  # starts 0 .. len-1-ngram
    hits = np.nonzero((win == key).all(axis=1))[0]
    if len(hits) == 0:
        return []
    start = int(hits[-1]) + ngram
    return a[start : start + n].tolist()


class _Decoder:
    """Single-token decode steps on one slot of an engine, returning the logits on the host."""

    def __init__(self, engine: Engine):
        self.engine = engine
        ns = engine.n_slots
        self.sp = BatchSampling.stack([SamplingParams.greedy()] * ns)
        self.keys = jnp.zeros((ns, 2), jnp.uint32)
        self.steps = np.zeros(ns, np.int32)
        self.bias = jnp.zeros((ns, engine.spec.n_vocab), jnp.float32)

    def step(self, slot: int, tok: int) -> np.ndarray:
        ns = self.engine.n_slots
        toks = np.zeros(ns, np.int32)
        toks[slot] = tok
        active = np.zeros(ns, bool)
        active[slot] = True
        _, logits = self.engine.step(toks, active, self.sp, self.keys, self.steps, self.bias)
        return np.asarray(logits[slot], np.float32)

    def feed(self, seq: list[int], slot: int = 0) -> np.ndarray:
        """Make the slot hold ``seq`` (reusing the common prefix); logits after its last token."""
        eng = self.engine
        keep = min(eng.common_prefix(seq, slot), len(seq) - 1)
        eng.rewind(slot, keep)
        new = seq[keep:]
        if len(new) > FEED_STEPS:
            return np.asarray(eng.prefill(new, slot), np.float32)
        for t in new:  # after a round: one or two new tokens, where decode steps are cheaper
            logits = self.step(slot, t)
        return logits


def verify_forward(eng: Engine, slot: int, tokens: list[int]) -> np.ndarray:
    """``eng.prefill(tokens, slot, all_logits=True)`` for a short block, padded to a
    ``VERIFY_BUCKETS`` length instead of a whole prefill chunk: logits [n, V] on the host."""
    n = len(tokens)
    if n > 16 or eng.pos[slot] + n > eng.ctx_size:  # longer: a whole prefill chunk is as cheap
        return np.asarray(eng.prefill(tokens, slot, all_logits=True), np.float32)
    t = _bucket(n, VERIFY_BUCKETS)
    buf = np.zeros((1, t), np.int32)
    buf[0, :n] = tokens
    pos0 = eng.pos[slot : slot + 1].copy()
    eng._need_pages(slot, int(pos0[0]) + n)
    eng._sync_table()
    logits, eng.cache = eng._forward_slot(
        eng.state, jnp.asarray(buf), jnp.asarray(pos0), eng.cache, jnp.int32(slot), None,
        kv_len=eng.kv_bucket(int(pos0[0]) + t))
    eng.pos[slot] += n
    eng.tokens[slot].extend(int(x) for x in tokens)
    return np.asarray(logits[:n], np.float32)


class NgramDraft:
    kind = "ngram"

    def __init__(self, ngram: int):
        self.ngram = ngram

    def propose(self, seq: list[int], n: int, params: SamplingParams, rng: np.random.Generator,
                bias: np.ndarray | None, n_vocab: int) -> tuple[list[int], list | None]:
        return ngram_lookup(seq, self.ngram, n), None


class ModelDraft:
    """A small model proposing greedily while it is confident (llama.cpp's p_min rule); when the
    target samples, drafts are drawn from the draft's own transformed distribution q instead."""

    kind = "model"

    def __init__(self, llm, p_min: float):
        self.llm = llm
        self.p_min = p_min
        self.dec = _Decoder(llm.engine)
        self._bias: jnp.ndarray | None = None

    def propose(self, seq: list[int], n: int, params: SamplingParams, rng: np.random.Generator,
                bias: np.ndarray | None, n_vocab: int) -> tuple[list[int], list | None]:
        greedy = params.temperature <= 0
        eng = self.dec.engine
        if greedy and eng.loop_decode and len(seq) - 1 + n <= eng.ctx_size:
            return self._propose_on_device(seq, n, n_vocab), None
        logits = self.dec.feed(seq)
        toks: list[int] = []
        qs: list[np.ndarray] = []
        hist = list(seq[-HISTORY:])
        while len(toks) < n:
            lg = _fit(logits, n_vocab)
            top = np.partition(lg, len(lg) - DRAFT_TOPK)[-DRAFT_TOPK:]
            if _softmax(top.astype(np.float64)).max() < self.p_min:
                break
            if greedy:
                x = int(np.argmax(lg))
            else:
                q = probs(lg, params, hist, bias)
                x = _draw(q, rng)
                qs.append(q)
            toks.append(x)
            hist = (hist + [x])[-HISTORY:]
            if len(toks) < n:
                logits = self.dec.step(0, x)
        return toks, (None if greedy else qs)


    def _propose_on_device(self, seq: list[int], n: int, n_vocab: int) -> list[int]:
        """The greedy drafts in one dispatch (``Engine.decode_chunk`` with the p_min rule): the
        slot is made to hold all of ``seq`` but its last token, which the loop feeds first."""
        eng, dec = self.dec.engine, self.dec
        keep = min(eng.common_prefix(seq, 0), len(seq) - 1)
        eng.rewind(0, keep)
        new = seq[keep:-1]
        if len(new) > FEED_STEPS:
            eng.prefill(new, 0)
        else:
            for t in new:
                dec.step(0, t)
        ns = eng.n_slots
        toks = np.zeros(ns, np.int32)
        toks[0] = seq[-1]
        active = np.zeros(ns, bool)
        active[0] = True
        left = np.zeros(ns, np.int32)
        left[0] = n
        # argmax over the target's ids only (the host path's _fit): the bias's width decides
        width = min(n_vocab, eng.spec.n_vocab)
        if self._bias is None or self._bias.shape[-1] != width:
            self._bias = jnp.zeros((ns, width), jnp.float32)
        out = eng.decode_chunk(toks, active, dec.sp, dec.keys, dec.steps, left, (), n,
                               self._bias, p_min=self.p_min)
        drafts = []
        for t in out[:, 0]:
            if t < 0:
                break
            drafts.append(int(t))
        return drafts


def _fit(logits: np.ndarray, n: int) -> np.ndarray:
    """Draft logits over the target's n_vocab ids (padding rows differ between model sizes)."""
    if len(logits) >= n:
        return logits[:n]
    return np.concatenate([logits, np.full(n - len(logits), -np.inf, np.float32)])


def check_vocab(target, draft) -> None:
    """Drafted ids must mean the same tokens to both models (llama.cpp's compatibility check)."""
    a, b = target.tokenizer, draft.tokenizer
    why = None
    if a.vocab.kind != b.vocab.kind:
        why = f"tokenizer {a.vocab.kind} vs {b.vocab.kind}"
    elif a.n_vocab != b.n_vocab:
        why = f"vocabulary size {a.n_vocab} vs {b.n_vocab}"
    elif a.vocab.tokens != b.vocab.tokens:
        i = next(i for i, (x, y) in enumerate(zip(a.vocab.tokens, b.vocab.tokens)) if x != y)
        why = f"token {i} is {a.vocab.tokens[i]!r} vs {b.vocab.tokens[i]!r}"
    elif (a.bos_id, a.eos_id) != (b.bos_id, b.eos_id):
        why = f"BOS/EOS ids {(a.bos_id, a.eos_id)} vs {(b.bos_id, b.eos_id)}"
    if why:
        raise JllamaError(f"draft model {draft.path} cannot draft for {target.path}: the "
                          f"vocabularies differ ({why})")


# ---------------------------------------------------------------------------- the generator
class Speculative:
    """Speculative generation for one ``Llama`` (target) with a draft model or prompt lookup."""

    def __init__(self, llm, cfg: DraftConfig, draft_llm=None):
        self.llm = llm
        self.engine: Engine = llm.engine
        self.cfg = cfg
        if cfg.kind == "ngram":
            self.proposer: NgramDraft | ModelDraft = NgramDraft(cfg.ngram)
        elif cfg.kind == "model":
            if draft_llm is None:
                raise ConfigError("speculative decoding with a draft model needs 'draft.model'")
            check_vocab(llm, draft_llm)
            self.proposer = ModelDraft(draft_llm, cfg.p_min)
        else:
            raise ConfigError(f"'draft.kind' must be model or ngram, got {cfg.kind!r}")
        # [last + drafts] one past a prefill bucket would double the verify forward: trim one
        vb = VERIFY_BUCKETS
        self.n_max = cfg.n - 1 if _bucket(cfg.n + 1, vb) > _bucket(cfg.n, vb) else cfg.n
        self.n_max = max(1, self.n_max)
        self.dec = _Decoder(self.engine)

    @property
    def draft(self):
        """The draft ``Llama`` (None for prompt lookup)."""
        return getattr(self.proposer, "llm", None)

    def generate(self, prompt: list[int], params: SamplingParams | None = None,
                 max_tokens: int = 128, stop_ids: set[int] | frozenset[int] = frozenset(),
                 slot: int = 0, on_full: str = "stop", n_keep: int = 0) -> Iterator[int]:
        """Engine.generate's contract (stop ids not yielded, ``max_tokens``, context full), with
        ``engine.timings.extra`` counting drafted and accepted tokens."""
        params = params or SamplingParams()
        eng = self.engine
        V = eng.spec.n_vocab
        t0 = time.perf_counter()
        tm = eng.timings = Timings(prompt_tokens=len(prompt))
        ex = tm.extra
        ex.update(cached_tokens=0, shifts=0, draft_kind=self.proposer.kind, draft_proposed=0,
                  draft_accepted=0, draft_acceptance=0.0, rounds=0, plain_steps=0,
                  draft_s=0.0, verify_s=0.0)
        logits, ex["cached_tokens"] = eng.prefill_cached(prompt, slot)
        seed = params.seed if params.seed is not None else int.from_bytes(np.random.bytes(4),
                                                                          "little")
        rng = np.random.default_rng(seed)
        bias = None
        if params.logit_bias:
            bias = np.zeros(V, np.float32)
            for k, v in params.logit_bias.items():
                if 0 <= int(k) < V:
                    bias[int(k)] = v
        greedy = params.temperature <= 0

        def pick(lg: np.ndarray, seq: list[int]) -> int:
            if greedy:
                return int(np.argmax(transformed_logits(lg[:V], params, seq[-HISTORY:], bias)))
            return _draw(probs(lg[:V], params, seq[-HISTORY:], bias), rng)

        pending = [pick(np.asarray(logits, np.float32), eng.tokens[slot])]
        t1 = time.perf_counter()
        tm.prompt_s = tm.first_token_s = t1 - t0
        n = 0
        keep_on_exit = None  # where the slot should end: tokens before the last one yielded
        try:
            while True:
                base = int(eng.pos[slot]) - (len(pending) - 1)  # where pending[0] sits
                for j, tok in enumerate(pending):
                    keep_on_exit = base + j
                    if tok in stop_ids:
                        return
                    yield tok
                    n += 1
                    tm.gen_tokens = n
                    tm.gen_s = time.perf_counter() - t1
                    if n >= max_tokens:
                        return
                keep_on_exit = None
                last = pending[-1]
                if eng.pos[slot] + 1 > eng.ctx_size:
                    if on_full != "shift":
                        ex["context_full"] = True
                        return
                    eng.shift_context(slot, n_keep)
                    ex["shifts"] += 1
                seq = eng.tokens[slot] + [last]
                room = min(self.n_max, max_tokens - n - 1, eng.ctx_size - int(eng.pos[slot]) - 1)
                drafts: list[int] = []
                qs = None
                if room >= max(1, self.cfg.n_min):
                    td = time.perf_counter()
                    drafts, qs = self.proposer.propose(seq, room, params, rng, bias, V)
                    ex["draft_s"] += time.perf_counter() - td
                if len(drafts) < max(1, self.cfg.n_min):
                    pending = [pick(self.dec.step(slot, last), seq)]
                    ex["plain_steps"] += 1
                    continue
                tv = time.perf_counter()
                pos0 = int(eng.pos[slot])
                lg = verify_forward(eng, slot, [last] + drafts)
                if greedy:
                    pending = []
                    for i, x in enumerate(drafts + [None]):
                        y = int(np.argmax(transformed_logits(lg[i, :V], params,
                                                             (seq + drafts[:i])[-HISTORY:], bias)))
                        pending.append(y)
                        if y != x:
                            break
                else:
                    rows = _Rows(lg[:, :V], params, seq + drafts, len(seq), bias)
                    pending = speculative_sample(rows, qs, drafts, rng)
                acc = len(pending) - 1
                eng.rewind(slot, pos0 + 1 + acc)
                ex["verify_s"] += time.perf_counter() - tv
                ex["rounds"] += 1
                ex["draft_proposed"] += len(drafts)
                ex["draft_accepted"] += acc
                ex["draft_acceptance"] = ex["draft_accepted"] / ex["draft_proposed"]
        finally:
            if keep_on_exit is not None:
                eng.rewind(slot, keep_on_exit)
            tm.gen_s = time.perf_counter() - t1


__all__ = ["Speculative", "accept", "check_vocab", "ngram_lookup", "probs",
           "speculative_sample", "transformed_logits"]
