"""llama-server's reasoning budget (--reasoning-budget N, --reasoning-budget-message; per
request ``reasoning_budget_tokens``/``thinking_budget_tokens`` and
``reasoning_budget_message``), as llama.cpp 0c1e570's common/reasoning-budget.cpp runs it:
a per-request state machine over the generated token ids.

IDLE until the thinking start tag's tokens come (from the generation prompt, fed first, or
generated); then COUNTING: each generated token spends one of N, and the end tag's tokens end
it naturally (DONE). Once N are spent (and the last token completed its UTF-8 character, else
WAITING_UTF8 until one does) it is FORCING: the message's tokens then the end tag's are the
only tokens allowed, one per step, after which it is DONE; a new start tag in DONE re-arms it
with a fresh budget. The scheduler (scheduler.py ``_take``/``_accept``) asks ``forced()`` for
each step and feeds ``accept`` every generated token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

IDLE, COUNTING, WAITING_UTF8, FORCING, DONE = range(5)


def utf8_complete(piece: bytes) -> bool:
    """common_utf8_is_complete: the bytes do not end inside a multi-byte character (all
    continuation bytes in the last four: not complete)."""
    if not piece:
        return True
    for back in range(1, min(4, len(piece)) + 1):
        c = piece[-back]
        if c & 0xC0 != 0x80:
            need = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2 if c >= 0xC0 else 1
            return back >= need
    return False


class _Matcher:
    """llama.cpp's token_matcher: which of the sequences (distinct, non-empty) ends at this
    token (the longest), reset after a match."""

    def __init__(self, seqs: list[list[int]]):
        self.seqs: list[list[int]] = []
        for s in seqs:
            if s and s not in self.seqs:
                self.seqs.append(list(s))
        self.longest = max((len(s) for s in self.seqs), default=0)
        self.hist: list[int] = []

    def advance(self, tok: int) -> int:
        self.hist = (self.hist + [tok])[-self.longest:] if self.longest else []
        best = -1
        for i, s in enumerate(self.seqs):
            if self.hist[-len(s):] == s and (best < 0 or len(s) > len(self.seqs[best])):
                best = i
        if best >= 0:
            self.hist = []
        return best

    def reset(self) -> None:
        self.hist = []


@dataclass
class ReasoningBudget:
    starts: list[list[int]]
    ends: list[list[int]]
    forced_tokens: list[int]
    budget: int
    piece: Callable[[int], bytes] | None = None  # a token's bytes (None: always complete)
    state: int = IDLE  # the initial state (COUNTING with a budget of 0: FORCING at once)
    remaining: int = 0
    force_pos: int = 0
    _start: _Matcher = field(init=False)
    _end: _Matcher = field(init=False)

    def __post_init__(self):
        self._start, self._end = _Matcher(self.starts), _Matcher(self.ends)
        self.remaining = self.budget
        if self.state == COUNTING and self.remaining <= 0:
            self.state = FORCING

    def _arm(self) -> None:
        self.state, self.remaining = COUNTING, self.budget
        if self.remaining <= 0:
            self.state, self.force_pos = FORCING, 0

    def accept(self, tok: int) -> None:
        if self.state in (IDLE, DONE):
            if self._start.advance(tok) >= 0:
                if self.state == DONE:
                    self._end.reset()
                self._arm()
            return
        if self.state == FORCING:
            self._end.advance(tok)
            self.force_pos += 1
            if self.force_pos >= len(self.forced_tokens):
                self.state = DONE
            return
        if self._end.advance(tok) >= 0:  # COUNTING / WAITING_UTF8: the natural end
            self.state = DONE
            return
        complete = self.piece is None or utf8_complete(self.piece(tok))
        if self.state == WAITING_UTF8:
            if complete:
                self.state, self.force_pos = FORCING, 0
                self._end.reset()
            return
        self.remaining -= 1
        if self.remaining <= 0:
            self.state = FORCING if complete else WAITING_UTF8
            self.force_pos = 0
            self._end.reset()

    def forced(self) -> int | None:
        """The only token allowed at this step, or None (no constraint)."""
        if self.state == FORCING and self.force_pos < len(self.forced_tokens):
            return self.forced_tokens[self.force_pos]
        return None


def budget_factory(tags: tuple[str, str] | None, budget: int, message: str, gen_prompt: str,
                   encode: Callable[[str], list[int]], piece: Callable[[int], bytes]
                   ) -> Callable[[], ReasoningBudget] | None:
    """A maker of the request's budget (each generation its own), fed the generation
    prompt's tokens as llama.cpp's sampler init does; None where llama-server builds none
    (no thinking tags, or an unlimited budget). ``encode``: text -> ids with special tokens
    parsed, no BOS (common_tokenize(vocab, s, false, true))."""
    if tags is None or budget < 0:
        return None
    start, end = encode(tags[0]), encode(tags[1])
    if not start or not end:
        return None
    forced = (encode(message) if message else []) + end
    prefill = encode(gen_prompt) if gen_prompt else []
    if prefill and piece(prefill[0])[:1].isspace() and not gen_prompt[:1].isspace():
        prefill = prefill[1:]  # a tokenizer's added leading space (llama.cpp skips it too)

    def make() -> ReasoningBudget:
        rb = ReasoningBudget([start], [end], forced, budget, piece)
        for t in prefill:
            rb.accept(t)
        return rb
    return make
