"""llama.cpp's DRY ("don't repeat yourself") sampler, on the host.

DRY penalises each token that would extend a run repeating an earlier stretch of the context by
``multiplier * base ** (run length - allowed length)``. The penalty depends only on the
request's tokens (the prompt and what it generated: what llama-server's sampler accepted), not
on the logits, so it is computed here per step and handed to ``sampling.sample_state`` as a
[V] row that it subtracts after the repetition penalties (llama.cpp's chain order). The scan
is sequential (restart sequences, then a Z-algorithm over the last ``dry_penalty_last_n``
tokens), a poor fit for a vectorised graph and a few microseconds in Python.

Sequence breakers (strings) become restart sequences as llama.cpp's
``get_overlapping_token_sequences`` builds them: every token whose text contains the breaker is a
single-token breaker; a token whose text ends with the breaker's start is the head of a
sequence whose tail is the rest of the breaker, tokenized.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

MAX_CHAR_LEN = 40  # breakers are cut to this many bytes
MAX_SEQ_LEN = 20  # and their tails to this many tokens
FLOAT_MAX_LOG = np.float32(88.7228391)  # log(FLT_MAX): the exponent's cap

Breakers = dict[int, list[tuple[int, ...]]]  # head token -> tails (empty: the token alone)


@functools.lru_cache(maxsize=4)
def _pieces(tok) -> tuple[bytes, ...]:
    """Each token's text as llama.cpp's ``vocab.detokenize({id}, true)`` gives it."""
    return tuple(tok.detokenize([i], unparse_special=True) for i in range(tok.n_vocab))


@functools.lru_cache(maxsize=16)
def process_breakers(tok, breakers: tuple[str, ...]) -> Breakers:
    """The restart sequences of ``breakers`` for tokenizer ``tok`` (cached: it scans the
    vocabulary)."""
    out: Breakers = {}
    pieces = _pieces(tok)
    for text in breakers:
        s = text.encode("utf-8")[:MAX_CHAR_LEN]
        if not s:
            continue
        for t, word in enumerate(pieces):
            if s in word:
                out.setdefault(t, []).append(())
                continue
            pos = word.find(s[:1])
            while pos >= 0:
                # the word's end matches the breaker's start from pos on
                i = 1
                while i < len(s) and pos + i < len(word) and word[pos + i] == s[i]:
                    i += 1
                if i == len(s) or pos + i >= len(word):
                    tail = s[i:].decode("utf-8", "replace")
                    seq = tuple(tok.encode(tail, add_special=False,
                                           parse_special=False)[:MAX_SEQ_LEN])
                    have = out.setdefault(t, [])
                    if seq not in have:
                        have.append(seq)
                pos = word.find(s[:1], pos + 1)
    return out


def _tail(tokens: Sequence[int], then: Sequence[int], n: int) -> list[int]:
    """The last ``n`` token ids of ``tokens`` followed by ``then``, image cells (negative ids,
    which llama-server's sampler never sees) left out; read from the end, so a long context
    costs nothing."""
    out: list[int] = []
    for seq in (then, tokens):
        for t in reversed(seq):
            if t >= 0:
                out.append(int(t))
                if len(out) == n:
                    return out[::-1]
    return out[::-1]


def penalties(tokens: Sequence[int], multiplier: float, base: float, allowed_length: int,
              last_n: int, breakers: Breakers, then: Sequence[int] = ()
              ) -> dict[int, np.float32]:
    """token -> the amount DRY subtracts from its logit, given the request's tokens so far
    (``tokens`` and then ``then``: what its sampler accepted)."""
    if multiplier == 0.0 or base < 1.0 or last_n <= 0:
        return {}
    last = _tail(tokens, then, last_n)
    n = len(last)
    if n <= allowed_length:
        return {}

    def rat(i: int) -> int:  # i-th token from the end
        return last[n - 1 - i]

    # restart sequences: the repetition may not reach back past the latest breaker
    rep_limit = n
    for i in range(n):
        tails = breakers.get(rat(i))
        if not tails:
            continue
        longest = -1
        for tail in tails:
            m = len(tail)
            if longest < m <= i and all(tail[o] == rat(i - o - 1) for o in range(m)):
                longest = m
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}
    # Z-algorithm over the reversed context: count[n-1-k] = how many tokens before position
    # k from the end match the context's own end (capped by rep_limit, also where the
    # Z-box reuses a capped value, as llama.cpp does)
    count = [0] * n
    lt = rt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            count[n - 1 - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            if count[n - 1 - p] < rt - k + 1:
                count[n - 1 - k] = min(count[n - 1 - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rat(i) == rat(i - k):
                    i += 1
                count[n - 1 - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1
    # the token after each repeat would extend it: keep its longest
    longest_run: dict[int, int] = {}
    for i in range(n - 1):
        r = count[i]
        if r >= allowed_length:
            t = rat(n - 2 - i)
            if longest_run.get(t, -1) < r:
                longest_run[t] = r
    max_exp = 0
    if np.float32(base) > np.float32(1.000001):
        max_exp = int(FLOAT_MAX_LOG / np.log(np.float32(base)))
    out = {}
    for t, r in longest_run.items():
        if any(len(tail) == 0 for tail in breakers.get(t, ())):
            continue  # a single-token breaker is never penalised
        e = r - allowed_length
        if max_exp > 0 and e > max_exp:
            e = max_exp
        # float * std::pow(float, int): computed in double, stored as float
        out[t] = np.float32(float(np.float32(multiplier)) * math.pow(float(np.float32(base)), e))
    return out


def penalty_row(tokens: Sequence[int], params, breakers: Breakers, n_vocab: int,
                out: np.ndarray | None = None, then: Sequence[int] = ()) -> np.ndarray:
    """``penalties`` for a request's ``SamplingParams`` as a [n_vocab] float32 row (filled into
    ``out`` when given)."""
    row = np.zeros(n_vocab, np.float32) if out is None else out
    row[:] = 0.0
    for t, v in penalties(tokens, params.dry_multiplier, params.dry_base,
                          params.dry_allowed_length, params.dry_penalty_last_n,
                          breakers, then).items():
        if t < n_vocab:
            row[t] = v
    return row
