"""The host side of the paged KV cache: which pages of the pool each slot owns.

A free list of page numbers and, per slot, the pages holding its positions in order; the block
table (``[slots, max_pages]``, the device copy in ``PagedKVCache.block_table``) is that list
padded with page 0, the scratch page no slot owns. Pages are taken as a slot's sequence grows
(before the step that writes them) and given back when it shrinks (rewind, reset), so the
pool's occupancy follows the live tokens. A pool too small for what is asked raises one
``PagePoolError`` (a ContextError) saying so, before any device work and before the slot
changes (a caller may free pages elsewhere and try again).
"""

from __future__ import annotations

import numpy as np

from jllama.errors import ContextError, PagePoolError


class PageAllocator:
    def __init__(self, n_slots: int, max_pages: int, n_pages: int, page_size: int):
        if n_pages < 2:
            raise ContextError(f"a page pool needs at least 2 pages (page 0 is scratch), "
                               f"got {n_pages}")
        self.page_size = int(page_size)
        self.n_pages = int(n_pages)
        self.max_pages = int(max_pages)
        # low page numbers first (pop from the end)
        self.free = list(range(self.n_pages - 1, 0, -1))
        self.owned: list[list[int]] = [[] for _ in range(n_slots)]
        self.table = np.zeros((n_slots, self.max_pages), np.int32)
        self.dirty = True  # the device copy is stale

    def pages_for(self, n_tokens: int) -> int:
        return -(-int(n_tokens) // self.page_size)

    def ensure(self, slot: int, n_tokens: int) -> None:
        """Own enough pages for positions 0 .. n_tokens - 1 (capped at the table's width)."""
        want = min(self.pages_for(n_tokens), self.max_pages)
        own = self.owned[slot]
        short = want - len(own)
        if short <= 0:
            return
        if short > len(self.free):
            raise PagePoolError(
                f"KV page pool exhausted: slot {slot} needs {short} more page(s) of "
                f"{self.page_size} tokens, {len(self.free)} free of {self.n_pages - 1} "
                f"(raise the pool size, kv_pages, or serve fewer/shorter sequences)")
        for _ in range(short):
            page = self.free.pop()
            self.table[slot, len(own)] = page
            own.append(page)
        self.dirty = True

    def trim(self, slot: int, n_tokens: int) -> None:
        """Give back the pages past position n_tokens - 1."""
        keep = self.pages_for(n_tokens)
        own = self.owned[slot]
        if len(own) <= keep:
            return
        self.free.extend(reversed(own[keep:]))
        del own[keep:]
        self.table[slot, keep:] = 0
        self.dirty = True

    @property
    def used(self) -> int:
        return sum(len(o) for o in self.owned)
