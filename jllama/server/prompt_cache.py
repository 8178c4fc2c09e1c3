"""llama-server's host-memory prompt cache (``--cache-ram``, server-task.cpp
``server_prompt_cache``): a slot's KV rows copied to host RAM before the slot is given a
different prompt, and copied back into a slot when a later prompt shares more with a saved
entry than with what the slot holds. Entries are kept oldest first and dropped oldest first
when the size limit (MiB) or the token limit is passed, as its ``alloc``/``update`` do.

The rows are ``Engine.export_slot``'s (the cache's own dtype, quantized blocks as stored) and
go back with ``Engine.import_slot``, bit for bit: a restored prefix is the very KV the slot
held, so what follows it is computed exactly as if the slot had kept it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("jllama.server")

MIB = 1024 * 1024
# server_prompt_cache::load: an entry that would keep less than this share of its own tokens is
# not loaded ("don't trash large prompts")
MIN_KEEP = 0.25


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Entry:
    tokens: list[int]
    marks: list[tuple[int, int]]
    rows: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)


class PromptCache:
    """``limit_mib``: llama-server's --cache-ram (-1: no size limit; 0 is "no cache", decided
    by the caller); ``limit_tokens``: its n_ctx (0: none), raised to what the size limit
    holds at the entries' average bytes per token."""

    def __init__(self, limit_mib: int, limit_tokens: int = 0):
        self.limit_size = 0 if limit_mib < 0 else int(limit_mib) * MIB
        self.limit_tokens = max(0, int(limit_tokens))
        self.states: list[Entry] = []  # oldest first

    def size(self) -> int:
        return sum(e.nbytes for e in self.states)

    def n_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.states)

    @staticmethod
    def _state_size(engine, n: int) -> int:
        return sum(math.prod(shape) * n * np.dtype(dt).itemsize
                   for shape, dt in engine.slot_layout())

    def save(self, engine, slot: int) -> bool:
        """Copy what ``slot`` holds into the cache (its ``prompt_save``/``alloc``); False when
        it holds nothing, is already held whole by an entry, or alone passes the size limit."""
        tokens = list(engine.tokens[slot])
        if not tokens:
            return False
        if any(common_prefix(e.tokens, tokens) == len(tokens) for e in self.states):
            log.debug(" - prompt is already in the cache, skipping")
            return False
        need = self._state_size(engine, len(tokens))
        if self.limit_size and need > self.limit_size:
            log.warning(" - prompt state size %.3f MiB exceeds cache size limit %.3f MiB, "
                        "skipping", need / MIB, self.limit_size / MIB)
            return False
        # entries the new one holds whole are obsolete
        self.states = [e for e in self.states
                       if common_prefix(e.tokens, tokens) != len(e.tokens)]
        while self.limit_size and self.states and self.size() + need > self.limit_size:
            log.warning(" - making room for prompt cache entry, removing oldest entry "
                        "(size = %.3f MiB)", self.states[0].nbytes / MIB)
            self.states.pop(0)
        toks, marks, rows = engine.export_slot(slot)
        self.states.append(Entry(list(toks), list(marks), [np.array(r) for r in rows]))
        log.debug(" - saved prompt with length %d, state size = %.3f MiB", len(toks),
                  need / MIB)
        return True

    def load(self, engine, slot: int, tokens_new: list[int]) -> bool:
        """Put into ``slot`` the entry that keeps the most of ``tokens_new`` while keeping
        more of itself than the slot would (its ``load``); the entry leaves the cache. True
        unless restoring failed (the slot must then be cleared)."""
        held = engine.tokens[slot]
        lcp = common_prefix(held, tokens_new)
        n_new = max(len(tokens_new), 1)
        f_keep_best = lcp / len(held) if held else -1.0  # an empty slot: any entry wins
        f_sim_best = lcp / n_new
        best = None
        for i, e in enumerate(self.states):
            n = common_prefix(e.tokens, tokens_new)
            f_keep, f_sim = n / len(e.tokens), n / n_new
            if f_keep < MIN_KEEP:
                continue
            if f_keep_best < f_keep and f_sim_best < f_sim:
                f_keep_best, f_sim_best, best = f_keep, f_sim, i
        if best is None:
            return True
        e = self.states.pop(best)
        log.debug(" - found better prompt with f_keep = %.3f, f_sim = %.3f", f_keep_best,
                  f_sim_best)
        try:
            engine.import_slot(slot, e.tokens, e.marks, e.rows)
        except Exception as ex:  # noqa: BLE001 - the caller clears the slot and goes on
            log.error("failed to restore prompt cache state: %s", ex)
            return False
        return True

    def update(self) -> None:
        """Drop the oldest entries while over the size limit, then over the token limit
        (raised to what the size limit holds at the entries' bytes per token)."""
        while self.limit_size and self.states and self.size() > self.limit_size:
            self.states.pop(0)
        per_token = max(1.0, self.size() / max(1, self.n_tokens()))
        limit_tokens = (max(self.limit_tokens, int(self.limit_size / per_token))
                        if self.limit_size else self.limit_tokens)
        if self.limit_tokens:
            while self.states and self.n_tokens() > limit_tokens:
                self.states.pop(0)
        log.debug(" - cache state: %d prompts, %.3f MiB (limits: %.3f MiB, %d tokens, %d est)",
                  len(self.states), self.size() / MIB, self.limit_size / MIB,
                  self.limit_tokens, limit_tokens)

    def clear(self) -> None:
        self.states.clear()
